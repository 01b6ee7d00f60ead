"""MoonViT-3D + patch-merger projector presets (digest §1.2-1.3).

`config.model.vision` holds the tower and the projector. `enabled=True` for every preset: the code builds the
multimodal `K25Model` when it is set, and text-only batches simply carry no media (all items invalid).

`moonvit_full` is the released `vision_config` (digest §1.2): 27 layers, width 1152, 16 heads (head dim 72), MLP
4304, patch 14, learned pos-emb 64x64 with a 4-frame sin-cos time table, 2x2 merge, projector
LayerNorm -> Linear(4608, 4608) -> GELU -> Linear(4608, text hidden). Tower ~416.9M and projector ~54.3M
parameters (digest §1.3 [INF]). `tiny` and `small` keep the structure at CPU size.

Packed attention (`k25jax.model.vision.packed_attention`): `attention_impl="dense"` materialises the [P, P] logits
of the whole packed sequence (a reference); `"chunked"` splits it into query chunks of `attention_chunk` patches and attends each
only to the neighbouring key chunks that can hold the same item, which needs every item to have at most
`max_item_patches` patches (checked on the host by `check_vision_inputs`); `"blocks"` computes only the
(query block, key block) pairs of `attention_chunk` patches that share an item (a data-dependent pair list in a
loop: the work follows the items packed, no item bound; the CPU presets' choice). `moonvit_full` uses `chunked` with
`max_item_patches=16384`, the released preprocessing's bound (`in_patch_limit` 16384 per image, 4 frames x 4096 per
video chunk, `k25jax.data.media`).
"""

from __future__ import annotations

import ml_collections

from k25jax.configs.validate import ConfigError

VISION_PRESETS = {"tiny": "moonvit_tiny", "small": "moonvit_small", "k25_full": "moonvit_full"}
_REMAT = ("none", "full", "dots")
_DTYPES = ("float32", "bfloat16", "float16")
_ATTENTION = ("dense", "chunked", "blocks")


def vision_config(name: str) -> ml_collections.ConfigDict:
  """Vision preset for a model preset (`tiny`, `small`, `k25_full`) or a vision name (`moonvit_*`)."""
  name = VISION_PRESETS.get(name, name)
  common = dict(
      enabled=True, patch_size=14, in_channels=3, pos_emb_time=4, merge_kernel_size=(2, 2),
      rope_theta=10000.0, layer_norm_eps=1e-5, projector_ln_eps=1e-5,
      dtype="float32", param_dtype="float32", remat_policy="none", initializer_range=0.02,
      # blocks of 64 patches: on this CPU 4-90x faster than dense for packs of small items (benchmarks/vision.py)
      attention_impl="blocks", attention_chunk=64, max_item_patches=1024)
  if name == "moonvit_tiny":
    v = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             pos_emb_height=8, pos_emb_width=8)
  elif name == "moonvit_small":
    v = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=344,
             pos_emb_height=16, pos_emb_width=16, max_item_patches=4096)
  elif name == "moonvit_full":
    v = dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304,
             pos_emb_height=64, pos_emb_width=64)
    common.update(dtype="bfloat16", remat_policy="full", attention_impl="chunked", attention_chunk=1024,
                  max_item_patches=16384)
  else:
    raise ValueError(f"unknown vision preset {name!r}; choose one of "
                     f"{', '.join(list(VISION_PRESETS) + list(VISION_PRESETS.values()))}")
  common.update(v)
  return ml_collections.ConfigDict(common)


def validate_vision(v: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` naming the `model.vision` field and the fix (digest §1.3 shape constraints)."""
  if not v.enabled:
    return
  for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
            "in_channels", "pos_emb_height", "pos_emb_width", "pos_emb_time"):
    if int(v[f]) <= 0:
      raise ConfigError(f"model.vision.{f}={v[f]} must be a positive integer")
  d, h = int(v.hidden_size), int(v.num_attention_heads)
  if d % h:
    raise ConfigError(f"model.vision.hidden_size={d} is not divisible by num_attention_heads={h}; pick a "
                      "head count that divides the width")
  if (d // h) % 4:
    raise ConfigError(f"model.vision head dim {d // h} (hidden_size/num_attention_heads) must be a multiple "
                      "of 4: the 2D RoPE splits each head into (column, row) rotary pairs")
  if d % 2:
    raise ConfigError(f"model.vision.hidden_size={d} must be even (sin-cos time embedding)")
  mk = tuple(int(k) for k in v.merge_kernel_size)
  if len(mk) != 2 or min(mk) < 1:
    raise ConfigError(f"model.vision.merge_kernel_size={v.merge_kernel_size} must be two positive ints, "
                      "e.g. (2, 2)")
  if v.remat_policy not in _REMAT:
    raise ConfigError(f"model.vision.remat_policy={v.remat_policy!r}: choose from {_REMAT}")
  if v.attention_impl not in _ATTENTION:
    raise ConfigError(f"model.vision.attention_impl={v.attention_impl!r}: choose from {_ATTENTION} (chunked or "
                      "blocks for large patch budgets)")
  for f in ("attention_chunk", "max_item_patches"):
    if not isinstance(v[f], int) or isinstance(v[f], bool) or v[f] <= 0:
      raise ConfigError(f"model.vision.{f}={v[f]!r} must be a positive integer, e.g. attention_chunk=1024, "
                        "max_item_patches=16384 (the largest item's t*h*w)")
  if v.dtype not in _DTYPES or v.param_dtype not in _DTYPES:
    raise ConfigError(f"model.vision.dtype={v.dtype!r} / param_dtype={v.param_dtype!r}: choose from {_DTYPES}")
