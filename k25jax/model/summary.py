"""Parameter counts of any preset without allocating it: `python -m k25jax.model.summary k25_full`.

Counting convention (documented in the README):
  total_params   every parameter of the model as built (the `params` collection), input embedding and LM head
                 counted separately (untied); the router correction biases (`moe_state`) are not parameters.
  active_params  parameters touched per token: all non-routed-expert parameters (embedding and LM head included)
                 plus num_experts_per_tok / n_routed_experts of the routed experts of every MoE layer.
  mtp_params     the multi-token-prediction layer (0 unless `model.num_nextn_predict_layers=1`); the paper's
                 "1.04T" includes one, the released checkpoint ships none. It shares the embedding and LM head.
  vision_params / projector_params  MoonViT-3D tower and patch-merger projector (when the vision path is on).
Usage: python -m k25jax.model.summary PRESET [--mtp] [--config.model.FIELD=VALUE ...]
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import jax
import ml_collections

from k25jax.configs import get_config, validate
from k25jax.model.lm import K2LM
from k25jax.sharding import unbox


def _size(tree: Any) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def lm_param_shapes(model_cfg: ml_collections.ConfigDict) -> Any:
  from k25jax.model import text_inputs
  x = text_inputs(1, 8)
  abstract = jax.eval_shape(lambda k: K2LM(model_cfg).init(k, x["tokens"], x["positions"], x["segment_ids"]),
                            jax.random.key(0))
  return unbox(abstract)["params"]


def count_lm(model_cfg: ml_collections.ConfigDict) -> dict[str, float]:
  params = lm_param_shapes(model_cfg)
  total = _size(params)
  routed = sum(_size(v) for k, v in params.get("moe_layers", {}).get("mlp", {}).items() if k.startswith("experts_"))
  mtp = _size(params.get("mtp", {}))
  mtp_routed = sum(_size(v) for k, v in params.get("mtp", {}).get("block", {}).get("mlp", {}).items()
                   if k.startswith("experts_"))
  frac = model_cfg.num_experts_per_tok / model_cfg.n_routed_experts
  main_active = (total - mtp) - routed + frac * routed
  return dict(total_params=total, active_params=main_active, mtp_params=mtp,
              mtp_active_params=(mtp - mtp_routed + frac * mtp_routed) if mtp else 0,
              routed_expert_params=routed)


def summarize(config: ml_collections.ConfigDict) -> dict[str, Any]:
  validate(config)
  out: dict[str, Any] = {"preset": config.preset}
  out.update(count_lm(config.model))
  if config.model.vision.enabled:
    from k25jax.model import k25  # noqa: PLC0415 (the vision path is optional)
    out.update(k25.count_vision_params(config))
  return out


def main(argv: list[str]) -> None:
  args = [a for a in argv[1:] if not a.startswith("--")]
  config = get_config(args[0] if args else "tiny")
  if "--mtp" in argv:
    config.model.num_nextn_predict_layers = 1
  for a in argv[1:]:
    if a.startswith("--config."):
      key, value = a[len("--config."):].split("=", 1)
      from k25jax.configs.cli import set_field
      set_field(config, key, value)
  print(json.dumps(summarize(config)))


if __name__ == "__main__":
  main(sys.argv)
