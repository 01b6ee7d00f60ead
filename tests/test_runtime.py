"""The caching-allocator setup (k25jax/runtime.py): what a child process actually maps."""

import ctypes.util
import os
import subprocess
import sys

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
