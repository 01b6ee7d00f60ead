"""Learning-rate schedules: warmup-stable-decay (WSD), the K2 pre-training schedule (digest §2.2).

K2 [P K2 §2.5]: a 500-step warm-up to 2e-4, constant for 10T tokens, then cosine decay to 2e-5 over 5.5T tokens
(final_frac 0.1). At small scale the phases are given as fractions of the run.
"""

from __future__ import annotations

import optax

from k25jax.configs.optim import DECAY_SHAPES


def wsd_schedule(peak_lr: float, total_steps: int, warmup_frac: float, decay_frac: float, final_frac: float,
                 decay_shape: str = "cosine") -> optax.Schedule:
  """Warm-up (linear from 0), stable at `peak_lr`, then decay to `final_frac * peak_lr` (digest §2.2).

  The phases take round(warmup_frac * total_steps) and round(decay_frac * total_steps) steps, the stable phase
  the rest; the decay ends exactly at `total_steps`, after which the rate stays at its final value (at `peak_lr`
  when decay_frac=0). Step 0 of a non-empty warm-up has rate 0 (the optax convention).
  """
  if not peak_lr > 0:
    raise ValueError(f"wsd_schedule: peak_lr={peak_lr} must be > 0")
  if int(total_steps) < 1:
    raise ValueError(f"wsd_schedule: total_steps={total_steps} must be >= 1 (config.train.steps)")
  for name, frac in (("warmup_frac", warmup_frac), ("decay_frac", decay_frac), ("final_frac", final_frac)):
    if not 0.0 <= frac <= 1.0:
      raise ValueError(f"wsd_schedule: {name}={frac} must lie in [0, 1]")
  if warmup_frac + decay_frac > 1.0:
    raise ValueError(f"wsd_schedule: warmup_frac + decay_frac = {warmup_frac + decay_frac} exceeds 1; shorten "
                     "one of the phases")
  if decay_shape not in DECAY_SHAPES:
    raise ValueError(f"wsd_schedule: decay_shape={decay_shape!r}; choose one of {DECAY_SHAPES}")
  total_steps = int(total_steps)
  warmup = round(warmup_frac * total_steps)
  decay = min(round(decay_frac * total_steps), total_steps - warmup)
  stable = total_steps - warmup - decay
  final_lr = final_frac * peak_lr
  if decay == 0:
    decay_fn = optax.constant_schedule(peak_lr)
  elif decay_shape == "linear":
    decay_fn = optax.linear_schedule(peak_lr, final_lr, decay)
  else:
    decay_fn = optax.cosine_decay_schedule(peak_lr, decay, alpha=final_frac)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak_lr, warmup), optax.constant_schedule(peak_lr), decay_fn],
      boundaries=[warmup, warmup + stable])
