"""K25Model (digest §1.2-1.3): media scatter order, the vision path alone (DEP), gradients, host checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k25jax.configs import get_config
from k25jax.model.k25 import K25Model, check_media_alignment, count_vision_params
from k25jax.model.lm import K2LM
from k25jax.model.vision import pack_media, patchify

PAD = 7
CFG = get_config("tiny").model
SHAPES = [(1, 2, 4), (4, 2, 2), (1, 4, 4)]   # 2 + 1 + 4 = 7 vision tokens


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  items = [patchify(rng.normal(size=(t, 3, 14 * h, 14 * w)).astype(np.float32), 14) for t, h, w in SHAPES]
  media = pack_media(items, 48, 4)
  tokens = rng.integers(8, CFG.vocab_size, size=(2, 16)).astype(np.int32)
  tokens[0, [3, 4, 9]] = PAD       # item 0 (2 tokens), item 1 (1 token)
  tokens[1, 5:9] = PAD             # item 2 (4 tokens)
  positions = np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16)).copy()
  return dict(tokens=tokens, positions=positions, segment_ids=np.ones((2, 16), np.int32), **media)


@pytest.fixture(scope="module")
def setup():
  model = K25Model(CFG)
  b = _batch()
  v = jax.jit(lambda k: model.init(k, **b, media_pad_id=PAD))(jax.random.key(0))
  # Redraw the vision/projector params so that vision tokens are far from init values.
  @jax.jit
  def redraw(params):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])

  v = {**v, "params": redraw(nn.unbox(v["params"]))}
  return model, v, b


def _call(model, v, b):
  return jax.jit(lambda v, b: model.apply(v, **b, media_pad_id=PAD))(v, b)


def test_forward_equals_row_major_scatter_reference(setup):
  model, v, b = setup
  check_media_alignment(b["tokens"], b["item_grid"], b["item_valid"], media_pad_id=PAD, num_vision_slots=12)
  logits, _ = _call(model, v, b)
  media = {k: b[k] for k in ("patches", "patch_item_ids", "item_grid", "item_valid")}
  vis, valid = jax.jit(lambda v, m: model.apply(v, **m, method=K25Model.encode_media))(v, media)
  assert valid.sum() == 7 and vis.shape == (12, CFG.hidden_size)
  emb = np.array(model.apply(v, b["tokens"], method=lambda mdl, t: mdl.language_model.embed(t)))
  k = 0
  for r in range(2):
    for c in range(16):
      if b["tokens"][r, c] == PAD:
        emb[r, c], k = vis[k], k + 1
  lm_vars = {name: col["language_model"] for name, col in v.items()}
  ref, _ = jax.jit(lambda lv, e: K2LM(CFG).apply(lv, b["tokens"], b["positions"], b["segment_ids"],
                                                 input_embeds=e))(lm_vars, emb)
  np.testing.assert_allclose(logits, ref, atol=2e-5, rtol=1e-5)
  text_only, _ = jax.jit(lambda lv: K2LM(CFG).apply(lv, b["tokens"], b["positions"], b["segment_ids"]))(lm_vars)
  assert np.abs(np.asarray(logits) - np.asarray(text_only)).max() > 1e-3   # vision tokens were used


def test_vision_path_alone_and_dep_gradients(setup):
  """Vision path with only its own params; LM(scatter(vision)) + vjp through the encoder == end-to-end grads."""
  model, v, b = setup
  media = {k: b[k] for k in ("patches", "patch_item_ids", "item_grid", "item_valid")}
  text = {k: b[k] for k in ("tokens", "positions", "segment_ids")}
  vis_params = {k: v["params"][k] for k in ("vision_tower", "mm_projector")}
  enc = lambda p: model.apply({"params": p}, **media, method=K25Model.encode_media)

  def loss_full(p):
    logits, _ = model.apply({**v, "params": p}, **b, media_pad_id=PAD)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  def loss_lm(p, vis, valid):
    logits, _ = model.apply({**v, "params": p}, **text, vision_tokens=vis, vision_valid=valid, media_pad_id=PAD,
                            method=K25Model.forward_with_vision_tokens)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  @jax.jit
  def dep(p):
    (vis, valid), vjp = jax.vjp(enc, {k: p[k] for k in ("vision_tower", "mm_projector")})
    g_lm, g_vis = jax.grad(loss_lm, argnums=(0, 1))(p, vis, valid)
    return g_lm, vjp((g_vis, jnp.zeros_like(valid)))[0], vis

  g_full = jax.jit(jax.grad(loss_full))(v["params"])
  g_lm, g_enc, vis = dep(v["params"])
  vis_alone, _ = jax.jit(enc)(vis_params)
  np.testing.assert_allclose(vis, vis_alone, atol=1e-6)
  for k in ("vision_tower", "mm_projector"):
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-6, rtol=1e-4), g_full[k], g_enc[k])
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-6, rtol=1e-4),
               g_full["language_model"], g_lm["language_model"])
  assert np.abs(g_full["vision_tower"]["blocks"]["wqkv"]["kernel"]).max() > 0
  assert np.abs(g_full["vision_tower"]["patch_embed"]["pos_emb"]).max() > 0


def test_text_only_batch_equals_lm(setup):
  model, v, b = setup
  t = dict(b)
  t["tokens"] = np.where(b["tokens"] == PAD, PAD + 1, b["tokens"]).astype(np.int32)
  t.update(patch_item_ids=np.zeros_like(b["patch_item_ids"]), item_grid=np.zeros_like(b["item_grid"]),
           item_valid=np.zeros_like(b["item_valid"]))
  check_media_alignment(t["tokens"], t["item_grid"], t["item_valid"], media_pad_id=PAD)
  logits, _ = _call(model, v, t)
  lm_vars = {name: col["language_model"] for name, col in v.items()}
  ref, _ = jax.jit(lambda lv: K2LM(CFG).apply(lv, t["tokens"], t["positions"], t["segment_ids"]))(lm_vars)
  np.testing.assert_allclose(logits, ref, atol=1e-6)


def test_media_alignment_check_and_vision_counts():
  b = _batch()
  bad = b["tokens"].copy()
  bad[1, 5] = PAD + 1
  with pytest.raises(ValueError, match="6 media_pad tokens .* give 7 vision tokens"):
    check_media_alignment(bad, b["item_grid"], b["item_valid"], media_pad_id=PAD)
  with pytest.raises(ValueError, match="exceed the 6 static slots"):
    check_media_alignment(b["tokens"], b["item_grid"], b["item_valid"], media_pad_id=PAD, num_vision_slots=6)
  counts = count_vision_params(get_config("k25_full"))
  assert abs(counts["vision_params"] / 416.9e6 - 1) < 5e-3, counts
  assert abs(counts["projector_params"] / 54.3e6 - 1) < 5e-3, counts


def test_host_boundary_padding_between_items(setup):
  """A global batch concatenates each host's patch budget (items then padding): items after a gap must get the
  same vision tokens as in a gap-free pack (positions and merges read item starts from the ids)."""
  model, v, b = setup
  enc = jax.jit(lambda v, p, ids, g, valid: model.apply(v, p, ids, g, valid, method=K25Model.encode_media))
  ref, ref_valid = enc(v, b["patches"], b["patch_item_ids"], b["item_grid"], b["item_valid"])
  ids = np.asarray(b["patch_item_ids"])
  n0 = int((ids == 1).sum())                          # "host 0" holds item 1, then 6 padding patches
  gap = 6
  patches = np.asarray(b["patches"])
  gapped = np.zeros_like(patches)
  gapped_ids = np.zeros_like(ids)
  gapped[:n0], gapped_ids[:n0] = patches[:n0], ids[:n0]
  rest = int((ids > 1).sum())
  gapped[n0 + gap:n0 + gap + rest] = patches[n0:n0 + rest]
  gapped_ids[n0 + gap:n0 + gap + rest] = ids[n0:n0 + rest]
  out, out_valid = enc(v, gapped, gapped_ids, b["item_grid"], b["item_valid"])
  np.testing.assert_array_equal(out_valid, ref_valid)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
