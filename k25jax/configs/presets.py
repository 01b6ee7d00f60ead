"""Model presets for k25jax, as `ml_collections` configs.

Usage (command line): `--config=k25jax/configs/presets.py:small --config.model.num_hidden_layers=2`.
Usage (Python): `from k25jax.configs import get_config; config = get_config("tiny")`.

`k25_full` carries the released Kimi-K2.5 `text_config` numbers (digest §1.1, "Released K2.5 text_config"):
61 layers, layer 0 dense (intermediate 18432), hidden 7168, 64 heads, MLA (q_lora 1536, kv_lora 512, nope 128,
rope 64, v 128), 384 routed experts of width 2048, top-8, 1 shared expert, sigmoid `noaux_tc` routing scaled by
2.827, no expert groups, vocab 163840, untied embeddings, rope theta 50000 with YaRN factor 64 from 4096.
`small` and `tiny` keep the same shape ratios at CPU size.
"""

from __future__ import annotations

import ml_collections

from k25jax.configs import data as data_presets
from k25jax.configs import optim as optim_presets
from k25jax.configs import sample as sample_presets
from k25jax.configs import train as trainer_presets
from k25jax.configs import vision as vision_presets

PRESETS = ("tiny", "small", "k25_full")


def _yarn(factor: float, original: int) -> ml_collections.ConfigDict:
  """YaRN rope scaling as in the released config (digest §1.1, 'rope scaling')."""
  return ml_collections.ConfigDict(dict(
      type="yarn", factor=float(factor), original_max_position_embeddings=int(original),
      beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0))


def _no_rope_scaling() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      type="none", factor=1.0, original_max_position_embeddings=0,
      beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.0))


def model_config(name: str) -> ml_collections.ConfigDict:
  """The language-model part of a preset (HF `DeepseekV3Config` field names)."""
  common = dict(
      # Routing (digest §1.1 "MoE router"): sigmoid scores in f32, correction bias for selection only.
      scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
      n_group=1, topk_group=1,
      rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
      num_nextn_predict_layers=0,
      # Aux-loss-free balancing (DeepSeek-V3 sign rule) and the optional sequence-level aux loss.
      bias_update_speed=1e-3, seq_aux_loss_alpha=0.0,
      # Execution.
      dtype="float32", param_dtype="float32",
      moe_dispatch="auto",           # auto | ragged | blocked | dense | ep
      moe_block_size=64,             # `blocked` dispatch: expert groups are padded to whole blocks of this many rows
      moe_max_block_size=512,        # ... and computed in chunks of block * 2^j rows up to this many
      remat_policy="none",           # none | full | dots | dots_no_batch
      attention_q_block=128,         # causal query blocks of MLA (k25jax/model/mla.py); 0 = one block
      scan_unroll=1,                 # layers per iteration of the scanned layer stacks (1 = rolled)
      initializer_range=0.02,
  )
  if name == "tiny":
    m = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.827,
        rope_theta=50000.0, max_position_embeddings=1024, rope_scaling=_no_rope_scaling())
  elif name == "small":
    m = dict(
        vocab_size=512, hidden_size=256, intermediate_size=640, moe_intermediate_size=128,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4,
        q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, routed_scaling_factor=2.827,
        rope_theta=50000.0, max_position_embeddings=4096, rope_scaling=_no_rope_scaling())
    # Three MoE layers: unrolled, the backward reads each layer's residuals in place instead of from a
    # stacked copy; deep stacks stay rolled so compile time does not grow with depth.
    common.update(scan_unroll=3)
  elif name == "k25_full":
    m = dict(
        vocab_size=163840, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, first_k_dense_replace=1, num_attention_heads=64,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=384, num_experts_per_tok=8, n_shared_experts=1, routed_scaling_factor=2.827,
        rope_theta=50000.0, max_position_embeddings=262144, rope_scaling=_yarn(64.0, 4096))
    common.update(dtype="bfloat16", remat_policy="full")
  else:
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
  m.update(common)
  cfg = ml_collections.ConfigDict(m)
  cfg.vision = vision_presets.vision_config(name)
  return cfg


def mesh_config() -> ml_collections.ConfigDict:
  """Mesh axis sizes; -1 fills with the remaining devices (at most one axis may be -1)."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1, rules="default"))


def train_config(name: str) -> ml_collections.ConfigDict:
  big = name == "k25_full"
  return ml_collections.ConfigDict(dict(
      batch_size=8 if not big else 1024, seq_len=64 if name == "tiny" else (256 if name == "small" else 4096),
      steps=10, learning_rate=3e-3 if not big else 2e-4, weight_decay=0.1, grad_clip=1.0,
      log_every=1))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Full config for a preset: `get_config("tiny" | "small" | "k25_full")` (default `tiny`)."""
  name = (arg or "tiny").strip()
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} "
                     f"(e.g. --config=k25jax/configs/presets.py:small)")
  config = ml_collections.ConfigDict()
  config.preset = name
  config.seed = 0
  config.dep = False   # DEP, the decoupled encoder process (digest §7; `k25jax.train.dep`)
  config.model = model_config(name)
  config.mesh = mesh_config()
  config.train = train_config(name)
  config.data = data_presets.data_config(name)
  config.optim = optim_presets.optim_config(name)
  config.sample = sample_presets.sample_config()
  config.trainer = trainer_presets.trainer_config(name)
  return config
