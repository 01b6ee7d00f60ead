"""AOT compilation of the real train step for a TPU topology on this CPU (issue 9 items 1 and 5; marker `aot`).

Needs libtpu (`pip install -r requirements-aot.txt`); skipped with the reason when it is not importable.
"""

import importlib.util
import math

import pytest

from k25jax.configs import ConfigError

pytestmark = [pytest.mark.aot, pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed; `pip install -r requirements-aot.txt` to run the AOT tests")]

from launch import aot  # noqa: E402


@pytest.fixture(scope="module")
def v5p8():
  return aot.topology_devices("v5p:2x2x2")


def test_topology_device_counts():
  devices, topo = aot.topology_devices("tpu7x:2x2x2")
  assert topo["chips"] == 8 and len(devices) == 16 and topo["devices_per_chip"] == 2  # ANCHORS §9
  assert aot.hbm_per_device(topo, None) == 96 * aot.GIB


def test_tiny_compiles_for_v5p_and_reports_memory(v5p8):
  devices, topo = v5p8
  config = aot.load_config("tiny", ["model.vision.enabled=False", "trainer.optimizer=adamw",
                                    "mesh.data=2", "mesh.fsdp=2", "mesh.expert=2", "train.seq_len=16"])
  report = aot.compile_train_step(config, devices, aot.hbm_per_device(topo, None))
  assert report["mesh"] == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
  assert report["moe_dispatch"] == "ep" and report["optimizer"] == "adamw"
  # Independent count: f32 params sharded as the rules say -> per-device bytes well below the replicated size,
  # and AdamW's two moments follow their parameters (mu + nu = 2x params, plus scalar counts).
  assert report["params_bytes"] < 4 * report["num_params"] / 2
  assert 2 * report["params_bytes"] <= report["opt_state_bytes"] <= 2 * report["params_bytes"] + 64
  # The compiled program takes the donated state as input and aliases it to the output.
  assert report["argument_bytes"] >= report["params_bytes"] + report["opt_state_bytes"]
  assert report["alias_bytes"] >= report["params_bytes"] + report["opt_state_bytes"]
  assert report["total_bytes"] == (report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
                                   + report["temp_bytes"] + report["generated_code_bytes"])
  assert report["fits"] is True and report["hbm_bytes"] == 95 * aot.GIB


def test_bad_inputs_name_the_fix(v5p8):
  devices, _ = v5p8
  with pytest.raises(ConfigError, match="--topology"):
    aot.topology_devices("v5p-128")
  config = aot.load_config("tiny", ["model.vision.enabled=False", "train.batch_size=3"])
  with pytest.raises(ConfigError, match="multiple of 8"):
    aot.compile_train_step(config, devices)
  with pytest.raises(ConfigError, match="unknown preset"):
    aot.load_config("huge")
  assert math.prod(aot.parse_mesh("data=2,fsdp=-1").values()) == -2
  with pytest.raises(ConfigError, match="axis=size"):
    aot.parse_mesh("pipeline=2")


def test_multimodal_chunked_vision_attention_cuts_temporaries(v5p8):
  """The integrated multimodal step compiles with either packed-attention path. Per device, dense holds the f32
  logits [heads, P / 8, P] of the global patch array (P = 2 hosts x 8192 patches); chunked (items of at most 64
  patches, chunks of 64, so 3 key chunks per query chunk) holds a [P / 8, heads, 64] block."""
  devices, topo = v5p8
  temp = {}
  for impl in ("dense", "chunked"):
    config = aot.load_config("tiny", ["trainer.optimizer=adamw", "mesh.data=8", "train.seq_len=16",
                                      "data.patch_budget=8192", "model.vision.max_item_patches=64",
                                      f"model.vision.attention_impl={impl}"])
    report = aot.compile_train_step(config, devices, aot.hbm_per_device(topo, None))
    assert report["fits"] is True
    temp[impl] = report["temp_bytes"]
  heads, p = 2, 2 * 8192
  assert temp["dense"] - temp["chunked"] >= heads * p * p * 4 // 8, temp
