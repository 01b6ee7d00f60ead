"""Config validation: every entry point calls `validate(config)` before anything compiles."""

from __future__ import annotations

import ml_collections

DTYPES = ("float32", "bfloat16", "float16")
DISPATCHES = ("auto", "ragged", "blocked", "dense", "ep", "cpu_kernel")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ROPE_TYPES = ("none", "yarn")


class ConfigError(ValueError):
  """A configuration value is invalid; the message names the field and the fix."""


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


def validate_model(m: ml_collections.ConfigDict, mesh: ml_collections.ConfigDict | None = None) -> None:
  """Checks the LM fields (digest §1.1) for consistency."""
  for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_intermediate_size",
            "intermediate_size", "n_routed_experts", "num_experts_per_tok"):
    _check(int(m[f]) > 0, f"model.{f}={m[f]} must be a positive integer")
  _check(m.qk_rope_head_dim % 2 == 0,
         f"model.qk_rope_head_dim={m.qk_rope_head_dim} must be even (rotary pairs); use e.g. "
         f"{m.qk_rope_head_dim + 1}")
  _check(m.q_lora_rank is None or int(m.q_lora_rank) >= 0,
         f"model.q_lora_rank={m.q_lora_rank} must be >= 0 (0 means a full-rank q projection)")
  _check(0 <= m.first_k_dense_replace <= m.num_hidden_layers,
         f"model.first_k_dense_replace={m.first_k_dense_replace} must lie in [0, num_hidden_layers="
         f"{m.num_hidden_layers}]")
  e, k = m.n_routed_experts, m.num_experts_per_tok
  _check(k <= e, f"model.num_experts_per_tok={k} exceeds model.n_routed_experts={e}; lower top-k or add "
         "experts")
  _check(m.n_group >= 1 and e % m.n_group == 0,
         f"model.n_group={m.n_group} must divide model.n_routed_experts={e}")
  _check(1 <= m.topk_group <= m.n_group,
         f"model.topk_group={m.topk_group} must lie in [1, n_group={m.n_group}]")
  if m.n_group > 1:
    _check(e // m.n_group >= 2,
           f"group-limited routing scores each group by its top-2 experts; n_routed_experts/n_group="
           f"{e // m.n_group} must be >= 2")
  _check(k <= m.topk_group * (e // m.n_group),
         f"model.num_experts_per_tok={k} exceeds the experts left by group routing (topk_group * "
         f"n_routed_experts / n_group = {m.topk_group * (e // m.n_group)})")
  _check(m.scoring_func == "sigmoid", f"model.scoring_func={m.scoring_func!r}: only 'sigmoid' is supported")
  _check(m.dtype in DTYPES and m.param_dtype in DTYPES,
         f"model.dtype={m.dtype!r} / param_dtype={m.param_dtype!r}: choose from {DTYPES}")
  _check(m.moe_dispatch in DISPATCHES, f"model.moe_dispatch={m.moe_dispatch!r}: choose from {DISPATCHES}")
  _check(m.moe_block_size >= 1, f"model.moe_block_size={m.moe_block_size} must be >= 1")
  _check(m.moe_max_block_size >= m.moe_block_size,
         f"model.moe_max_block_size={m.moe_max_block_size} must be >= moe_block_size={m.moe_block_size}")
  _check(m.attention_q_block >= 0, f"model.attention_q_block={m.attention_q_block} must be >= 0 (0 = one block)")
  _check(m.scan_unroll >= 1, f"model.scan_unroll={m.scan_unroll} must be >= 1 (1 = a rolled scan)")
  _check(m.remat_policy in REMAT_POLICIES,
         f"model.remat_policy={m.remat_policy!r}: choose from {REMAT_POLICIES}")
  _check(m.rope_scaling.type in ROPE_TYPES,
         f"model.rope_scaling.type={m.rope_scaling.type!r}: choose from {ROPE_TYPES}")
  if m.rope_scaling.type == "yarn":
    _check(m.rope_scaling.factor >= 1.0 and m.rope_scaling.original_max_position_embeddings > 0,
           "model.rope_scaling: YaRN needs factor >= 1 and original_max_position_embeddings > 0")
  _check(m.num_nextn_predict_layers in (0, 1),
         f"model.num_nextn_predict_layers={m.num_nextn_predict_layers}: 0 or 1 MTP layer is supported")
  _check(m.bias_update_speed >= 0, f"model.bias_update_speed={m.bias_update_speed} must be >= 0")
  if mesh is not None:
    t, x = int(mesh.tensor), int(mesh.expert)
    if t > 0:
      _check(m.num_attention_heads % t == 0,
             f"model.num_attention_heads={m.num_attention_heads} is not divisible by mesh.tensor={t}; "
             "pick a tensor axis size that divides the head count")
    if x > 0:
      _check(e % x == 0, f"model.n_routed_experts={e} is not divisible by mesh.expert={x}")


def validate_mesh(mesh: ml_collections.ConfigDict) -> None:
  sizes = [int(mesh[a]) for a in ("data", "fsdp", "expert", "tensor")]
  _check(all(s == -1 or s >= 1 for s in sizes),
         f"mesh sizes {sizes} must be positive or -1 (fill with the remaining devices)")
  _check(sizes.count(-1) <= 1, f"mesh sizes {sizes}: at most one axis may be -1")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Raises `ConfigError` naming the field and the fix; returns the config unchanged."""
  from k25jax.configs.optim import validate_optim  # noqa: PLC0415 (these import ConfigError from here)
  from k25jax.configs.vision import validate_vision  # noqa: PLC0415
  validate_mesh(config.mesh)
  if "optim" in config:
    validate_optim(config.optim)
  validate_model(config.model, config.mesh)
  v = config.model.vision
  _check(not config.get("dep", False) or v.enabled,
         "config.dep=True needs the multimodal model (model.vision.enabled=True); text-only runs have no encoder "
         "to decouple: set --config.dep=False")
  if v.enabled:
    validate_vision(v)
    t = int(config.mesh.tensor)
    if t > 0:
      _check(v.num_attention_heads % t == 0 and v.intermediate_size % t == 0,
             f"model.vision.num_attention_heads={v.num_attention_heads} / intermediate_size={v.intermediate_size} "
             f"must be divisible by mesh.tensor={t}")
  return config
