"""Basic layers of the Kimi K2 / DeepSeek-V3 decoder (digest §1.1): RMSNorm, linear maps, SwiGLU MLP."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype


def dtype_of(name: str) -> Dtype:
  return jnp.dtype(name)


class RMSNorm(nn.Module):
  """y = x / rms(x) * weight, statistics in f32 (HF `DeepseekV3RMSNorm`)."""
  eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        (x.shape[-1],), dtype_of(self.param_dtype))
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (weight.astype(jnp.float32) * y).astype(dtype_of(self.dtype))


class Linear(nn.Module):
  """x @ kernel with logical names on the kernel; no bias (`attention_bias: false` in the release)."""
  features: int
  names: Sequence[str | None]
  dtype: str = "float32"
  param_dtype: str = "float32"
  stddev: float = 0.02

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.stddev),
                                                               tuple(self.names)),
                        (x.shape[-1], self.features), dtype_of(self.param_dtype))
    dt = dtype_of(self.dtype)
    return jnp.dot(x.astype(dt), kernel.astype(dt))


@jax.custom_vjp
def swiglu(g: jax.Array, u: jax.Array) -> jax.Array:
  """silu(g) * u, the SwiGLU gate (digest §1.1), with a hand-written VJP: one sigmoid, computed in f32, shared by
  both cotangents (autodiff of silu re-derives it through several elementwise passes)."""
  return (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(g.dtype)


def _swiglu_fwd(g, u):
  return swiglu(g, u), (g, u)


def _swiglu_bwd(res, dh):
  g, u = res
  gf, uf, dhf = g.astype(jnp.float32), u.astype(jnp.float32), dh.astype(jnp.float32)
  sig = jax.nn.sigmoid(gf)
  dg = dhf * uf * sig * (1.0 + gf * (1.0 - sig))
  return dg.astype(g.dtype), (dhf * gf * sig).astype(u.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)): the dense first layer and the shared expert (digest §1.1)."""
  hidden: int
  dtype: str = "float32"
  param_dtype: str = "float32"
  stddev: float = 0.02
  mlp_name: str = "mlp"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, stddev=self.stddev)
    g = Linear(self.hidden, ("embed", self.mlp_name), name="gate_proj", **kw)(x)
    u = Linear(self.hidden, ("embed", self.mlp_name), name="up_proj", **kw)(x)
    h = nn.with_logical_constraint(swiglu(g, u), ("batch", "length", "act_mlp"))
    return Linear(x.shape[-1], (self.mlp_name, "embed"), name="down_proj", **kw)(h)
