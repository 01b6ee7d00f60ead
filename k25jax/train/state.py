"""Train state of the pre-training trainer: model choice, optimizer, and a state created on its shards.

Digest §2.2 (joint text-vision pre-training of the whole K2.5 model) and §8 (MuonClip). The state is a plain dict
pytree `{"params", "moe_state", "opt_state", "step"}` (f32 master weights in `model.param_dtype`; the forward
computes in `model.dtype`), so it jits, donates and checkpoints without wrappers. `step` counts consumed batches,
including skipped non-finite ones, so it always equals the data iterator's position.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from k25jax import sharding as shd
from k25jax.model import K2LM, text_inputs


def is_multimodal(config: ml_collections.ConfigDict) -> bool:
  """Whether the trainer builds `K25Model` (vision tower + projector + LM) rather than the text-only `K2LM`."""
  return bool(config.model.vision.enabled)


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """K25Model when `model.vision.enabled` (digest §1.2-1.3), else K2LM (digest §1.1)."""
  if is_multimodal(config):
    from k25jax.model.k25 import K25Model
    return K25Model(config.model)
  return K2LM(config.model)


def init_variables(config: ml_collections.ConfigDict, model: nn.Module, key: jax.Array) -> dict:
  """`model.init` on dummy inputs (boxed, with logical partitioning metadata)."""
  x = text_inputs(1, 8)
  if is_multimodal(config):
    from k25jax.model.k25 import media_inputs
    return model.init(key, x["tokens"], x["positions"], x["segment_ids"], **media_inputs(config.model.vision, 4, 1),
                      media_pad_id=0)
  return model.init(key, x["tokens"], x["positions"], x["segment_ids"])


def make_tx(config: ml_collections.ConfigDict, params: Any, shardings: Any = None) -> optax.GradientTransformation:
  """The optimizer: MuonClip from `k25jax.optim` (digest §8; WSD schedule and clipping inside; `shardings`, the
  parameters' shardings, keep each Muon update in its parameter's layout), or AdamW.

  AdamW: global-norm clipping at `train.grad_clip`, then `optax.adamw(train.learning_rate, b1=0.9, b2=0.95,
  weight_decay=train.weight_decay)` (digest §8, Moonlight's AdamW settings).
  """
  if config.trainer.optimizer == "muonclip":
    from k25jax.optim import make_optimizer
    return make_optimizer(config, params, shardings)
  t = config.train
  return optax.chain(optax.clip_by_global_norm(t.grad_clip),
                     optax.adamw(t.learning_rate, b1=0.9, b2=0.95, weight_decay=t.weight_decay))


def abstract_variables(config: ml_collections.ConfigDict, model: nn.Module) -> Any:
  """Boxed abstract variables (shapes, dtypes, logical names) of the model."""
  return jax.eval_shape(lambda k: init_variables(config, model, k), jax.random.key(0))


def _leaf_paths(tree: Any) -> dict[tuple, Any]:
  return {tuple(str(k) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def opt_state_shardings(abstract_opt_state: Any, abstract_params: Any, param_shardings: Any, mesh) -> Any:
  """Shardings of the optimizer state: a leaf whose key path ends with a parameter's path and has its shape
  (momenta, second moments) takes that parameter's sharding; anything else (counts, scalars) is replicated."""
  by_path = {path: (leaf.shape, sh) for (path, leaf), sh in zip(
      _leaf_paths(abstract_params).items(), jax.tree.leaves(param_shardings))}
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    keys = tuple(str(k) for k in path)
    for i in range(len(keys)):
      hit = by_path.get(keys[i:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def _state_init(config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation):
  def init(key):
    variables = shd.unbox(init_variables(config, model, key))
    return {"params": variables["params"], "moe_state": variables.get("moe_state", {}),
            "opt_state": tx.init(variables["params"]), "step": jnp.zeros((), jnp.int32)}
  return init


def abstract_state(config: ml_collections.ConfigDict, mesh, model: nn.Module | None = None
                   ) -> tuple[Any, Any, optax.GradientTransformation]:
  """(abstract state carrying its target shardings, state shardings, tx) on `mesh` (any mesh shape).

  Parameters and `moe_state` follow the logical-axis rules; optimizer moments follow their parameter
  (`opt_state_shardings`); `step` is replicated. The abstract state is also the checkpoint restore target.
  """
  model = model or build_model(config)
  rules = shd.get_rules(config)
  boxed = abstract_variables(config, model)
  params = shd.unbox(boxed["params"])
  param_sh = shd.unbox(shd.tree_shardings(boxed["params"], mesh, rules))
  tx = make_tx(config, params, param_sh)
  moe_sh = shd.unbox(shd.tree_shardings(boxed.get("moe_state", {}), mesh, rules))
  opt_abstract = jax.eval_shape(tx.init, params)
  shardings = {"params": param_sh, "moe_state": moe_sh,
               "opt_state": opt_state_shardings(opt_abstract, params, param_sh, mesh),
               "step": NamedSharding(mesh, P())}
  shapes = {"params": params, "moe_state": shd.unbox(boxed.get("moe_state", {})), "opt_state": opt_abstract,
            "step": jax.ShapeDtypeStruct((), jnp.int32)}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
  return abstract, shardings, tx


def init_state(config: ml_collections.ConfigDict, mesh, model: nn.Module | None = None
               ) -> tuple[dict, Any, optax.GradientTransformation]:
  """(state, state_shardings, tx): every leaf created directly on its shards (jit with `out_shardings`)."""
  model = model or build_model(config)
  _, shardings, tx = abstract_state(config, mesh, model)
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.get_rules(config)):
    state = jax.jit(_state_init(config, model, tx), out_shardings=shardings)(jax.random.key(int(config.seed)))
  return state, shardings, tx
