"""HF interop, Kimi-K2.5 (issue 8; digest §1.2-1.3): a transformers-saved tiny Kimi_K25 imported with the CLI gives
the same logits as transformers for one image and one 4-frame video chunk; the export loads back in transformers.

transformers 5.23 crashes on multi-frame chunks in `get_image_features` (ENVIRONMENT.md §7), so the reference
calls its vision tower and projector per item and passes the features through `mm_encoder_outputs`.
"""

import json
import os

import jax
import numpy as np
import pytest

from k25jax.interop import hf, mapping

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.modeling_outputs import BaseModelOutputWithPooling  # noqa: E402

from test_interop_text import TEXT, canonical_tensors, hf_logits, redraw  # noqa: E402

IMAGE_ID, VIDEO_ID = 90, 91
VISION = dict(patch_size=14, pos_emb_height=8, pos_emb_width=8, pos_emb_time=4, num_attention_heads=2,
              num_hidden_layers=2, hidden_size=32, intermediate_size=64, merge_kernel_size=[2, 2])
ITEMS = ((1, 4, 6), (4, 4, 4))          # one image (6 tokens), one 4-frame video chunk (4 tokens)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  cfg = transformers.Kimi_K25Config(
      text_config=dict(TEXT, n_group=1, topk_group=1, max_position_embeddings=256,
                       rope_parameters=dict(rope_type="default", rope_theta=500.0)),
      vision_config=VISION, projection_hidden_size=32, tie_word_embeddings=False, image_token_id=IMAGE_ID,
      video_token_id=VIDEO_ID)
  torch.manual_seed(0)
  model = redraw(transformers.Kimi_K25ForConditionalGeneration(cfg).eval(), seed=2)
  path = str(tmp_path_factory.mktemp("k25"))
  model.save_pretrained(path)
  rng = np.random.default_rng(0)
  pixels = [rng.normal(size=(t * h * w, 3, 14, 14)).astype(np.float32) for t, h, w in ITEMS]
  ids = np.concatenate([rng.integers(0, 80, 3), np.full(6, IMAGE_ID), rng.integers(0, 80, 2), np.full(4, VIDEO_ID),
                        rng.integers(0, 80, 3)])[None]
  return path, model, pixels, ids


def reference_logits(model, pixels, ids):
  feats = []
  with torch.no_grad():
    for x, grid in zip(pixels, ITEMS):
      out = model.model.vision_tower(torch.from_numpy(x), grid_thw=torch.tensor([grid]))
      feats.append(model.model.mm_projector(out.pooler_output).squeeze(1))
  mm = {kind: BaseModelOutputWithPooling(pooler_output=(f,)) for kind, f in zip(("image", "video"), feats)}
  return hf_logits(model, ids, mm_encoder_outputs=mm)


def k25_logits(config, variables, pixels, ids):
  from k25jax.model.k25 import K25Model
  from k25jax.model.vision import pack_media
  media = pack_media([(x.reshape(x.shape[0], -1), g) for x, g in zip(pixels, ITEMS)], num_patches=96,
                     max_items=2)
  tokens = np.where(ids == VIDEO_ID, IMAGE_ID, ids).astype(np.int32)    # one media_pad id for both (vLLM)
  pos = np.arange(ids.shape[1], dtype=np.int32)[None]
  fn = jax.jit(lambda v, t, p, s, m: K25Model(config.model).apply(v, t, p, s, **m, media_pad_id=IMAGE_ID)[0])
  return np.asarray(fn(variables, tokens, pos, np.ones_like(tokens), media))


def test_cli_import_matches_transformers_image_and_video(saved, tmp_path):
  path, model, pixels, ids = saved
  report = hf.dry_run(path)
  assert report.ok, report.format()
  assert hf.main(["import", path, str(tmp_path / "k25jax")]) == 0
  config, variables = hf.load_imported(str(tmp_path / "k25jax"))
  assert config.model.vision.enabled and config.model.vision.hidden_size == 32
  config.model.moe_dispatch = "dense"
  ref = reference_logits(model, pixels, ids)
  ours = k25_logits(config, variables, pixels, ids)
  diff = float(np.abs(ours - ref).max())
  print(f"kimi_k25 image + 4-frame video: max |logit diff| = {diff:.2e}")
  assert diff <= 1e-4
  # The media changed the logits (the vision path is not bypassed).
  blank = [np.zeros_like(x) for x in pixels]
  assert np.abs(k25_logits(config, variables, blank, ids) - ours).max() > 1e-3

  out = str(tmp_path / "exported")
  assert hf.main(["export", str(tmp_path / "k25jax"), out]) == 0
  src, dst = canonical_tensors(path), canonical_tensors(out)
  assert sorted(src) == sorted(dst)
  assert "vision_tower.patch_embed.proj.weight" in dst and "mm_projector.pre_norm.weight" in dst
  for k in src:
    np.testing.assert_array_equal(src[k], dst[k], err_msg=k)
  back, info = transformers.Kimi_K25ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  np.testing.assert_array_equal(reference_logits(back.eval(), pixels, ids), ref)
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["video_token_id"] == VIDEO_ID and cfg["vision_config"]["pos_emb_time"] == 4


def test_released_vision_config_names_map():
  released = dict(model_type="kimi_k25", media_placeholder_token_id=163605,
                  text_config=dict(model_type="kimi_k2", **TEXT, n_group=1, topk_group=1),
                  vision_config=dict(patch_size=14, vt_hidden_size=32, vt_num_hidden_layers=2,
                                     vt_num_attention_heads=2, vt_intermediate_size=64, init_pos_emb_height=8,
                                     init_pos_emb_width=8, init_pos_emb_time=4, merge_kernel_size=[2, 2],
                                     merge_type="sd2_tpool", mm_projector_type="patchmerger", mm_hidden_size=32,
                                     text_hidden_size=32, projector_ln_eps=1e-5, projector_hidden_act="gelu"))
  v = mapping.config_from_hf(released).model.vision
  assert (v.hidden_size, v.num_hidden_layers, v.intermediate_size, v.pos_emb_height) == (32, 2, 64, 8)
  back = mapping.config_to_hf(mapping.config_from_hf(released).model, released)
  assert back["vision_config"]["vt_hidden_size"] == 32 and back["media_placeholder_token_id"] == 163605
  with pytest.raises(Exception, match="merge_type"):
    mapping.config_from_hf({**released, "vision_config": {**released["vision_config"], "merge_type": "avg"}})
