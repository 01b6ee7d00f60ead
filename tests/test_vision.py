"""MoonViT-3D tower, tpool merger and projector (digest §1.3): invariants and parity with transformers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k25jax.configs import ConfigError, get_config
from k25jax.configs.vision import validate_vision, vision_config
from k25jax.model.projector import PatchMergerProjector, tpool_patch_merger
from k25jax.model.vision import (MoonViT3D, bicubic_resize_matrix, check_vision_inputs, pack_media, patchify,
                                 rope_2d)

CFG = vision_config("tiny")  # width 32, 2 heads (hd 16), 2 layers, pos-emb 8x8
TEXT_HIDDEN = 48


def _items(rng, shapes):
  return [patchify(rng.normal(size=(t, 3, 14 * h, 14 * w)).astype(np.float32), 14) for t, h, w in shapes]


def _redraw(params, key):
  """Every parameter redrawn away from its init: matrices ~N(0, 1/fan_in), biases N(0, .1), norm scales 1+N(0, .1)."""
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]
  keys = jax.random.split(key, len(flat))
  out = {}
  for (path, x), k in zip(flat, keys):
    names = tuple(p.key for p in path)
    leaf, mod = names[-1], names[-2]
    scanned = "blocks" in names
    shape = x.shape[1:] if scanned else x.shape
    if leaf == "kernel":
      fan_in = {"wqkv": shape[0], "wo": shape[0] * shape[1]}.get(mod, shape[0])
      v = jax.random.normal(k, x.shape) / np.sqrt(fan_in)
    elif leaf == "pos_emb":
      v = 0.5 * jax.random.normal(k, x.shape)
    elif leaf == "scale":
      v = 1.0 + 0.1 * jax.random.normal(k, x.shape)
    else:
      v = 0.1 * jax.random.normal(k, x.shape)
    node = out
    for n in names[:-1]:
      node = node.setdefault(n, {})
    node[leaf] = v.astype(x.dtype)
  return out


@pytest.fixture(scope="module")
def model_params():
  batch = pack_media(_items(np.random.default_rng(0), [(1, 2, 2)]), 8, 2)
  tower, proj = MoonViT3D(CFG), PatchMergerProjector(CFG, TEXT_HIDDEN)
  tv = tower.init(jax.random.key(0), batch["patches"], batch["patch_item_ids"], batch["item_grid"])
  h = jnp.zeros((8, CFG.hidden_size))
  pv = proj.init(jax.random.key(1), h, batch["item_grid"], batch["item_valid"])
  return tower, proj, _redraw(tv, jax.random.key(2)), _redraw(pv, jax.random.key(3))


def _run(tower, proj, tv, pv, batch):
  @jax.jit
  def f(tv, pv, b):
    h = tower.apply(tv, b["patches"], b["patch_item_ids"], b["item_grid"])
    return (h, *proj.apply(pv, h, b["item_grid"], b["item_valid"]))
  return tuple(np.asarray(a) for a in f(tv, pv, batch))


def test_packed_batch_equals_each_item_alone(model_params):
  tower, proj, tv, pv = model_params
  shapes = [(1, 4, 6), (2, 2, 4), (1, 2, 2), (4, 2, 2)]
  items = _items(np.random.default_rng(1), shapes)
  packed = pack_media(items, 96, 6)
  check_vision_inputs(packed["patch_item_ids"], packed["item_grid"], packed["item_valid"], CFG)
  h, tok, valid = _run(tower, proj, tv, pv, packed)
  assert valid.sum() == sum(h_ * w_ // 4 for _, h_, w_ in shapes) and valid[:valid.sum()].all()
  off_p = off_t = 0
  for (t, hh, ww), it in zip(shapes, items):
    alone = pack_media([it], 64, 2)
    h1, tok1, v1 = _run(tower, proj, tv, pv, alone)
    n, nt = t * hh * ww, hh * ww // 4
    np.testing.assert_allclose(h[off_p:off_p + n], h1[:n], atol=1e-5)
    np.testing.assert_allclose(tok[off_t:off_t + nt], tok1[:nt], atol=1e-5)
    off_p, off_t = off_p + n, off_t + nt
  assert np.all(tok[off_t:] == 0)


def test_pos_emb_resize_matches_torch_bicubic():
  torch = pytest.importorskip("torch")
  np.testing.assert_array_equal(np.asarray(bicubic_resize_matrix(64, 64)), np.eye(64, dtype=np.float32))
  table = np.random.default_rng(2).normal(size=(8, 8, 5)).astype(np.float32)
  for h, w in [(3, 13), (16, 5), (8, 8), (1, 2), (40, 7)]:
    ours = jnp.einsum("hi,ijd,wj->hwd", bicubic_resize_matrix(h, 8), table, bicubic_resize_matrix(w, 8),
                      precision="highest")
    ref = torch.nn.functional.interpolate(torch.from_numpy(table).permute(2, 0, 1)[None], size=(h, w),
                                          mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, err_msg=f"grid {h}x{w}")


def test_rope_2d_keeps_norms_and_is_relative():
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.normal(size=(1, 2, 16)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 2, 16)), jnp.float32)

  def score(r1, c1, r2, c2):
    a = rope_2d(q, jnp.array([r1]), jnp.array([c1]), 10000.0)
    b = rope_2d(k, jnp.array([r2]), jnp.array([c2]), 10000.0)
    return np.asarray(jnp.einsum("phd,phd->ph", a, b))

  rq = rope_2d(q, jnp.array([5]), jnp.array([11]), 10000.0)
  np.testing.assert_allclose(np.linalg.norm(rq, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)
  base = score(2, 3, 7, 1)
  np.testing.assert_allclose(score(2 + 9, 3 + 4, 7 + 9, 1 + 4), base, rtol=1e-4, atol=1e-5)
  assert not np.allclose(score(2, 3, 8, 1), base, atol=1e-3)   # rows matter
  assert not np.allclose(score(2, 3, 7, 2), base, atol=1e-3)   # columns matter


def test_tpool_merger_is_mean_of_per_frame_merges():
  hid = jnp.asarray(np.random.default_rng(4).normal(size=(96, 8)), jnp.float32)
  merged, valid = tpool_patch_merger(hid, jnp.array([[4, 4, 6]]), jnp.array([True]), (2, 2), 4)
  frames = [tpool_patch_merger(hid[f * 24:(f + 1) * 24], jnp.array([[1, 4, 6]]), jnp.array([True]), (2, 2), 4)[0]
            for f in range(4)]
  assert valid.sum() == 6
  np.testing.assert_allclose(merged[:6], np.mean([fr[:6] for fr in frames], axis=0), atol=1e-6)
  # One image: token (bi, bj) holds patches (2bi+di, 2bj+dj) in (di, dj) order.
  x = hid[:24].reshape(4, 6, 8)
  ref = x.reshape(2, 2, 3, 2, 8).transpose(0, 2, 1, 3, 4).reshape(6, 4, 8)
  np.testing.assert_allclose(frames[0][:6], ref, atol=1e-6)


def _to_torch(tv, pv, hf_tower, hf_proj, cfg):
  import torch
  t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))
  tp, pp = tv["params"], pv["params"]
  d, heads = cfg.hidden_size, cfg.num_attention_heads
  hd = d // heads
  sd = {"patch_embed.proj.weight": t(tp["patch_embed"]["proj"]["kernel"].T.reshape(d, 3, 14, 14)),
        "patch_embed.proj.bias": t(tp["patch_embed"]["proj"]["bias"]),
        "patch_embed.pos_emb.position_embeddings": t(tp["patch_embed"]["pos_emb"]),
        "final_layernorm.weight": t(tp["final_layernorm"]["scale"]),
        "final_layernorm.bias": t(tp["final_layernorm"]["bias"])}
  b = tp["blocks"]

  def rope_perm(w):  # released interleaved pairs -> HF rotate-half (transformers' PermuteForRope)
    return w.reshape(heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

  for i in range(cfg.num_hidden_layers):
    wqkv = np.asarray(b["wqkv"]["kernel"][i]).reshape(d, 3 * d).T          # released [3D, D]
    bqkv = np.asarray(b["wqkv"]["bias"][i]).reshape(3 * d)
    for j, n in enumerate(("q_proj", "k_proj", "v_proj")):
      w, bb = wqkv[j * d:(j + 1) * d], bqkv[j * d:(j + 1) * d]
      if n != "v_proj":
        w, bb = rope_perm(w), rope_perm(bb)
      sd[f"layers.{i}.attn.{n}.weight"], sd[f"layers.{i}.attn.{n}.bias"] = t(w), t(bb)
    sd[f"layers.{i}.attn.proj.weight"] = t(np.asarray(b["wo"]["kernel"][i]).reshape(d, d).T)
    sd[f"layers.{i}.attn.proj.bias"] = t(b["wo"]["bias"][i])
    for ours, theirs in (("norm0", "norm1"), ("norm1", "norm2")):
      sd[f"layers.{i}.{theirs}.weight"] = t(b[ours]["scale"][i])
      sd[f"layers.{i}.{theirs}.bias"] = t(b[ours]["bias"][i])
    for ours, theirs in (("fc0", "fc1"), ("fc1", "fc2")):
      sd[f"layers.{i}.mlp.{theirs}.weight"] = t(np.asarray(b["mlp"][ours]["kernel"][i]).T)
      sd[f"layers.{i}.mlp.{theirs}.bias"] = t(b["mlp"][ours]["bias"][i])
  missing, unexpected = hf_tower.load_state_dict(sd, strict=False)
  assert not unexpected and all("time_position" in m or "inv_freq" in m for m in missing), (missing, unexpected)
  hf_proj.load_state_dict({
      "pre_norm.weight": t(pp["pre_norm"]["scale"]), "pre_norm.bias": t(pp["pre_norm"]["bias"]),
      "in_proj.weight": t(pp["proj_0"]["kernel"].T), "in_proj.bias": t(pp["proj_0"]["bias"]),
      "out_proj.weight": t(pp["proj_2"]["kernel"].T), "out_proj.bias": t(pp["proj_2"]["bias"])})


def test_matches_transformers_kimi_k25_vision(model_params):
  """Tower + projector equal HF `Kimi_K25VisionModel` + `Kimi_K25MultimodalProjection` (images and a 4-frame
  chunk; HF's tower called directly, since its top-level model cannot split multi-frame chunks)."""
  torch = pytest.importorskip("torch")
  kimi = pytest.importorskip("transformers.models.kimi_k25.modeling_kimi_k25")
  from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25Config, Kimi_K25VisionConfig
  tower, proj, tv, pv = model_params
  vcfg = Kimi_K25VisionConfig(hidden_size=CFG.hidden_size, num_hidden_layers=CFG.num_hidden_layers,
                              num_attention_heads=CFG.num_attention_heads, intermediate_size=CFG.intermediate_size,
                              pos_emb_height=CFG.pos_emb_height, pos_emb_width=CFG.pos_emb_width,
                              pos_emb_time=CFG.pos_emb_time)
  cfg = Kimi_K25Config(vision_config=vcfg.to_dict(), projection_hidden_size=CFG.hidden_size,
                       text_config=dict(model_type="deepseek_v3", hidden_size=TEXT_HIDDEN, vocab_size=64,
                                        num_hidden_layers=1))
  cfg.vision_config._attn_implementation = "eager"
  hf_tower = kimi.Kimi_K25VisionModel(cfg.vision_config).eval()
  hf_proj = kimi.Kimi_K25MultimodalProjection(cfg).eval()
  _to_torch(nn.unbox(tv), nn.unbox(pv), hf_tower, hf_proj, CFG)

  shapes = [(1, 8, 8), (1, 4, 6), (4, 4, 4), (3, 2, 2), (1, 10, 2)]
  items = _items(np.random.default_rng(5), shapes)
  packed = pack_media(items, 200, 6)
  h, tok, valid = _run(tower, proj, tv, pv, packed)
  n = sum(t * hh * ww for t, hh, ww in shapes)
  with torch.no_grad():  # one HF call per item: its merge index cannot mix different t in one call
    outs = [hf_tower(torch.from_numpy(x).reshape(-1, 3, 14, 14), torch.tensor([g])) for x, g in items]
    ref_h = np.concatenate([o.last_hidden_state.numpy() for o in outs])
    ref_tok = np.concatenate([hf_proj(o.pooler_output).squeeze(1).numpy() for o in outs])
  np.testing.assert_allclose(h[:n], ref_h, atol=1e-4, rtol=1e-4)
  chunked = vision_config("tiny")
  chunked.update(attention_impl="chunked", attention_chunk=24, max_item_patches=64)
  h_c = _run(MoonViT3D(chunked), proj, tv, pv, packed)[0]
  np.testing.assert_allclose(h_c[:n], ref_h, atol=1e-4, rtol=1e-4)
  assert valid.sum() == ref_tok.shape[0]
  np.testing.assert_allclose(tok[:ref_tok.shape[0]], ref_tok, atol=1e-4, rtol=1e-4)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_moonvit_full_parameter_counts():
  cfg = vision_config("k25_full")
  patches = jax.ShapeDtypeStruct((4, 588), jnp.float32)
  ids, grid = jax.ShapeDtypeStruct((4,), jnp.int32), jax.ShapeDtypeStruct((1, 3), jnp.int32)
  tv = jax.eval_shape(MoonViT3D(cfg).init, jax.random.key(0), patches, ids, grid)
  pv = jax.eval_shape(PatchMergerProjector(cfg, 7168).init, jax.random.key(0),
                      jax.ShapeDtypeStruct((4, 1152), jnp.float32), grid, jax.ShapeDtypeStruct((1,), bool))
  n_tower, n_proj = _count(nn.unbox(tv)), _count(nn.unbox(pv))
  assert abs(n_tower / 416.9e6 - 1) < 5e-3, n_tower
  assert abs(n_proj / 54.3e6 - 1) < 5e-3, n_proj
  names = nn.get_partition_spec(tv)["params"]
  assert names["blocks"]["wqkv"]["kernel"] == jax.sharding.PartitionSpec("layers", "vit_embed", None, "vit_heads",
                                                                         None)


def test_bad_inputs_raise_clear_errors():
  bad = vision_config("tiny")
  bad.num_attention_heads = 4  # head dim 8 is fine; 32/3 is not
  validate_vision(bad)
  bad.num_attention_heads = 3
  with pytest.raises(ConfigError, match="num_attention_heads=3"):
    validate_vision(bad)
  items = _items(np.random.default_rng(6), [(1, 2, 4), (1, 2, 2)])
  b = pack_media(items, 16, 3)
  b["patch_item_ids"][[0, 8]] = b["patch_item_ids"][[8, 0]]
  with pytest.raises(ValueError, match=r"patch_item_ids\[0\]=2"):
    check_vision_inputs(b["patch_item_ids"], b["item_grid"], b["item_valid"], CFG)
  odd = pack_media(_items(np.random.default_rng(7), [(1, 3, 2)]), 8, 1)
  with pytest.raises(ValueError, match="media item 0 has grid h=3"):
    check_vision_inputs(odd["patch_item_ids"], odd["item_grid"], odd["item_valid"], CFG)
  with pytest.raises(ValueError, match="budget is num_patches=4"):
    pack_media(items, 4, 3)


def test_sharded_bf16_and_remat_variants_agree(model_params):
  """On a (data 2, fsdp 2, tensor 2) mesh with the default rules, and in bf16 with remat, the outputs stay put."""
  from k25jax.sharding import get_rules, make_mesh, tree_shardings
  tower, proj, tv, pv = model_params
  batch = pack_media(_items(np.random.default_rng(8), [(1, 4, 6), (4, 2, 2)]), 48, 2)
  h, tok, valid = _run(tower, proj, tv, pv, batch)

  config = get_config("tiny")
  config.mesh.update(data=2, fsdp=2, expert=1, tensor=2)
  mesh, rules = make_mesh(config), get_rules("default")
  shard = lambda m, v, *a: jax.device_put(v, nn.unbox(tree_shardings(jax.eval_shape(m.init, jax.random.key(0), *a),
                                                                     mesh, rules)))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    tv_s = shard(tower, tv, batch["patches"], batch["patch_item_ids"], batch["item_grid"])
    pv_s = shard(proj, pv, h, batch["item_grid"], batch["item_valid"])
    h_s, tok_s, _ = _run(tower, proj, tv_s, pv_s, batch)
    chunked = vision_config("tiny")
    chunked.update(attention_impl="chunked", attention_chunk=8, max_item_patches=24)
    h_c = _run(MoonViT3D(chunked), proj, tv_s, pv_s, batch)[0]
  np.testing.assert_allclose(h_c[:40], h[:40], atol=1e-5)  # the 40 valid patches (24 + 16); the rest is padding
  assert tv_s["params"]["blocks"]["wqkv"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", None, "tensor", None)
  np.testing.assert_allclose(h_s, h, atol=1e-5)
  np.testing.assert_allclose(tok_s, tok, atol=1e-5)

  for dtype, remat in (("float32", "dots"), ("bfloat16", "full")):
    cfg = vision_config("tiny")
    cfg.update(dtype=dtype, remat_policy=remat)
    h2, tok2, valid2 = _run(MoonViT3D(cfg), PatchMergerProjector(cfg, TEXT_HIDDEN), tv, pv, batch)
    tol = 1e-5 if dtype == "float32" else 0.1
    np.testing.assert_array_equal(valid2, valid)
    np.testing.assert_allclose(np.asarray(h2, np.float32), h, atol=tol * np.abs(h).max())
    np.testing.assert_allclose(np.asarray(tok2, np.float32), tok, atol=tol * np.abs(tok).max())
