"""Vision:text mixture schedule and deterministic per-step sampling (digest §2.1 Table 1, §2.2 "Data", §7).

The fusion ablation (digest §2.1) fixes the total vision budget and varies *when* vision enters and at *what*
ratio: before the injection point the stream is text only, after it a constant fraction of vision. The three
Table 1 arms (inject at 0.0 with 10:90, at 0.5 with 20:80, at 0.8 with 50:50) all spend 10% of the budget on vision.

The ratio is a share of *tokens*: the tokens of vision examples (one with media: their visual tokens and their
text) over all tokens. A draw is a vision example with the probability that gives that token share in
expectation, p = r L_t / (r L_t + (1 - r) L_v) for mean example lengths L_t (text) and L_v (vision) measured on the
domains (`Mixture.example_tokens`; without them the ratio is the share of examples). The packer reports the
realised shares (`packing.PackStats`: vision_data_tokens, vision_tokens = visual tokens) so runs log "tokens seen
by modality".

Sampling is a pure function of (seed, step): every call for the same step yields the same candidate sequence,
so a pipeline restored at step s continues exactly as the original (digest §7 "deterministic, resumable data
order"). Hosts draw the same modality/domain sequence (so their vision loads stay balanced) and read disjoint
items because each host's sources are sharded (`pipeline.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import numpy as np

MODALITIES = ("text", "vision")


@dataclasses.dataclass(frozen=True)
class FusionSchedule:
  """Vision fraction as a step function of training progress p in [0, 1] (digest §2.1).

  inject_at: progress at which vision data starts (0.0 = early fusion).
  vision_ratio: fraction of vision examples from `inject_at` on (the "Vision:Text ratio" of Table 1).
  """
  inject_at: float
  vision_ratio: float

  def __post_init__(self):
    if not 0.0 <= self.inject_at <= 1.0:
      raise ValueError(f"FusionSchedule.inject_at={self.inject_at} must lie in [0, 1] (fraction of training)")
    if not 0.0 <= self.vision_ratio <= 1.0:
      raise ValueError(f"FusionSchedule.vision_ratio={self.vision_ratio} must lie in [0, 1] (e.g. 0.1 for 10:90)")

  def __call__(self, progress: float) -> float:
    """Fraction of vision examples at training progress `progress`."""
    if not 0.0 <= progress <= 1.0:
      raise ValueError(f"progress={progress} must lie in [0, 1]; clamp step/total_steps before calling")
    return self.vision_ratio if progress >= self.inject_at else 0.0

  def total_vision_share(self) -> float:
    """Closed form of the share of vision over the whole run: ratio * (1 - inject_at) (digest §2.1 [INF])."""
    return self.vision_ratio * (1.0 - self.inject_at)


# Digest §2.1, Table 1: every arm spends 10% of the budget on vision.
TABLE1_ARMS: dict[str, FusionSchedule] = {
    "early": FusionSchedule(inject_at=0.0, vision_ratio=0.1),
    "mid": FusionSchedule(inject_at=0.5, vision_ratio=0.2),
    "late": FusionSchedule(inject_at=0.8, vision_ratio=0.5),
}


def total_vision_share(schedule: Callable[[float], float], num_steps: int | None = None) -> float:
  """Share of vision over a run for any schedule p -> vision fraction (digest §2.1).

  With `num_steps`, the exact average a run of that many steps sees (step s at progress s / num_steps); without,
  the integral over [0, 1] by the midpoint rule on 100k points (error <= max fraction / 1e5 per jump).
  """
  n = 100_000 if num_steps is None else int(num_steps)
  if n <= 0:
    raise ValueError(f"total_vision_share: num_steps={num_steps} must be positive")
  points = (np.arange(n) + (0.5 if num_steps is None else 0.0)) / n
  return float(np.mean([schedule(float(p)) for p in points]))


class Candidate(NamedTuple):
  """One draw of the mixture: which modality/domain, and the slot to read in that domain's (sharded) source."""
  modality: str
  domain: str
  slot: int


