"""Block-sparse attention within packed items for MoonViT-3D (digest §1.3 step 3, native-resolution packing).

Packed media items are contiguous runs of patches with their own id (the packing contract,
`k25jax.model.vision.check_vision_inputs`), and attention stays inside an item. Cut the sequence into blocks of
`block` patches: query block i needs exactly the key blocks from the run start of its first item to the run end
of its last one. Those (query block, key block) pairs are listed on the device (their count is data-dependent, at
most blocks^2) and visited one by one in a `lax.fori_loop` with an online softmax (flash attention), so the work
follows the items actually packed: a pack of small images costs about one block pair per block instead of the
[P, P] logits of a dense mask, and no bound on the item size is needed.

The backward pass is flash attention's (`jax.custom_vjp`): it keeps the output and the log-sum-exp per query,
recomputes each pair's probabilities, and accumulates dq, dk, dv over the same pair list.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def block_pairs(ids: jax.Array, block: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(query block [N], key block [N], count) of the pairs that share an item; ids [P] with P % block == 0.

  Pairs of one query block are consecutive; entries past `count` are padding (N = (P / block)^2).
  """
  p = ids.shape[0]
  nb = p // block
  pos = jnp.arange(p, dtype=jnp.int32)
  first = ids != jnp.concatenate([jnp.full((1,), -1, ids.dtype), ids[:-1]])
  last = ids != jnp.concatenate([ids[1:], jnp.full((1,), -1, ids.dtype)])
  run_start = jax.lax.cummax(jnp.where(first, pos, 0))
  run_end = jax.lax.cummin(jnp.where(last, pos, p - 1), reverse=True)
  valid = ids > 0
  lo = jnp.min(jnp.where(valid, run_start, p).reshape(nb, block), axis=1) // block
  hi = jnp.max(jnp.where(valid, run_end, -1).reshape(nb, block), axis=1) // block
  n = jnp.maximum(hi - lo + 1, 0)
  ends = jnp.cumsum(n)
  i = jnp.arange(nb * nb, dtype=jnp.int32)
  qb = jnp.minimum(jnp.searchsorted(ends, i, side="right"), nb - 1).astype(jnp.int32)
  return qb, (lo[qb] + i - (ends - n)[qb]).astype(jnp.int32), ends[-1].astype(jnp.int32)


def _varying_like(x: jax.Array, *arrays):
  """Inside `shard_map`, loop carries must vary over the same mesh axes as the data (DEP phase 1/3)."""
  vma = tuple(sorted(jax.typeof(x).manual_axis_type.varying))
  return jax.lax.pcast(arrays, vma, to="varying") if vma else arrays


def _pair_blocks(i, pairs, block, q, k, v, ids):
  qb, kb, _ = pairs
  qs, ks = qb[i] * block, kb[i] * block
  take = lambda a, s: jax.lax.dynamic_slice_in_dim(a, s, block, axis=0)
  return qs, ks, take(q, qs), take(k, ks), take(v, ks), take(ids, qs), take(ids, ks)


def _scores(qi, ki, iq, ik, scale):
  """Masked logits [H, bq, bk] (f32, -inf off-item) and the mask [bq, bk]."""
  mask = (iq[:, None] == ik[None, :]) & (ik[None, :] > 0)
  s = jnp.einsum("qhd,khd->hqk", qi, ki, preferred_element_type=jnp.float32) * scale
  return jnp.where(mask[None], s, -jnp.inf), mask


