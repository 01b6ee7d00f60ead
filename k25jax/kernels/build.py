"""Builds and registers the C++ XLA FFI kernels of `k25jax.kernels` (CPU custom calls).

A kernel's source is compiled with the host's C++ compiler on first use (`g++`, or `$CXX`) against the XLA FFI
headers that ship with jaxlib, into a cache keyed by the source, jaxlib version, CPU and flags
(`$K25JAX_KERNEL_CACHE`, default `~/.cache/k25jax/kernels`), then loaded and registered as FFI targets for the
CPU platform, once per process.
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
import jaxlib

FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-w")


def _cpu_signature() -> str:
  """The CPU model and instruction-set flags (`-march=native` builds are only valid on the same CPU)."""
  try:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor()
  return "\n".join([l for l in lines if l.startswith(("model name", "flags"))][:2])


def host_has_avx512() -> bool:
  """Whether this host's CPU has AVX-512F, which the kernels' 16-lane vector code needs (`vec.h`)."""
  return "avx512f" in _cpu_signature().split()


def cache_dir() -> Path:
  return Path(os.environ.get("K25JAX_KERNEL_CACHE") or Path.home() / ".cache" / "k25jax" / "kernels")


def compile_library(source: Path) -> Path:
  """Compiles `source` once per (source text, the headers beside it, jaxlib, CPU, compiler, flags); returns the
  shared library's path."""
  compiler = os.environ.get("CXX", "g++")
  headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]
  key = hashlib.sha256("\0".join([source.read_text(), *headers, jaxlib.__version__, _cpu_signature(), compiler,
                                  *FLAGS]).encode()).hexdigest()[:16]
  out = cache_dir() / f"{source.stem}-{key}.so"
  if out.exists():
    return out
  if shutil.which(compiler) is None:
    raise RuntimeError(f"the CPU kernel {source.name} is compiled with a C++ compiler, and {compiler!r} is not on "
                       "PATH: install one (Debian: apt-get install g++) or set $CXX")
  out.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  cmd = [compiler, *FLAGS, "-I", jax.ffi.include_dir(), "-I", str(source.parent), str(source), "-o", tmp]
  done = subprocess.run(cmd, capture_output=True, text=True)
  if done.returncode != 0:
    os.unlink(tmp)
    raise RuntimeError(f"building {source.name} failed ({' '.join(cmd)}):\n{done.stderr[-4000:]}")
  os.replace(tmp, out)  # atomic: concurrent builders (test workers) each produce the same file
  return out


@functools.cache
def register(source: Path, targets: tuple[tuple[str, str], ...]) -> None:
  """Builds (if needed) and loads `source`, registering each (FFI target name, exported handler symbol)."""
  library = ctypes.cdll.LoadLibrary(str(compile_library(source)))
  for name, symbol in targets:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")


@functools.cache
def available(*registrations) -> bool:
  """Whether every registration (a zero-argument callable) succeeds; when one fails, warns once with the reason
  (callers that pick kernels automatically then use XLA's ops)."""
  try:
    for reg in registrations:
      reg()
  except (RuntimeError, OSError) as err:
    warnings.warn(f"CPU kernels unavailable, XLA's ops are used instead: {err}", stacklevel=2)
    return False
  return True
