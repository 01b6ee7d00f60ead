"""The Kimi K2 mixture-of-experts block (digest §1.1, "MoE router"; DeepSeek-V3 `noaux_tc` routing).

  s      = sigmoid(x W_gate)                       (f32)
  choice = s + e_score_correction_bias             (the bias only selects; optional group-limited routing)
  idx    = top_k(choice);  w = s[idx] / sum(s[idx]) * routed_scaling_factor
  y      = sum_k w_k SwiGLU_{idx_k}(x) + SharedExpert(x)

The correction bias lives in the `moe_state` collection and is moved outside the gradient by the DeepSeek-V3
sign rule (`update_correction_bias`). Expert compute has four interchangeable dispatches with equal results:
  ragged   sort assignments by expert + `jax.lax.ragged_dot` (the TPU/GPU path; dropless)
  blocked  sort into expert groups padded to `moe_block_size` rows, then whole-expert matmuls over chunks of up to
           `moe_max_block_size` rows in loops that visit only the chunks present (`k25jax.model.grouped`; dropless;
           the CPU path, where ragged_dot is slow)
  dense    every expert on every token, combined by the routing weights (simple reference; E/k times the FLOPs)
  ep       expert parallelism over the `expert` mesh axis in `jax.shard_map`: tokens are all-gathered along the
           axis, each device runs its local experts (ragged), and outputs are reduce-scattered back (dropless).
  cpu_kernel  one XLA:CPU custom call that groups rows by expert and runs only the routed work
           (`k25jax.kernels.routed_experts_cpu`; forward only, float32: the decode steps of generation on CPU) on
           tile-packed weights (`prepare_experts`)
Under a mesh, `ragged`, `blocked` and `dense` run data-locally (`_data_local`): each device routes its own tokens
with the expert weights gathered, split over `tensor` on the expert width, as MaxText's sparse matmul does; a
global sort would replicate the whole batch's expert work on every device.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from k25jax.kernels import routed_experts_cpu
from k25jax.model import grouped
from k25jax.model.layers import SwiGLU, dtype_of, swiglu
from k25jax.sharding import BATCH_AXES

DISPATCHES = ("ragged", "blocked", "dense", "ep", "cpu_kernel")


# ----------------------------------------------------------------------------------------------- routing
def route(scores: jax.Array, bias: jax.Array, m: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """Top-k expert ids and weights from sigmoid scores [T, E] (f32) and the correction bias [E]."""
  e, k = scores.shape[-1], m.num_experts_per_tok
  choice = scores + bias
  if m.n_group > 1:
    grouped = choice.reshape(-1, m.n_group, e // m.n_group)
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)                          # [T, n_group]
    _, top_groups = jax.lax.top_k(group_scores, m.topk_group)
    group_mask = jnp.zeros_like(group_scores).at[jnp.arange(group_scores.shape[0])[:, None], top_groups].set(1)
    expert_mask = jnp.repeat(group_mask, e // m.n_group, axis=-1) > 0
    choice = jnp.where(expert_mask, choice, 0.0)   # as the reference: masked experts score 0, not -inf
  _, idx = jax.lax.top_k(choice, k)
  w = jnp.take_along_axis(scores, idx, axis=-1)
  if m.norm_topk_prob:
    w = w / (w.sum(-1, keepdims=True) + 1e-20)
  return idx.astype(jnp.int32), w * m.routed_scaling_factor


def update_correction_bias(bias: jax.Array, load: jax.Array, speed: float) -> jax.Array:
  """DeepSeek-V3 aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones.

  bias, load: [..., E] (stacked over layers). Applied outside the gradient after each step.
  """
  mean = jnp.mean(load, axis=-1, keepdims=True)
  return bias + speed * jnp.sign(mean - load).astype(bias.dtype)


def sequence_aux_loss(scores: jax.Array, idx: jax.Array, valid: jax.Array, k: int) -> jax.Array:
  """DeepSeek-V3 complementary sequence-wise balance loss sum_i f_i P_i, averaged over rows.

  scores [B, L, E] sigmoid scores, idx [B, L, k], valid [B, L]. f_i = E/(k L) * (#tokens choosing i),
  P_i = mean over tokens of the scores normalised over experts.
  """
  e = scores.shape[-1]
  v = valid.astype(jnp.float32)
  n = jnp.maximum(v.sum(-1), 1.0)                                                   # [B]
  counts = (jax.nn.one_hot(idx, e, dtype=jnp.float32).sum(-2) * v[..., None]).sum(1)  # [B, E]
  f = counts * e / (k * n[:, None])
  p = ((scores / scores.sum(-1, keepdims=True)) * v[..., None]).sum(1) / n[:, None]
  return jnp.mean(jnp.sum(f * p, axis=-1))


# ----------------------------------------------------------------------------------------------- dispatch
def _sort_assignments(idx: jax.Array, num_groups: int):
  """Stable sort of the T*k (token, expert) assignments by expert; returns order, token ids, group sizes."""
  flat = idx.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  token_of = order // idx.shape[1]
  sizes = jnp.bincount(flat, length=num_groups).astype(jnp.int32)
  return order, token_of, flat[order], sizes


def _combine(out_sorted: jax.Array, order: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
  """Un-sorts expert outputs [T*k, D] and sums them per token with routing weights w [T, k] (f32)."""
  t, k = w.shape
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  out = out_sorted[inverse].reshape(t, k, -1)
  return jnp.einsum("tkd,tk->td", out.astype(jnp.float32), w).astype(out_dtype)


def ragged_ffn(xs: jax.Array, sizes: jax.Array, wg, wu, wd) -> jax.Array:
  """Grouped SwiGLU on rows sorted by expert: `jax.lax.ragged_dot` per projection."""
  g = jax.lax.ragged_dot(xs, wg, sizes)
  u = jax.lax.ragged_dot(xs, wu, sizes)
  return jax.lax.ragged_dot(swiglu(g, u).astype(xs.dtype), wd, sizes)


def dispatch_ragged(x, idx, w, wg, wu, wd):
  order, token_of, _, sizes = _sort_assignments(idx, wg.shape[0])
  return _combine(ragged_ffn(x[token_of], sizes, wg, wu, wd), order, w, x.dtype)


def dispatch_blocked(x, idx, w, wg, wu, wd, block: int, max_block: int):
  """Dropless grouped matmuls over expert-sorted rows (`k25jax.model.grouped`): each expert's group padded to
  `block` rows, computed in whole-expert chunks of up to `max_block` rows, only the chunks present."""
  return grouped.grouped_moe(x, idx, w, wg, wu, wd, block=block, max_block=max_block)


def dispatch_dense(x, idx, w, wg, wu, wd):
  """Every expert on every token; the routing weight (0 for unchosen experts) scales the SwiGLU activations
  before the down projection, which is linear, so the combine is one [T, E*F] x [E*F, D] contraction. Reads each
  weight once: the fastest path when tokens * top-k >= experts (decode steps, `k25jax.sample.engine`)."""
  t, e = x.shape[0], wg.shape[0]
  comb = jnp.zeros((e, t), jnp.float32).at[idx, jnp.arange(t)[:, None]].add(w)
  xe = jnp.broadcast_to(x, (e, *x.shape))
  h = swiglu(jnp.einsum("etd,edf->etf", xe, wg), jnp.einsum("etd,edf->etf", xe, wu))
  h = (h.astype(jnp.float32) * comb[..., None]).astype(x.dtype)
  return jnp.einsum("etf,efd->td", h, wd, preferred_element_type=jnp.float32).astype(x.dtype)


def dispatch_ep(x, idx, w, wg, wu, wd):
  """Expert parallelism (needs a mesh in context, `jax.set_mesh`): all-gather tokens over `expert`, run the
  local experts on the rows routed to them, reduce-scatter the partial outputs back (+ psum over `tensor`)."""

  def local(x, idx, w, wg, wu, wd):
    xg = jax.lax.all_gather(x, "expert", axis=0, tiled=True)
    ig = jax.lax.all_gather(idx, "expert", axis=0, tiled=True)
    wgt = jax.lax.all_gather(w, "expert", axis=0, tiled=True)
    e_local = wg.shape[0]
    lid = ig - jax.lax.axis_index("expert") * e_local
    is_local = (lid >= 0) & (lid < e_local)
    key = jnp.where(is_local, lid, e_local)                    # foreign assignments sort last, outside groups
    order, token_of, _, sizes = _sort_assignments(key, e_local + 1)
    out = ragged_ffn(xg[token_of], sizes[:e_local], wg, wu, wd)
    out = jnp.where(is_local.reshape(-1)[order][:, None], out, 0)
    y = _combine(out, order, jnp.where(is_local, wgt, 0.0), x.dtype)
    y = jax.lax.psum_scatter(y, "expert", scatter_dimension=0, tiled=True)
    return jax.lax.psum(y, "tensor")

  tok = P(BATCH_AXES, None)
  return jax.shard_map(
      local, in_specs=(tok, tok, tok, P("expert", None, "tensor"), P("expert", None, "tensor"),
                       P("expert", "tensor", None)),
      out_specs=tok, check_vma=False)(x, idx, w, wg, wu, wd)


def resolve_dispatch(name: str) -> str:
  """`auto`: expert parallelism when the context mesh has an expert axis > 1, else blocked on CPU, ragged on
  accelerators."""
  if name != "auto":
    return name
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and dict(mesh.shape).get("expert", 1) > 1:
    return "ep"
  return "blocked" if jax.default_backend() == "cpu" else "ragged"


def route_local(scores: jax.Array, bias: jax.Array, m: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """`route` on each device's own rows (`jax.shard_map` over the batch axes). XLA's SPMD partitioner does not
  split top-k over a sharded row dimension: under GSPMD it all-gathers every MoE layer's scores and routes the
  whole batch on every device (one collective per layer and decode step). Without a context mesh, or on one
  device, it is `route` itself."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return route(scores, bias, m)
  tok = P(BATCH_AXES, None)
  return jax.shard_map(functools.partial(route, m=m), in_specs=(tok, P()), out_specs=(tok, tok))(scores, bias)


# Expert weights split over `tensor` on the expert width: as stored ([E, D, F], [E, F, D]) and tile-packed for
# the `cpu_kernel` dispatch ([E, ceil(F / TILE), D, TILE], [E, ceil(D / TILE), F, TILE]).
_EXPERT_SPECS = (P(None, None, "tensor"), P(None, None, "tensor"), P(None, "tensor", None))
_PACKED_SPECS = (P(None, "tensor", None, None), P(None, "tensor", None, None), P(None, None, "tensor", None))


def _data_local(fn: Callable, weight_specs: tuple = _EXPERT_SPECS) -> Callable:
  """Runs a token-local dispatch on each device's own tokens (`jax.shard_map` over the batch axes) with the expert
  weights gathered and split over `tensor` on the expert width (the partial outputs are summed over `tensor`).
  Without a context mesh, or on one device, it is `fn` itself."""

  def run(x, idx, w, wg, wu, wd):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
      return fn(x, idx, w, wg, wu, wd)
    tok = P(BATCH_AXES, None)
    local = (lambda *a: jax.lax.psum(fn(*a), "tensor")) if dict(mesh.shape).get("tensor", 1) > 1 else fn
    return jax.shard_map(local, in_specs=(tok, tok, tok, *weight_specs), out_specs=tok, check_vma=False)(
        x, idx, w, wg, wu, wd)

  return run


def prepare_experts(name: str, wg: jax.Array, wu: jax.Array, wd: jax.Array) -> tuple[jax.Array, ...]:
  """The expert weights in the layout dispatch `name` reads: tile-packed for `cpu_kernel`
  (`routed_experts_cpu.pack`, each `tensor` shard of the expert width on its own), as given for the others.
  Dispatches prepare the weights at every call; a loop that runs a layer many times (the decode steps of
  `k25jax.sample.engine`) prepares them once before it and passes them to `MoE` as `experts`."""
  if resolve_dispatch(name) != "cpu_kernel" or wg.ndim == 4:
    return wg, wu, wd
  pack = lambda *ws: tuple(routed_experts_cpu.pack(a) for a in ws)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or dict(mesh.shape).get("tensor", 1) == 1:
    return pack(wg, wu, wd)
  return jax.shard_map(pack, in_specs=_EXPERT_SPECS, out_specs=_PACKED_SPECS, check_vma=False)(wg, wu, wd)


def dispatch_cpu_kernel(x, idx, w, wg, wu, wd):
  """The XLA:CPU routed-experts kernel on each device's tokens, on stored or already packed expert weights."""
  wg, wu, wd = prepare_experts("cpu_kernel", wg, wu, wd)
  return _data_local(routed_experts_cpu.routed_experts, _PACKED_SPECS)(x, idx, w, wg, wu, wd)


def get_dispatch(name: str, block: int = 64, max_block: int = 512) -> Callable:
  name = resolve_dispatch(name)
  if name in ("ep", "cpu_kernel"):
    return {"ep": dispatch_ep, "cpu_kernel": dispatch_cpu_kernel}[name]
  fn = {"ragged": dispatch_ragged, "dense": dispatch_dense,
        "blocked": functools.partial(dispatch_blocked, block=block, max_block=max_block)}[name]
  return _data_local(fn)


# ----------------------------------------------------------------------------------------------- modules
class Router(nn.Module):
  """Sigmoid router with the aux-loss-free correction bias (`moe_state` collection)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array):
    m = self.config
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(m.initializer_range),
                                                               ("embed", None)),
                        (x.shape[-1], m.n_routed_experts), dtype_of(m.param_dtype))
    bias = self.variable("moe_state", "e_score_correction_bias",
                         lambda: jnp.zeros((m.n_routed_experts,), jnp.float32)).value
    scores = jax.nn.sigmoid(jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32)))
    idx, w = route_local(scores, bias, m)
    return idx, w, scores


class MoE(nn.Module):
  """Routed experts (stacked [E, ...] weights) + shared expert(s). Returns (y, aux).

  `experts`: optional (gate, up, down) expert weights already in the dispatch's layout (`prepare_experts`); the
  stored `experts_*` parameters are then not read (nor needed)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, valid: jax.Array,
               experts: tuple[jax.Array, ...] | None = None) -> tuple[jax.Array, dict]:
    m = self.config
    b, l, d = x.shape
    e, f, dt = m.n_routed_experts, m.moe_intermediate_size, dtype_of(m.dtype)
    x2 = x.reshape(b * l, d)
    idx, w, scores = Router(m, name="gate")(x2)
    if experts is None:
      init = nn.initializers.normal(m.initializer_range)
      experts = tuple(
          self.param(f"experts_{name}", nn.with_logical_partitioning(init, names), shape,
                     dtype_of(m.param_dtype)).astype(dt)
          for name, names, shape in (("gate_proj", ("exp", "embed", "moe_mlp"), (e, d, f)),
                                     ("up_proj", ("exp", "embed", "moe_mlp"), (e, d, f)),
                                     ("down_proj", ("exp", "moe_mlp", "embed"), (e, f, d))))
    dispatch = get_dispatch(m.moe_dispatch, m.moe_block_size, m.moe_max_block_size)
    y = dispatch(x2.astype(dt), idx, w, *experts)
    y = y.reshape(b, l, d)
    if m.n_shared_experts:
      y = y + SwiGLU(f * m.n_shared_experts, m.dtype, m.param_dtype, m.initializer_range,
                     name="shared_experts")(x)
    v = valid.reshape(-1).astype(jnp.float32)
    load = jnp.zeros((e,), jnp.float32).at[idx.reshape(-1)].add(jnp.repeat(v, idx.shape[1]))
    aux = {"expert_load": load}
    if m.seq_aux_loss_alpha > 0:
      aux["aux_loss"] = m.seq_aux_loss_alpha * sequence_aux_loss(
          scores.reshape(b, l, e), idx.reshape(b, l, -1), valid, m.num_experts_per_tok)
    return nn.with_logical_constraint(y, ("batch", "length", "act_embed")), aux
