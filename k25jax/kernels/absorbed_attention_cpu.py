"""MLA's absorbed attention over the latent cache as one XLA:CPU custom call (`absorbed_attention_cpu.cc`).

The same math as `k25jax.sample.cache.absorbed_attention` (digest §1.1): per query row the kernel reads the
cached rows once for all heads, where XLA:CPU runs a chain of small batched matmuls and fusions over them. Decode
steps of generation on CPU use it (`k25jax.sample.engine`); forward only, float32. Built and registered on first
use by `k25jax.kernels.build`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from k25jax.kernels import build

SOURCE = Path(__file__).with_suffix(".cc")
TARGET = "k25jax_absorbed_attention_cpu"
register = functools.partial(build.register, SOURCE, ((TARGET, "K25AbsorbedAttentionCpu"),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def absorbed_attention(q_nope: jax.Array, q_rot: jax.Array, latent: jax.Array, kv_b_kernel: jax.Array,
                       mask: jax.Array, scale: float, kv_lora: int) -> jax.Array:
  """`cache.absorbed_attention` on the host CPU: q_nope [B,L,H,nope], q_rot [B,L,H,rope], latent
  [B,S,kv_lora+rope], kv_b_kernel [kv_lora, H*(nope+v)], mask [B,L,S] bool -> [B,L,H,v], all float32."""
  for name, a in (("q_nope", q_nope), ("q_rot", q_rot), ("latent", latent), ("kv_b_kernel", kv_b_kernel)):
    if a.dtype != jnp.float32:
      raise TypeError(f"the absorbed-attention CPU kernel computes in float32; {name} is {a.dtype}: set "
                      "model.dtype='float32' or sample.cpu_kernels=False")
  if jax.default_backend() != "cpu":
    raise ValueError(f"the absorbed-attention kernel runs on XLA:CPU and the backend is {jax.default_backend()!r}:"
                     " set sample.cpu_kernels=False")
  if kv_b_kernel.shape[0] != kv_lora:
    raise ValueError(f"kv_b_kernel has {kv_b_kernel.shape[0]} rows; expected kv_lora={kv_lora}")
  register()
  b, l, h, _ = q_nope.shape
  v = kv_b_kernel.shape[1] // h - q_nope.shape[-1]
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((b, l, h, v), jnp.float32))(
      q_nope, q_rot, latent, kv_b_kernel, mask.astype(jnp.bool_), scale=np.float32(scale))


def _forward(q_nope, q_rot, latent, kv_b_kernel, mask, scale, kv_lora):
  return absorbed_attention(q_nope, q_rot, latent, kv_b_kernel, mask, scale, kv_lora), None


def _backward(scale, kv_lora, _, g):
  raise NotImplementedError("the absorbed-attention CPU kernel is forward-only (generation)")


absorbed_attention.defvjp(_forward, _backward)
