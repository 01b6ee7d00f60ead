"""DEP, the decoupled encoder process: the K2.5 multimodal train step in three phases (digest §7; K2.5 §4.5).

Selected by `config.dep` (bool, default False): the trainer builds `make_dep_train_step` instead of
`k25jax.train.step.make_train_step`; both have the signature `step(state, global_batch) -> (state, metrics)` and
give the same gradients, objective (`step.make_loss_fn`) and update.

  plan     (host) `balance.plan_media`: the global batch's media items go to ALL devices of the mesh (the four axes
           flattened, D = mesh.size) by LPT on patch counts under static per-device budgets, independently of how
           the text batch is sharded. The item metadata is tiny and gathered from every host.
  phase 1  `vision_forward` (its own jitted program, so no activation survives it): gather patches into the
           balanced layout [D, Pd, C]; the tower + projector run per device under `jax.shard_map` with replicated
           vision params; tokens [D, Nd, Dt] are gathered back into placeholder order [N, Dt].
  phase 2  `backbone`: the LM forward + backward with the integrated step's (text-only) shardings and the vision
           tokens as an input; returns the loss, LM gradients and the cotangent dL/d(vision tokens).
  phase 3  `vision_backward`: the cotangent is gathered into the balanced layout; each device recomputes its
           encoder forward under `jax.vjp` and pulls the cotangent back; parameter gradients are summed over all
           devices (`psum`) and land on the vision params' own shardings.
  update   `update`: optimizer, QK-Clip, MoE bias update and the non-finite guard, as in the integrated step.

Per-device budgets (`device_budgets`): by default each step's plan is fitted (`balance.plan_media(fit=True)`):
Pd = the busiest device's patch load rounded up to a rung of {2^n, 3 * 2^(n-1)} x (kh*kw) (<= 1.5x the load), so
phases 1 and 3 only compute what the balanced media need and compile once per rung. A fixed
`device_patch_budget` (a multiple of kh*kw) gives one static shape instead (e.g. for AOT), at the price of every
device computing Pd patches and Pd^2 attention pairs however few it holds: at the `small` preset's default
(Pd = 2 x 4096 / 8 = 1024 for ~220 patches a device) phase 3 took 7.8 s instead of 0.6 s. LPT bounds the max load
by mean + largest item, so any item of at most Pd / 2 patches always fits a fixed budget; a larger one may raise.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from k25jax import sharding as shd
from k25jax.configs.validate import ConfigError
from k25jax.data.pipeline import batch_shardings
from k25jax.model.k25 import K25Model
from k25jax.train import balance
from k25jax.train import simple
from k25jax.train.step import make_loss_fn, make_update

VISION_KEYS = ("vision_tower", "mm_projector")
TEXT_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
MEDIA_KEYS = ("patch_item_ids", "item_grid", "item_valid")
DEVICES = P(shd.MESH_AXES)  # leading dim over all four mesh axes flattened


def device_budgets(config: ml_collections.ConfigDict, mesh, device_patch_budget: int | None = None,
                   device_max_items: int | None = None) -> tuple[int, int, bool]:
  """(Pd, Md, fit): per-device patch and item slots for the balanced vision forward (module docstring).

  With `device_patch_budget=None` the plan is fitted per step (fit=True) and (Pd, Md) only cap the assignment:
  the global budgets, which any single item respects. `device_max_items` defaults to min(global items, Pd/(kh*kw)).
  """
  kh, kw = (int(k) for k in config.model.vision.merge_kernel_size)
  k = kh * kw
  n_proc = jax.process_count()
  total_patches = int(config.data.patch_budget) * n_proc
  total_items = int(config.data.max_items) * n_proc
  fit = device_patch_budget is None
  if fit:
    device_patch_budget = k * math.ceil(total_patches / k)
  if device_patch_budget <= 0 or device_patch_budget % k:
    raise ConfigError(f"DEP device_patch_budget={device_patch_budget} must be a positive multiple of the merge "
                      f"kernel size {kh}x{kw}={k} (or None to fit it to each step's plan)")
  if device_max_items is None:
    device_max_items = min(total_items, device_patch_budget // k)
  if device_max_items <= 0:
    raise ConfigError(f"DEP device_max_items={device_max_items} must be positive")
  return int(device_patch_budget), int(device_max_items), fit


def memory_stats(compiled: Any) -> dict[str, int]:
  """Per-device bytes of a compiled program from XLA's memory analysis; `peak` = arguments + outputs + temporaries
  - aliased (donated) bytes, the live-buffer bound while the program runs."""
  m = compiled.memory_analysis()
  out = dict(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
             temp=int(m.temp_size_in_bytes), alias=int(m.alias_size_in_bytes))
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def host_media(batch: dict) -> dict[str, np.ndarray]:
  """The global batch's item metadata on every host (`process_allgather`; a plain copy on one host)."""
  return {k: np.asarray(multihost_utils.process_allgather(batch[k], tiled=True)) for k in MEDIA_KEYS}


