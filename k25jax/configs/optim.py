"""Optimizer presets: MuonClip (digest §8) with a WSD schedule (digest §2.2); `config.optim`.

Muon hyper-parameters follow the Moonlight reference [MOON] quoted in digest §8 (Nesterov momentum 0.95, 5
Newton-Schulz steps with the quintic coefficients on bf16 operands (here with f32 accumulation; f32 operands for
the CPU presets, where bf16 measured no faster on Muon's small matrices), update RMS matched to AdamW by `0.2 * sqrt(max(n, m))`,
decoupled weight decay 0.1); AdamW (0.9, 0.95, 1e-8) takes the embedding, the LM head, norms and biases.
`k25_full` uses K2's 2e-4 peak with a short warm-up and cosine decay to 0.1x (digest §2.2: 2e-4 -> 2e-5);
`qk_clip_tau` is K2's tau = 100 (0 disables QK-Clip). `name="adamw"` swaps in plain AdamW for ablations, with
`learning_rate` as its peak.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from k25jax.configs.validate import ConfigError

OPTIMIZERS = ("muonclip", "adamw")
DECAY_SHAPES = ("linear", "cosine")


def optim_config(preset: str) -> ml_collections.ConfigDict:
  """`config.optim` for a model preset (`tiny`, `small`, `k25_full`)."""
  if preset in ("tiny", "small"):
    # Muon peak lr 2e-2 with consistent_rms (Muon update RMS 0.2 * lr); checked on `tiny` in tests/test_optim.py.
    lr, schedule = 2e-2, dict(warmup_frac=0.05, decay_frac=0.2, final_frac=0.1, decay_shape="linear")
  elif preset == "k25_full":
    # K2 [P K2 §2.5]: warm-up then constant 2e-4 for 10T of 15.5T tokens, cosine to 2e-5 over the last 5.5T.
    lr, schedule = 2e-4, dict(warmup_frac=0.01, decay_frac=0.35, final_frac=0.1, decay_shape="cosine")
  else:
    raise ValueError(f"optim_config: unknown preset {preset!r}; choose one of tiny, small, k25_full")
  return ml_collections.ConfigDict(dict(
      name="muonclip",
      learning_rate=lr,
      weight_decay=0.1,
      momentum=0.95,
      nesterov=True,
      ns_steps=5,
      ns_dtype="float32" if preset in ("tiny", "small") else "bfloat16",   # Newton-Schulz matmul operands
      consistent_rms=0.2,
      adam_b1=0.9,
      adam_b2=0.95,
      adam_eps=1e-8,
      adam_learning_rate=config_dict.placeholder(float),  # None: the same schedule as Muon
      qk_clip_tau=100.0,
      schedule=ml_collections.ConfigDict(schedule),
  ))


def validate_optim(optim: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` naming the `optim` field and the fix."""
  def check(cond: bool, msg: str) -> None:
    if not cond:
      raise ConfigError(msg)

  check(optim.name in OPTIMIZERS, f"optim.name={optim.name!r}: choose one of {OPTIMIZERS}")
  check(optim.learning_rate > 0, f"optim.learning_rate={optim.learning_rate} must be > 0")
  check(optim.adam_learning_rate is None or optim.adam_learning_rate > 0,
        f"optim.adam_learning_rate={optim.adam_learning_rate} must be > 0 (or None to reuse learning_rate)")
  check(optim.weight_decay >= 0, f"optim.weight_decay={optim.weight_decay} must be >= 0")
  check(0 <= optim.momentum < 1, f"optim.momentum={optim.momentum} must lie in [0, 1)")
  check(int(optim.ns_steps) >= 1, f"optim.ns_steps={optim.ns_steps} must be >= 1 (5 is the Muon default)")
  check(optim.ns_dtype in ("float32", "bfloat16"),
        f"optim.ns_dtype={optim.ns_dtype!r}: choose float32 or bfloat16 (Newton-Schulz matmul operands)")
  check(optim.consistent_rms > 0, f"optim.consistent_rms={optim.consistent_rms} must be > 0 (0.2 matches AdamW)")
  for f in ("adam_b1", "adam_b2"):
    check(0 <= optim[f] < 1, f"optim.{f}={optim[f]} must lie in [0, 1)")
  check(optim.adam_eps > 0, f"optim.adam_eps={optim.adam_eps} must be > 0")
  check(optim.qk_clip_tau >= 0, f"optim.qk_clip_tau={optim.qk_clip_tau} must be >= 0 (0 disables QK-Clip)")
  s = optim.schedule
  for f in ("warmup_frac", "decay_frac", "final_frac"):
    check(0 <= s[f] <= 1, f"optim.schedule.{f}={s[f]} must lie in [0, 1]")
  check(s.warmup_frac + s.decay_frac <= 1,
        f"optim.schedule: warmup_frac + decay_frac = {s.warmup_frac + s.decay_frac} exceeds 1; shorten a phase")
  check(s.decay_shape in DECAY_SHAPES, f"optim.schedule.decay_shape={s.decay_shape!r}: choose from {DECAY_SHAPES}")
