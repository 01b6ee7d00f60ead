"""Multi-host path on one CPU (issue 9 item 5): 2 processes over loopback `jax.distributed`, 4 fake devices each,
train `tiny` (full trainer step), save and restore an orbax checkpoint, and agree with one process on 8 devices."""

import json

import numpy as np
import pytest

from launch import local_multiprocess, train

ARGS = ["--config=tiny", "--steps=3", "--save_at=2", "--config.model.vision.enabled=False",
        "--config.mesh.fsdp=2", "--config.mesh.expert=2", "--config.train.batch_size=8",
        "--config.train.seq_len=16"]


@pytest.mark.slow
def test_two_processes_match_one_and_resume(tmp_path):
  out = tmp_path / "result.json"
  local_multiprocess.launch(ARGS + [f"--ckpt_dir={tmp_path / 'ckpt_mp'}", f"--out={out}"], num_processes=2,
                            devices_per_process=4, timeout_s=420)
  multi = json.loads(out.read_text())
  assert multi["processes"] == 2 and multi["devices"] == 8
  assert multi["mesh"] == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}

  single = train.main(ARGS + [f"--ckpt_dir={tmp_path / 'ckpt_sp'}", "--num_processes=1"])
  assert single["processes"] == 1 and single["devices"] == 8
  # Same global batches and program on the same mesh shape: only the collectives' transport differs.
  np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-5, atol=1e-5)
  assert multi["losses"][-1] < multi["losses"][0], multi["losses"]
  for result in (multi, single):
    # Restoring the step-2 checkpoint and replaying step 3 reproduces the straight run exactly.
    assert result["restored_step"] == 2
    assert result["resumed_losses"] == result["losses"][2:]


def test_launch_reports_the_failing_process(tmp_path):
  with pytest.raises(RuntimeError, match="process 0 of 2 exited"):
    local_multiprocess.launch(["--config=tiny", f"--ckpt_dir={tmp_path}", "--save_at=0"], num_processes=2,
                              devices_per_process=1, timeout_s=120)


def test_process_env_sets_its_own_device_count(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_dump_to=/tmp/x")
  env = local_multiprocess.process_env(3)
  assert env["XLA_FLAGS"].split() == ["--xla_dump_to=/tmp/x", "--xla_force_host_platform_device_count=3"]
  assert env["JAX_PLATFORMS"] == "cpu"
