"""Grouped expert FFN for the `blocked` MoE dispatch: dropless, computing only the rows each expert received.

The T*k (token, expert) assignments are sorted by expert into slots; each expert's group is padded to a whole
number of `block` rows (less than `block` padding per expert, nothing dropped). The SwiGLU expert FFN
(digest §1.1, "MoE router": y = SwiGLU_e(x)) then runs over every group in chunks of block * 2^j rows, largest
first up to `max_block`: a group of 1344 rows at block 64, max 512 is two chunks of 512, one of 256 and one of 64.
Each chunk size is one `lax.fori_loop` whose trip count is the number of chunks present in this batch, and each
iteration is one whole-expert matmul on contiguous rows with the expert's weights read in place. So shapes stay
static while the work follows the routing: the loops skip the empty tiles a static tile bound would compute, no
per-tile copy of the weights is made, and most rows go through large matmuls, which XLA:CPU runs near its peak
(a 512-row tile of the `small` model runs ~2x faster per row than a 64-row one on this machine).

The routing weight of each slot scales its activations before the down projection (linear, so this equals
weighting the expert's output), and a token's output is then the plain sum of its k slots. The backward is written
out (`jax.custom_vjp`): it keeps only the slot rows, their routing weights and the gate/up pre-activations,
recomputes nothing, accumulates the weight gradients per chunk in f32, and moves rows between token order and
slot order with gathers in both directions (no scatter-add).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Layout(NamedTuple):
  """Where each assignment sits among the expert-sorted, block-padded slots."""
  dest: jax.Array       # [T*k] slot of each assignment (token-major order)
  slot_src: jax.Array   # [S] assignment held by each slot; T*k marks a padding slot
  sizes: jax.Array      # [E] assignments per expert
  offsets: jax.Array    # [E] first slot of each expert's group
  padded: jax.Array     # [E] group length rounded up to whole blocks


def num_slots(rows: int, experts: int, block: int) -> int:
  """Static slot bound: every group padded to whole blocks (< block padding each)."""
  return -(-(rows + experts * (block - 1)) // block) * block


def chunk_sizes(block: int, max_block: int) -> tuple[int, ...]:
  """block * 2^j for j >= 0 up to max_block (at least `block`), largest first."""
  sizes = [block]
  while sizes[-1] * 2 <= max_block:
    sizes.append(sizes[-1] * 2)
  return tuple(reversed(sizes))


def layout(idx: jax.Array, experts: int, block: int) -> Layout:
  """Sorts the assignments idx [T, k] by expert into block-padded groups."""
  rows = idx.size
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  sorted_exp = flat[order]
  sizes = jnp.bincount(flat, length=experts).astype(jnp.int32)
  padded = (sizes + block - 1) // block * block
  offsets = jnp.cumsum(padded) - padded
  rank = jnp.arange(rows, dtype=jnp.int32) - (jnp.cumsum(sizes) - sizes)[sorted_exp]
  dest_sorted = offsets[sorted_exp] + rank
  slot_src = jnp.full((num_slots(rows, experts, block),), rows, jnp.int32).at[dest_sorted].set(order)
  dest = jnp.zeros((rows,), jnp.int32).at[order].set(dest_sorted)
  return Layout(dest, slot_src, sizes, offsets, padded)


def chunk_plan(lay: Layout, rows: int, sizes: tuple[int, ...]) -> tuple[tuple[jax.Array, jax.Array, jax.Array], ...]:
  """Per chunk size (largest first): (start slot [n], expert [n], count) of the chunks that cover the groups.

  The largest size tiles each group from its start; the remainder (< largest) is covered by at most one chunk of
  each smaller size, as the binary digits of remainder / block.
  """
  e = lay.sizes.shape[0]
  big = sizes[0]
  per_expert = lay.padded // big
  ends = jnp.cumsum(per_expert)
  n_big = max(1, num_slots(rows, e, sizes[-1]) // big)
  i = jnp.arange(n_big, dtype=jnp.int32)
  expert = jnp.minimum(jnp.searchsorted(ends, i, side="right"), e - 1).astype(jnp.int32)
  plans = [(lay.offsets[expert] + (i - (ends - per_expert)[expert]) * big, expert, ends[-1])]
  cursor, rest = lay.offsets + per_expert * big, lay.padded - per_expert * big
  for size in sizes[1:]:
    take = rest >= size
    experts = jnp.argsort(~take, stable=True).astype(jnp.int32)     # experts holding a chunk of this size first
    plans.append((cursor[experts], experts, jnp.sum(take, dtype=jnp.int32)))
    cursor, rest = cursor + take * size, rest - take * size
  return tuple(plans)


# --------------------------------------------------------------------------------------------- row movement
# to_slots and to_tokens are each other's transpose, so each one's VJP is the other: gathers both ways.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def to_slots(x: jax.Array, slot_src: jax.Array, dest: jax.Array, k: int) -> jax.Array:
  """Token rows x [T, D] -> slot rows [S, D]: each slot holds its assignment's token row (padding slots 0)."""
  padded = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
  return padded[jnp.minimum(slot_src // k, x.shape[0])]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def to_tokens(ys: jax.Array, slot_src: jax.Array, dest: jax.Array, k: int) -> jax.Array:
  """Slot rows [S, D] -> token rows [T, D]: each token sums the slots of its k assignments (k row gathers
  added, which XLA fuses; a [T, k, D] gather then a reduction materialises k times the output)."""
  per_token = dest.reshape(-1, k)
  return functools.reduce(jnp.add, (ys[per_token[:, j]] for j in range(k)))


to_slots.defvjp(lambda x, s, d, k: (to_slots(x, s, d, k), (s, d)),
                lambda k, res, g: (to_tokens(g, *res, k), None, None))
to_tokens.defvjp(lambda y, s, d, k: (to_tokens(y, s, d, k), (s, d)),
                 lambda k, res, g: (to_slots(g, *res, k), None, None))


# --------------------------------------------------------------------------------------------- expert FFN
def _slice(a, start, size):
  return jax.lax.dynamic_slice_in_dim(a, start, size, axis=0)


def _put(a, value, start):
  return jax.lax.dynamic_update_slice_in_dim(a, value.astype(a.dtype), start, axis=0)


def _chunk_loops(sizes, plans, body, carry):
  """Runs body(size, start, expert, carry) over every chunk of every size."""
  for size, (starts, experts, count) in zip(sizes, plans):
    step = lambda i, c, size=size, starts=starts, experts=experts: body(size, starts[i], experts[i], c)
    carry = jax.lax.fori_loop(0, count, step, carry)
  return carry


def _forward(sizes, xs, rw, plans, wg, wu, wd, keep):
  empty = jnp.zeros((xs.shape[0], wg.shape[-1]), xs.dtype) if keep else None

  def body(size, start, e, carry):
    ys, gs, us = carry
    x, r = _slice(xs, start, size), _slice(rw, start, size)[:, None]
    g, u = x @ wg[e], x @ wu[e]
    ys = _put(ys, (jax.nn.silu(g) * u * r).astype(xs.dtype) @ wd[e], start)
    if keep:
      gs, us = _put(gs, g, start), _put(us, u, start)
    return ys, gs, us

  return _chunk_loops(sizes, plans, body, (jnp.zeros_like(xs), empty, empty))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def expert_ffn(sizes: tuple[int, ...], xs: jax.Array, rw: jax.Array, plans, wg: jax.Array, wu: jax.Array,
               wd: jax.Array) -> jax.Array:
  """rw[s] * SwiGLU_e(xs[s]) for every slot s of expert e's chunks (wg, wu [E, D, F], wd [E, F, D]; rw [S] f32
  routing weights, 0 on padding). The weight scales the activations before the (linear) down projection."""
  return _forward(sizes, xs, rw, plans, wg, wu, wd, keep=False)[0]


def _expert_ffn_fwd(sizes, xs, rw, plans, wg, wu, wd):
  ys, gs, us = _forward(sizes, xs, rw, plans, wg, wu, wd, keep=True)
  return ys, (xs, rw, plans, wg, wu, wd, gs, us)


def _expert_ffn_bwd(sizes, res, dys):
  xs, rw, plans, wg, wu, wd, gs, us = res
  f32 = lambda w: jnp.zeros(w.shape, jnp.float32)

  def body(size, start, e, carry):
    dxs, drw, dwg, dwu, dwd = carry
    x, g, u, dy = (_slice(a, start, size) for a in (xs, gs, us, dys))
    r = _slice(rw, start, size)[:, None]
    sig = jax.nn.sigmoid(g.astype(jnp.float32))
    h = g * sig * u                                               # the unweighted SwiGLU activations
    dhr = (dy @ wd[e].T).astype(jnp.float32)                      # d(loss)/d(r h)
    drw = _put(drw, jnp.sum(dhr * h, axis=-1), start)
    dh = dhr * r
    dg = (dh * u * sig * (1 + g * (1 - sig))).astype(xs.dtype)
    du = (dh * g * sig).astype(xs.dtype)
    acc = lambda dw, upd: dw.at[e].add(upd.astype(jnp.float32))
    dwd = acc(dwd, (h * r).astype(xs.dtype).T @ dy)
    dwg, dwu = acc(dwg, x.T @ dg), acc(dwu, x.T @ du)
    dxs = _put(dxs, dg @ wg[e].T + du @ wu[e].T, start)
    return dxs, drw, dwg, dwu, dwd

  carry = (jnp.zeros_like(xs), jnp.zeros_like(rw), f32(wg), f32(wu), f32(wd))
  dxs, drw, dwg, dwu, dwd = _chunk_loops(sizes, plans, body, carry)
  return dxs, drw, None, dwg.astype(wg.dtype), dwu.astype(wu.dtype), dwd.astype(wd.dtype)


expert_ffn.defvjp(_expert_ffn_fwd, _expert_ffn_bwd)


def grouped_moe(x: jax.Array, idx: jax.Array, w: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array, *,
                block: int, max_block: int) -> jax.Array:
  """sum_k w[t, k] SwiGLU_{idx[t, k]}(x[t]) for x [T, D], idx/w [T, k] (w in f32), dropless."""
  t, k = idx.shape
  sizes = chunk_sizes(block, min(max_block, num_slots(t * k, wg.shape[0], block)))
  lay = layout(idx, wg.shape[0], block)
  plans = chunk_plan(lay, t * k, sizes)
  rw = jnp.concatenate([w.reshape(-1).astype(jnp.float32), jnp.zeros((1,), jnp.float32)])[lay.slot_src]
  ys = expert_ffn(sizes, to_slots(x, lay.slot_src, lay.dest, k), rw, plans, wg, wu, wd)
  return to_tokens(ys, lay.slot_src, lay.dest, k)
