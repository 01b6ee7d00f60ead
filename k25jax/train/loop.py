"""The pre-training loop: data -> sharded step -> metrics, evaluation, checkpoints, preemption (DESIGN "training").

Digest §2.1-2.2 (joint text-vision pre-training; the text "dip-and-recover" is tracked with held-out text and
vision losses) and §8 (MuonClip metrics). One `Trainer` holds everything that depends only on shapes (mesh,
model, optimizer, jitted step and eval functions), so several runs of the same shapes (the Table 1 arms, seeds)
compile once; `Trainer.run(config, workdir)` trains one run and is resumable:

  * resume: the newest complete checkpoint in `<workdir>/checkpoints` restores the state (onto this mesh) and the
    data iterator's position, so the losses continue bit for bit as if never interrupted (on CPU);
  * SIGTERM (preemption): the current step finishes, a checkpoint is written synchronously, and `run` returns
    with status "preempted" (the command-line entry point exits 0);
  * a non-finite loss or gradient norm skips the update inside the step; `trainer.max_bad_steps` consecutive ones
    raise `TrainingDiverged` without saving, so the last good checkpoint stays the newest;
  * evaluation: held-out text and vision losses every `trainer.eval.every` steps and at the end; the six-category
    suite at the end by likelihood (`k25jax.evals.run_suite_choice`: each candidate is scored by the summed
    log-probability of its tokens as the assistant answer; the highest wins). Generation-based scoring needs the
    sampler (`k25jax.sample`) and is not used here.

Command line: `python -m k25jax.train.loop --config=k25jax/configs/presets.py:tiny --workdir=DIR
[--config.train.steps=50] [--config.trainer.checkpoint.every=10]`.
"""

from __future__ import annotations

import copy
import json
import os
import signal
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from k25jax import sharding as shd
from k25jax.configs import validate
from k25jax.configs.train import validate_trainer
from k25jax.data import chat
from k25jax.data.packing import PackSpec, pack
from k25jax.data.pipeline import make_eval_iterator, make_train_iterator, to_global_batch
from k25jax.data.tokenizer import ByteTokenizer
from k25jax.runtime import cpu_devices_for_training
from k25jax.train.checkpoint import Checkpointer, config_json
from k25jax.train.metrics import MetricsWriter, Progress, to_scalars
from k25jax.train.state import abstract_state, build_model, init_state, is_multimodal
from k25jax.train.dep import make_dep_train_step
from k25jax.train.step import make_eval_step, make_train_step


class TrainingDiverged(RuntimeError):
  """Raised after `trainer.max_bad_steps` consecutive non-finite losses; the last good checkpoint is intact."""


