"""The routed experts of an MoE layer as one XLA:CPU custom call (`routed_experts_cpu.cc`, digest §1.1).

XLA:CPU has no grouped matmul (`jax.lax.ragged_dot` lowers to a slow loop there), so its MoE dispatches trade
wasted FLOPs (`dense`: every expert on every row) against per-tile loop overhead (`blocked`). At decode steps,
with a few rows per expert, both leave most of the step to the MoE. The kernel groups each device's rows by expert
and multiplies them in register-blocked chunks, reading each chosen expert's weights once: only the routed FLOPs.

It reads expert weights tile-packed (`pack`: [E, ceil(N / TILE), K, TILE], each column tile one contiguous run),
which lets the hardware prefetchers stream them: at a decode step's few rows per expert the call is a weight
stream. Stored [E, K, N] weights are packed at every call; loops pack once (`k25jax.model.moe.prepare_experts`).

It is the `cpu_kernel` MoE dispatch (`k25jax.model.moe`), forward only (generation; training raises), float32.
Built and registered on first use by `k25jax.kernels.build`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from k25jax.kernels import build

SOURCE = Path(__file__).with_suffix(".cc")
TARGET = "k25jax_routed_experts_cpu"
register = functools.partial(build.register, SOURCE, ((TARGET, "K25RoutedExpertsCpu"),))
TILE = 64  # columns per packed weight tile (kTile in the C++ source)


def pack(wm: jax.Array) -> jax.Array:
  """[E, K, N] expert matrices -> the kernel's tile-packed [E, ceil(N / TILE), K, TILE] (columns past N zero)."""
  e, k, n = wm.shape
  tiles = -(-n // TILE)
  wm = jnp.pad(wm, ((0, 0), (0, 0), (0, tiles * TILE - n)))
  return wm.reshape(e, k, tiles, TILE).transpose(0, 2, 1, 3)


@jax.custom_vjp
def routed_experts(x: jax.Array, idx: jax.Array, w: jax.Array, wg: jax.Array, wu: jax.Array,
                   wd: jax.Array) -> jax.Array:
  """sum_j w[t, j] * SwiGLU_{idx[t, j]}(x[t]) for x [T, D], idx / w [T, k], wg / wu [E, D, F], wd [E, F, D]
  (float32), stored or tile-packed (`pack`; calls on the same weights pack them once). Expert ids outside
  [0, E) fail the call with an error naming them."""
  for name, a in (("x", x), ("w", w), ("wg", wg), ("wu", wu), ("wd", wd)):
    if a.dtype != jnp.float32:
      raise TypeError(f"moe_dispatch='cpu_kernel' computes in float32; {name} is {a.dtype}: set model.dtype="
                      "'float32' or choose model.moe_dispatch='blocked' / 'dense'")
  if jax.default_backend() != "cpu":
    raise ValueError(f"moe_dispatch='cpu_kernel' is an XLA:CPU kernel and the backend is "
                     f"{jax.default_backend()!r}: use model.moe_dispatch='ragged' (or 'auto')")
  register()
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype))(
      x, idx.astype(jnp.int32), w, *(a if a.ndim == 4 else pack(a) for a in (wg, wu, wd)))


def _forward(x, idx, w, wg, wu, wd):
  return routed_experts(x, idx, w, wg, wu, wd), None


def _backward(_, g):
  raise NotImplementedError("moe_dispatch='cpu_kernel' is forward-only (generation); train with "
                            "model.moe_dispatch='blocked', 'dense' or 'ragged'")


routed_experts.defvjp(_forward, _backward)
