"""AOT compilation of the real train step for a TPU topology on this CPU (issue 9 items 1 and 5; marker `aot`).

Needs libtpu (`pip install -r requirements-aot.txt`); skipped with the reason when it is not importable.
"""

import importlib.util
import math

import jax.numpy as jnp
import numpy as np
import pytest

from k25jax import sharding as shd
from k25jax.configs import ConfigError
from k25jax.train import balance

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


def test_dep_step_compiles_per_phase_with_live_arrays(v5p8):
  """The DEP step (config.dep) compiles as its four programs; each phase's total adds the step's live arrays it
  does not take to its program's bytes, and the abstract media plan has the shapes of a real plan. The tower runs
  the chunked packed attention of `k25_full` (a scan inside phase 1's shard_map)."""
  devices, topo = v5p8
  hbm = aot.hbm_per_device(topo, None)
  config = aot.load_config("tiny", ["dep=True", "mesh.data=2", "mesh.fsdp=2", "mesh.expert=2", "train.seq_len=16",
                                    "model.vision.attention_impl=chunked", "model.vision.attention_chunk=64",
                                    "model.vision.max_item_patches=64"])
  report = aot.compile_dep_step(config, devices, hbm)
  d, k = 8, 4
  hosts = len({dev.process_index for dev in devices})  # 2 on v5p:2x2x2 (2x2x1 chips per host)
  patches = config.data.patch_budget * hosts
  assert report["dep"] == dict(device_patches=2 * patches // d, device_items=config.data.max_items * hosts,
                               global_patches=patches, vision_tokens=patches // k,
                               vision_token_share=round(patches / k / (8 * 16), 4))
  phases = report["phases"]
  assert list(phases) == ["vision_forward", "backbone", "vision_backward", "update"]
  for name, p in phases.items():
    assert p["program_bytes"] == (p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"] + p["temp_bytes"]
                                  + p["generated_code_bytes"]), name
    assert p["total_bytes"] == p["program_bytes"] + p["outside_bytes"] and p["fits"] is True, name
  assert report["total_bytes"] == max(p["total_bytes"] for p in phases.values()) and report["fits"] is True
  # Phase 1 returns the vision tokens replicated, [N, hidden] in the compute dtype (TPU layouts pad the minor
  # dimension to 128 lanes), and nothing else.
  hidden, itemsize = config.model.hidden_size, jnp.dtype(config.model.dtype).itemsize
  assert patches // k * hidden * itemsize <= phases["vision_forward"]["output_bytes"]
  assert phases["vision_forward"]["output_bytes"] <= patches // k * max(hidden, 128) * itemsize
  # The optimizer state is never an argument of phases 1-3 (it stays outside); the update takes the state and the
  # gradients donated, so only the media arrays stay outside it.
  for name in ("vision_forward", "backbone", "vision_backward"):
    assert phases[name]["outside_bytes"] > report["opt_state_bytes"], name
  assert phases["update"]["alias_bytes"] >= report["params_bytes"] + report["opt_state_bytes"]
  mesh = shd.make_mesh(config, devices)
  b = aot.abstract_batch(config, mesh)
  assert phases["update"]["outside_bytes"] == aot.tree_bytes({n: b[n] for n in ("patches", "patch_item_ids",
                                                                                 "item_grid", "item_valid")})
  # The abstract plan matches what `balance.plan_media` builds at the same budgets.
  pd, md = report["dep"]["device_patches"], report["dep"]["device_items"]
  grid = np.array([[1, 4, 4], [1, 2, 6]] + [[0, 0, 0]] * (config.data.max_items * hosts - 2), np.int32)
  ids = np.zeros(patches, np.int32)
  ids[:16], ids[16:28] = 1, 2
  real = balance.plan_media(ids, grid, grid[:, 0] > 0, num_devices=d, patch_budget=pd, max_items=md,
                            merge_kernel=(2, 2), num_vision_slots=patches // k).device_arrays()
  abstract = aot.abstract_plan(mesh, pd, md, patches // k, k)
  assert {n: (a.shape, a.dtype) for n, a in abstract.items()} == {n: (a.shape, a.dtype) for n, a in real.items()}


def test_dep_needs_the_vision_tower(v5p8):
  devices, _ = v5p8
  config = aot.load_config("tiny", ["dep=True", "model.vision.enabled=False", "mesh.data=8"])
  with pytest.raises(ConfigError, match=r"dep=True needs the multimodal model"):
    aot.compile_dep_step(config, devices)