def prepare_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of the config, validated: raises `ConfigError` before any compile."""
  config = copy.deepcopy(config)
  validate(config)
  validate_trainer(config)
  return config


class _Preemption:
  """Records SIGTERM while installed (the loop polls it after each step)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del signum, frame
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no handler, no preemption support
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class Trainer:
  """Shape-dependent pieces of pre-training built once: mesh, model, optimizer, jitted train and eval steps.

  Runs given to `run` may differ from the trainer's config only in fields that keep shapes and the optimizer
  (data mixture, seeds, steps, eval and checkpoint settings); `run` checks the model, mesh and batch shapes.
  """

  def __init__(self, config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None):
    self.config = prepare_config(config)
    self.tokenizer = ByteTokenizer()
    self.mesh = shd.make_mesh(self.config, devices)
    self.model = build_model(self.config)
    self.abstract, self.shardings, self.tx = abstract_state(self.config, self.mesh, self.model)
    pad = int(self.tokenizer.media_pad_id)
    make = make_dep_train_step if self.config.dep else make_train_step   # DEP: the three-phase step (digest §7)
    self.train_step = make(self.config, self.mesh, self.model, self.tx, self.shardings, media_pad_id=pad)
    self.eval_step = make_eval_step(self.config, self.mesh, self.model, self.shardings, media_pad_id=pad)
    self.spec = PackSpec(batch_size=int(self.config.train.batch_size), seq_len=int(self.config.train.seq_len),
                         patch_budget=int(self.config.data.patch_budget), max_items=int(self.config.data.max_items),
                         media_pad_id=pad, pad_id=int(self.tokenizer.pad_id))

  # ------------------------------------------------------------------------------------------------------ checks
  def _check_compatible(self, config: ml_collections.ConfigDict) -> None:
    for group in ("model", "mesh"):
      if config[group].to_dict() != self.config[group].to_dict():
        raise ValueError(f"Trainer.run: config.{group} differs from the trainer's; build a new Trainer for it")
    for key in ("batch_size", "seq_len", "steps", "learning_rate", "weight_decay", "grad_clip"):
      if config.train[key] != self.config.train[key]:
        raise ValueError(f"Trainer.run: config.train.{key}={config.train[key]} differs from the trainer's "
                         f"{self.config.train[key]}; build a new Trainer for it")
    for key in ("patch_budget", "max_items"):
      if config.data[key] != self.config.data[key]:
        raise ValueError(f"Trainer.run: config.data.{key} differs from the trainer's; build a new Trainer for it")
    optim = lambda c: c.optim.to_dict() if "optim" in c else {}   # values only: a flag config is locked
    if config.trainer.optimizer != self.config.trainer.optimizer or optim(config) != optim(self.config):
      raise ValueError("Trainer.run: config.trainer.optimizer / config.optim differ from the trainer's; build a "
                       "new Trainer")

  # ---------------------------------------------------------------------------------------------------- evaluation
  def heldout_losses(self, state: dict, config: ml_collections.ConfigDict) -> dict[str, float]:
    """Mean CE per target token on the held-out text and vision streams (`make_eval_iterator`)."""
    out = {}
    for modality in ("text", "vision"):
      if not any(float(w) > 0 for w in config.data[f"{modality}_domains"].values()):
        continue
      logprob = tokens = 0.0
      for batch in make_eval_iterator(config, tokenizer=self.tokenizer, modality=modality):
        r = jax.device_get(self.eval_step(state["params"], state["moe_state"], to_global_batch(batch, self.mesh)))
        logprob += float(np.sum(r["logprob"]))
        tokens += float(np.sum(r["tokens"]))
      out[f"{modality}_loss"] = -logprob / max(tokens, 1.0)
    return out

  def _row(self, conversation: dict, candidate: str) -> dict[str, np.ndarray]:
    """One (prompt, candidate) as a single packed row; the loss mask covers the candidate and its end token."""
    conv = dict(conversation, messages=list(conversation["messages"]) + [
        {"role": "assistant", "content": [{"type": "text", "text": candidate}]}])
    ex = chat.encode_conversation(conv, self.tokenizer, train_on="last")
    n_patch = sum(int(m.num_patches) for m in ex.media)
    if len(ex.tokens) > self.spec.seq_len or n_patch > self.spec.patch_budget or len(ex.media) > self.spec.max_items:
      raise ValueError(f"eval item needs {len(ex.tokens)} tokens, {n_patch} patches and {len(ex.media)} media "
                       f"items but a row holds {self.spec.seq_len} tokens (train.seq_len) and a batch "
                       f"{self.spec.patch_budget} patches / {self.spec.max_items} items (data.patch_budget / "
                       "data.max_items); raise them or set trainer.eval.suite_n=0")
    one = PackSpec(batch_size=1, seq_len=self.spec.seq_len, patch_budget=max(n_patch, 1),
                   max_items=max(len(ex.media), 1), media_pad_id=self.spec.media_pad_id, pad_id=self.spec.pad_id)
    row, _ = pack([ex], one)
    row["n_patches"], row["n_items"] = n_patch, len(ex.media)
    return row

  def _batches(self, rows: list[dict]):
    """Groups single rows into full-shape eval batches (B rows, the training patch/item budgets)."""
    s = self.spec
    i = 0
    while i < len(rows):
      batch = {k: np.zeros((s.batch_size,) + v.shape[1:], v.dtype) for k, v in rows[i].items()
               if k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
      batch.update(patches=np.zeros((s.patch_budget, s.patch_dim), np.float32),
                   patch_item_ids=np.zeros((s.patch_budget,), np.int32),
                   item_grid=np.zeros((s.max_items, 3), np.int32), item_valid=np.zeros((s.max_items,), bool))
      b = p = m = 0
      while i < len(rows) and b < s.batch_size and p + rows[i]["n_patches"] <= s.patch_budget and \
          m + rows[i]["n_items"] <= s.max_items:
        r = rows[i]
        for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions"):
          batch[k][b] = r[k][0]
        np_, ni = r["n_patches"], r["n_items"]
        batch["patches"][p:p + np_] = r["patches"][:np_]
        batch["patch_item_ids"][p:p + np_] = np.where(r["patch_item_ids"][:np_] > 0, r["patch_item_ids"][:np_] + m, 0)
        batch["item_grid"][m:m + ni] = r["item_grid"][:ni]
        batch["item_valid"][m:m + ni] = r["item_valid"][:ni]
        b, p, m, i = b + 1, p + np_, m + ni, i + 1
      yield batch, b

  def score_fn(self, state: dict) -> Callable[[list[tuple[dict, str]]], list[float]]:
    """`run_suite_choice` scorer: summed log-probability of each candidate answer given its prompt."""

    def score(pairs):
      rows = [self._row(conv, cand) for conv, cand in pairs]
      out = []
      for batch, used in self._batches(rows):
        r = jax.device_get(self.eval_step(state["params"], state["moe_state"], to_global_batch(batch, self.mesh)))
        out.extend(float(x) for x in r["logprob"][:used])
      return out

    return score

  def suite(self, state: dict, config: ml_collections.ConfigDict) -> dict:
    """The six-category suite (digest §2.1 Table 1 columns) by likelihood."""
    from k25jax.evals import run_suite_choice
    return run_suite_choice(self.score_fn(state), n_per_category=int(config.trainer.eval.suite_n),
                            with_images=bool(config.trainer.eval.with_images) and is_multimodal(config),
                            seed=int(config.trainer.eval.suite_seed))

  # -------------------------------------------------------------------------------------------------------- train
  def run(self, config: ml_collections.ConfigDict, workdir: str, *, log: Callable[[str], None] = print,
          name: str = "") -> dict:
    """Trains (or resumes) one run in `workdir`; returns {"status", "step", "skipped", "heldout", "suite"}.

    Writes `workdir/metrics.jsonl`, `workdir/tb/`, `workdir/checkpoints/` and, when done, `workdir/final.json`.
    """
    config = prepare_config(config)
    self._check_compatible(config)
    t = config.trainer
    total = int(config.train.steps)
    os.makedirs(workdir, exist_ok=True)
    final_path = os.path.join(workdir, "final.json")
    if os.path.exists(final_path):
      with open(final_path, encoding="utf-8") as f:
        return json.load(f)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=int(t.checkpoint.keep),
                        async_save=bool(t.checkpoint.async_save))
    it = make_train_iterator(config, tokenizer=self.tokenizer)
    skipped = 0
    if ckpt.latest_step() is not None:
      state, data_state, meta = ckpt.restore(self.abstract)
      it.set_state(data_state)
      skipped = int(meta.get("skipped", 0))
      log(f"{name}resumed from step {int(state['step'])} ({ckpt.directory})")
    else:
      state, _, _ = init_state(config, self.mesh, self.model)
    start = int(jax.device_get(state["step"]))
    writer = MetricsWriter(workdir)
    progress = Progress(total, start, prefix=name)
    bad = 0
    status = "done"

    def save(step):
      ckpt.save(step, state, data_state=it.get_state(),
                meta={"skipped": skipped, "config": config_json(config), "name": name})

    try:
      with _Preemption() as preempt:
        for step in range(start + 1, total + 1):
          host = next(it)
          state, metrics = self.train_step(state, to_global_batch(host, self.mesh))
          scalars = to_scalars(jax.device_get(metrics))
          progress.tick()
          if not scalars["finite"]:
            bad += 1
            skipped += 1
            log(f"{name}step {step}: non-finite loss {scalars['loss']} / grad norm {scalars['grad_norm']}; update "
                f"skipped ({bad} in a row, {skipped} in total)")
          else:
            bad = 0
          scalars["skipped_total"] = skipped
          scalars["vision_share"] = scalars["vision_tokens"] / max(scalars["vision_tokens"] + scalars["text_tokens"], 1)
          scalars["vision_examples"] = float(host["stats"]["vision_examples"])
          scalars["vision_data_tokens"] = float(host["stats"]["vision_data_tokens"])
          scalars["examples"] = float(host["stats"]["examples"])
          writer.write("train", step, scalars)
          if bad >= int(t.max_bad_steps):
            raise TrainingDiverged(
                f"{name}{bad} consecutive non-finite losses up to step {step} (trainer.max_bad_steps="
                f"{t.max_bad_steps}); stopped without saving, the last good checkpoint is step "
                f"{ckpt.latest_step()} in {ckpt.directory}. Lower train.learning_rate or check the data.")
          if step % int(config.train.log_every) == 0 or step == total:
            log(progress.line(step, scalars, scalars["text_tokens"] + scalars["vision_tokens"]))
          if int(t.eval.every) and step % int(t.eval.every) == 0 and step < total:
            writer.write("eval", step, self.heldout_losses(state, config))
          if preempt.requested:
            save(step)
            ckpt.wait()
            log(f"{name}SIGTERM: saved step {step} to {ckpt.directory}; exiting")
            status = "preempted"
            break
          if int(t.checkpoint.every) and step % int(t.checkpoint.every) == 0 and step < total:
            save(step)
        if status == "done":
          if ckpt.latest_step() != total:
            save(total)
          heldout = self.heldout_losses(state, config)
          writer.write("eval", total, heldout)
          suite = self.suite(state, config) if int(t.eval.suite_n) else None
          if suite is not None:
            writer.write("suite", total, {c: v["score"] for c, v in suite["categories"].items()})
          ckpt.wait()
          result = {"status": status, "step": total, "skipped": skipped, "heldout": heldout, "suite": suite}
          with open(final_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
          os.replace(final_path + ".tmp", final_path)
          return result
        return {"status": status, "step": int(jax.device_get(state["step"])), "skipped": skipped}
    finally:
      ckpt.wait()
      ckpt.close()
      writer.close()
      if hasattr(it, "close"):
        it.close()


def train(config: ml_collections.ConfigDict, workdir: str, *, devices: Sequence[Any] | None = None,
          log: Callable[[str], None] = print) -> dict:
  """One run: `Trainer(config, devices).run(config, workdir)`."""
  return Trainer(config, devices).run(config, workdir, log=log)


def main(argv) -> None:
  del argv
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  cpu_devices_for_training(flags.FLAGS.config)
  result = train(flags.FLAGS.config, flags.FLAGS.workdir, log=lambda s: print(s, flush=True))
  print(json.dumps({"status": result["status"], "step": result["step"]}), flush=True)


if __name__ == "__main__":
  from k25jax.runtime import use_caching_allocator
  use_caching_allocator()
  from absl import app, flags
  from k25jax.configs import cli
  cli.define_config_flag("k25jax/configs/presets.py:tiny")
  flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics.jsonl, tb/).", required=True)
  app.run(main)
