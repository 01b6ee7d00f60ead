"""Multi-host entry point: `jax.distributed.initialize()`, then a short sharded training run with checkpoints.

The same command runs on every host (issue 9 item 4): a Cloud TPU pod slice (`launch/tpu_pod.sh`), a SLURM GPU
cluster (`launch/slurm_gpu.sbatch`) or N local CPU processes (`launch/local_multiprocess.py`).

    python -m launch.train --config=tiny --steps=4 --save_at=2 --ckpt_dir=/tmp/k25ckpt [--out=result.json]
        [--coordinator=HOST:PORT --num_processes=N --process_id=I] [--config.mesh.fsdp=2 ...]

Without `--coordinator`, `jax.distributed.initialize()` detects the cluster (Cloud TPU metadata, SLURM
variables); with `--num_processes=1` it is skipped. The run is the full trainer step (`k25jax.train.step`: loss,
gradients, optimizer, QK-Clip, MoE bias update) on the synthetic bigram stream of `k25jax.train.simple`. Each
process builds only its own rows of the global batch (`jax.make_array_from_process_local_data`). At `--save_at` the
state is saved with an orbax `CheckpointManager` (every process writes its shards); after the last step the
checkpoint is restored into a fresh abstract state and the remaining steps are replayed, so the result holds both
the straight losses and the resumed ones. Process 0 writes the JSON result to `--out` and prints it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from k25jax import sharding as shd
from k25jax.configs import ConfigError, validate
from k25jax.configs.train import validate_trainer
from k25jax.data.pipeline import to_global_batch
from k25jax.train import simple
from k25jax.train import state as state_lib
from k25jax.train import step as step_lib
from launch.aot import load_config

MEDIA_PAD_ID = 0  # the synthetic stream has no media


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
  """`jax.distributed.initialize` with explicit arguments (local runs) or auto-detection (TPU pods, SLURM)."""
  if num_processes == 1:
    return
  if coordinator is not None and (num_processes is None or process_id is None):
    raise ConfigError("--coordinator needs --num_processes and --process_id (e.g. 2 and 0..1)")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def host_rows(mesh, global_rows: int) -> slice:
  """The rows of a batch-sharded global array that this process's devices hold (contiguous by construction of
  the mesh: devices are ordered by process)."""
  index_map = shd.batch_sharding(mesh, 1).addressable_devices_indices_map((global_rows,))
  starts = sorted({idx[0].start or 0 for idx in index_map.values()})
  stops = sorted({idx[0].stop or global_rows for idx in index_map.values()})
  rows = slice(starts[0], stops[-1])
  if rows.stop - rows.start != global_rows // jax.process_count():
    raise ConfigError(f"process {jax.process_index()} holds rows {rows} of {global_rows}, not a contiguous "
                      f"1/{jax.process_count()} share; order the mesh devices by process")
  return rows


def host_batch(config: ml_collections.ConfigDict, mesh, step: int) -> dict[str, np.ndarray]:
  """This process's part of the global batch of `step`: identical on any number of processes."""
  b, seq = int(config.train.batch_size), int(config.train.seq_len)
  full = simple.synthetic_batch(np.random.default_rng([int(config.seed), step]), b, seq, config.model.vocab_size)
  full["loss_mask"] = full["loss_mask"] > 0
  shards = int(np.prod([mesh.shape[a] for a in shd.BATCH_AXES]))
  full.update(patches=np.zeros((shards, 14 * 14 * 3), np.float32), patch_item_ids=np.zeros((shards,), np.int32),
              item_grid=np.zeros((shards, 3), np.int32), item_valid=np.zeros((shards,), bool))
  rows, media = host_rows(mesh, b), host_rows(mesh, shards)
  return {k: v[media if k in ("patches", "patch_item_ids", "item_grid", "item_valid") else rows]
          for k, v in full.items()}


def run(config: ml_collections.ConfigDict, steps: int, save_at: int, ckpt_dir: str) -> dict[str, Any]:
  """Trains `steps` steps saving at `save_at`, then restores that checkpoint and replays the rest."""
  if not 1 <= save_at < steps:
    raise ConfigError(f"--save_at={save_at} must lie in [1, --steps={steps}) so that some steps are replayed")
  if config.model.vision.enabled:
    raise ConfigError("the synthetic stream is text-only; pass --config.model.vision.enabled=False")
  validate(config)
  validate_trainer(config)
  mesh = shd.make_mesh(config)
  model = state_lib.build_model(config)
  state, shardings, tx = state_lib.init_state(config, mesh, model)
  train_step = step_lib.make_train_step(config, mesh, model, tx, shardings, media_pad_id=MEDIA_PAD_ID)
  batch = lambda i: to_global_batch(host_batch(config, mesh, i), mesh)
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
  losses = []
  with ocp.CheckpointManager(ckpt_dir, options=options) as manager:
    for i in range(steps):
      state, metrics = train_step(state, batch(i))
      losses.append(float(metrics["loss"]))
      if i + 1 == save_at:
        manager.save(save_at, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    abstract, _, _ = state_lib.abstract_state(config, mesh, model)
    state = manager.restore(save_at, args=ocp.args.StandardRestore(abstract))
  restored_step = int(state["step"])
  resumed = []
  for i in range(save_at, steps):
    state, metrics = train_step(state, batch(i))
    resumed.append(float(metrics["loss"]))
  return dict(preset=config.preset, processes=jax.process_count(), devices=jax.device_count(),
              mesh=dict(mesh.shape), optimizer=config.trainer.optimizer, losses=losses, restored_step=restored_step,
              resumed_losses=resumed)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="tiny", help="preset name or k25jax/configs/presets.py:NAME")
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--save_at", type=int, default=2)
  parser.add_argument("--ckpt_dir", required=True, help="checkpoint directory every process can reach")
  parser.add_argument("--optimizer", default="adamw", choices=("adamw", "muonclip"))
  parser.add_argument("--out", help="JSON result (written by process 0)")
  parser.add_argument("--coordinator", help="HOST:PORT of process 0 (omit on TPU pods / SLURM: auto-detected)")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith("--config.")]
  if bad:
    parser.error(f"unknown arguments {bad}; field overrides look like --config.train.batch_size=16")
  initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  config = load_config(args.config, [a[len("--config."):] for a in rest], optimizer=args.optimizer)
  result = run(copy.deepcopy(config), args.steps, args.save_at, args.ckpt_dir)
  if jax.process_index() == 0:
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if args.out:
      with open(args.out, "w") as f:
        f.write(text + "\n")
  return result


if __name__ == "__main__":
  from k25jax.runtime import use_caching_allocator
  use_caching_allocator()
  main(sys.argv[1:])
