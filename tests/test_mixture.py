"""Fusion schedule and mixture sampler (k25jax/data/mixture.py; digest §2.1 Table 1)."""

import collections

import numpy as np
import pytest

from k25jax.data.mixture import TABLE1_ARMS, FusionSchedule, Mixture, total_vision_share


@pytest.mark.parametrize("arm", sorted(TABLE1_ARMS))
def test_table1_arms_spend_ten_percent_on_vision(arm):
  sched = TABLE1_ARMS[arm]
  assert sched.total_vision_share() == pytest.approx(0.10, abs=1e-12)
  assert total_vision_share(sched) == pytest.approx(0.10, abs=1e-5)          # integral, computed numerically
  assert total_vision_share(sched, num_steps=1000) == pytest.approx(0.10, abs=1e-12)  # what a run sees
  assert sched(max(sched.inject_at - 1e-3, 0.0)) == (sched.vision_ratio if sched.inject_at == 0 else 0.0)
  assert sched(1.0) == sched.vision_ratio


def test_total_share_of_any_schedule():
  assert total_vision_share(lambda p: 0.2 * p) == pytest.approx(0.1, abs=1e-6)  # linear ramp: integral 0.1
  assert total_vision_share(FusionSchedule(0.25, 0.4), num_steps=4) == pytest.approx(0.3)  # steps 1,2,3 of 4


def _mixture(arm="mid", **kw):
  args = dict(text_weights={"web": 3.0, "code": 1.0, "off": 0.0}, vision_weights={"ocr": 1.0, "charts": 1.0},
              seed=7, total_steps=200, max_draws=64)
  args.update(kw)
  return Mixture(TABLE1_ARMS[arm], **args)


def test_candidates_are_a_function_of_seed_and_step():
  m = _mixture()
  assert list(m.candidates(123)) == list(m.candidates(123))
  assert list(m.candidates(123)) != list(m.candidates(124))
  assert list(m.candidates(123)) != list(_mixture(seed=8).candidates(123))
  assert len(list(m.candidates(0))) == 64


@pytest.mark.parametrize("arm", sorted(TABLE1_ARMS))
def test_vision_fraction_follows_the_schedule(arm):
  m = _mixture(arm)
  sched = TABLE1_ARMS[arm]
  per_step = np.asarray([np.mean([c.modality == "vision" for c in m.candidates(s)]) for s in range(200)])
  before = per_step[: int(sched.inject_at * 200)]
  after = per_step[int(sched.inject_at * 200):]
  assert not before.any()
  n = after.size * 64
  tol = 4 * np.sqrt(sched.vision_ratio * (1 - sched.vision_ratio) / n)
  assert after.mean() == pytest.approx(sched.vision_ratio, abs=tol)
  assert per_step.mean() == pytest.approx(0.10, abs=tol)


def test_domain_weights_and_unique_slots():
  m = _mixture("early", max_draws=256)
  counts = collections.Counter()
  slots = collections.defaultdict(list)
  for s in range(40):
    for c in m.candidates(s):
      counts[c.domain] += 1
      slots[c.domain].append(c.slot)
  assert counts["off"] == 0
  assert counts["web"] / (counts["web"] + counts["code"]) == pytest.approx(0.75, abs=0.02)
  assert counts["ocr"] / (counts["ocr"] + counts["charts"]) == pytest.approx(0.5, abs=0.05)
  for domain, ss in slots.items():
    assert len(set(ss)) == len(ss), f"{domain} reads a slot twice"


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="vision_ratio"):
    FusionSchedule(0.0, 1.5)
  with pytest.raises(ValueError, match="inject_at"):
    FusionSchedule(-0.1, 0.1)
  with pytest.raises(ValueError, match="vision_weights is empty"):
    Mixture(FusionSchedule(0.0, 0.1), {"web": 1.0}, {}, seed=0, total_steps=10)
  with pytest.raises(ValueError, match="negative"):
    Mixture(FusionSchedule(0.0, 0.1), {"web": -1.0}, {"ocr": 1.0}, seed=0, total_steps=10)
  with pytest.raises(ValueError, match="progress"):
    FusionSchedule(0.0, 0.1)(1.5)
  Mixture(FusionSchedule(0.0, 0.0), {"web": 1.0}, {}, seed=0, total_steps=10)  # text-only is valid


@pytest.mark.parametrize("arm", sorted(TABLE1_ARMS))
def test_token_share_converts_to_the_draw_probability(arm):
  """With mean lengths L_t, L_v the draw probability p gives the schedule's ratio as the expected token share."""
  text_len, vision_len = 100.0, 300.0
  m = _mixture(arm, example_tokens=(text_len, vision_len))
  r = TABLE1_ARMS[arm].vision_ratio
  p = m.vision_fraction(199)
  assert p * vision_len / (p * vision_len + (1 - p) * text_len) == pytest.approx(r, abs=1e-12)
  assert p < r                                                             # longer vision examples: fewer draws
  assert _mixture(arm).vision_fraction(199) == r                           # no lengths: a share of examples
  assert m.vision_fraction(0) == (p if TABLE1_ARMS[arm].inject_at == 0 else 0.0)
  with pytest.raises(ValueError, match="example_tokens"):
    _mixture(arm, example_tokens=(0.0, 10.0))
