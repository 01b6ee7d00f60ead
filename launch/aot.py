"""Ahead-of-time compilation of the real training step for a TPU topology, on this CPU (issue 9).

    python -m launch.aot --config=k25_full --topology=v5p:8x8x16 --mesh data=1,fsdp=128,expert=8,tensor=1 \
        --batch 1024 --seq 4096 [--config.model.remat_policy=full]

`libtpu` (requirements-aot.txt) provides compile-only devices for a named topology
(`jax.experimental.topologies.get_topology_desc`); the step is lowered from `ShapeDtypeStruct`s that carry the
project's shardings and compiled by the TPU compiler, which reports per-device memory exactly as a pod would,
out-of-memory included (MaxText `train_compile.py`, ANCHORS §1.6 "AOT", §5 AOT row, §8.4 item 5). The state is
built with `jax.eval_shape` only: nothing full-size is ever allocated here. Prints one JSON object.
`--config.dep=True` compiles the DEP step's four programs instead and reports each phase (`compile_dep_step`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from k25jax import sharding as shd
from k25jax.configs import PRESETS, ConfigError, get_config, validate
from k25jax.configs.cli import set_field
from k25jax.configs.train import validate_trainer
from k25jax.data.pipeline import batch_shardings
from k25jax.train import dep as dep_lib
from k25jax.train import state as state_lib
from k25jax.train import step as step_lib

GIB = 1024 ** 3
# HBM per chip (ANCHORS §6.1, https://docs.cloud.google.com/tpu/docs/tpu7x): v5p 95, v6e 32, TPU7x 192 GiB.
# A device is one TensorCore where a chip exposes several (tpu7x: 2 per chip, ANCHORS §9), so HBM per device is
# the chip's HBM divided by the devices per chip.
HBM_GIB_PER_CHIP = {"v5p": 95, "v6e": 32, "tpu7x": 192}
PATCH_DIM = 14 * 14 * 3  # MoonViT patch (k25jax/data/packing.py)
MEDIA_PAD_ID = 0  # only decides where vision tokens land; shapes, memory and compile do not depend on it


def load_config(spec: str, overrides: Sequence[str] = (), optimizer: str = "muonclip") -> ml_collections.ConfigDict:
  """A preset by name (`k25_full`) or file spec (`k25jax/configs/presets.py:k25_full`) with the trainer and
  optimizer groups attached, then `a.b=v` overrides (e.g. `trainer.optimizer=adamw`)."""
  name = spec.rsplit(":", 1)[-1] if ":" in spec else spec
  if name not in PRESETS:
    raise ConfigError(f"--config={spec!r}: unknown preset {name!r}; choose one of {PRESETS}")
  config = prepare_config(get_config(name), optimizer)
  for item in overrides:
    key, sep, value = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r} has no '='; write --config.model.remat_policy=dots")
    set_field(config, key, value)
  return config


def parse_mesh(text: str) -> dict[str, int]:
  """'data=1,fsdp=-1,expert=8,tensor=1' -> dict; unnamed axes keep the config's value."""
  out = {}
  for part in filter(None, text.split(",")):
    axis, sep, size = part.partition("=")
    if not sep or axis.strip() not in shd.MESH_AXES:
      raise ConfigError(f"--mesh entry {part!r}: write axis=size with axis in {shd.MESH_AXES}")
    out[axis.strip()] = int(size)
  return out


