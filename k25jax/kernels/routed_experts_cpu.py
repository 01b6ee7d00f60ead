"""The routed experts of an MoE layer as one XLA:CPU custom call (`routed_experts_cpu.cc`, digest §1.1).

XLA:CPU has no grouped matmul (`jax.lax.ragged_dot` lowers to a slow loop there), so its MoE dispatches trade
wasted FLOPs (`dense`: every expert on every row) against per-tile loop overhead (`blocked`). At decode steps,
with a few rows per expert, both leave most of the step to the MoE. The kernel groups each device's rows by expert
and multiplies them in register-blocked chunks, reading each chosen expert's weights once: only the routed FLOPs.

It is the `cpu_kernel` MoE dispatch (`k25jax.model.moe`), forward only (generation; training raises), float32.
The C++ source is compiled with the host's C++ compiler on first use (`g++`, or `$CXX`) against the XLA FFI
headers that ship with jaxlib, into a cache keyed by the source, jaxlib version and CPU
(`$K25JAX_KERNEL_CACHE`, default `~/.cache/k25jax/kernels`), and registered as an FFI target for the CPU
platform.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib

SOURCE = Path(__file__).with_suffix(".cc")
TARGET = "k25jax_routed_experts_cpu"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-w")


def _cpu_signature() -> str:
  """The CPU model and instruction-set flags (`-march=native` builds are only valid on the same CPU)."""
  try:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor()
  keep = [l for l in lines if l.startswith(("model name", "flags"))][:2]
  return "\n".join(keep)


def _cache_dir() -> Path:
  return Path(os.environ.get("K25JAX_KERNEL_CACHE") or Path.home() / ".cache" / "k25jax" / "kernels")


def build() -> Path:
  """Compiles the kernel once per (source, jaxlib, CPU, flags) and returns the shared library's path."""
  compiler = os.environ.get("CXX", "g++")
  key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, _cpu_signature(), compiler,
                                  *_FLAGS]).encode()).hexdigest()[:16]
  out = _cache_dir() / f"routed_experts_cpu-{key}.so"
  if out.exists():
    return out
  if shutil.which(compiler) is None:
    raise RuntimeError(f"moe_dispatch='cpu_kernel' compiles {SOURCE.name} with a C++ compiler, and {compiler!r} "
                       "is not on PATH: install one (Debian: apt-get install g++) or set $CXX, or choose "
                       "model.moe_dispatch='dense' / 'blocked'")
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  cmd = [compiler, *_FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode != 0:
    os.unlink(tmp)
    raise RuntimeError(f"building {SOURCE.name} failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
  os.replace(tmp, out)  # atomic: concurrent builders (test workers) each produce the same file
  return out


@functools.cache
def register() -> None:
  """Builds (if needed), loads and registers the kernel as the CPU FFI target `TARGET`, once per process."""
  library = ctypes.cdll.LoadLibrary(str(build()))
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.K25RoutedExpertsCpu), platform="cpu")


@functools.cache
def available() -> bool:
  """Whether the kernel can be built and loaded here; when not, warns once with the reason (callers that pick it
  automatically, `k25jax.sample.engine.decode_moe_config`, then use XLA's dispatches)."""
  try:
    register()
  except (RuntimeError, OSError) as err:
    warnings.warn(f"routed-experts CPU kernel unavailable, decode steps use XLA's MoE dispatches: {err}",
                  stacklevel=2)
    return False
  return True


@jax.custom_vjp
def routed_experts(x: jax.Array, idx: jax.Array, w: jax.Array, wg: jax.Array, wu: jax.Array,
                   wd: jax.Array) -> jax.Array:
  """sum_j w[t, j] * SwiGLU_{idx[t, j]}(x[t]) for x [T, D], idx / w [T, k], wg / wu [E, D, F], wd [E, F, D]
  (float32). Expert ids outside [0, E) fail the call with an error naming them."""
  for name, a in (("x", x), ("w", w), ("wg", wg), ("wu", wu), ("wd", wd)):
    if a.dtype != jnp.float32:
      raise TypeError(f"moe_dispatch='cpu_kernel' computes in float32; {name} is {a.dtype}: set model.dtype="
                      "'float32' or choose model.moe_dispatch='blocked' / 'dense'")
  register()
  return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype))(
      x, idx.astype(jnp.int32), w, wg, wu, wd)


def _forward(x, idx, w, wg, wu, wd):
  return routed_experts(x, idx, w, wg, wu, wd), None


def _backward(_, g):
  raise NotImplementedError("moe_dispatch='cpu_kernel' is forward-only (generation); train with "
                            "model.moe_dispatch='blocked', 'dense' or 'ragged'")


routed_experts.defvjp(_forward, _backward)
