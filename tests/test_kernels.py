"""The XLA:CPU kernels (`k25jax.kernels`): routed experts against the per-token MoE loop, absorbed attention
against XLA's `cache.absorbed_attention`, and their build cache."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k25jax.configs import get_config
from k25jax import sharding as shd
from k25jax.kernels import absorbed_attention_cpu, build, routed_experts_cpu
from k25jax.model import moe as moe_lib
from k25jax.sample import cache

from tests.test_model import _dispatch_problem, _naive_moe

pytestmark = pytest.mark.skipif(not build.host_has_avx512(), reason="the CPU kernels need AVX-512 (vec.h)")


def _problem(seed, t, d, f, e, k):
  """tests/test_model.py's dispatch problem as writable numpy arrays: x, idx, w, wg, wu, wd."""
  x, idx, w, ws = _dispatch_problem(seed, t, d, f, e, k)
  return tuple(np.array(a) for a in (x, idx, w, *ws))


# Widths that are multiples of the 64-float tile, of the 16-float vector only, and neither (scalar tail); token
# counts that give experts 1 to 6 rows (each row-count specialisation) and more than 6 (several chunks per
# expert).
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


def test_kernel_silu_holds_at_large_activations():
  """Gate activations far outside exp's float range (the kernel's vectorised exp clamps its argument)."""
  x, idx, w, wg, wu, wd = _problem(1, 8, 32, 24, 4, 2)
  x = x * 400.0
  with np.errstate(over="ignore"):   # the reference's exp(-g) overflows to inf, and g / inf is the right 0
    want = _naive_moe(x, idx, w, wg, wu, wd)
  got = jax.jit(routed_experts_cpu.routed_experts)(x, idx, w, wg, wu, wd)
  assert np.abs(np.asarray(want)).max() > 1e3
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-2)


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


def _attention_problem(seed, b, l, h, nope, rope, v, kv_lora, s, p_mask=0.6):
  """Random absorbed-attention inputs with a random mask; row 0's first query sees no slot."""
  k = jax.random.split(jax.random.key(seed), 5)
  q_nope = jax.random.normal(k[0], (b, l, h, nope))
  q_rot = jax.random.normal(k[1], (b, l, h, rope))
  latent = jax.random.normal(k[2], (b, s, kv_lora + rope))
  kv_b = 0.3 * jax.random.normal(k[3], (kv_lora, h * (nope + v)))
  mask = jax.random.bernoulli(k[4], p_mask, (b, l, s)).at[0, 0].set(False)
  return q_nope, q_rot, latent, kv_b, mask


# The `small` decode shape (latent width 48 = 3 vectors, 4 heads); widths with a partial vector (24, 13), head
# counts that leave a partial group of 4 (5, 3), slot counts that end in a partial block of 16, several queries.
@pytest.mark.parametrize("b,l,h,nope,rope,v,kv_lora,s", [(16, 1, 4, 32, 16, 32, 32, 127), (3, 5, 5, 16, 8, 24, 16, 21),
                                                         (2, 3, 3, 7, 5, 9, 8, 40), (1, 2, 1, 16, 16, 16, 16, 16)])
def test_attention_kernel_equals_xla(b, l, h, nope, rope, v, kv_lora, s):
  """Equal to `cache.absorbed_attention` (XLA's ops), including a query whose mask allows no slot (softmax
  over equal masked logits: the mean of every slot)."""
  args = _attention_problem(b * 7 + s, b, l, h, nope, rope, v, kv_lora, s)
  want = cache.absorbed_attention(*args, 0.13, kv_lora)
  kernel = jax.jit(absorbed_attention_cpu.absorbed_attention, static_argnums=(5, 6))
  got = kernel(*args, 0.13, kv_lora)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  q_nope, q_rot, latent, kv_b, mask = args
  mean = cache.absorbed_attention(q_nope[:1, :1], q_rot[:1, :1], latent[:1], kv_b, jnp.ones_like(mask[:1, :1]),
                                  0.0, kv_lora)
  np.testing.assert_allclose(got[:1, :1], mean, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mesh_cfg", [dict(data=8, fsdp=1, expert=1, tensor=1),
                                      dict(data=2, fsdp=2, expert=1, tensor=2)], ids=("8x1x1x1", "2x2x1x2"))
def test_attention_kernel_runs_each_devices_rows_and_heads(mesh_cfg):
  """`cache.absorbed_attention_kernel` under a mesh (rows over the batch axes, heads over `tensor`) equals XLA's
  ops on one device, and its program moves no data between devices."""
  args = _attention_problem(5, 8, 1, 4, 16, 8, 16, 16, 33)
  want = cache.absorbed_attention(*args, 0.2, 16)
  c = get_config("tiny")
  c.mesh.update(**mesh_cfg)
  mesh = shd.make_mesh(c)
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(shd.BATCH_AXES))
  fn = jax.jit(lambda *a: cache.absorbed_attention_kernel(*a, 0.2, 16))
  with jax.set_mesh(mesh):
    placed = [jax.device_put(a, rows) for a in args[:3]] + [args[3], jax.device_put(args[4], rows)]
    got = fn(*placed)
    hlo = fn.lower(*placed).compile().as_text()
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  assert not re.findall(r"(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)", hlo)


def test_attention_kernel_names_bad_inputs():
  q_nope, q_rot, latent, kv_b, mask = _attention_problem(0, 2, 1, 2, 8, 4, 8, 8, 10)
  kernel = jax.jit(absorbed_attention_cpu.absorbed_attention, static_argnums=(5, 6))
  with pytest.raises(Exception, match=r"latent \[B, S, kv_lora \+ rope\]"):
    kernel(q_nope, q_rot, latent[..., :-1], kv_b, mask, 0.1, 8)
  with pytest.raises(ValueError, match="kv_b_kernel has 8 rows; expected kv_lora=4"):
    kernel(q_nope, q_rot, latent, kv_b, mask, 0.1, 4)
  with pytest.raises(TypeError, match="computes in float32; q_nope is bfloat16"):
    kernel(q_nope.astype(jnp.bfloat16), q_rot, latent, kv_b, mask, 0.1, 8)
  with pytest.raises(NotImplementedError, match="forward-only"):
    jax.grad(lambda q: kernel(q, q_rot, latent, kv_b, mask, 0.1, 8).sum())(q_nope)
