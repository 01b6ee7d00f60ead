"""QK-Clip for MLA, per head (digest §8, Algorithm 1 step 2; MLA mapping to the released tensors).

After the optimizer update, for each attention layer l and head h whose forward-pass maximum logit
S = max_logits[l, h] exceeds tau, with gamma = tau / S:
  q_b_proj (or q_proj) columns of head h: q_nope part * sqrt(gamma), q_rope part * gamma;
  kv_b_proj columns of head h: k_nope part * sqrt(gamma), v part untouched;
  kv_a_proj_with_mqa (the shared rope key) untouched.
Both terms of the head's logits, q_nope.k_nope and q_rot.k_rot, then scale by exactly gamma, so the head's max
logit on the same batch becomes tau. Heads at or below tau keep bit-identical weights. The vision tower is not
clipped (digest §8: not stated for K2.5).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections


def _replace(tree: Mapping, keys: tuple[str, ...], fn) -> Mapping:
  """A copy of nested mapping `tree` with the subtree at `keys` replaced by fn(subtree)."""
  if not keys:
    return fn(tree)
  new = dict(tree)
  new[keys[0]] = _replace(tree[keys[0]], keys[1:], fn)
  return new if isinstance(tree, dict) else type(tree)(new)


def _scale_columns(kernel: jax.Array, scale: jax.Array) -> jax.Array:
  """kernel [..., in, out] * scale [..., out] (broadcast over `in`), in f32, back to the kernel dtype."""
  return (kernel.astype(jnp.float32) * scale[..., None, :]).astype(kernel.dtype)


def _clip_attention(attn: Mapping, gamma: jax.Array, m: ml_collections.ConfigDict) -> Mapping:
  """Rescales one (possibly layer-stacked) MLA parameter dict by per-head gamma [..., H]."""
  root = jnp.sqrt(gamma)[..., None]
  per_head = lambda parts: jnp.concatenate(parts, axis=-1).reshape(*gamma.shape[:-1], -1)
  q_scale = per_head([jnp.broadcast_to(root, (*gamma.shape, m.qk_nope_head_dim)),
                      jnp.broadcast_to(gamma[..., None], (*gamma.shape, m.qk_rope_head_dim))])
  kv_scale = per_head([jnp.broadcast_to(root, (*gamma.shape, m.qk_nope_head_dim)),
                       jnp.ones((*gamma.shape, m.v_head_dim), jnp.float32)])
  q_name = "q_b_proj" if "q_b_proj" in attn else "q_proj"
  attn = _replace(attn, (q_name, "kernel"), lambda w: _scale_columns(w, q_scale))
  return _replace(attn, ("kv_b_proj", "kernel"), lambda w: _scale_columns(w, kv_scale))


def qk_clip(params: Mapping, max_logits: jax.Array, config: ml_collections.ConfigDict, *, tau: float,
            mtp_max_logits: jax.Array | None = None) -> tuple[Mapping, dict[str, jax.Array]]:
  """K2's per-head QK-Clip (digest §8). Pure and jit-able; `tau` is a static float > 0.

  params: the `K2LM` params, or the multimodal tree with the LM under `language_model`.
  max_logits: [num_hidden_layers, H] f32 from the forward pass (aux["max_logits"]: dense layers, then MoE layers).
  mtp_max_logits: [H] (aux["mtp_max_logits"]), required when the params hold an MTP layer.
  Returns (params, metrics) with metrics `qk_clip_fraction` (clipped heads / all heads) and `max_logit`.
  """
  if not tau > 0:
    raise ValueError(f"qk_clip: tau={tau} must be > 0; QK-Clip is disabled by config.optim.qk_clip_tau=0, in which "
                     "case do not call qk_clip")
  if "model" not in config:
    raise ValueError("qk_clip: pass the full config (with a `model` group), not config.model")
  m = config.model
  prefix = ("language_model",) if "language_model" in params else ()
  lm = params[prefix[0]] if prefix else params
  n, h, n_dense = m.num_hidden_layers, m.num_attention_heads, m.first_k_dense_replace
  if tuple(max_logits.shape) != (n, h):
    raise ValueError(f"qk_clip: max_logits has shape {tuple(max_logits.shape)}; expected (num_hidden_layers, "
                     f"num_attention_heads) = ({n}, {h}), i.e. aux['max_logits'] of this model")
  groups = [(("dense_layers", "self_attn"), max_logits[:n_dense]),
            (("moe_layers", "self_attn"), max_logits[n_dense:])]
  groups = [(keys, s) for keys, s in groups if s.shape[0]]
  if "mtp" in lm:
    if mtp_max_logits is None or tuple(mtp_max_logits.shape) != (h,):
      raise ValueError(f"qk_clip: the params hold an MTP layer, so pass mtp_max_logits of shape ({h},) "
                       f"(aux['mtp_max_logits']); got {None if mtp_max_logits is None else mtp_max_logits.shape}")
    groups.append((("mtp", "block", "self_attn"), mtp_max_logits))
  for keys, _ in groups:
    sub = lm
    for k in keys:
      if k not in sub:
        raise ValueError(f"qk_clip: params have no {'/'.join(prefix + keys)}; they do not match config.model "
                         f"(first_k_dense_replace={n_dense}, num_hidden_layers={n})")
      sub = sub[k]
  for keys, s in groups:
    s = s.astype(jnp.float32)
    gamma = jnp.where(s > tau, tau / s, 1.0)
    lm = _replace(lm, keys, lambda attn, g=gamma: _clip_attention(attn, g, m))
  all_s = jnp.concatenate([s.reshape(-1).astype(jnp.float32) for _, s in groups])
  metrics = {"qk_clip_fraction": jnp.mean((all_s > tau).astype(jnp.float32)), "max_logit": jnp.max(all_s)}
  params = _replace(params, prefix, lambda _: lm) if prefix else lm
  return params, metrics
