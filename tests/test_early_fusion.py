"""Smoke test of `python -m experiments.early_fusion` (Table 1, digest §2.1) on the `tiny` experiment config."""

import json
import os

import jax
import pytest

from experiments import early_fusion as ef
from k25jax.configs import ConfigError
from k25jax.evals import CATEGORIES


def test_arms_spend_the_same_vision_share():
  c = ef.get_config("tiny")
  shares = []
  for arm in ef.ARMS:
    m = ef.arm_config(c, arm, 0).data.mixture
    shares.append(m.vision_ratio * (1 - m.inject_at))
  assert shares == pytest.approx([0.1, 0.1, 0.1])


def test_bad_config_fails_before_compiling(tmp_path):
  c = ef.get_config("tiny")
  c.trainer.optimizer = "sgd"
  with pytest.raises(ConfigError, match="optimizer"):
    ef.run(c, str(tmp_path), log=lambda s: None, devices=jax.devices()[:1])


def test_tiny_run_writes_table1_results_and_resumes(tmp_path):
  c = ef.get_config("tiny")
  c.train.steps = 3
  workdir = str(tmp_path)
  ef.run(c, workdir, log=lambda s: None, devices=jax.devices()[:1])
  with open(os.path.join(workdir, "results.json")) as f:
    res = json.load(f)
  assert list(res["arms"]) == ["early", "mid", "late"]
  for arm, r in res["arms"].items():
    assert set(r["categories"]) == set(CATEGORIES)
    for v in r["categories"].values():
      assert 0.0 <= v["score"] <= 1.0 and v["n"] == c.trainer.eval.suite_n and v["seeds"] == [0]
    assert r["heldout"]["text_loss"] > 0
  assert res["paper"]["early"]["Vision Knowledge"] == 25.8 and res["paper"]["late"]["OCR"] == 61.5
  md = open(os.path.join(workdir, "results.md")).read().splitlines()
  assert all(c in md[0] for c in CATEGORIES)
  rows = [line for line in md if line.startswith(("| Early", "| Mid", "| Late"))][:3]
  assert [r.split("|")[1].strip() for r in rows] == ["Early", "Mid", "Late"]
  assert "(25.8)" in rows[0] and "(61.5)" in rows[2]
  assert os.path.getsize(os.path.join(workdir, "text_curves.png")) > 1000
  # Rerunning with the same workdir does not retrain finished arms.
  logs = []
  metrics = os.path.join(workdir, "arms", "early_seed0", "metrics.jsonl")
  n_lines = len(open(metrics).readlines())
  ef.run(c, workdir, log=logs.append, devices=jax.devices()[:1])
  assert len(open(metrics).readlines()) == n_lines
  assert not any("step 1/" in line for line in logs)
