"""The XLA:CPU routed-experts kernel (`k25jax.kernels`) against the per-token MoE loop, and its build cache."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k25jax.configs import get_config
from k25jax import sharding as shd
from k25jax.kernels import build, routed_experts_cpu
from k25jax.model import moe as moe_lib

from tests.test_model import _dispatch_problem, _naive_moe


def _problem(seed, t, d, f, e, k):
  """tests/test_model.py's dispatch problem as writable numpy arrays: x, idx, w, wg, wu, wd."""
  x, idx, w, ws = _dispatch_problem(seed, t, d, f, e, k)
  return tuple(np.array(a) for a in (x, idx, w, *ws))


# Widths that are multiples of the 128- and 64-float tiles, of the 16-float tail tile only, and neither
# (scalar tail); token counts that give experts 1 to 4 rows (each row-count specialisation) and more than 4
# (several chunks per expert).
@pytest.mark.parametrize("t,d,f,e,k", [(16, 256, 128, 16, 4), (5, 48, 40, 4, 3), (1, 64, 16, 8, 2),
                                       (37, 24, 9, 6, 2)])
def test_kernel_equals_per_token_loop(t, d, f, e, k):
  """On stored weights (packed inside the call) and on weights packed beforehand (one tile and several, the
  last one partial), equal to the per-token loop."""
  x, idx, w, wg, wu, wd = _problem(t, t, d, f, e, k)
  want = _naive_moe(x, idx, w, wg, wu, wd)
  kernel = jax.jit(routed_experts_cpu.routed_experts)
  np.testing.assert_allclose(kernel(x, idx, w, wg, wu, wd), want, atol=1e-4, rtol=1e-4)
  packed = [routed_experts_cpu.pack(a) for a in (wg, wu, wd)]
  np.testing.assert_allclose(kernel(x, idx, w, *packed), want, atol=1e-4, rtol=1e-4)


def test_pack_lays_out_column_tiles_contiguously():
  """packed[e, j, k, c] = w[e, k, j * TILE + c], zero past the last column."""
  tile = routed_experts_cpu.TILE
  w = np.random.default_rng(0).standard_normal((2, 3, tile + 5)).astype(np.float32)
  packed = np.asarray(routed_experts_cpu.pack(w))
  assert packed.shape == (2, 2, 3, tile)
  e, j, k, c = np.meshgrid(*map(np.arange, packed.shape), indexing="ij")
  col = j * tile + c
  want = np.where(col < w.shape[2], w[e, k, np.minimum(col, w.shape[2] - 1)], 0.0)
  np.testing.assert_array_equal(packed, want)


def test_kernel_rejects_weights_of_another_shape():
  x, idx, w, wg, wu, wd = _problem(0, 4, 16, 16, 4, 2)
  wd_other = routed_experts_cpu.pack(np.concatenate([wd, wd], axis=0))   # 8 experts, not 4
  with pytest.raises(Exception, match="tile-packed weights"):
    jax.block_until_ready(jax.jit(routed_experts_cpu.routed_experts)(x, idx, w, wg, wu, wd_other))


def test_kernel_handles_one_expert_holding_every_row():
  """11 rows on expert 2 (chunks of 4, 4, 3) and none on the others."""
  x, idx, w, wg, wu, wd = _problem(0, 11, 32, 32, 4, 1)
  idx[:] = 2
  got = jax.jit(routed_experts_cpu.routed_experts)(x, idx, w, wg, wu, wd)
  np.testing.assert_allclose(got, _naive_moe(x, idx, w, wg, wu, wd), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad", [4, -1])
def test_kernel_rejects_expert_ids_out_of_range(bad):
  x, idx, w, wg, wu, wd = _problem(0, 4, 16, 16, 4, 2)
  idx[1, 0] = bad
  with pytest.raises(Exception, match=rf"expert id {bad} outside \[0, 4\)"):
    jax.block_until_ready(jax.jit(routed_experts_cpu.routed_experts)(x, idx, w, wg, wu, wd))


def test_kernel_is_float32_and_forward_only():
  x, idx, w, wg, wu, wd = (jnp.asarray(a) for a in _problem(0, 4, 16, 16, 4, 2))
  with pytest.raises(TypeError, match="float32"):
    routed_experts_cpu.routed_experts(x.astype(jnp.bfloat16), idx, w, wg, wu, wd)
  with pytest.raises(NotImplementedError, match="forward-only"):
    jax.grad(lambda x: routed_experts_cpu.routed_experts(x, idx, w, wg, wu, wd).sum())(x)


def test_kernel_names_the_backend_it_needs(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  x, idx, w, wg, wu, wd = _problem(0, 4, 16, 16, 4, 2)
  with pytest.raises(ValueError, match="XLA:CPU kernel and the backend is 'gpu'"):
    routed_experts_cpu.routed_experts(x, idx, w, wg, wu, wd)


@pytest.mark.parametrize("mesh_cfg", [dict(data=8, fsdp=1, expert=1, tensor=1),
                                      dict(data=2, fsdp=2, expert=1, tensor=2)], ids=("8x1x1x1", "2x2x1x2"))
def test_cpu_kernel_dispatch_runs_data_locally(mesh_cfg):
  """As a `model.moe_dispatch` under a mesh: each device's rows, weights split over `tensor` (partial outputs
  summed), equal to the single-device dense dispatch."""
  x, idx, w, ws = _dispatch_problem(3, t=32)
  c = get_config("tiny")
  c.mesh.update(**mesh_cfg)
  mesh = shd.make_mesh(c)
  want = jax.jit(moe_lib.get_dispatch("dense"))(x, idx, w, *ws)
  kernel = jax.jit(moe_lib.get_dispatch("cpu_kernel"))
  prepare = jax.jit(functools.partial(moe_lib.prepare_experts, "cpu_kernel"))
  with jax.set_mesh(mesh):
    xs = jax.device_put(x, shd.batch_sharding(mesh))
    got = kernel(xs, idx, w, *ws)
    got_prepared = kernel(xs, idx, w, *prepare(*ws))   # each `tensor` shard packed on its own
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(got_prepared, want, atol=1e-5, rtol=1e-4)


def test_build_is_cached_by_source_and_names_a_missing_compiler(tmp_path, monkeypatch):
  """A second build with the same source, jaxlib and CPU reuses the library; a missing compiler is named."""
  monkeypatch.setenv("K25JAX_KERNEL_CACHE", str(tmp_path))
  first = build.compile_library(routed_experts_cpu.SOURCE)
  mtime = first.stat().st_mtime_ns
  assert build.compile_library(routed_experts_cpu.SOURCE) == first and first.stat().st_mtime_ns == mtime
  monkeypatch.setenv("K25JAX_KERNEL_CACHE", str(tmp_path / "empty"))
  monkeypatch.setenv("CXX", "no-such-compiler")
  with pytest.raises(RuntimeError, match="no-such-compiler"):
    build.compile_library(routed_experts_cpu.SOURCE)
