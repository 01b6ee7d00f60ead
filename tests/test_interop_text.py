"""HF interop, text path (issue 8; digest §1.1): config mapping, INT4 dequantisation, dry run, streaming import
onto a sharded mesh, logits parity with transformers' DeepseekV3 and exact export round trips."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from k25jax import sharding as shd
from k25jax.configs.validate import ConfigError
from k25jax.interop import hf, int4, mapping

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
            first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
            kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
            num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.5, rms_norm_eps=1e-6,
            tie_word_embeddings=False)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=4, beta_fast=32.0,
            beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
CASES = {"groups": dict(n_group=2, topk_group=1, max_position_embeddings=256,
                        rope_parameters=dict(rope_type="default", rope_theta=500.0)),
         "yarn": dict(n_group=1, topk_group=1, max_position_embeddings=32, rope_parameters=YARN)}


def redraw(model, seed=0):
  """Every parameter and the router bias random (ENVIRONMENT.md §7: default init hides bugs)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
      if not p.is_floating_point() or "inv_freq" in name or "time_position" in name:
        continue
      noise = torch.randn(p.shape, generator=g)
      if "e_score_correction_bias" in name:
        p.copy_(0.1 * noise)
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.1 * noise)
      elif p.ndim >= 2:
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:]) if "patch_embed.proj" in name else p.shape[-1]))
      else:
        p.copy_(0.1 * noise)
  return model


def hf_logits(model, ids, **kw):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(np.asarray(ids)).long(), **kw).logits.float().numpy()


def k2_logits(config, variables, ids):
  from k25jax.model import K2LM
  b, length = ids.shape
  pos = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length))
  fn = jax.jit(lambda v, t, p, s: K2LM(config.model).apply(v, t, p, s)[0])
  return np.asarray(fn(variables, ids.astype(np.int32), pos, np.ones_like(ids, np.int32)))


def _mesh(config):
  config.mesh.update(data=2, fsdp=2, expert=1, tensor=2)
  return shd.make_mesh(config)


def canonical_tensors(path):
  out = {}
  for f in sorted(os.listdir(path)):
    if f.endswith(".safetensors"):
      out.update({mapping.canonical_name(k): v for k, v in load_file(os.path.join(path, f)).items()})
  return out


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
  cfg = transformers.DeepseekV3Config(**TEXT, **CASES[request.param])
  torch.manual_seed(0)
  model = redraw(transformers.DeepseekV3ForCausalLM(cfg).eval(), seed=1)
  path = str(tmp_path_factory.mktemp(f"ds_{request.param}"))
  model.save_pretrained(path, max_shard_size="40KB")          # several shards + index json
  ids = np.random.default_rng(0).integers(0, TEXT["vocab_size"], (2, 12))
  return request.param, path, model, ids


def test_parity_with_transformers_and_exact_export(saved, tmp_path):
  name, path, model, ids = saved
  assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
  report = hf.dry_run(path)
  assert report.ok, report.format()
  with open(os.path.join(path, "config.json")) as f:
    config = mapping.config_from_hf(json.load(f))
  assert config.model.rope_scaling.type == ("yarn" if name == "yarn" else "none")
  assert config.model.n_group == CASES[name]["n_group"]
  config.model.moe_dispatch = "dense"
  mesh = _mesh(config)
  config, variables = hf.load_hf(path, config, mesh)
  # Placed straight into the rule shardings: q_b_proj's lora dim on `fsdp` and heads on `tensor`, the embedding's
  # width on `fsdp`.
  qb = variables["params"]["moe_layers"]["self_attn"]["q_b_proj"]["kernel"]
  assert qb.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  emb = variables["params"]["embed_tokens"]["embedding"]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  bias = variables["moe_state"]["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"]
  ref_bias = model.model.layers[1].mlp.gate.e_score_correction_bias.numpy()
  np.testing.assert_array_equal(np.asarray(bias)[0], ref_bias)
  assert np.abs(ref_bias).max() > 0.01

  ref = hf_logits(model, ids)
  ours = k2_logits(config, variables, ids)
  diff = float(np.abs(ours - ref).max())
  print(f"{name}: max |logit diff| = {diff:.2e}")
  assert diff <= 1e-4

  out = str(tmp_path / "exported")
  names = hf.export_hf(out, config, variables, hf_config=json.load(open(os.path.join(path, "config.json"))),
                       max_shard_bytes=30_000)
  src, dst = canonical_tensors(path), canonical_tensors(out)
  assert sorted(src) == sorted(dst) == sorted(names)
  for k in src:
    np.testing.assert_array_equal(src[k], dst[k], err_msg=k)
  back = transformers.DeepseekV3ForCausalLM.from_pretrained(out).eval()
  np.testing.assert_array_equal(hf_logits(back, ids), ref)


