"""A compact sharded LM train step (AdamW), used by the foundation demo and the train-step benchmark.

The pre-training trainer (`k25jax.train.trainer`) builds on the same pieces with MuonClip, checkpoints and the
multimodal batch; this file is the smallest complete example of the sharding flow:
`eval_shape` -> logical specs -> `NamedSharding`s -> `jit(init, out_shardings)`; batches as global arrays;
a donated, jitted step; the MoE correction-bias update applied outside the gradient.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from k25jax import sharding as shd
from k25jax.model import K2LM, text_inputs
from k25jax.model.moe import update_correction_bias
from k25jax.train.loss import cross_entropy


def abstract_params(config: ml_collections.ConfigDict) -> Any:
  """Shapes and dtypes of the LM parameters (no allocation), e.g. to build an optimizer's masks."""
  x = text_inputs(1, 8)
  model = K2LM(config.model)
  return shd.unbox(jax.eval_shape(lambda k: model.init(k, x["tokens"], x["positions"], x["segment_ids"]),
                                  jax.random.key(0))["params"])


def init_state(config: ml_collections.ConfigDict, mesh, tx: optax.GradientTransformation, seed: int = 0
               ) -> tuple[dict, Any]:
  """(state, state_shardings) with params, moe_state, opt_state and step, each created on its shards; optimizer
  moments take their parameter's sharding (`k25jax.train.state.opt_state_shardings`)."""
  from k25jax.train.state import opt_state_shardings  # noqa: PLC0415 (state imports the model stack)
  model = K2LM(config.model)
  rules = shd.get_rules(config)
  x = text_inputs(1, 8)
  boxed = jax.eval_shape(lambda k: model.init(k, x["tokens"], x["positions"], x["segment_ids"]), jax.random.key(0))
  params = shd.unbox(boxed["params"])
  param_sh = shd.unbox(shd.tree_shardings(boxed["params"], mesh, rules))
  shardings = {"params": param_sh, "moe_state": shd.unbox(shd.tree_shardings(boxed["moe_state"], mesh, rules)),
               "opt_state": opt_state_shardings(jax.eval_shape(tx.init, params), params, param_sh, mesh),
               "step": NamedSharding(mesh, P())}

  def init(key):
    variables = shd.unbox(model.init(key, x["tokens"], x["positions"], x["segment_ids"]))
    return {"params": variables["params"], "moe_state": variables["moe_state"],
            "opt_state": tx.init(variables["params"]), "step": jnp.zeros((), jnp.int32)}

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
  return state, shardings


def make_train_step(config: ml_collections.ConfigDict, mesh, tx: optax.GradientTransformation,
                    state_shardings: Any) -> Callable:
  """step(state, batch) -> (state, metrics); batch has tokens/targets/loss_mask/positions/segment_ids [B, L]."""
  model = K2LM(config.model)
  rules = shd.get_rules(config)
  speed = config.model.bias_update_speed

  def loss_fn(params, moe_state, batch):
    logits, aux = model.apply({"params": params, "moe_state": moe_state}, batch["tokens"], batch["positions"],
                              batch["segment_ids"])
    loss, metrics = cross_entropy(logits, batch["targets"], batch["loss_mask"])
    if "aux_loss" in aux:
      loss = loss + aux["aux_loss"]
    return loss, (metrics, aux)

  def step(state, batch):
    with nn.logical_axis_rules(rules):
      (loss, (metrics, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state["params"], state["moe_state"], batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    moe_state = state["moe_state"]
    if "expert_load" in aux:
      moe_state = jax.tree.map(lambda b: update_correction_bias(b, aux["expert_load"], speed), moe_state)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), max_logit=jnp.max(aux["max_logits"]))
    return {"params": params, "moe_state": moe_state, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  batch_sh = shd.batch_sharding(mesh, 2)
  jitted = jax.jit(step, in_shardings=(state_shardings, batch_sh), out_shardings=(state_shardings, None),
                   donate_argnums=(0,))

  def run(state, batch):
    with jax.set_mesh(mesh):
      return jitted(state, batch)

  run.jitted = jitted
  return run


def synthetic_batch(rng: np.random.Generator, batch: int, length: int, vocab: int) -> dict[str, np.ndarray]:
  """A learnable toy stream: x_{t+1} = (5 x_t + 3) mod m from a random start (a fixed bigram rule, m < vocab)."""
  m = min(vocab, 251)
  seq = np.empty((batch, length + 1), np.int64)
  seq[:, 0] = rng.integers(0, m, size=batch)
  for t in range(length):
    seq[:, t + 1] = (5 * seq[:, t] + 3) % m
  return dict(tokens=seq[:, :-1].astype(np.int32), targets=seq[:, 1:].astype(np.int32),
              loss_mask=np.ones((batch, length), np.float32),
              positions=np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
              segment_ids=np.ones((batch, length), np.int32))
