"""Checkpoints of the pre-training run (orbax `CheckpointManager`): state, data-iterator position, config.

DESIGN "training" (orbax checkpoints incl. data-iterator state; Levanter-style exact resumption). One step
directory holds three items:
  state  the train state pytree (params, moe_state incl. router correction biases, opt_state, step), sharded
  data   the grain iterator's `get_state()` (JSON). Batches are a pure function of (config, step, host shard)
         (`k25jax.data.pipeline`), so every host's position equals host 0's and one copy restores all hosts
  meta   JSON: the config, counters of the loop (e.g. skipped non-finite steps) and anything else the loop adds

Saves are asynchronous (the next steps run while the arrays are written) and atomic: orbax writes into a temporary
directory and renames it when complete, so a run killed at any moment leaves the latest *finished* checkpoint
intact; unfinished temporaries are removed when the manager is next opened (`cleanup_tmp_directories`). Restoring
takes an abstract state whose leaves carry target shardings, so a checkpoint restores onto any mesh.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp


def config_json(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON (saved beside every checkpoint)."""
  return json.loads(config.to_json_best_effort())


class Checkpointer:
  """Keep-N, async, atomic checkpoints of one run directory (`directory` is created if missing)."""

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"Checkpointer: keep={keep} must be >= 1 (number of newest checkpoints kept)")
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    """Step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, data_state: dict, meta: dict) -> None:
    """Starts saving `state` at `step` (returns once the arrays are copied off; the write continues async)."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))
    self._manager.save(int(step), args=args, force=True)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, dict]:
    """(state, data_state, meta) of `step` (default: latest) placed on `abstract_state`'s shardings."""
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}; train from scratch or point the "
                              "workdir at a run that saved one")
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
                              meta=ocp.args.JsonRestore())
    out = self._manager.restore(step, args=args)
    return out["state"], out["data"], out["meta"]

  def wait(self) -> None:
    """Blocks until pending async saves are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
