"""MLA attention over the latent cache as one XLA:CPU custom call (`latent_attention_cpu.cc`, digest §1.1).

In the absorbed form a decode step's attention is two batched products of tiny matrices ([heads, W] x [W, S] and
[heads, S] x [S, kv_lora] per batch row) with a masked softmax between them; XLA:CPU runs each as a separate
library call per layer and step. The kernel reads each batch row's cached latents once per query row and returns
the probability-weighted latents. Used by `k25jax.sample.cache.absorbed_attention(kernel=True)` (the decode steps
of generation on CPU); forward only, float32. Built and registered on first use by `k25jax.kernels.build`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from k25jax.kernels import build

SOURCE = Path(__file__).with_suffix(".cc")
TARGET = "k25jax_latent_attention_cpu"
register = functools.partial(build.register, SOURCE, ((TARGET, "K25LatentAttentionCpu"),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def latent_attention(q: jax.Array, latent: jax.Array, keep: jax.Array, scale: float, heads: int,
                     width: int) -> jax.Array:
  """sum_s softmax_s(scale * q . latent_s) latent_s[:width] over the slots `keep` allows: q [B, L * heads, W]
  (query l's heads consecutive), latent [B, S, W], keep [B, L, S] bool -> [B, L * heads, width] float32. A
  masked slot's logit is `k25jax.model.mla.NEG_INF`, as in the XLA path."""
  if q.dtype != jnp.float32 or latent.dtype != jnp.float32:
    raise TypeError(f"latent_attention computes in float32; got q {q.dtype}, latent {latent.dtype}")
  register()
  b, m, _ = q.shape
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((b, m, width), jnp.float32))(
      q, latent, keep.astype(jnp.bool_), scale=np.float32(scale), heads=np.int64(heads))


def _forward(q, latent, keep, scale, heads, width):
  return latent_attention(q, latent, keep, scale, heads, width), None


def _backward(scale, heads, width, _, g):
  raise NotImplementedError("latent_attention is forward-only (generation)")


latent_attention.defvjp(_forward, _backward)
