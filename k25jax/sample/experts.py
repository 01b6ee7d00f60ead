"""Routed experts for decode steps: every expert on the few decode tokens, no sparse dispatch (digest §1.1, "MoE").

At a decode step the batch is a handful of tokens. Once tokens * top-k >= experts nearly every expert is chosen
by some token, so all expert weights are read anyway, and the sparse dispatches pay extra for their sparsity:
`blocked` gathers a weight tile per row tile (on XLA:CPU a copy of ~2x the expert weights per layer and step) and
multiplies tiny tiles; `ragged_dot` is slow on CPU. Here a step instead computes, on the stored [E, D, F] /
[E, F, D] weights without moving them,

  h_e = silu(x W_gate_e) * (x W_up_e)                for every expert e   (batched matmuls over e)
  y   = sum_e sum_f comb[t, e] h_e[t, f] W_down_e[f]                      (one [T, E F] x [E F, D] matmul)

with comb[t, e] the router's weight for (t, e), 0 for unchosen experts. This equals the model's MoE routed sum
sum_k w_k SwiGLU_{idx_k}(x) (the weight moves before the linear down projection), at E / top-k times the routed
FLOPs but with every weight read once. The router (sigmoid scores, correction bias, top-k, normalisation,
scaling) and the shared expert are the model's own modules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from k25jax.model.layers import SwiGLU, dtype_of
from k25jax.model.moe import Router, resolve_dispatch


def use_dense_decode(m: ml_collections.ConfigDict, tokens: int) -> bool:
  """Whether decode steps of `tokens` tokens run `routed_dense`: when the config's dispatch is a single-device
  CPU one (`blocked`/`dense`; `ragged` and expert-parallel `ep` keep the model's dispatch) and tokens * top-k
  >= experts, i.e. the step touches about every expert's weights anyway. Needs the mesh in context (`auto`)."""
  return (resolve_dispatch(m.moe_dispatch) in ("blocked", "dense")
          and tokens * m.num_experts_per_tok >= m.n_routed_experts)


def routed_dense(x: jax.Array, idx: jax.Array, w: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array
                 ) -> jax.Array:
  """Routed-expert output [T, D] in x's dtype (module docstring). x [T, D]; idx, w [T, k] from the router
  (w f32); wg, wu [E, D, F], wd [E, F, D] (the MoE's `experts_*`)."""
  t, (e, d, _) = x.shape[0], wg.shape
  comb = jnp.zeros((e, t), jnp.float32).at[idx, jnp.arange(t)[:, None]].add(w)
  xe = jnp.broadcast_to(x, (e, t, d))
  h = jax.nn.silu(jnp.einsum("etd,edf->etf", xe, wg)) * jnp.einsum("etd,edf->etf", xe, wu)
  h = (h.astype(jnp.float32) * comb[..., None]).astype(x.dtype)
  return jnp.einsum("etf,efd->td", h, wd, preferred_element_type=jnp.float32).astype(x.dtype)


def moe_decode(m: ml_collections.ConfigDict, mlp: dict, state: dict, x: jax.Array) -> jax.Array:
  """`MoE(m)` on tokens x [B, L, D] (`mlp` / `state`: its params / moe_state): the model's router and shared
  expert, routed experts by `routed_dense`."""
  b, l, d = x.shape
  dt = dtype_of(m.dtype)
  x2 = x.reshape(b * l, d)
  idx, w, _ = Router(m).apply({"params": mlp["gate"], "moe_state": state["gate"]}, x2)
  wg, wu, wd = (mlp[f"experts_{n}"].astype(dt) for n in ("gate_proj", "up_proj", "down_proj"))
  y = routed_dense(x2.astype(dt), idx, w, wg, wu, wd).reshape(b, l, d)
  if m.n_shared_experts:
    y = y + SwiGLU(m.moe_intermediate_size * m.n_shared_experts, m.dtype, m.param_dtype,
                   m.initializer_range).apply({"params": mlp["shared_experts"]}, x)
  return y