def test_dry_run_reports_missing_unexpected_and_mismatched(saved, tmp_path):
  _, path, _, _ = saved
  tensors = canonical_tensors(path)
  del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
  tensors["model.layers.0.self_attn.o_proj.weight"] = np.zeros((5, 5), np.float32)
  tensors["model.layers.0.mlp.extra.weight"] = np.zeros((2,), np.float32)
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with open(os.path.join(path, "config.json")) as f, open(tmp_path / "config.json", "w") as g:
    g.write(f.read())
  report = hf.dry_run(str(tmp_path))
  assert not report.ok
  assert report.missing == ["model.layers.1.mlp.experts.3.up_proj.weight"]
  assert report.unexpected == ["model.layers.0.mlp.extra.weight"]
  assert report.mismatched == [("model.layers.0.self_attn.o_proj.weight", (32, 16), (5, 5))]
  text = report.format()
  assert "experts.3.up_proj" in text and "(32, 16) vs (5, 5)" in text
  with pytest.raises(ValueError, match="does not match its config.json"):
    hf.import_checkpoint(str(tmp_path), str(tmp_path / "out"))


def _tiny_tokenizer(path):
  from k25jax.data import tokenizer as tk
  with open(os.path.join(path, "tiktoken.model"), "w") as f:
    import base64
    for b in range(256):
      f.write(f"{base64.b64encode(bytes([b])).decode()} {b}\n")
  decoder = {str(256 + i): {"content": s} for i, s in enumerate(tk.REQUIRED_SPECIALS)}
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"added_tokens_decoder": decoder}, f)


def test_cli_import_int4_experts_then_export(saved, tmp_path):
  """Released INT4 experts (pack-quantized, group 32) are dequantised on import; the CLI writes the k25jax format
  with the tokenizer, and export writes back the dequantised layout."""
  name, path, _, _ = saved
  if name != "groups":
    pytest.skip("one case suffices")
  src = tmp_path / "int4"
  src.mkdir()
  tensors, expected = canonical_tensors(path), {}
  for k in [k for k in tensors if ".mlp.experts." in k]:
    packed = int4.quantize_pack_quantized(tensors.pop(k), group_size=8)
    base = k[:-len("weight")]
    tensors.update({base + p: v for p, v in packed.items()})
    expected[k] = int4.dequantize_pack_quantized(packed[int4.PACKED], packed[int4.SCALE], packed[int4.SHAPE],
                                                 group_size=8)
  save_file(tensors, str(src / "model.safetensors"))
  cfg = json.load(open(os.path.join(path, "config.json")))
  cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                "config_groups": {"group_0": {"weights": {"num_bits": 4, "group_size": 8,
                                                                          "symmetric": True, "strategy": "group"}}}}
  json.dump(cfg, open(src / "config.json", "w"))
  _tiny_tokenizer(str(src))
  report = hf.dry_run(str(src))
  assert report.ok and report.quantized == 24, report.format()

  assert hf.main(["import", str(src), str(tmp_path / "k25jax"), "--dry-run"]) == 0
  assert not os.path.exists(tmp_path / "k25jax")
  assert hf.main(["import", str(src), str(tmp_path / "k25jax")]) == 0
  from k25jax.data.tokenizer import TiktokenTokenizer
  assert TiktokenTokenizer.from_dir(str(tmp_path / "k25jax" / "tokenizer")).encode("hi") == [104, 105]
  config, variables = hf.load_imported(str(tmp_path / "k25jax"))
  up = np.asarray(variables["params"]["moe_layers"]["mlp"]["experts_up_proj"])
  np.testing.assert_array_equal(up[0, 5], expected["model.layers.1.mlp.experts.5.up_proj.weight"].T)
  assert np.abs(up[0, 5].T - canonical_tensors(path)["model.layers.1.mlp.experts.5.up_proj.weight"]).max() > 0

  assert hf.main(["export", str(tmp_path / "k25jax"), str(tmp_path / "back")]) == 0
  back = canonical_tensors(str(tmp_path / "back"))
  for k, v in expected.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  assert "quantization_config" not in json.load(open(tmp_path / "back" / "config.json"))
  assert os.path.isfile(tmp_path / "back" / "tiktoken.model")


