"""Multi-head Latent Attention as DeepSeek-V3 / Kimi K2 compute it (digest §1.1, "MLA forward pass").

  q      = q_b_proj(RMSNorm(q_a_proj(x)))            -> per head [nope | rope]
  ckv    = kv_a_proj_with_mqa(x)                     -> [kv_lora | rope]; the rope key is shared by all heads
  kv     = kv_b_proj(RMSNorm(c_kv))                  -> per head [k_nope | v]
  logits = (q_nope.k_nope + rope(q_rot).rope(k_rot)) * softmax_scale

Besides the output, the layer returns the per-head maximum pre-softmax logit over valid (unmasked) pairs, the
S_max^h that QK-Clip needs (digest §8); computing it does not change the output.

Training rows are slot-causal: packing places each segment's tokens in position order, so no query attends a key in
a later slot. With `attention_q_block` = b > 0 the queries are split into blocks of b slots and block i attends only
the keys of slots [0, (i+1) b): the pairs skipped are all masked, so outputs and max logits are unchanged, and
about (n - 1) / 2n of the attention work is skipped for n blocks (e.g. 25% at n = 2).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from k25jax.model import rope
from k25jax.model.layers import Linear, RMSNorm, dtype_of

NEG_INF = -1e30
# The latent norms (q_a_layernorm, kv_a_layernorm) use eps 1e-6 whatever `rms_norm_eps` says, as the DeepSeek-V3
# reference and transformers' DeepseekV3Attention build them; only the decoder-level norms use `rms_norm_eps`.
LATENT_NORM_EPS = 1e-6


def attention_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array, q_positions: jax.Array,
                   kv_positions: jax.Array) -> jax.Array:
  """[B, Lq, Lk] bool: same packed segment (id 0 = padding) and causal by position within it."""
  same = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] > 0)
  return same & (kv_positions[:, None, :] <= q_positions[:, :, None])


def _heads_first(a: jax.Array) -> jax.Array:
  """[B, L, H, D] <-> [B, H, L, D]: attention as plain batched matmuls."""
  return a.transpose(0, 2, 1, 3)


def _attend_fwd(q_nope, q_rot, k_nope, k_rot, v, mask, scale):
  logits = (jnp.einsum("bhqd,bhkd->bhqk", _heads_first(q_nope), _heads_first(k_nope),
                       preferred_element_type=jnp.float32)
            + jnp.einsum("bhqr,bkr->bhqk", _heads_first(q_rot), k_rot, preferred_element_type=jnp.float32)) * scale
  logits = jnp.where(mask[:, None, :, :], logits, NEG_INF)
  # Softmax with the normalisation deferred past the value product: one row max (shared with QK-Clip's statistic;
  # the shift cancels), and the division on [.., Dv] outputs rather than [.., Lk] probabilities.
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  p = jnp.exp(logits - row_max)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  out = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), _heads_first(v), preferred_element_type=jnp.float32)
  out = out / denom
  result = (_heads_first(out).astype(v.dtype), jnp.max(row_max, axis=(0, 2, 3)))
  return result, (q_nope, q_rot, k_nope, k_rot, v, mask, p, denom, out)


def _attend_bwd(scale, res, cotangents):
  """Softmax attention backward (max logit: no gradient): dS = P (dP - rowsum(dO O)) on unmasked pairs, with
  P = p / denom formed once, and the four input gradients as batched matmuls."""
  q_nope, q_rot, k_nope, k_rot, v, mask, p, denom, out = res
  dout = _heads_first(cotangents[0]).astype(jnp.float32)
  probs = p / denom
  mm = lambda spec, a, b: jnp.einsum(spec, a.astype(v.dtype), b.astype(v.dtype), preferred_element_type=jnp.float32)
  dv = mm("bhqk,bhqd->bkhd", probs, dout)
  dprobs = mm("bhqd,bhkd->bhqk", dout, _heads_first(v))
  delta = jnp.sum(dout * out, axis=-1, keepdims=True)
  ds = jnp.where(mask[:, None, :, :], probs * (dprobs - delta), 0.0) * scale
  dq_nope = mm("bhqk,bhkd->bqhd", ds, _heads_first(k_nope))
  dq_rot = mm("bhqk,bkr->bqhr", ds, k_rot)
  dk_nope = mm("bhqk,bhqd->bkhd", ds, _heads_first(q_nope))
  dk_rot = mm("bhqk,bhqr->bkr", ds, _heads_first(q_rot))
  cast = lambda g, x: g.astype(x.dtype)
  return (cast(dq_nope, q_nope), cast(dq_rot, q_rot), cast(dk_nope, k_nope), cast(dk_rot, k_rot), cast(dv, v),
          None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attend(q_nope, q_rot, k_nope, k_rot, v, mask, scale):
  return _attend_fwd(q_nope, q_rot, k_nope, k_rot, v, mask, scale)[0]


_attend.defvjp(_attend_fwd, _attend_bwd)


def attend(q_nope: jax.Array, q_rot: jax.Array, k_nope: jax.Array, k_rot: jax.Array, v: jax.Array,
           mask: jax.Array, scale: float) -> tuple[jax.Array, jax.Array]:
  """Softmax attention with materialised logits (QK-Clip needs their max).

  logits = (q_nope . k_nope + q_rot . k_rot) * scale, with the rope key shared by all heads (MLA), so neither the
  per-head keys [k_nope | k_rot] nor the queries are ever concatenated. q_nope [B,Lq,H,Dn], q_rot [B,Lq,H,Dr],
  k_nope [B,Lk,H,Dn], k_rot [B,Lk,Dr], v [B,Lk,H,Dv], mask [B,Lq,Lk]. Returns (out [B,Lq,H,Dv], max_logit [H] f32).
  Softmax statistics in f32; fully masked query rows (padding) give finite garbage that losses mask out. The
  backward is written out (`_attend_bwd`, the standard softmax-attention gradient) so the [B,H,Lq,Lk] passes are
  one fused elementwise op rather than autodiff's chain through the normalisation.
  """
  out, max_logit = _attend(q_nope, q_rot, k_nope, k_rot, v, mask, float(scale))
  return out, jax.lax.stop_gradient(max_logit)


def attend_causal_blocks(q_nope: jax.Array, q_rot: jax.Array, k_nope: jax.Array, k_rot: jax.Array, v: jax.Array,
                         segment_ids: jax.Array, positions: jax.Array, scale: float, block: int
                         ) -> tuple[jax.Array, jax.Array]:
  """`attend` over query blocks of `block` slots, each against the keys up to its last slot (module doc);
  block <= 0 or >= the length is one block. Same outputs and max logits as the full masked attention on
  slot-causal rows."""
  length = q_nope.shape[1]
  block = length if block <= 0 else block
  outs, max_logit = [], None
  for start in range(0, length, block):
    end = min(start + block, length)
    mask = attention_mask(segment_ids[:, start:end], segment_ids[:, :end], positions[:, start:end],
                          positions[:, :end])
    out, mx = attend(q_nope[:, start:end], q_rot[:, start:end], k_nope[:, :end], k_rot[:, :end], v[:, :end],
                     mask, scale)
    outs.append(out)
    max_logit = mx if max_logit is None else jnp.maximum(max_logit, mx)
  return jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0], max_logit


class MLA(nn.Module):
  """Multi-head latent attention (one layer). Parameter names follow the released checkpoint."""
  config: ml_collections.ConfigDict

  def setup(self):
    m = self.config
    kw = dict(dtype=m.dtype, param_dtype=m.param_dtype, stddev=m.initializer_range)
    h, nope, rdim, vdim = m.num_attention_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    if m.q_lora_rank:
      self.q_a_proj = Linear(m.q_lora_rank, ("embed", "q_lora"), **kw)
      self.q_a_layernorm = RMSNorm(LATENT_NORM_EPS, m.dtype, m.param_dtype)
      self.q_b_proj = Linear(h * (nope + rdim), ("q_lora", "heads"), **kw)
    else:
      self.q_proj = Linear(h * (nope + rdim), ("embed", "heads"), **kw)
    self.kv_a_proj_with_mqa = Linear(m.kv_lora_rank + rdim, ("embed", "kv_lora"), **kw)
    self.kv_a_layernorm = RMSNorm(LATENT_NORM_EPS, m.dtype, m.param_dtype)
    self.kv_b_proj = Linear(h * (nope + vdim), ("kv_lora", "heads"), **kw)
    self.o_proj = Linear(m.hidden_size, ("heads", "embed"), **kw)

  def project_q(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(q_nope [B,L,H,nope], q_rot [B,L,H,rope]) with rope applied."""
    m = self.config
    q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if m.q_lora_rank else self.q_proj(x)
    q = q.reshape(*x.shape[:2], m.num_attention_heads, m.qk_nope_head_dim + m.qk_rope_head_dim)
    q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
    inv_freq, factor = rope.inv_freq_and_attention_factor(m)
    q_nope, q_rot = q[..., :m.qk_nope_head_dim], q[..., m.qk_nope_head_dim:]
    return q_nope, rope.apply_rope(q_rot, positions, inv_freq, factor)

  def project_latent(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(normed latent c_kv [B,L,kv_lora], roped shared key k_rot [B,L,rope]): what a decode cache stores."""
    m = self.config
    ckv = self.kv_a_proj_with_mqa(x)
    c, k_rot = ckv[..., :m.kv_lora_rank], ckv[..., m.kv_lora_rank:]
    inv_freq, factor = rope.inv_freq_and_attention_factor(m)
    return self.kv_a_layernorm(c), rope.apply_rope(k_rot, positions, inv_freq, factor)

  def expand_kv(self, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Latent [B,L,kv_lora] -> (k_nope [B,L,H,nope], v [B,L,H,v])."""
    m = self.config
    kv = self.kv_b_proj(c).reshape(*c.shape[:2], m.num_attention_heads, m.qk_nope_head_dim + m.v_head_dim)
    kv = nn.with_logical_constraint(kv, ("batch", "length", "act_heads", None))
    return kv[..., :m.qk_nope_head_dim], kv[..., m.qk_nope_head_dim:]

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """x [B,L,D] -> (out [B,L,D], max_logit [H])."""
    m = self.config
    q_nope, q_rot = self.project_q(x, positions)
    c, k_rot = self.project_latent(x, positions)
    k_nope, v = self.expand_kv(c)
    out, max_logit = attend_causal_blocks(q_nope, q_rot, k_nope.astype(q_nope.dtype), k_rot.astype(q_rot.dtype), v,
                                          segment_ids, positions, rope.softmax_scale(m), m.attention_q_block)
    out = out.reshape(*x.shape[:2], m.num_attention_heads * m.v_head_dim).astype(dtype_of(m.dtype))
    return self.o_proj(out), max_logit
