"""The caching-allocator setup (k25jax/runtime.py): what a child process actually maps."""

import ctypes.util
import os
import re
import subprocess
import sys
from pathlib import Path

from k25jax import runtime

_MAPS = "import sys; sys.stdout.write(str('jemalloc' in open('/proc/self/maps').read()))"


def _child(env):
  return subprocess.run([sys.executable, "-m", "k25jax.runtime", sys.executable, "-c", _MAPS], env=env,
                        capture_output=True, text=True, check=True).stdout


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "K25JAX_ALLOCATOR")}
  return {**env, "PYTHONPATH": os.getcwd(), **extra}


def test_runtime_preloads_jemalloc_when_installed():
  installed = ctypes.util.find_library("jemalloc") is not None
  assert _child(_clean_env()) == str(installed)


def test_system_switch_keeps_glibc():
  assert _child(_clean_env(K25JAX_ALLOCATOR="system")) == "False"


def test_allocator_env_is_idempotent():
  env = runtime.allocator_env(_clean_env())
  if env is None:                                   # jemalloc not installed: nothing to preload
    assert ctypes.util.find_library("jemalloc") is None
    return
  assert env["LD_PRELOAD"].count("jemalloc") == 1 and env["MALLOC_CONF"] == runtime.MALLOC_CONF
  assert runtime.allocator_env(env) is None         # already preloaded: no second re-exec


_DEVICES = ("import jax; from k25jax import runtime; n = runtime.cpu_device_per_core({count}); "
            "print(n, jax.device_count(), jax.devices()[0].platform)")


def test_cpu_device_per_core_sets_the_device_count():
  """Explicit count, and the default of one device per usable core; it wins over an inherited XLA flag."""
  for count, want in ((3, 3), (None, len(os.sched_getaffinity(0)))):
    out = subprocess.run([sys.executable, "-c", _DEVICES.format(count=count)], env=_clean_env(), check=True,
                         capture_output=True, text=True).stdout.split()
    assert out == [str(want), str(want), "cpu"]


def test_cpu_device_per_core_refuses_after_jax_started():
  code = "import jax; jax.devices(); from k25jax import runtime; runtime.cpu_device_per_core(2)"
  proc = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True)
  assert proc.returncode != 0 and "before backends are initialized" in proc.stderr


_TRAINING = ("import jax; from k25jax import runtime; from k25jax.configs import get_config; c = get_config('tiny'); "
             "c.train.batch_size = 6; {edit}; print(runtime.cpu_devices_for_training(c), jax.device_count())")


def test_cpu_devices_for_training_splits_the_batch_over_the_cores():
  """The largest divisor of the batch (6) within the core count, and nothing when the mesh or XLA_FLAGS is set."""
  env = {k: v for k, v in _clean_env().items() if k != "XLA_FLAGS"}
  cores = len(os.sched_getaffinity(0))
  want = max(n for n in range(1, cores + 1) if 6 % n == 0)
  cases = (("pass", env, want), ("c.mesh.fsdp = 2", env, 1),
           ("pass", {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, 1))
  for edit, child_env, count in cases:
    out = subprocess.run([sys.executable, "-c", _TRAINING.format(edit=edit)], env=child_env, check=True,
                         capture_output=True, text=True).stdout.split()
    devices = 3 if "XLA_FLAGS" in child_env else count
    assert out == [str(count), str(devices)], (edit, out)


def test_share_host_replicas_aliases_one_buffer_on_every_cpu_device():
  """A replicated array on the 8 CPU devices comes back with equal values and ONE buffer behind every shard; a
  sharded array and a single-device one are returned as they are."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  value = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
  replicated = jax.jit(lambda a: a + 0, out_shardings=NamedSharding(mesh, P()))(value)   # a copy per device
  other = jax.jit(lambda a: a[:7, :3] * 3, out_shardings=NamedSharding(mesh, P()))(value)   # 21 floats: unaligned size
  split = jax.device_put(value, NamedSharding(mesh, P("data")))
  single = jax.device_put(value, jax.devices()[0])
  shared, shared_other, same_split, same_single = runtime.share_host_replicas((replicated, other, split, single))
  np.testing.assert_array_equal(np.asarray(shared_other), value[:7, :3] * 3)   # its own bytes, no overlap
  assert shared_other.addressable_shards[0].data.unsafe_buffer_pointer() % 64 == 0
  assert len({s.data.unsafe_buffer_pointer() for s in replicated.addressable_shards}) == 8
  assert len({s.data.unsafe_buffer_pointer() for s in shared.addressable_shards}) == 1
  assert shared.sharding == replicated.sharding
  np.testing.assert_array_equal(np.asarray(shared), value)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: a * 2)(shared)), value * 2)
  assert same_split is split and same_single is single
  # The shared buffers lie in one private anonymous mapping advised for transparent huge pages (VmFlags `hg`).
  if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists():
    mapping = _smaps_entry(shared.addressable_shards[0].data.unsafe_buffer_pointer())
    assert re.search(r"^VmFlags:.* hg\b", mapping, re.M), mapping


def _smaps_entry(address: int) -> str:
  """The /proc/self/smaps block of the mapping that holds `address`."""
  block, found = [], None
  for line in Path("/proc/self/smaps").read_text().splitlines():
    head = line.split()[0]
    if "-" in head and all(c in "0123456789abcdef-" for c in head):
      if found is not None:
        break
      lo, hi = (int(x, 16) for x in head.split("-"))
      block = [line]
      found = line if lo <= address < hi else None
    elif found is not None:
      block.append(line)
  return "\n".join(block) if found else ""