def test_int4_unpacks_the_compressed_tensors_bit_layout():
  # Value j of a row sits in word j // 8, bits 4 (j % 8): build words by hand from known int4 values.
  rng = np.random.default_rng(0)
  q = rng.integers(-8, 8, (3, 64))
  words = np.zeros((3, 8), np.uint64)
  for j in range(64):
    words[:, j // 8] |= (q[:, j] + 8).astype(np.uint64) << np.uint64(4 * (j % 8))
  scale = rng.uniform(0.5, 2.0, (3, 2)).astype(np.float32)
  w = int4.dequantize_pack_quantized(words.astype(np.uint32).view(np.int32), scale, [3, 64])
  np.testing.assert_array_equal(w, (q * np.repeat(scale, 32, axis=1)).astype(np.float32))
  x = rng.normal(size=(4, 64)).astype(np.float32)
  packed = int4.quantize_pack_quantized(x)
  back = int4.dequantize_pack_quantized(packed[int4.PACKED], packed[int4.SCALE], packed[int4.SHAPE])
  assert np.abs(back - x).max() <= packed[int4.SCALE].max() / 2 + 1e-6
  with pytest.raises(ValueError, match="weight_scale has shape"):
    int4.dequantize_pack_quantized(packed[int4.PACKED], packed[int4.SCALE][:, :1], packed[int4.SHAPE])


def test_config_mapping_both_directions_and_clear_errors():
  released = dict(model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"], **TEXT, n_group=1, topk_group=1,
                  max_position_embeddings=262144,
                  rope_theta=50000.0, scoring_func="sigmoid", topk_method="noaux_tc", bos_token_id=163584,
                  rope_scaling=dict(type="yarn", factor=64.0, original_max_position_embeddings=4096, beta_fast=1.0,
                                    beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))
  config = mapping.config_from_hf(released)
  m = config.model
  assert (m.rope_theta, m.rope_scaling.factor, m.rope_scaling.beta_fast) == (50000.0, 64.0, 1.0)
  assert m.num_nextn_predict_layers == 0 and not m.vision.enabled and m.q_lora_rank == 16
  back = mapping.config_to_hf(m, released)
  assert back["rope_scaling"]["type"] == "yarn" and back["rope_theta"] == 50000.0
  assert back["bos_token_id"] == 163584 and "rope_parameters" not in back
  assert mapping.config_from_hf(back).model.to_dict() == m.to_dict()
  fresh = mapping.config_to_hf(m)
  assert fresh["rope_parameters"]["rope_type"] == "yarn"
  assert mapping.config_from_hf(fresh).model.to_dict() == m.to_dict()
  for field, value, match in (("scoring_func", "softmax", "config.scoring_func"),
                              ("rope_interleave", False, "config.rope_interleave"),
                              ("num_key_value_heads", 1, "num_key_value_heads"),
                              ("model_type", "llama", "model_type")):
    with pytest.raises(ConfigError, match=match):
      mapping.config_from_hf({**released, field: value})


def test_mapping_covers_every_leaf_including_mtp_and_full_q_proj():
  """Each model leaf is filled by exactly one entry with its shape (MTP layer: DeepSeek-V3 layer index L)."""
  config = mapping.config_from_hf(dict(model_type="deepseek_v3", **TEXT, n_group=1, topk_group=1,
                                       num_nextn_predict_layers=1), mtp=True)
  m = config.model
  assert m.num_nextn_predict_layers == 1
  entries = mapping.build_entries(m)
  assert hf.check_entries(m, entries) == []
  names = [n for e in entries for _, n in e.items()]
  assert "model.layers.2.eh_proj.weight" in names and "model.layers.2.mlp.experts.7.down_proj.weight" in names
  assert len(names) == len(set(names))
  m.q_lora_rank = 0
  assert hf.check_entries(m, mapping.build_entries(m)) == []