def _normalised(weights: Mapping[str, float], field: str) -> tuple[tuple[str, ...], np.ndarray]:
  names = tuple(sorted(weights))
  w = np.asarray([float(weights[n]) for n in names], np.float64)
  if np.any(w < 0) or not np.all(np.isfinite(w)):
    raise ValueError(f"{field}={dict(weights)} has a negative or non-finite weight; use weights >= 0")
  if names and w.sum() <= 0:
    raise ValueError(f"{field}={dict(weights)} sums to 0; give at least one domain a positive weight")
  return names, (w / w.sum() if names else w)


@dataclasses.dataclass(frozen=True)
class Mixture:
  """Deterministic modality/domain sampler driven by the fusion schedule (digest §2.1, §2.2 "Data", §7).

  text_weights / vision_weights: relative domain weights inside each modality (zero-weight domains never drawn).
  max_draws: upper bound on draws per step; it also strides the per-domain slots so that no two steps, and no two
    draws of one step, read the same slot of a domain.
  total_steps: run length; progress = min(step / total_steps, 1).
  example_tokens: (mean tokens of a text draw, of a vision draw): the schedule's ratio is then a token share
    (module docstring); None makes it the share of examples.
  """
  schedule: FusionSchedule
  text_weights: Mapping[str, float]
  vision_weights: Mapping[str, float]
  seed: int
  total_steps: int
  max_draws: int = 1024
  example_tokens: tuple[float, float] | None = None

  def __post_init__(self):
    if self.total_steps <= 0:
      raise ValueError(f"Mixture.total_steps={self.total_steps} must be positive (config.train.steps)")
    if self.max_draws <= 0:
      raise ValueError(f"Mixture.max_draws={self.max_draws} must be positive")
    if self.example_tokens is not None and not min(self.example_tokens) > 0:
      raise ValueError(f"Mixture.example_tokens={self.example_tokens} must be two positive mean lengths (text, "
                       "vision), or None for a share of examples")
    text_names, _ = _normalised(self.text_weights, "text_weights")
    vision_names, _ = _normalised(self.vision_weights, "vision_weights")
    if self.schedule.vision_ratio > 0 and self.schedule.inject_at < 1 and not vision_names:
      raise ValueError(f"schedule {self.schedule} draws vision examples but vision_weights is empty; add a vision "
                       "domain or set vision_ratio=0")
    if self.schedule.vision_ratio < 1 and not text_names:
      raise ValueError(f"schedule {self.schedule} draws text examples but text_weights is empty; add a text domain "
                       "or set vision_ratio=1 with inject_at=0")

  def progress(self, step: int) -> float:
    """Training progress of `step` in [0, 1]."""
    if step < 0:
      raise ValueError(f"step={step} must be >= 0")
    return min(step / self.total_steps, 1.0)

  def vision_fraction(self, step: int) -> float:
    """Probability that a draw at `step` is a vision example (the schedule's token share converted with
    `example_tokens`, module docstring)."""
    r = self.schedule(self.progress(step))
    if self.example_tokens is None or r in (0.0, 1.0):
      return r
    text, vision = self.example_tokens
    return r * text / (r * text + (1.0 - r) * vision)

  def candidates(self, step: int) -> Iterator[Candidate]:
    """The (at most `max_draws`) draws of `step`, a pure function of (seed, step)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(self.seed), int(step)]))
    frac = self.vision_fraction(step)
    names, cdfs = {}, {}
    for modality, weights in (("text", self.text_weights), ("vision", self.vision_weights)):
      names[modality], probs = _normalised(weights, f"{modality}_weights")
      cdfs[modality] = np.cumsum(probs)
    is_vision = rng.random(self.max_draws) < frac
    u = rng.random(self.max_draws)
    counts: dict[str, int] = {}
    for k in range(self.max_draws):
      modality = "vision" if is_vision[k] else "text"
      cdf = cdfs[modality]
      domain = names[modality][min(int(np.searchsorted(cdf, u[k], side="right")), len(cdf) - 1)]
      j = counts.get(domain, 0)
      counts[domain] = j + 1
      yield Candidate(modality, domain, int(step) * self.max_draws + j)
