"""Rotary position embeddings: YaRN inverse frequencies and mscale, interleaved rotation (digest §1.1).

The released config sets `rope_interleave: true`: rotary pairs are adjacent channels (2i, 2i+1). HF rotates in
the rotate-half layout after de-interleaving q and k by the same permutation; attention scores are invariant to
that shared permutation, so rotating pairs in place gives identical logits.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq_and_attention_factor(m: ml_collections.ConfigDict) -> tuple[np.ndarray, float]:
  """Inverse frequencies [rope_dim/2] and the cos/sin multiplier (YaRN "attention_factor")."""
  dim, base = m.qk_rope_head_dim, float(m.rope_theta)
  pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  rs = m.rope_scaling
  if rs.type == "none":
    return (1.0 / pos_freqs).astype(np.float32), 1.0
  factor, orig = float(rs.factor), float(rs.original_max_position_embeddings)
  if rs.mscale and rs.mscale_all_dim:
    attention_factor = _yarn_mscale(factor, rs.mscale) / _yarn_mscale(factor, rs.mscale_all_dim)
  else:
    attention_factor = _yarn_mscale(factor)

  def correction_dim(num_rotations: float) -> float:
    return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

  low = max(math.floor(correction_dim(rs.beta_fast)), 0)
  high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
  extrapolation_weight = 1.0 - ramp
  inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
  return inv.astype(np.float32), float(attention_factor)


def softmax_scale(m: ml_collections.ConfigDict) -> float:
  """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (HF DeepseekV3Attention)."""
  scale = (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5
  rs = m.rope_scaling
  if rs.type == "yarn" and rs.mscale_all_dim:
    ms = _yarn_mscale(float(rs.factor), float(rs.mscale_all_dim))
    scale *= ms * ms
  return scale


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, attention_factor: float) -> jax.Array:
  """Rotates adjacent channel pairs of x [..., L, (H,) D] by position * inv_freq, in f32.

  positions: [B, L] int. x: [B, L, D] or [B, L, H, D].
  """
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)       # [B, L, D/2]
  if x.ndim == 4:
    angles = angles[:, :, None, :]
  cos, sin = jnp.cos(angles) * attention_factor, jnp.sin(angles) * attention_factor
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  x0, x1 = xf[..., 0], xf[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)