def _global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host numpy array (identical on every host) as a global array with `sharding`."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


class _WithVisionTokens:
  """K25Model as `step.make_loss_fn` sees a text-only model: `apply(variables, tokens, positions, segment_ids)`
  runs `forward_with_vision_tokens` with the given (traced) vision tokens, so phase 2 uses the trainer's objective
  (CE, z-loss, aux and MTP losses) unchanged."""

  def __init__(self, model: K25Model, vision_tokens: jax.Array, vision_valid: jax.Array, media_pad_id: int):
    self.model, self.vision_tokens, self.vision_valid, self.media_pad_id = (model, vision_tokens, vision_valid,
                                                                            media_pad_id)

  def apply(self, variables: dict, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array):
    return self.model.apply(variables, tokens, positions, segment_ids, self.vision_tokens, self.vision_valid,
                            media_pad_id=self.media_pad_id, method=K25Model.forward_with_vision_tokens)


def make_dep_train_step(config: ml_collections.ConfigDict, mesh, model: K25Model, tx: optax.GradientTransformation,
                        state_shardings: Any, *, media_pad_id: int, device_patch_budget: int | None = None,
                        device_max_items: int | None = None) -> Callable:
  """step(state, global_batch) -> (state, metrics): the DEP step (module docstring), a drop-in replacement of
  `k25jax.train.step.make_train_step` for K25Model.

  Attributes of the returned function: `plan(batch) -> MediaPlan`, `grads(params, moe_state, batch) -> (grads,
  (loss, metrics, aux, plan))` (phases 1-3 without the update), `memory(state, batch)` (per-program
  `memory_stats`), `phases` (the four jitted programs) and `budgets` (Pd, Md, fit) of `device_budgets`.
  `metrics` adds `dep_load_max_over_mean` (patch load of the busiest device over the mean) and
  `dep_device_patches` (the plan's per-device patch slots Pd).
  """
  if not isinstance(model, K25Model):
    raise ConfigError("config.dep=True needs the multimodal K25Model (model.vision.enabled=True); text-only runs "
                      "have no encoder to decouple: set dep=False")
  rules = shd.get_rules(config)
  vcfg = config.model.vision
  kh, kw = (int(k) for k in vcfg.merge_kernel_size)
  n_dev = mesh.size
  pd, md, fit = device_budgets(config, mesh, device_patch_budget, device_max_items)
  text_config = ml_collections.ConfigDict(config.to_dict())
  text_config.model.vision.enabled = False  # `step.forward` then calls apply(variables, tokens, positions, seg)
  param_sh = state_shardings["params"]
  vision_sh = {k: param_sh[k] for k in VISION_KEYS}
  lm_sh = {"language_model": param_sh["language_model"]}
  replicated = NamedSharding(mesh, P())
  per_device = NamedSharding(mesh, DEVICES)
  b_sh = batch_shardings(mesh)
  text_sh = {k: b_sh[k] for k in TEXT_KEYS}
  plan_sh = dict(patch_src=per_device, patch_item_ids=per_device, item_grid=per_device, item_valid=per_device,
                 token_src=replicated, token_dst=per_device, token_valid=replicated)

  def encode_local(vparams, patches, ids, grid, valid):
    """One device's balanced media -> its vision tokens [Nd, Dt] (no logical rules: everything is local)."""
    tokens, _ = model.apply({"params": vparams}, patches, ids, grid, valid, method=K25Model.encode_media)
    return tokens

  def balanced_patches(patches, plan):
    return jax.lax.with_sharding_constraint(balance.take_rows(patches, plan["patch_src"]), per_device)

  # ---------------------------------------------------------------------------------------- phase 1
  def vision_forward(vparams, patches, plan):
    def local(vp, x, ids, grid, valid):
      return encode_local(vp, x[0], ids[0], grid[0], valid[0])[None]

    tokens = jax.shard_map(local, mesh=mesh, in_specs=(P(), DEVICES, DEVICES, DEVICES, DEVICES),
                           out_specs=DEVICES)(vparams, balanced_patches(patches, plan), plan["patch_item_ids"],
                                              plan["item_grid"], plan["item_valid"])
    return balance.take_rows(tokens.reshape(-1, tokens.shape[-1]), plan["token_src"])

  # ---------------------------------------------------------------------------------------- phase 2
  def backbone(lm_params, moe_state, batch, vision_tokens, vision_valid):
    def loss(p, vis):
      fn = make_loss_fn(text_config, _WithVisionTokens(model, vis, vision_valid, media_pad_id), media_pad_id)
      return fn(p, moe_state, batch)

    with nn.logical_axis_rules(rules):
      (loss_value, (metrics, aux)), (g_lm, g_vis) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
          lm_params, vision_tokens)
    return loss_value, metrics, aux, g_lm, g_vis

  # ---------------------------------------------------------------------------------------- phase 3
  def vision_backward(vparams, patches, plan, cotangent):
    def local(vp, x, ids, grid, valid, ct):
      _, pullback = jax.vjp(lambda p: encode_local(p, x[0], ids[0], grid[0], valid[0]), vp)
      # `vp` is invariant over the mesh (in_spec P()): the transpose of its implicit broadcast to the devices is
      # a psum over all four axes, so `g` is already the sum of every device's parameter gradient.
      (g,) = pullback(ct[0])
      return g

    ct = jax.lax.with_sharding_constraint(balance.take_rows(cotangent, plan["token_dst"]), per_device)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), DEVICES, DEVICES, DEVICES, DEVICES, DEVICES),
                         out_specs=P())(vparams, balanced_patches(patches, plan), plan["patch_item_ids"],
                                        plan["item_grid"], plan["item_valid"], ct)

  update = make_update(config, tx, media_pad_id=media_pad_id)

  phases = dict(
      vision_forward=jax.jit(vision_forward, in_shardings=(vision_sh, b_sh["patches"], plan_sh),
                             out_shardings=replicated),
      backbone=jax.jit(backbone, in_shardings=(lm_sh, state_shardings["moe_state"], text_sh, replicated, replicated),
                       out_shardings=(None, None, None, lm_sh, replicated)),
      vision_backward=jax.jit(vision_backward, in_shardings=(vision_sh, b_sh["patches"], plan_sh, replicated),
                              out_shardings=vision_sh),
      update=jax.jit(update, in_shardings=(state_shardings, param_sh, None, None, None, text_sh),
                     out_shardings=(state_shardings, None), donate_argnums=(0, 1)),
  )

  def plan(batch: dict, balanced: bool = True) -> balance.MediaPlan:
    m = host_media(batch)
    return balance.plan_media(m["patch_item_ids"], m["item_grid"], m["item_valid"], num_devices=n_dev,
                              patch_budget=pd, max_items=md, merge_kernel=(kh, kw),
                              num_vision_slots=m["patch_item_ids"].shape[0] // (kh * kw), balance=balanced,
                              fit=fit)

  def run_phases(params, moe_state, batch, record: dict | None = None):
    """Phases 1-3 -> (grads, (loss, metrics, aux, plan)); `record` collects each program's arguments."""
    media_plan = plan(batch)
    arrays = {k: _global_array(v, plan_sh[k]) for k, v in media_plan.device_arrays().items()}
    vparams = {k: params[k] for k in VISION_KEYS}
    text = {k: batch[k] for k in TEXT_KEYS}
    args = {"vision_forward": (vparams, batch["patches"], arrays)}
    with jax.set_mesh(mesh):
      vis = phases["vision_forward"](*args["vision_forward"])
      args["backbone"] = ({"language_model": params["language_model"]}, moe_state, text, vis, arrays["token_valid"])
      loss, metrics, aux, g_lm, ct = phases["backbone"](*args["backbone"])
      args["vision_backward"] = (vparams, batch["patches"], arrays, ct)
      g_vision = phases["vision_backward"](*args["vision_backward"])
    if record is not None:
      record.update(args)
    return {**g_lm, **g_vision}, (loss, metrics, aux, media_plan)

  def grads(params, moe_state, batch):
    return run_phases(params, moe_state, batch)

  def memory(state, batch) -> dict[str, dict[str, int]]:
    """`memory_stats` of each of the four compiled programs at these inputs (runs phases 1-3, compiles again)."""
    args = {}
    g, (loss, metrics, aux, _) = run_phases(state["params"], state["moe_state"], batch, args)
    args["update"] = (state, g, loss, metrics, aux, {k: batch[k] for k in TEXT_KEYS})
    with jax.set_mesh(mesh):
      return {name: memory_stats(phases[name].lower(*a).compile()) for name, a in args.items()}

  def run(state, batch):
    g, (loss, metrics, aux, media_plan) = run_phases(state["params"], state["moe_state"], batch)
    with jax.set_mesh(mesh):
      state, out = phases["update"](state, g, loss, metrics, aux, {k: batch[k] for k in TEXT_KEYS})
    out["dep_load_max_over_mean"] = media_plan.stats()["max_over_mean"]
    out["dep_device_patches"] = media_plan.patch_src.shape[1]
    return state, out

  run.plan, run.grads, run.memory, run.phases, run.budgets = plan, grads, memory, phases, (pd, md, fit)
  return run


