"""Checkpoints and resumption (k25jax.train.checkpoint, k25jax.train.loop): round trip incl. the data iterator,
restore onto another mesh, and a preempted (SIGTERM) then killed (SIGKILL) run that resumes bit-exactly."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from k25jax import sharding as shd
from k25jax.configs import get_config
from k25jax.data.pipeline import make_train_iterator
from k25jax.data.tokenizer import ByteTokenizer
from k25jax.train import state as st
from k25jax.train.checkpoint import Checkpointer
from k25jax.train.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def text_config(steps=4, **mesh):
  c = get_config("tiny")
  c.model.vision.enabled = False
  c.model.num_hidden_layers = 2
  c.train.update(batch_size=8, seq_len=32, steps=steps)
  c.data.update(patch_budget=64, max_items=8)
  c.trainer.checkpoint.every = 3
  c.trainer.eval.update(every=0, suite_n=0)
  c.mesh.update(mesh)
  return c


def test_round_trip_restores_state_and_data_iterator_onto_another_mesh(tmp_path):
  c = text_config(data=-1)
  mesh8 = shd.make_mesh(c)
  state, _, _ = st.init_state(c, mesh8)
  tok = ByteTokenizer()
  it = make_train_iterator(c, tokenizer=tok)
  for _ in range(2):
    next(it)
  ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2)
  ckpt.save(2, state, data_state=it.get_state(), meta={"skipped": 1})
  ckpt.wait()
  expected_next = next(it)

  c2 = text_config(data=2, expert=2, tensor=-1)
  mesh2 = shd.make_mesh(c2)
  abstract, shardings, _ = st.abstract_state(c2, mesh2)
  restored, data_state, meta = ckpt.restore(abstract)
  ckpt.close()
  assert meta == {"skipped": 1}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
  jax.tree.map(lambda a, s: (a.sharding == s) or (_ for _ in ()).throw(AssertionError(a.sharding)),
               restored, shardings)
  assert any(a.sharding.spec != jax.sharding.PartitionSpec() for a in jax.tree.leaves(restored["params"]))
  it2 = make_train_iterator(c, tokenizer=tok)
  it2.set_state(data_state)
  got = next(it2)
  for k in ("tokens", "targets", "loss_mask", "patches"):
    np.testing.assert_array_equal(got[k], expected_next[k])


def test_keep_n_and_an_unfinished_save_never_hides_the_latest(tmp_path):
  c = text_config(data=-1)
  mesh = shd.make_mesh(c, jax.devices()[:1])
  state, _, _ = st.init_state(c, mesh)
  d = tmp_path / "ckpt"
  ckpt = Checkpointer(str(d), keep=2)
  for s in (1, 2, 3):
    ckpt.save(s, state, data_state={"s": s}, meta={})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  ckpt.close()
  # A save killed mid-write leaves only orbax's temporary directory: it is not a checkpoint and is cleaned up.
  (d / "4.orbax-checkpoint-tmp-123").mkdir()
  ckpt = Checkpointer(str(d), keep=2)
  assert ckpt.latest_step() == 3
  _, data_state, _ = ckpt.restore(st.abstract_state(c, mesh)[0])
  assert data_state == {"s": 3}
  ckpt.close()


def _loop_cmd(workdir, steps):
  return [sys.executable, "-m", "k25jax.train.loop", "--config=k25jax/configs/presets.py:tiny",
          f"--workdir={workdir}", "--config.model.vision.enabled=False", "--config.model.num_hidden_layers=2",
          "--config.train.batch_size=8", "--config.train.seq_len=32", f"--config.train.steps={steps}",
          "--config.data.patch_budget=64", "--config.data.max_items=8", "--config.trainer.checkpoint.every=3",
          "--config.trainer.eval.every=0", "--config.trainer.eval.suite_n=0"]


def _start(workdir, steps):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, ".cache", "jax"))
  return subprocess.Popen(_loop_cmd(workdir, steps), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait_for_step(proc, workdir, step, timeout=240):
  path = os.path.join(workdir, "metrics.jsonl")
  end = time.time() + timeout
  while time.time() < end:
    if os.path.exists(path) and any(r["step"] >= step for r in read_metrics(path)):
      return
    if proc.poll() is not None:
      raise AssertionError(f"the run exited early:\n{proc.stdout.read()[-3000:]}")
    time.sleep(0.2)
  proc.kill()
  raise AssertionError("the run did not reach step {step} in time")


def test_sigterm_saves_and_exits_then_sigkill_and_resume_are_bit_exact(tmp_path):
  steps = 12
  run = str(tmp_path / "run")
  # 1) Preemption: SIGTERM finishes the step, saves it and exits 0.
  proc = _start(run, steps)
  _wait_for_step(proc, run, 2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out[-3000:]
  last = read_metrics(os.path.join(run, "metrics.jsonl"))[-1]["step"]
  ckpt = Checkpointer(os.path.join(run, "checkpoints"))
  assert ckpt.latest_step() == last and last < steps
  ckpt.close()
  # 2) Resume, then SIGKILL mid-way (possibly during an async save).
  proc = _start(run, steps)
  _wait_for_step(proc, run, last + 5)
  proc.kill()
  proc.wait()
  # 3) Resume to the end.
  proc = _start(run, steps)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert "resumed from step" in out
  resumed = [r["loss"] for r in read_metrics(os.path.join(run, "metrics.jsonl"))]

  # Uninterrupted reference: the same command, never interrupted.
  ref_dir = str(tmp_path / "ref")
  proc = _start(ref_dir, steps)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  reference = [r["loss"] for r in read_metrics(os.path.join(ref_dir, "metrics.jsonl"))]
  assert len(resumed) == len(reference) == steps
  assert resumed == reference  # bit for bit


def test_consecutive_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
  from k25jax.train.loop import Trainer, TrainingDiverged
  c = text_config(steps=10, data=-1)
  c.trainer.checkpoint.update(every=2, async_save=False)
  c.trainer.max_bad_steps = 3
  trainer = Trainer(c, jax.devices()[:1])
  real_step = trainer.train_step
  good = {}

  def nan_loss_from_step_4(state, batch):
    # From step 4 on the step sees NaN parameters, so its loss is NaN; it returns the incoming good parameters,
    # as the in-step guard does for a real NaN (tests/test_train_step.py checks that guard).
    step = int(state["step"]) + 1
    if step < 4:
      new, metrics = real_step(state, batch)
      good["params"] = jax.device_get(new["params"])
      return new, metrics
    params = state["params"]
    new, metrics = real_step(dict(state, params=jax.tree.map(lambda p: p * np.nan, params)), batch)
    return dict(new, params=params), metrics

  trainer.train_step = nan_loss_from_step_4
  logs = []
  try:
    trainer.run(c, str(tmp_path / "run"), log=logs.append)
    raise AssertionError("the run did not stop")
  except TrainingDiverged as e:
    assert "3 consecutive non-finite losses up to step 6" in str(e) and "last good checkpoint is step 4" in str(e)
  assert sum("update skipped" in line for line in logs) == 3
  rows = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
  assert [r["finite"] for r in rows] == [1, 1, 1, 0, 0, 0]
  assert not (tmp_path / "run" / "final.json").exists()
  ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"))
  assert ckpt.all_steps() == [2, 4]   # nothing saved after the stop
  restored, _, meta = ckpt.restore(trainer.abstract)
  ckpt.close()
  assert meta["skipped"] == 1
  # The newest checkpoint holds the last good (step 3) parameters: skipped updates never touched them.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored["params"]), good["params"])