def topology_devices(name: str, chips_per_host: Sequence[int] = (2, 2, 1), num_slices: int = 1
                     ) -> tuple[list[Any], dict[str, Any]]:
  """Compile-only devices of a TPU topology such as 'v5p:8x8x16' or 'tpu7x:4x4x4' (needs libtpu)."""
  generation, sep, dims = name.partition(":")
  if not sep or not all(d.isdigit() for d in dims.split("x")):
    raise ConfigError(f"--topology={name!r}: write GENERATION:AxBxC, e.g. v5p:8x8x16 (1024 chips) or tpu7x:4x4x4")
  from jax.experimental import topologies  # noqa: PLC0415 (only AOT needs it)
  # Compile-only use: several processes (pytest workers, other jobs) may load libtpu at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    devices = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="default",
                                           chips_per_host_bounds=tuple(chips_per_host),
                                           num_slices=num_slices).devices
  except Exception as e:  # libtpu missing or an unknown topology: say which and how to fix it.
    raise RuntimeError(f"cannot build TPU topology {name!r} ({type(e).__name__}: {e}). Install libtpu with "
                       "`pip install -r requirements-aot.txt` and use a valid topology name, e.g. v5p:4x4x4") from e
  chips = math.prod(int(d) for d in dims.split("x")) * num_slices
  return list(devices), dict(name=name, generation=generation, chips=chips, devices=len(devices),
                             devices_per_chip=len(devices) // chips, device_kind=devices[0].device_kind)


def prepare_config(config: ml_collections.ConfigDict, optimizer: str = "muonclip") -> ml_collections.ConfigDict:
  """A copy with `trainer.optimizer` set."""
  config = copy.deepcopy(config)
  config.trainer.optimizer = optimizer
  return config


def abstract_batch(config: ml_collections.ConfigDict, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch of `k25jax.data.pipeline.to_global_batch` as `ShapeDtypeStruct`s with its shardings.

  Token arrays are [train.batch_size, train.seq_len]; the media arrays hold every host's `data.patch_budget` /
  `data.max_items` when the vision tower is on, else a minimal placeholder (one row per batch shard) that the
  text-only forward never reads."""
  b, seq = int(config.train.batch_size), int(config.train.seq_len)
  shards = math.prod(mesh.shape[a] for a in shd.BATCH_AXES)
  if b % shards:
    raise ConfigError(f"global batch {b} is not divisible by data*fsdp*expert={shards}; pass --batch as a "
                      f"multiple of {shards}")
  hosts = len({d.process_index for d in mesh.devices.flat})
  if state_lib.is_multimodal(config):
    p, m = int(config.data.patch_budget) * hosts, int(config.data.max_items) * hosts
  else:
    p = m = shards
  shapes = dict(tokens=((b, seq), jnp.int32), targets=((b, seq), jnp.int32), loss_mask=((b, seq), jnp.bool_),
                segment_ids=((b, seq), jnp.int32), positions=((b, seq), jnp.int32),
                patches=((p, PATCH_DIM), jnp.float32), patch_item_ids=((p,), jnp.int32),
                item_grid=((m, 3), jnp.int32), item_valid=((m,), jnp.bool_))
  sh = batch_shardings(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sh[k]) for k, (shape, dtype) in shapes.items()}


def per_device_bytes(abstract: Any, shardings: Any) -> int:
  """Bytes one device holds of a tree, from each leaf's shard shape (the largest shard)."""
  return int(sum(math.prod(s.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
                 for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))))


def _setup(config: ml_collections.ConfigDict, devices: Sequence[Any]) -> dict[str, Any]:
  """Validated config, mesh, model, abstract state (+ shardings, tx) and abstract global batch for `devices`."""
  config = copy.deepcopy(config)  # ConfigDict(config) would share the nested groups
  if config.model.moe_dispatch == "auto":  # `auto` would look at this host's backend (CPU), not the target's.
    config.model.moe_dispatch = "ep" if shd.mesh_shape(config.mesh, len(devices))[2] > 1 else "ragged"
  validate(config)
  validate_trainer(config)
  mesh = shd.make_mesh(config, devices)
  # Parameters do not depend on the MoE dispatch; `init` traces a 1x8 dummy batch, which the `ep` dispatch cannot
  # split over a pod's batch shards, so the abstract state is traced with the (shape-identical) ragged dispatch.
  init_config = copy.deepcopy(config)
  init_config.model.moe_dispatch = "ragged"
  state, shardings, tx = state_lib.abstract_state(init_config, mesh, state_lib.build_model(init_config))
  return dict(config=config, mesh=mesh, model=state_lib.build_model(config), state=state, shardings=shardings,
              tx=tx, batch=abstract_batch(config, mesh))


def _state_report(s: dict[str, Any]) -> dict[str, Any]:
  """The run's settings and the per-device bytes of the state, from its shard shapes."""
  config, state, sh = s["config"], s["state"], s["shardings"]
  return dict(
      preset=config.preset, optimizer=config.trainer.optimizer, mesh=dict(s["mesh"].shape), rules=config.mesh.rules,
      global_batch=int(config.train.batch_size), seq_len=int(config.train.seq_len),
      remat_policy=config.model.remat_policy, moe_dispatch=config.model.moe_dispatch, dtype=config.model.dtype,
      param_dtype=config.model.param_dtype,
      num_params=int(sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"]))),
      params_bytes=per_device_bytes(state["params"], sh["params"]),
      opt_state_bytes=per_device_bytes(state["opt_state"], sh["opt_state"]),
      moe_state_bytes=per_device_bytes(state["moe_state"], sh["moe_state"]))


def _compile(lowered: Any) -> dict[str, Any]:
  """Compiles a lowered program; its `memory_analysis()` bytes and compile time, or `fits: False` with the TPU
  compiler's out-of-memory message (the answer, not a crash)."""
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return dict(fits=False, error=str(e).splitlines()[0][:2000], compile_s=round(time.perf_counter() - t0, 2))
  mem = compiled.memory_analysis()
  out = dict(compile_s=round(time.perf_counter() - t0, 2), argument_bytes=mem.argument_size_in_bytes,
             output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
             temp_bytes=mem.temp_size_in_bytes, generated_code_bytes=mem.generated_code_size_in_bytes)
  out["total_bytes"] = int(out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
                           + out["generated_code_bytes"])
  return out


def _fits(report: dict[str, Any], total: int, hbm_bytes: int | None) -> None:
  report.update(total_bytes=int(total), total_gib=round(total / GIB, 2))
  if hbm_bytes is not None:
    report.update(hbm_bytes=int(hbm_bytes), hbm_gib=round(hbm_bytes / GIB, 2), fits=bool(total <= hbm_bytes))


def compile_train_step(config: ml_collections.ConfigDict, devices: Sequence[Any], hbm_bytes: int | None = None
                       ) -> dict[str, Any]:
  """Lowers and compiles the full trainer step (`k25jax.train.step.make_train_step`: forward, backward, optimizer
  update, QK-Clip, MoE bias update) for `devices`; returns the per-device memory report."""
  s = _setup(config, devices)
  runner = step_lib.make_train_step(s["config"], s["mesh"], s["model"], s["tx"], s["shardings"],
                                    media_pad_id=MEDIA_PAD_ID)
  t0 = time.perf_counter()
  with jax.set_mesh(s["mesh"]):
    lowered = runner.jitted.lower(s["state"], s["batch"])
  report = dict(_state_report(s), lower_s=round(time.perf_counter() - t0, 2), **_compile(lowered))
  if "total_bytes" in report:
    _fits(report, report["total_bytes"], hbm_bytes)
  return report


def abstract_plan(mesh, device_patches: int, device_items: int, num_vision_slots: int, merge_kernel: int
                  ) -> dict[str, jax.ShapeDtypeStruct]:
  """The device arrays of a DEP media plan (`balance.MediaPlan.device_arrays()`) as `ShapeDtypeStruct`s with the
  DEP phases' shardings: per-device rows over all mesh devices, placeholder-order token maps replicated."""
  d, pd, md, n = mesh.size, device_patches, device_items, num_vision_slots
  per_device, replicated = NamedSharding(mesh, dep_lib.DEVICES), NamedSharding(mesh, P())
  shapes = dict(patch_src=((d, pd), jnp.int32), patch_item_ids=((d, pd), jnp.int32),
                item_grid=((d, md, 3), jnp.int32), item_valid=((d, md), jnp.bool_), token_src=((n,), jnp.int32),
                token_dst=((d, pd // merge_kernel), jnp.int32), token_valid=((n,), jnp.bool_))
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated if k.startswith("token_") and k != "token_dst"
                                  else per_device) for k, (shape, dtype) in shapes.items()}


def tree_bytes(tree: Any) -> int:
  """Per-device bytes of a tree of `ShapeDtypeStruct`s that carry their shardings."""
  return per_device_bytes(tree, jax.tree.map(lambda a: a.sharding, tree))


def full_bytes(tree: Any) -> int:
  """Bytes of a tree of shaped leaves held whole (replicated) on every device."""
  return int(sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree)))


def compile_dep_step(config: ml_collections.ConfigDict, devices: Sequence[Any], hbm_bytes: int | None = None,
                     device_patches: int | None = None, device_items: int | None = None) -> dict[str, Any]:
  """Lowers and compiles the four programs of the DEP step (`k25jax.train.dep`, digest §7) for `devices`.

  Phase 1 (`vision_forward`: balanced vision forward), phase 2 (`backbone`: LM forward + backward with the vision
  tokens as an input), phase 3 (`vision_backward`: vision recompute + vjp) and the `update` run one after another
  (`dep.make_dep_train_step`), so while a phase runs the device also holds the step's live arrays that the phase
  does not take (`outside_bytes`): the rest of the state and the batch, the media plan, and the earlier phases'
  results the step still holds (phase 1's vision tokens; phase 2's LM gradients and vision cotangent). A phase's
  `total_bytes` = its program's bytes (arguments + outputs - aliased + temporaries + code) + `outside_bytes`;
  the step fits when every phase fits.

  The media plan has fixed budgets of `device_patches` patch and `device_items` item slots per device (default:
  twice the balanced mean patch load, so LPT places any item of up to the mean; at run time
  `balance.plan_media(fit=True)` sizes them per step, never above the budget).
  """
  s = _setup(config, devices)
  config, mesh, state, batch = s["config"], s["mesh"], s["state"], s["batch"]
  kh, kw = (int(k) for k in config.model.vision.merge_kernel_size)
  k = kh * kw
  num_patches, num_items = batch["patches"].shape[0], batch["item_grid"].shape[0]
  device_patches = device_patches or 2 * k * math.ceil(num_patches / (mesh.size * k))
  device_items = device_items or min(num_items, device_patches // k)
  runner = dep_lib.make_dep_train_step(config, mesh, s["model"], s["tx"], s["shardings"],
                                       media_pad_id=MEDIA_PAD_ID, device_patch_budget=device_patches,
                                       device_max_items=device_items)
  plan = abstract_plan(mesh, device_patches, device_items, num_patches // k, k)
  vparams = {name: state["params"][name] for name in dep_lib.VISION_KEYS}
  lm = {"language_model": state["params"]["language_model"]}
  text = {name: batch[name] for name in dep_lib.TEXT_KEYS}
  report = dict(_state_report(s), dep=dict(device_patches=device_patches, device_items=device_items,
                                           global_patches=num_patches, vision_tokens=num_patches // k,
                                           vision_token_share=round(num_patches / k / batch["tokens"].size, 4)))
  # Per-device bytes of every array the step holds between its programs (`dep.run_phases`).
  live = dict(lm=tree_bytes(lm), vision=tree_bytes(vparams), moe_state=tree_bytes(state["moe_state"]),
              opt_state=tree_bytes({n: state[n] for n in ("opt_state", "step")}), text=tree_bytes(text),
              patches=tree_bytes(batch["patches"]), media=tree_bytes({n: batch[n] for n in dep_lib.MEDIA_KEYS}),
              plan=tree_bytes(plan))
  phases: dict[str, dict[str, Any]] = {}

  def compile_phase(name: str, args: tuple, held: Sequence[str], taken: Sequence[str]) -> Any:
    """Compiles phase `name`; `held` names the live arrays, `taken` those among them it takes as arguments.
    Returns the abstract outputs for the next phases."""
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      lowered = runner.phases[name].lower(*args)
    rep = dict(lower_s=round(time.perf_counter() - t0, 2), **_compile(lowered))
    rep["outside_bytes"] = sum(live[n] for n in held if n not in taken)
    if "total_bytes" in rep:
      rep["program_bytes"] = rep.pop("total_bytes")
      _fits(rep, rep["program_bytes"] + rep["outside_bytes"], hbm_bytes)
    phases[name] = rep
    return lowered.out_info

  step_arrays = ("lm", "vision", "moe_state", "opt_state", "text", "patches", "media")
  held = step_arrays + ("plan",)
  vis = compile_phase("vision_forward", (vparams, batch["patches"], plan), held, ("vision", "patches", "plan"))
  live["vision_tokens"] = full_bytes(vis)  # replicated (`dep.make_dep_train_step`)
  held += ("vision_tokens",)
  loss, metrics, aux, g_lm, ct = compile_phase(
      "backbone", (lm, state["moe_state"], text, vis, plan["token_valid"]), held,
      ("lm", "moe_state", "text", "vision_tokens"))  # the plan's small token_valid is counted outside
  live.update(lm_grads=live["lm"], cotangent=full_bytes(ct), scalars=full_bytes((loss, metrics, aux)))
  held += ("lm_grads", "cotangent", "scalars")
  g_vision = compile_phase("vision_backward", (vparams, batch["patches"], plan, ct), held,
                           ("vision", "patches", "plan", "cotangent"))
  live["vision_grads"] = live["vision"]
  compile_phase("update", (state, {**g_lm, **g_vision}, loss, metrics, aux, text),
                step_arrays + ("lm_grads", "vision_grads", "scalars"),
                ("lm", "vision", "moe_state", "opt_state", "lm_grads", "vision_grads", "scalars", "text"))
  report["phases"] = phases
  report["compile_s"] = round(sum(p["compile_s"] for p in phases.values()), 2)
  peaks = [p.get("total_bytes") for p in phases.values()]
  if None in peaks:
    report["fits"] = False
  else:
    _fits(report, max(peaks), hbm_bytes)
  return report


def hbm_per_device(topo: dict[str, Any], hbm_gib: float | None) -> int:
  if hbm_gib is None:
    if topo["generation"] not in HBM_GIB_PER_CHIP:
      raise ConfigError(f"no HBM size known for {topo['generation']!r} (known: {sorted(HBM_GIB_PER_CHIP)}); "
                        "pass --hbm_gib=<GiB per chip>")
    hbm_gib = HBM_GIB_PER_CHIP[topo["generation"]]
  return int(hbm_gib * GIB) // topo["devices_per_chip"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="tiny", help=f"preset {PRESETS} or k25jax/configs/presets.py:NAME")
  parser.add_argument("--topology", required=True, help="e.g. v5p:8x8x16 (1024 chips), tpu7x:4x4x4, v6e:16x16")
  parser.add_argument("--mesh", default="", help="axis sizes, e.g. data=1,fsdp=128,expert=8,tensor=1 (-1 fills)")
  parser.add_argument("--batch", type=int, help="global batch (default config.train.batch_size)")
  parser.add_argument("--seq", type=int, help="sequence length (default config.train.seq_len)")
  parser.add_argument("--chips_per_host", default="2,2,1", help="host bounds of the topology (chips)")
  parser.add_argument("--num_slices", type=int, default=1)
  parser.add_argument("--hbm_gib", type=float, help="HBM per chip in GiB (default from the generation)")
  parser.add_argument("--dep_patches", type=int, help="with --config.dep=True: DEP patch slots per device "
                      "(default twice the balanced mean)")
  parser.add_argument("--dep_items", type=int, help="with --config.dep=True: DEP media item slots per device")
  args, rest = parser.parse_known_args(argv)
  overrides = []
  for item in rest:
    if not item.startswith("--config."):
      parser.error(f"unknown argument {item!r}; field overrides look like --config.model.remat_policy=dots")
    overrides.append(item[len("--config."):])
  config = load_config(args.config, overrides)
  for axis, size in parse_mesh(args.mesh).items():
    config.mesh[axis] = size
  if args.batch:
    config.train.batch_size = args.batch
  if args.seq:
    config.train.seq_len = args.seq
  devices, topo = topology_devices(args.topology, [int(c) for c in args.chips_per_host.split(",")],
                                   args.num_slices)
  hbm = hbm_per_device(topo, args.hbm_gib)
  if config.dep:
    report = compile_dep_step(config, devices, hbm, args.dep_patches, args.dep_items)
  else:
    report = compile_train_step(config, devices, hbm)
  report = dict(topology=topo, **report)
  print(json.dumps(report, indent=1))
  return report


if __name__ == "__main__":
  main(sys.argv[1:])