def synthetic_batch(rng: np.random.Generator, *, batch_size: int, seq_len: int, num_patches: int, max_items: int,
                    vocab_size: int, media_pad_id: int, patch_dim: int, max_side: int = 16,
                    large_frac: float = 0.2, video_frac: float = 0.1) -> dict[str, np.ndarray]:
  """A packed multimodal batch with a skewed image-size distribution (tests and `benchmarks/dep.py`).

  Text is `k25jax.train.simple.synthetic_batch`'s learnable stream; media items are placed in row-major order as runs of
  (h/2)(w/2) media_pad tokens with their t*h*w patches packed in the same order (the packer's contract). Sides are
  even; most items are small (2..4 patches a side), `large_frac` are large (up to `max_side`), `video_frac` are
  2-frame chunks. Stops when rows, patches or item slots run out.
  """
  text = simple.synthetic_batch(rng, batch_size, seq_len, vocab_size)
  tokens = text["tokens"]
  patches = np.zeros((num_patches, patch_dim), np.float32)
  ids = np.zeros((num_patches,), np.int32)
  grid = np.zeros((max_items, 3), np.int32)
  row, col, p_off, n = 0, int(rng.integers(1, 8)), 0, 0
  while n < max_items and row < batch_size:
    side = max_side if rng.random() < large_frac else 4
    h, w = (2 * int(rng.integers(1, side // 2 + 1)) for _ in range(2))
    t = 2 if rng.random() < video_frac else 1
    ntok, npatch = (h // 2) * (w // 2), t * h * w
    if p_off + npatch > num_patches:
      break
    if col + ntok > seq_len:
      row, col = row + 1, int(rng.integers(1, 8))
      continue
    tokens[row, col:col + ntok] = media_pad_id
    patches[p_off:p_off + npatch] = rng.normal(size=(npatch, patch_dim))
    ids[p_off:p_off + npatch] = n + 1
    grid[n] = (t, h, w)
    row_col = col + ntok + int(rng.integers(1, 8))
    col, p_off, n = row_col, p_off + npatch, n + 1
  targets = np.concatenate([tokens[:, 1:], text["targets"][:, -1:]], axis=1)
  loss_mask = ((tokens != media_pad_id) & (targets != media_pad_id)).astype(np.float32)
  return dict(tokens=tokens, targets=targets, loss_mask=loss_mask, positions=text["positions"],
              segment_ids=text["segment_ids"], patches=patches, patch_item_ids=ids, item_grid=grid,
              item_valid=grid[:, 0] > 0)
