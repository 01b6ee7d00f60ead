"""Analytic FLOP counts for DEP's efficiency ceiling (digest §7: DEP reaches 90% of text-only throughput in K2.5).

DEP cannot beat text-only training: at the same tokens per step it runs the same backbone work plus the vision
tower. The ideal throughput ratio of a multimodal step is therefore bounded by FLOPs,

  bound = text_train / (text_train + extra_vision),

where `extra_vision` is what the variant executes for the encoder: the integrated step runs forward + backward
(plus one forward more when the tower is remat'd), DEP runs forward (phase 1) + recompute forward and backward
(phase 3). Counts are useful FLOPs (multiply-adds x 2): no padding, attention per item (vision) and causal
(LM), the backward of a matmul twice its forward except the patch embedding, whose input needs no gradient.

The ratio that makes K2.5's 90% possible is the encoder's weight relative to the backbone:
`vision_lm_ratio` = vision forward FLOPs per vision token (kh*kw patches + projector, matmuls only) / LM forward
FLOPs per token (matmuls only). K2.5 (`k25_full`): ~3.4 GFLOP / ~64 GFLOP ~ 0.05.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from k25jax.model.summary import count_lm


def vision_forward_flops(vision: ml_collections.ConfigDict, text_hidden: int, item_grid: np.ndarray,
                         item_valid: np.ndarray | None = None, *, attention: bool = True) -> dict[str, float]:
  """Forward FLOPs of tower + projector over the valid items of `item_grid` [M, 3] (t, h, w).

  Returns {"patch_embed", "pos_emb", "blocks", "attention", "projector", "total"}; `attention` is the per-item
  QK^T and PV (all frames of an item attend to each other), 0 with attention=False.
  """
  grid = np.asarray(item_grid, np.float64)
  if item_valid is not None:
    grid = grid[np.asarray(item_valid, bool)]
  grid = grid[grid.prod(axis=1) > 0]
  d, f, layers = float(vision.hidden_size), float(vision.intermediate_size), float(vision.num_hidden_layers)
  kh, kw = (int(k) for k in vision.merge_kernel_size)
  k = kh * kw
  n = grid.prod(axis=1)                                      # patches per item
  tokens = (grid[:, 1] // kh) * (grid[:, 2] // kw)           # merged tokens per item (frames pooled)
  p = float(n.sum())
  out = dict(
      patch_embed=2 * p * vision.in_channels * vision.patch_size ** 2 * d,
      pos_emb=2 * p * vision.pos_emb_height * vision.pos_emb_width * d,   # resize rows x table (vision.PatchEmbed)
      blocks=2 * p * layers * (4 * d * d + 2 * d * f),                    # wqkv, wo, fc0, fc1
      attention=4 * layers * d * float((n * n).sum()) if attention else 0.0,
      projector=2 * float(tokens.sum()) * (k * d * k * d + k * d * text_hidden))
  out["total"] = sum(out.values())
  return out


def lm_forward_flops(model: ml_collections.ConfigDict, batch_size: int, seq_len: int, *,
                     attention: bool = True) -> float:
  """Forward FLOPs of the LM on [batch_size, seq_len] tokens: 2 x active matmul parameters per token (all but the
  input embedding; routed experts at top-k / n_experts) + causal MLA attention (mean context (L+1)/2)."""
  active = count_lm(model)["active_params"] - model.vocab_size * model.hidden_size
  per_token = 2.0 * active
  if attention:
    qk = model.qk_nope_head_dim + model.qk_rope_head_dim
    per_token += (2.0 * model.num_hidden_layers * model.num_attention_heads * (qk + model.v_head_dim)
                  * (seq_len + 1) / 2)
  return per_token * batch_size * seq_len


def vision_lm_ratio(model: ml_collections.ConfigDict) -> float:
  """Vision forward FLOPs per vision token (one image token: kh*kw patches + projector) over LM forward FLOPs per
  token, matmuls only (the encoder's weight relative to the backbone; K2.5 ~ 0.05)."""
  kh, kw = (int(k) for k in model.vision.merge_kernel_size)
  vis = vision_forward_flops(model.vision, model.hidden_size, np.array([[1, kh, kw]]), attention=False)
  return (vis["total"] - vis["pos_emb"]) / lm_forward_flops(model, 1, 1, attention=False)


def efficiency_bounds(config: ml_collections.ConfigDict, item_grid: np.ndarray, item_valid: np.ndarray
                      ) -> dict[str, float]:
  """FLOP ceilings of the multimodal/text throughput ratio at the same tokens per step (module docstring).

  Returns text_train_flops, vision_forward_flops, the extra vision FLOPs of each variant and
  efficiency_bound_{dep,integrated}.
  """
  m = config.model
  text = 3.0 * lm_forward_flops(m, int(config.train.batch_size), int(config.train.seq_len))
  v = vision_forward_flops(m.vision, m.hidden_size, item_grid, item_valid)
  backward = 2 * v["total"] - v["patch_embed"]
  remat = v["total"] if m.vision.remat_policy != "none" else 0.0
  extra = dict(integrated=v["total"] + remat + backward, dep=2 * v["total"] + backward)
  out = dict(text_train_flops=text, vision_forward_flops=v["total"],
             vision_extra_flops_integrated=extra["integrated"], vision_extra_flops_dep=extra["dep"])
  for name, e in extra.items():
    out[f"efficiency_bound_{name}"] = text / (text + e)
  return out

