"""Hugging Face <-> k25jax: config fields and a declarative tensor-name map with reshape hooks (digest §1.1-1.3).

Checkpoint layouts accepted (the released Kimi-K2.5 one is canonical and is what export writes):
  text-only (DeepseekV3 / Kimi-K2):  model.layers.{l}.*, model.embed_tokens.weight, model.norm.weight,
                                     lm_head.weight; routed experts per expert (mlp.experts.{e}.{gate,up,down}_proj)
  Kimi-K2.5:                         language_model.model.layers.{l}.*, language_model.lm_head.weight,
                                     vision_tower.patch_embed.*, vision_tower.encoder.{blocks.{i}.*, final_layernorm},
                                     mm_projector.{pre_norm, proj.0, proj.2}
`save_pretrained` of transformers 5.23 `Kimi_K25ForConditionalGeneration` writes three names differently (its
reverse renaming is not exact); `canonical_name` maps them back:
  language_model.model.blocks.{l}.  -> language_model.model.layers.{l}.
  model.mm_projector.pre_norm.      -> mm_projector.pre_norm.
  vision_tower.encoder.patch_embed. -> vision_tower.patch_embed.

Each `Entry` maps one k25jax leaf to the HF tensors that fill it: a leaf stacked over scanned layers (and over
experts) is assembled from one HF tensor per (layer[, expert]); a hook turns an HF tensor ([out, in] linears,
conv kernels, fused qkv) into the leaf's trailing shape and back.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import ml_collections
import numpy as np

from k25jax.configs import get_config
from k25jax.configs.validate import ConfigError

# ----------------------------------------------------------------------------------------------- config

_TEXT_TYPES = ("deepseek_v3", "kimi_k2")
_K25_TYPES = ("kimi_k25",)
# k25jax config.model field <- HF text_config field (same name unless listed).
_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                "first_k_dense_replace", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
                "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
                "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "rms_norm_eps",
                "max_position_embeddings", "initializer_range")
# Fields whose value k25jax fixes: HF field -> accepted values (absent means the HF default, accepted).
_TEXT_FIXED = {"hidden_act": ("silu",), "scoring_func": ("sigmoid",), "topk_method": ("noaux_tc",),
               "rope_interleave": (True,), "attention_bias": (False,), "moe_layer_freq": (1,),
               "pretraining_tp": (1,)}
# Released (original Moonshot) vision_config names -> HF 5.x names.
_VISION_ALIASES = {"vt_hidden_size": "hidden_size", "vt_num_hidden_layers": "num_hidden_layers",
                   "vt_num_attention_heads": "num_attention_heads", "vt_intermediate_size": "intermediate_size",
                   "init_pos_emb_height": "pos_emb_height", "init_pos_emb_width": "pos_emb_width",
                   "init_pos_emb_time": "pos_emb_time"}
_VISION_FIXED = {"hidden_act": ("gelu_pytorch_tanh",), "pos_emb_type": ("divided_fixed",),
                 "merge_type": ("sd2_tpool",), "video_attn_type": ("spatial_temporal",),
                 "mm_projector_type": ("patchmerger",), "projector_hidden_act": ("gelu",)}


def _fail(where: str, msg: str) -> None:
  raise ConfigError(f"HF config {where}: {msg}")


def _check_fixed(cfg: dict, fixed: dict, where: str) -> None:
  for key, allowed in fixed.items():
    if key in cfg and cfg[key] is not None and cfg[key] not in allowed:
      _fail(f"{where}.{key}", f"{cfg[key]!r} is not supported by k25jax (it implements {allowed[0]!r} only); "
            "convert the checkpoint or extend the model first")


def text_config_of(hf: dict) -> tuple[dict, str]:
  """(text config dict, where-prefix) of a DeepseekV3 / Kimi-K2 / Kimi-K2.5 config.json."""
  mtype = hf.get("model_type")
  if mtype in _K25_TYPES or "text_config" in hf:
    if not isinstance(hf.get("text_config"), dict):
      _fail("text_config", "missing; a Kimi-K2.5 config.json holds the LM under text_config")
    return hf["text_config"], "text_config"
  if mtype not in _TEXT_TYPES:
    _fail("model_type", f"{mtype!r} is not one of {_TEXT_TYPES + _K25_TYPES}; only DeepSeek-V3-style "
          "(Kimi-K2, Kimi-K2.5) checkpoints can be imported")
  return hf, "config"


def is_multimodal(hf: dict) -> bool:
  return hf.get("model_type") in _K25_TYPES or "vision_config" in hf


def _rope_from_hf(text: dict, where: str) -> tuple[float, ml_collections.ConfigDict]:
  params = dict(text.get("rope_scaling") or {})
  params.update(text.get("rope_parameters") or {})
  theta = float(params.get("rope_theta", text.get("rope_theta", 10000.0)))
  rtype = params.get("rope_type", params.get("type", "default"))
  if rtype in ("default", None):
    return theta, ml_collections.ConfigDict(dict(type="none", factor=1.0, original_max_position_embeddings=0,
                                                 beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.0))
  if rtype != "yarn":
    _fail(f"{where}.rope_parameters.rope_type", f"{rtype!r} is not supported; k25jax implements 'default' and "
          "'yarn' (the released Kimi-K2.5 uses yarn)")
  for key, ok in (("attention_factor", None), ("truncate", True)):
    if params.get(key, ok) != ok:
      _fail(f"{where}.rope_parameters.{key}", f"{params[key]!r} is not supported (k25jax derives the YaRN "
            "attention factor from factor/mscale/mscale_all_dim and truncates the correction range); remove it")
  if params.get("factor") is None or params.get("original_max_position_embeddings") is None:
    _fail(f"{where}.rope_parameters", "YaRN needs 'factor' and 'original_max_position_embeddings'; add them")
  return theta, ml_collections.ConfigDict(dict(
      type="yarn", factor=float(params["factor"]),
      original_max_position_embeddings=int(params["original_max_position_embeddings"]),
      beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
      mscale=float(params.get("mscale") or 0.0), mscale_all_dim=float(params.get("mscale_all_dim") or 0.0)))


def _vision_from_hf(hf: dict, text_hidden: int, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  raw = hf.get("vision_config")
  if not isinstance(raw, dict):
    _fail("vision_config", "missing; a Kimi-K2.5 config.json describes MoonViT-3D under vision_config")
  v = {_VISION_ALIASES.get(k, k): val for k, val in raw.items()}
  _check_fixed(v, _VISION_FIXED, "vision_config")
  out = ml_collections.ConfigDict(base.to_dict())
  out.enabled = True
  for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
            "pos_emb_height", "pos_emb_width", "pos_emb_time"):
    if f in v:
      out[f] = int(v[f])
  if "merge_kernel_size" in v:
    out.merge_kernel_size = tuple(int(k) for k in v["merge_kernel_size"])
  theta = (v.get("rope_parameters") or {}).get("rope_theta")
  if theta is not None:
    out.rope_theta = float(theta)
  out.projector_ln_eps = float(hf.get("projection_layer_norm_eps", raw.get("projector_ln_eps", 1e-5)))
  proj_in = hf.get("projection_hidden_size", raw.get("mm_hidden_size"))
  if proj_in is not None and int(proj_in) != out.hidden_size:
    _fail("projection_hidden_size", f"{proj_in} differs from the vision width {out.hidden_size}; the patch-merger "
          "projector normalises tower outputs, so both must be equal")
  proj_out = raw.get("text_hidden_size")
  if proj_out is not None and int(proj_out) != text_hidden:
    _fail("vision_config.text_hidden_size", f"{proj_out} differs from text_config.hidden_size={text_hidden}")
  return out


def config_from_hf(hf: dict, *, mtp: bool = False, preset: str = "tiny") -> ml_collections.ConfigDict:
  """k25jax config (the `preset`'s train/data/mesh groups, `model` from `hf`) of an HF config.json dict.

  `mtp`: keep `num_nextn_predict_layers` (DeepSeek-V3 MTP) only when the checkpoint holds the MTP weights
  (transformers does not save them); otherwise the LM is built without the MTP layer.
  """
  text, where = text_config_of(hf)
  _check_fixed(text, _TEXT_FIXED, where)
  heads = int(text["num_attention_heads"])
  kv_heads = text.get("num_key_value_heads")
  if kv_heads is not None and int(kv_heads) != heads:
    _fail(f"{where}.num_key_value_heads", f"{kv_heads} != num_attention_heads={heads}; MLA has one key per head")
  config = get_config(preset)
  m = config.model
  for f in _TEXT_FIELDS:
    if f in text and text[f] is not None:
      m[f] = type(m[f])(text[f])
  m.q_lora_rank = int(text.get("q_lora_rank") or 0)
  m.rope_theta, m.rope_scaling = _rope_from_hf(text, where)
  m.num_nextn_predict_layers = int(text.get("num_nextn_predict_layers", 0) or 0) if mtp else 0
  m.tie_word_embeddings = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
  if is_multimodal(hf):
    m.vision = _vision_from_hf(hf, m.hidden_size, m.vision)
  else:
    m.vision.enabled = False
  return config


def config_to_hf(m: ml_collections.ConfigDict, base: dict | None = None) -> dict:
  """HF config.json dict of `config.model`; fields of `base` (the imported config.json) that k25jax does not
  model (token ids, quantization_config, ...) are kept, the modelled ones are overwritten."""
  multimodal = bool(m.vision.enabled)
  out = dict(base or {})
  if multimodal and not out:
    out = dict(architectures=["Kimi_K25ForConditionalGeneration"], model_type="kimi_k25",
               image_token_id=163605, video_token_id=163840)
  text = dict(out.get("text_config") or {}) if multimodal else out
  text.setdefault("model_type", "deepseek_v3")
  if not multimodal:
    text.setdefault("architectures", ["DeepseekV3ForCausalLM"])
  for f in _TEXT_FIELDS:
    text[f] = m[f]
  text.update(num_key_value_heads=m.num_attention_heads, q_lora_rank=m.q_lora_rank or None,
              num_nextn_predict_layers=m.num_nextn_predict_layers, tie_word_embeddings=m.tie_word_embeddings,
              hidden_act="silu", rope_interleave=True, attention_bias=False)
  rs = m.rope_scaling
  rope = dict(rope_type="default", rope_theta=m.rope_theta)
  if rs.type == "yarn":
    rope = dict(rope_type="yarn", rope_theta=m.rope_theta, factor=rs.factor,
                original_max_position_embeddings=rs.original_max_position_embeddings, beta_fast=rs.beta_fast,
                beta_slow=rs.beta_slow, mscale=rs.mscale, mscale_all_dim=rs.mscale_all_dim)
  if "rope_scaling" in text:      # the released (pre-5.x) style: rope_theta beside a rope_scaling dict
    text["rope_theta"] = m.rope_theta
    text["rope_scaling"] = None if rs.type == "none" else {
        ("type" if "type" in (text["rope_scaling"] or {}) else "rope_type"): "yarn",
        **{k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}}
  else:
    text["rope_parameters"] = rope
  if not multimodal:
    return text
  v = m.vision
  vision = dict(out.get("vision_config") or {})
  released = any(k in vision for k in _VISION_ALIASES)
  names = {hf_name: k for k, hf_name in _VISION_ALIASES.items()} if released else {}
  for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "pos_emb_height",
            "pos_emb_width", "pos_emb_time"):
    vision[names.get(f, f)] = int(v[f])
  vision.update(patch_size=int(v.patch_size), merge_kernel_size=[int(k) for k in v.merge_kernel_size])
  if not released:
    vision.update(model_type="kimi_k25_vision", hidden_act="gelu_pytorch_tanh",
                  rope_parameters=dict(rope_type="axial", rope_theta=v.rope_theta))
  else:
    vision.update(mm_hidden_size=int(v.hidden_size), text_hidden_size=int(m.hidden_size),
                  projector_ln_eps=float(v.projector_ln_eps))
  out.update(text_config=text, vision_config=vision, tie_word_embeddings=m.tie_word_embeddings)
  if not released:
    out.update(projection_hidden_size=int(v.hidden_size), projection_layer_norm_eps=float(v.projector_ln_eps))
  return out


# ----------------------------------------------------------------------------------------------- names

_CANONICAL = ((re.compile(r"^language_model\.model\.blocks\."), "language_model.model.layers."),
              (re.compile(r"^model\.mm_projector\."), "mm_projector."),
              (re.compile(r"^vision_tower\.encoder\.patch_embed\."), "vision_tower.patch_embed."))


def canonical_name(name: str) -> str:
  """The released-layout name of a tensor name written by the released checkpoint or by `save_pretrained`."""
  for pattern, repl in _CANONICAL:
    name = pattern.sub(repl, name)
  return name


# Hooks: (HF tensor -> k25jax slice of `shape`, k25jax slice -> HF tensor of `shape`).
Hook = tuple[Callable[[np.ndarray, tuple], np.ndarray], Callable[[np.ndarray, tuple], np.ndarray]]
HOOKS: dict[str, Hook] = {
    "id": (lambda x, s: x.reshape(s), lambda x, s: x.reshape(s)),
    # nn.Linear weight [out, in] <-> kernel [in, out]
    "linear": (lambda x, s: x.T, lambda x, s: x.T),
    # Conv2d weight [D, C, p, p] <-> kernel [C*p*p, D] (patches flattened as (C, p, p))
    "conv": (lambda x, s: x.reshape(x.shape[0], -1).T, lambda x, s: x.T.reshape(s)),
    # fused wqkv weight [3D, D] (interleaved rope pairs, released order) <-> DenseGeneral kernel [D, 3, heads, hd]
    "wqkv": (lambda x, s: x.reshape(s[1], s[2], s[3], s[0]).transpose(3, 0, 1, 2),
             lambda x, s: x.transpose(1, 2, 3, 0).reshape(s)),
    # attention out weight [D, heads*hd] <-> DenseGeneral kernel [heads, hd, D]
    "wo": (lambda x, s: x.T.reshape(s), lambda x, s: x.reshape(-1, x.shape[-1]).T),
}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One k25jax leaf (`target` path from the variables root) and the HF tensors it is made of.

  `hf` is a name template; `{layer}` runs over the HF layer indices `layers` along the leaf's axis 0 (when set)
  and `{expert}` over `range(experts)` along the next axis. `hf_shape` is the shape of one HF tensor, `shape` the whole leaf's shape.
  `copies` are further HF names holding the same tensor (written on export, not read on import).
  """
  target: tuple[str, ...]
  hf: str
  hook: str
  shape: tuple[int, ...]
  hf_shape: tuple[int, ...]
  layers: tuple[int, ...] | None = None
  experts: int | None = None
  copies: tuple[str, ...] = ()

  @property
  def n_stacked(self) -> int:
    return (self.layers is not None) + (self.experts is not None)

  def items(self) -> list[tuple[tuple[int, ...], str]]:
    """(leading index into the leaf, HF name) for every HF tensor of this leaf."""
    layer_ix = [((), {})] if self.layers is None else [((i,), {"layer": l}) for i, l in enumerate(self.layers)]
    expert_ix = [((), {})] if self.experts is None else [((e,), {"expert": e}) for e in range(self.experts)]
    return [(li + ei, self.hf.format(**lk, **ek)) for li, lk in layer_ix for ei, ek in expert_ix]


def _layer_entries(m, prefix: str, root: tuple[str, ...], state_root: tuple[str, ...], use_moe: bool,
                   layers: tuple[int, ...], scanned: bool) -> list[Entry]:
  """Entries of a decoder layer group: `scanned` (leaf axis 0 runs over the HF indices `layers`) or the single
  unscanned layer `layers[0]` (the MTP block)."""
  d, h = m.hidden_size, m.num_attention_heads
  nope, rope, vdim = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
  lead, seq = ((len(layers),), layers) if scanned else ((), None)
  hf_layer = f"{prefix}layers.{{layer}}." if scanned else f"{prefix}layers.{layers[0]}."

  def lin(path, hf, n_in, n_out):
    return Entry(root + path, hf_layer + hf, "linear", lead + (n_in, n_out), (n_out, n_in), seq)

  def vec(path, hf, n, coll_root=root):
    return Entry(coll_root + path, hf_layer + hf, "id", lead + (n,), (n,), seq)

  out = [vec(("input_layernorm", "weight"), "input_layernorm.weight", d),
         vec(("post_attention_layernorm", "weight"), "post_attention_layernorm.weight", d)]
  a = ("self_attn",)
  if m.q_lora_rank:
    out += [lin(a + ("q_a_proj", "kernel"), "self_attn.q_a_proj.weight", d, m.q_lora_rank),
            vec(a + ("q_a_layernorm", "weight"), "self_attn.q_a_layernorm.weight", m.q_lora_rank),
            lin(a + ("q_b_proj", "kernel"), "self_attn.q_b_proj.weight", m.q_lora_rank, h * (nope + rope))]
  else:
    out.append(lin(a + ("q_proj", "kernel"), "self_attn.q_proj.weight", d, h * (nope + rope)))
  out += [lin(a + ("kv_a_proj_with_mqa", "kernel"), "self_attn.kv_a_proj_with_mqa.weight", d,
              m.kv_lora_rank + rope),
          vec(a + ("kv_a_layernorm", "weight"), "self_attn.kv_a_layernorm.weight", m.kv_lora_rank),
          lin(a + ("kv_b_proj", "kernel"), "self_attn.kv_b_proj.weight", m.kv_lora_rank, h * (nope + vdim)),
          lin(a + ("o_proj", "kernel"), "self_attn.o_proj.weight", h * vdim, d)]
  if not use_moe:
    f = m.intermediate_size
    return out + [lin(("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", d, f),
                  lin(("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", d, f),
                  lin(("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", f, d)]
  e, f = m.n_routed_experts, m.moe_intermediate_size
  out += [lin(("mlp", "gate", "kernel"), "mlp.gate.weight", d, e),
          vec(("mlp", "gate", "e_score_correction_bias"), "mlp.gate.e_score_correction_bias", e, state_root)]
  for name, (n_in, n_out) in (("gate_proj", (d, f)), ("up_proj", (d, f)), ("down_proj", (f, d))):
    out.append(Entry(root + ("mlp", f"experts_{name}"), hf_layer + f"mlp.experts.{{expert}}.{name}.weight",
                     "linear", lead + (e, n_in, n_out), (n_out, n_in), seq, e))
  if m.n_shared_experts:
    fs = f * m.n_shared_experts
    out += [lin(("mlp", "shared_experts", "gate_proj", "kernel"), "mlp.shared_experts.gate_proj.weight", d, fs),
            lin(("mlp", "shared_experts", "up_proj", "kernel"), "mlp.shared_experts.up_proj.weight", d, fs),
            lin(("mlp", "shared_experts", "down_proj", "kernel"), "mlp.shared_experts.down_proj.weight", fs, d)]
  return out


def lm_entries(m: ml_collections.ConfigDict, multimodal: bool) -> list[Entry]:
  """Entries of the K2 LM (digest §1.1 weight shapes), under `language_model` for the K2.5 model."""
  prefix, head = ("language_model.model.", "language_model.lm_head.weight") if multimodal else (
      "model.", "lm_head.weight")
  root = ("params", "language_model") if multimodal else ("params",)
  state = ("moe_state", "language_model") if multimodal else ("moe_state",)
  v, d, k, n = m.vocab_size, m.hidden_size, m.first_k_dense_replace, m.num_hidden_layers
  mtp = bool(m.num_nextn_predict_layers)
  out = [Entry(root + ("embed_tokens", "embedding"), prefix + "embed_tokens.weight", "id", (v, d), (v, d),
               copies=(f"{prefix}layers.{n}.embed_tokens.weight",) if mtp else ()),
         Entry(root + ("norm", "weight"), prefix + "norm.weight", "id", (d,), (d,)),
         Entry(root + ("lm_head", "kernel"), head, "linear", (d, v), (v, d),
               copies=(f"{prefix}layers.{n}.shared_head.head.weight",) if mtp else ())]
  if k:
    out += _layer_entries(m, prefix, root + ("dense_layers",), state + ("dense_layers",), False, tuple(range(k)),
                          True)
  if n > k:
    out += _layer_entries(m, prefix, root + ("moe_layers",), state + ("moe_layers",), True, tuple(range(k, n)),
                          True)
  if mtp:
    r, s, hf = root + ("mtp",), state + ("mtp",), f"{prefix}layers.{n}."
    out += [Entry(r + ("enorm", "weight"), hf + "enorm.weight", "id", (d,), (d,)),
            Entry(r + ("hnorm", "weight"), hf + "hnorm.weight", "id", (d,), (d,)),
            Entry(r + ("eh_proj", "kernel"), hf + "eh_proj.weight", "linear", (2 * d, d), (d, 2 * d)),
            Entry(r + ("shared_head_norm", "weight"), hf + "shared_head.norm.weight", "id", (d,), (d,))]
    out += _layer_entries(m, prefix, r + ("block",), s + ("block",), n > k, (n,), False)
  return out


def vision_entries(m: ml_collections.ConfigDict) -> list[Entry]:
  """Entries of MoonViT-3D and the projector (name map of `k25jax.model.vision` / `projector` docstrings)."""
  v = m.vision
  d, heads, f, nl = v.hidden_size, v.num_attention_heads, v.intermediate_size, v.num_hidden_layers
  kh, kw = (int(k) for k in v.merge_kernel_size)
  din, dm = v.in_channels * v.patch_size ** 2, d * kh * kw
  t, p = ("params", "vision_tower"), ("params", "mm_projector")
  b, blk, layers = t + ("blocks",), "vision_tower.encoder.blocks.{layer}.", tuple(range(nl))

  def ln(path, hf, stacked):
    lead, seq, tmpl = ((nl,), layers, blk) if stacked else ((), None, "")
    return [Entry(path + ("scale",), tmpl + hf + ".weight", "id", lead + (d,), (d,), seq),
            Entry(path + ("bias",), tmpl + hf + ".bias", "id", lead + (d,), (d,), seq)]

  def dense(path, hf, n_in, n_out, lead=(), seq=None):
    return [Entry(path + ("kernel",), hf + ".weight", "linear", lead + (n_in, n_out), (n_out, n_in), seq),
            Entry(path + ("bias",), hf + ".bias", "id", lead + (n_out,), (n_out,), seq)]

  out = [Entry(t + ("patch_embed", "proj", "kernel"), "vision_tower.patch_embed.proj.weight", "conv", (din, d),
               (d, v.in_channels, v.patch_size, v.patch_size)),
         Entry(t + ("patch_embed", "proj", "bias"), "vision_tower.patch_embed.proj.bias", "id", (d,), (d,)),
         Entry(t + ("patch_embed", "pos_emb"), "vision_tower.patch_embed.pos_emb.weight", "id",
               (v.pos_emb_height, v.pos_emb_width, d), (v.pos_emb_height, v.pos_emb_width, d)),
         Entry(b + ("wqkv", "kernel"), blk + "wqkv.weight", "wqkv", (nl, d, 3, heads, d // heads), (3 * d, d),
               layers),
         Entry(b + ("wqkv", "bias"), blk + "wqkv.bias", "id", (nl, 3, heads, d // heads), (3 * d,), layers),
         Entry(b + ("wo", "kernel"), blk + "wo.weight", "wo", (nl, heads, d // heads, d), (d, d), layers),
         Entry(b + ("wo", "bias"), blk + "wo.bias", "id", (nl, d), (d,), layers)]
  out += ln(b + ("norm0",), "norm0", True) + ln(b + ("norm1",), "norm1", True)
  out += dense(b + ("mlp", "fc0"), blk + "mlp.fc0", d, f, (nl,), layers)
  out += dense(b + ("mlp", "fc1"), blk + "mlp.fc1", f, d, (nl,), layers)
  out += ln(t + ("final_layernorm",), "vision_tower.encoder.final_layernorm", False)
  out += ln(p + ("pre_norm",), "mm_projector.pre_norm", False)
  out += dense(p + ("proj_0",), "mm_projector.proj.0", dm, dm) + dense(p + ("proj_2",), "mm_projector.proj.2", dm,
                                                                       m.hidden_size)
  return out


def build_entries(m: ml_collections.ConfigDict) -> list[Entry]:
  """All entries of the model that `config.model` describes (K2.5 when `vision.enabled`, else the text LM)."""
  multimodal = bool(m.vision.enabled)
  return lm_entries(m, multimodal) + (vision_entries(m) if multimodal else [])


def get_path(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree
