"""Process setup for CPU hosts: a caching memory allocator (jemalloc) instead of glibc's malloc, and one XLA
device per core.

XLA:CPU allocates an executable's buffers on every call. glibc serves requests above its mmap threshold (at most
32 MiB) with fresh `mmap`s and returns them on free, so each train step page-faults its temporaries in again. On
the project's 2-core machine a `small` forward+backward took 167k minor faults and 0.43 s of kernel time per call,
about 30% of its CPU time; under jemalloc with page decay off (freed pages stay mapped for reuse) the same call
took under 200 faults and ran 1.46x faster. TPU VM images preload tcmalloc for the same reason.

Entry points call `use_caching_allocator()` first: it re-executes the process once with jemalloc in
`LD_PRELOAD` when Debian's `libjemalloc2` is installed (`make data` installs it as root). `K25JAX_ALLOCATOR=system`
keeps glibc. `python -m k25jax.runtime CMD ...` runs any command (the test suite, say) the same way.

XLA:CPU runs a program's ops one after another, and only large matmuls use more than one thread: elementwise
passes, softmaxes, gathers and the many small matmuls of `small` (attention heads, Muon's Newton-Schulz on
128 x 256 expert matrices) each run on one core. `cpu_device_per_core()` splits the host into one CPU device per
core, so a data-parallel mesh runs one program per core and both cores stay busy (`benchmarks.train_step` times
the `small` step both ways; `results/bench/train_step.json`: 1182 ms on 2 devices, 1400 ms on 1).
"""

from __future__ import annotations

import ctypes.util
import os
import sys

LIBRARY = "jemalloc"
# Keep freed pages mapped (no decay to the OS) so the next step reuses them without page faults.
MALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
_ENV_SWITCH = "K25JAX_ALLOCATOR"


def allocator_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
  """The environment that preloads jemalloc, or None when it is off, missing or already preloaded."""
  env = dict(os.environ if environ is None else environ)
  if env.get(_ENV_SWITCH) == "system" or LIBRARY in env.get("LD_PRELOAD", ""):
    return None
  path = ctypes.util.find_library(LIBRARY)
  if path is None:
    return None
  env["LD_PRELOAD"] = ":".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)
  env["MALLOC_CONF"] = env.get("MALLOC_CONF") or MALLOC_CONF
  return env


def use_caching_allocator() -> None:
  """Re-executes this process (same interpreter and arguments) with jemalloc preloaded, at most once."""
  env = allocator_env()
  if env is None:
    if os.environ.get(_ENV_SWITCH) != "system" and LIBRARY not in os.environ.get("LD_PRELOAD", ""):
      print("k25jax: jemalloc not found (Debian: apt-get install libjemalloc2); XLA:CPU steps run slower under "
            "glibc malloc (k25jax/runtime.py)", file=sys.stderr)
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def cpu_device_per_core(count: int | None = None) -> int:
  """Makes JAX's CPU backend expose `count` devices (default: one per core the process may use) and returns it.

  Call before any JAX operation runs (JAX raises otherwise); it only changes the CPU platform, so a GPU or TPU
  host's accelerators are unaffected.
  """
  import jax  # noqa: PLC0415  (deferred: the allocator re-exec above must run before JAX loads)
  count = len(os.sched_getaffinity(0)) if count is None else int(count)
  if count < 1:
    raise ValueError(f"cpu devices={count}: pass a positive count, or None for one per core")
  jax.config.update("jax_num_cpu_devices", count)
  return count


def cpu_devices_for_training(config) -> int:
  """One CPU device per core for a training entry point (call it before any JAX operation), when that keeps
  `config` valid: the mesh is the default (`data` fills the devices, every other axis 1), the process was not given
  a device count through XLA_FLAGS, and the batch splits evenly. Returns the device count chosen: the largest
  divisor of `config.train.batch_size` not above the core count (1: nothing changed). Only the CPU platform is
  affected, so runs on accelerators are unchanged."""
  axes = config.mesh
  default_mesh = axes.data == -1 and axes.fsdp == axes.expert == axes.tensor == 1
  if not default_mesh or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return 1
  cores, batch = len(os.sched_getaffinity(0)), int(config.train.batch_size)
  count = max(n for n in range(1, cores + 1) if batch % n == 0)
  return cpu_device_per_core(count) if count > 1 else 1


def share_host_replicas(tree):
  """`tree` with each fully replicated jax.Array on two or more CPU devices re-homed onto ONE host buffer that
  every device aliases; other leaves are returned as they are.

  The CPU devices of a process (`cpu_device_per_core`) share the host's memory, yet a replicated array holds a copy
  per device, so data-parallel steps stream every weight once per device through the shared caches. Each array
  gets a 64-byte aligned NumPy buffer, placed on each device without a copy (XLA:CPU aliases aligned host
  buffers), alive as long as the arrays are (JAX holds it). All the buffers lie in one 2 MiB-aligned private
  anonymous mapping that asks Linux for transparent huge pages (`MADV_HUGEPAGE`; the default policy on many hosts
  grants them only on request): a decode step streams tens of megabytes of weights, and 4 KiB pages would cost a
  TLB miss every 4 KiB.
  """
  import mmap  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  def shared(a) -> bool:
    if not isinstance(a, jax.Array):
      return False
    devices = a.sharding.addressable_devices
    return len(devices) >= 2 and a.sharding.is_fully_replicated and all(d.platform == "cpu" for d in devices)

  leaves, treedef = jax.tree.flatten(tree)
  picked = [i for i, a in enumerate(leaves) if shared(a)]
  if not picked:
    return tree
  huge = 2 << 20
  sizes = [-(-leaves[i].nbytes // 64) * 64 for i in picked]
  region = mmap.mmap(-1, sum(sizes) + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
  try:
    region.madvise(mmap.MADV_HUGEPAGE)
  except (AttributeError, OSError):   # no such advice on this OS or kernel: 4 KiB pages
    pass
  raw = np.frombuffer(region, np.uint8)
  offset = -raw.ctypes.data % huge
  for i, size in zip(picked, sizes):
    a = leaves[i]
    value = np.asarray(a.addressable_shards[0].data)
    host = raw[offset:offset + value.nbytes].view(value.dtype).reshape(value.shape)
    host[...] = value
    offset += size
    leaves[i] = jax.make_array_from_single_device_arrays(
        a.shape, a.sharding, [jax.device_put(host, d) for d in a.sharding.addressable_devices])
  return jax.tree.unflatten(treedef, leaves)


def main(argv: list[str]) -> None:
  """`python -m k25jax.runtime CMD [ARGS...]`: runs CMD with jemalloc preloaded when available."""
  if not argv:
    raise SystemExit("usage: python -m k25jax.runtime CMD [ARGS...]")
  env = allocator_env() or dict(os.environ)
  os.execvpe(argv[0], argv, env)


if __name__ == "__main__":
  main(sys.argv[1:])
