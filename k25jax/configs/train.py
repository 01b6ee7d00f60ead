"""Trainer, checkpoint and evaluation fields of the pre-training loop (`config.trainer`).

Digest §2.2 (joint pre-training with MuonClip; losses) and §8 (QK-Clip threshold). Every preset carries it
(`k25jax.configs.presets.get_config`).

  optimizer        "muonclip" (k25jax.optim with `config.optim`: Muon + AdamW, WSD schedule, QK-Clip) or "adamw"
                   (optax.adamw at the constant `config.train.learning_rate`, weight decay and grad clip; no QK-Clip)
  z_loss           weight of the log-partition z-loss (0 = off)
  mtp_loss_weight  weight of the multi-token-prediction loss when `model.num_nextn_predict_layers == 1`
  max_bad_steps    consecutive non-finite losses (each update skipped) that stop the run
  checkpoint       every (steps; 0 = only at the end and on SIGTERM), keep (newest N), async_save
  eval             every (steps between held-out text/vision losses; 0 = end only), suite_n (items per category
                   of the six-category likelihood suite at the end; 0 = off), with_images, suite_seed (the
                   suite's items: fixed across training seeds, so seeds vary the model, not the test set)
"""

from __future__ import annotations

import ml_collections

OPTIMIZERS = ("muonclip", "adamw")


def trainer_config(name: str = "tiny") -> ml_collections.ConfigDict:
  """`config.trainer` for a preset ("tiny", "small", "k25_full")."""
  big = name == "k25_full"
  return ml_collections.ConfigDict(dict(
      optimizer="muonclip",
      z_loss=0.0,
      mtp_loss_weight=0.3,
      max_bad_steps=3,
      checkpoint=dict(every=1000 if big else 50, keep=2, async_save=True),
      eval=dict(every=0 if big else 25, suite_n=0 if big else 16, with_images=True, suite_seed=0),
  ))


def validate_trainer(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` naming the `config.trainer` / `config.train` field and the fix."""
  from k25jax.configs.validate import ConfigError
  t, tr = config.trainer, config.train
  checks = (
      (t.optimizer in OPTIMIZERS, f"trainer.optimizer={t.optimizer!r}: choose one of {OPTIMIZERS}"),
      (t.z_loss >= 0, f"trainer.z_loss={t.z_loss} must be >= 0 (0 turns it off)"),
      (t.mtp_loss_weight >= 0, f"trainer.mtp_loss_weight={t.mtp_loss_weight} must be >= 0"),
      (int(t.max_bad_steps) >= 1, f"trainer.max_bad_steps={t.max_bad_steps} must be >= 1"),
      (int(t.checkpoint.every) >= 0, f"trainer.checkpoint.every={t.checkpoint.every} must be >= 0 (0 = end only)"),
      (int(t.checkpoint.keep) >= 1, f"trainer.checkpoint.keep={t.checkpoint.keep} must be >= 1"),
      (int(t.eval.every) >= 0, f"trainer.eval.every={t.eval.every} must be >= 0 (0 = end only)"),
      (int(t.eval.suite_n) >= 0, f"trainer.eval.suite_n={t.eval.suite_n} must be >= 0 (0 = no suite)"),
      (int(tr.steps) >= 1, f"train.steps={tr.steps} must be >= 1"),
      (int(tr.batch_size) >= 1 and int(tr.seq_len) >= 2,
       f"train.batch_size={tr.batch_size} / seq_len={tr.seq_len} must be >= 1 / >= 2"),
      (tr.learning_rate > 0, f"train.learning_rate={tr.learning_rate} must be > 0"),
      (int(tr.log_every) >= 1, f"train.log_every={tr.log_every} must be >= 1"),
  )
  for ok, msg in checks:
    if not ok:
      raise ConfigError(msg)

