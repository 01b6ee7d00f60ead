"""Chunked (flash-style, windowed) and block-sparse packed ViT attention equal the dense path (digest §1.3 step 3)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k25jax.configs import ConfigError
from k25jax.configs.vision import validate_vision, vision_config
from k25jax.model.vision import MoonViT3D, check_vision_inputs, pack_media, packed_attention, patchify

# Item lengths straddle chunk boundaries (chunks of 8 or 5); a padding gap sits between items (a host boundary
# of a global batch) and padding at the end; P = 61 is not a multiple of either chunk.
_RUNS = [(1, 7), (2, 12), (3, 1), (4, 9), (0, 3), (5, 17), (6, 4), (0, 8)]
_IDS = np.concatenate([np.full((n,), i, np.int32) for i, n in _RUNS])


def _dense_vs_chunked(chunk, max_item, dtype=jnp.float32, impls=("dense", "chunked")):
  rng = np.random.default_rng(chunk)
  p, heads, hd = _IDS.size, 2, 8
  q, k, v, ct = (jnp.asarray(rng.normal(size=(p, heads, hd)), dtype) for _ in range(4))
  ids = jnp.asarray(_IDS)
  valid = (ids > 0)[:, None, None]

  def loss(impl, q, k, v):
    o = packed_attention(q, k, v, ids, impl=impl, chunk=chunk, max_item_patches=max_item)
    return jnp.sum(jnp.where(valid, o * ct, 0).astype(jnp.float32)), o

  out = {}
  for impl in impls:
    (_, o), g = jax.jit(jax.value_and_grad(lambda *a, impl=impl: loss(impl, *a), argnums=(0, 1, 2),
                                           has_aux=True))(q, k, v)
    out[impl] = (np.asarray(o, np.float32)[_IDS > 0], [np.asarray(x, np.float32) for x in g])
  return out


@pytest.mark.parametrize("chunk,max_item", [(8, 17), (5, 17), (8, 40), (64, 17), (1, 17)])
def test_chunked_equals_dense_values_and_gradients(chunk, max_item):
  out = _dense_vs_chunked(chunk, max_item)
  np.testing.assert_allclose(out["chunked"][0], out["dense"][0], rtol=1e-5, atol=1e-5)
  for name, gc, gd in zip("qkv", out["chunked"][1], out["dense"][1]):
    np.testing.assert_allclose(gc, gd, rtol=1e-4, atol=1e-5, err_msg=f"d/d{name}")
  assert all(np.isfinite(g).all() for g in out["chunked"][1])


@pytest.mark.parametrize("block", [1, 5, 8, 16, 64])
def test_blocks_equal_dense_values_and_gradients(block):
  """Block-sparse attention visits only the block pairs that share an item; no item bound (max_item unused)."""
  out = _dense_vs_chunked(block, 1, impls=("dense", "blocks"))
  np.testing.assert_allclose(out["blocks"][0], out["dense"][0], rtol=1e-5, atol=1e-5)
  for name, gb, gd in zip("qkv", out["blocks"][1], out["dense"][1]):
    np.testing.assert_allclose(gb, gd, rtol=1e-4, atol=1e-5, err_msg=f"d/d{name}")
    assert np.all(gb[_IDS == 0] == 0), f"d/d{name} leaks into padding rows"


def test_block_pairs_are_exactly_the_blocks_sharing_an_item():
  from k25jax.model.block_attention import block_pairs
  block = 8
  ids = np.concatenate([_IDS, np.zeros((-_IDS.size % block,), np.int32)])
  qb, kb, count = (np.asarray(a) for a in block_pairs(jnp.asarray(ids), block))
  got = set(zip(qb[:count].tolist(), kb[:count].tolist()))
  blocks = ids.reshape(-1, block)
  want = {(i, j) for i in range(len(blocks)) for j in range(len(blocks))
          if set(blocks[i][blocks[i] > 0]) & set(blocks[j][blocks[j] > 0])}
  assert got == want and len(got) == count


def test_too_small_window_is_wrong():
  """The window is what makes it exact: a bound below the longest item (17) drops keys and changes the output."""
  out = _dense_vs_chunked(5, 5)
  assert not np.allclose(out["chunked"][0], out["dense"][0], atol=1e-3)


def test_tower_chunked_and_blocks_equal_dense():
  cfg = vision_config("tiny")
  shapes = [(1, 4, 6), (2, 2, 4), (1, 2, 2), (4, 2, 2), (1, 2, 6)]
  rng = np.random.default_rng(1)
  items = [patchify(rng.normal(size=(t, 3, 14 * h, 14 * w)).astype(np.float32), 14) for t, h, w in shapes]
  b = pack_media(items, 100, 6)
  chunked = vision_config("tiny")
  chunked.update(attention_impl="chunked", attention_chunk=16, max_item_patches=24)
  check_vision_inputs(b["patch_item_ids"], b["item_grid"], b["item_valid"], chunked)
  valid = b["patch_item_ids"] > 0
  ct = jnp.asarray(rng.normal(size=(100, cfg.hidden_size)), jnp.float32)
  params = MoonViT3D(cfg).init(jax.random.key(0), b["patches"], b["patch_item_ids"], b["item_grid"])

  def run(c):
    def loss(params):
      h = MoonViT3D(c).apply(params, b["patches"], b["patch_item_ids"], b["item_grid"])
      return jnp.sum(jnp.where(valid[:, None], h * ct, 0)), h
    (_, h), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(h)[valid], g

  blocks = vision_config("tiny")
  blocks.update(attention_impl="blocks", attention_chunk=8)
  (hd, gd), (hc, gc), (hb, gb) = run(cfg), run(chunked), run(blocks)
  for h, g in ((hc, gc), (hb, gb)):
    np.testing.assert_allclose(h, hd, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, gd)


def test_bad_chunk_settings_name_the_field():
  for field, value, match in [("attention_impl", "flash", "attention_impl"), ("attention_chunk", 0, "attention_chunk"),
                              ("max_item_patches", -1, "max_item_patches")]:
    v = vision_config("tiny")
    v[field] = value
    with pytest.raises(ConfigError, match=match):
      validate_vision(v)
  v = vision_config("tiny")
  v.update(attention_impl="chunked", max_item_patches=8)
  b = pack_media([patchify(np.zeros((1, 3, 28, 84), np.float32), 14)], 16, 2)
  with pytest.raises(ValueError, match="max_item_patches=8"):
    check_vision_inputs(b["patch_item_ids"], b["item_grid"], b["item_valid"], v)
  assert vision_config("k25_full").attention_impl == "chunked" and vision_config("tiny").attention_impl == "blocks"