def _forward(q, k, v, ids, block, pairs):
  p, heads, hd = q.shape
  scale = hd ** -0.5
  acc, m, l = _varying_like(q, jnp.zeros((p, heads, hd), jnp.float32), jnp.full((heads, p), -jnp.inf),
                            jnp.zeros((heads, p), jnp.float32))

  def body(i, carry):
    acc, m, l = carry
    qs, _, qi, ki, vi, iq, ik = _pair_blocks(i, pairs, block, q, k, v, ids)
    s, _ = _scores(qi, ki, iq, ik, scale)
    m_old = jax.lax.dynamic_slice_in_dim(m, qs, block, axis=1)
    m_new = jnp.maximum(m_old, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    e = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m_old - m_safe)
    l_blk = alpha * jax.lax.dynamic_slice_in_dim(l, qs, block, axis=1) + jnp.sum(e, axis=-1)
    pv = jnp.einsum("hqk,khd->qhd", e.astype(v.dtype), vi, preferred_element_type=jnp.float32)
    acc_blk = alpha.T[:, :, None] * jax.lax.dynamic_slice_in_dim(acc, qs, block, axis=0) + pv
    return (jax.lax.dynamic_update_slice_in_dim(acc, acc_blk, qs, axis=0),
            jax.lax.dynamic_update_slice_in_dim(m, m_new, qs, axis=1),
            jax.lax.dynamic_update_slice_in_dim(l, l_blk, qs, axis=1))

  acc, m, l = jax.lax.fori_loop(0, pairs[2], body, (acc, m, l))
  has = l > 0
  out = acc / jnp.where(has, l, 1.0).T[:, :, None]
  lse = jnp.where(has, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(has, l, 1.0)), 0.0)
  return out.astype(v.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, ids, block):
  return _forward(q, k, v, ids, block, block_pairs(ids, block))[0]


def _attention_fwd(q, k, v, ids, block):
  pairs = block_pairs(ids, block)
  out, lse = _forward(q, k, v, ids, block, pairs)
  return out, (q, k, v, ids, pairs, out, lse)


def _attention_bwd(block, res, dout):
  q, k, v, ids, pairs, out, lse = res
  scale = q.shape[-1] ** -0.5
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1).T      # [H, P]
  grads = _varying_like(q, *(jnp.zeros(a.shape, jnp.float32) for a in (q, k, v)))

  def body(i, carry):
    dq, dk, dv = carry
    qs, ks, qi, ki, vi, iq, ik = _pair_blocks(i, pairs, block, q, k, v, ids)
    s, mask = _scores(qi, ki, iq, ik, scale)
    lse_q = jax.lax.dynamic_slice_in_dim(lse, qs, block, axis=1)
    prob = jnp.where(mask[None], jnp.exp(s - lse_q[..., None]), 0.0)
    do = jax.lax.dynamic_slice_in_dim(dout, qs, block, axis=0)
    dp = jnp.einsum("qhd,khd->hqk", do, vi, preferred_element_type=jnp.float32)
    ds = prob * (dp - jax.lax.dynamic_slice_in_dim(delta, qs, block, axis=1)[..., None]) * scale
    add = lambda a, upd, s: jax.lax.dynamic_update_slice_in_dim(
        a, jax.lax.dynamic_slice_in_dim(a, s, block, axis=0) + upd, s, axis=0)
    dv = add(dv, jnp.einsum("hqk,qhd->khd", prob.astype(do.dtype), do, preferred_element_type=jnp.float32), ks)
    dq = add(dq, jnp.einsum("hqk,khd->qhd", ds.astype(ki.dtype), ki, preferred_element_type=jnp.float32), qs)
    dk = add(dk, jnp.einsum("hqk,qhd->khd", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32), ks)
    return dq, dk, dv

  dq, dk, dv = jax.lax.fori_loop(0, pairs[2], body, grads)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_attention(q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array, block: int) -> jax.Array:
  """Attention of each patch to the patches of its own item: q, k, v [P, heads, hd], ids [P] (0 = padding,
  items contiguous). Padding rows give zeros. Returns [P, heads, hd] in v's dtype."""
  p = q.shape[0]
  block = min(block, p)
  pad = -p % block
  if pad:
    q, k, v = (jnp.pad(a, ((0, pad), (0, 0), (0, 0))) for a in (q, k, v))
    ids = jnp.pad(ids, (0, pad))
  return _attention(q, k, v, ids.astype(jnp.int32), block)[:p]
