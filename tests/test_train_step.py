"""The pre-training step (k25jax.train.step): mesh invariance, skipped non-finite updates, config checks."""

import jax
import numpy as np
import pytest

from k25jax import sharding as shd
from k25jax.configs import ConfigError, get_config
from k25jax.train import state as st
from k25jax.train import step as sp
from k25jax.train.loop import prepare_config

PAD = 7  # media_pad id for the step's token accounting (not in the synthetic data below)


def text_config(optimizer="adamw", **mesh):
  c = get_config("tiny")
  c.model.vision.enabled = False
  c.model.num_hidden_layers = 2
  c.train.batch_size, c.train.seq_len = 8, 16
  c.trainer.optimizer = optimizer
  c.mesh.update(mesh)
  return c


def host_batch(seed, c, bad_targets=False):
  rng = np.random.default_rng(seed)
  b, l, v = c.train.batch_size, c.train.seq_len, c.model.vocab_size
  seq = rng.integers(10, 200, size=(b, l + 1)).astype(np.int32)
  seg = np.ones((b, l), np.int32)
  seg[:, l - 3:] = 0  # padding tail
  targets = seq[:, 1:].copy()
  if bad_targets:
    targets[:] = v + 5  # out-of-vocabulary targets: the CE gather yields NaN
  return dict(tokens=seq[:, :-1], targets=targets, loss_mask=seg > 0, segment_ids=seg,
              positions=np.broadcast_to(np.arange(l, dtype=np.int32), (b, l)).copy(),
              patches=np.zeros((8, 588), np.float32), patch_item_ids=np.zeros((8,), np.int32),
              item_grid=np.zeros((8, 3), np.int32), item_valid=np.zeros((8,), bool))


def run_steps(c, devices, n=2):
  from k25jax.data.pipeline import to_global_batch
  mesh = shd.make_mesh(c, devices)
  model = st.build_model(c)
  state, shs, tx = st.init_state(c, mesh, model)
  fn = sp.make_train_step(c, mesh, model, tx, shs, media_pad_id=PAD)
  losses = []
  for i in range(n):
    state, m = fn(state, to_global_batch(host_batch(i, c), mesh))
    losses.append(float(m["loss"]))
  return losses, state


def test_same_loss_on_one_and_eight_devices_with_two_mesh_shapes():
  ref, ref_state = run_steps(text_config(data=-1), jax.devices()[:1])
  for mesh in (dict(data=-1), dict(data=2, expert=2, tensor=-1)):
    losses, state = run_steps(text_config(**mesh), jax.devices())
    # Step 2's loss also checks the sharded update (AdamW moments sharded like their parameters).
    np.testing.assert_allclose(losses, ref, rtol=2e-5, err_msg=str(mesh))
    jax.tree.map(np.testing.assert_allclose, jax.device_get(state["moe_state"]), jax.device_get(ref_state["moe_state"]))
  assert ref[1] < ref[0]


def test_opt_state_is_sharded_like_params():
  c = text_config(data=2, expert=2, tensor=-1)
  mesh = shd.make_mesh(c)
  _, shs, _ = st.abstract_state(c, mesh)
  adam = shs["opt_state"][1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
  flat_p = jax.tree.leaves(shs["params"])
  assert jax.tree.leaves(adam.mu) == flat_p and jax.tree.leaves(adam.nu) == flat_p
  assert any(s.spec != jax.sharding.PartitionSpec() for s in flat_p)


def test_non_finite_loss_skips_the_update():
  from k25jax.data.pipeline import to_global_batch
  c = text_config(data=-1)
  mesh = shd.make_mesh(c, jax.devices()[:1])
  model = st.build_model(c)
  state, shs, tx = st.init_state(c, mesh, model)
  fn = sp.make_train_step(c, mesh, model, tx, shs, media_pad_id=PAD)
  before = jax.device_get({k: state[k] for k in ("params", "moe_state", "opt_state")})
  state, m = fn(state, to_global_batch(host_batch(0, c, bad_targets=True), mesh))
  assert not np.isfinite(float(m["loss"])) and int(m["finite"]) == 0
  after = jax.device_get({k: state[k] for k in ("params", "moe_state", "opt_state")})
  jax.tree.map(np.testing.assert_array_equal, after, before)
  assert int(state["step"]) == 1
  state, m = fn(state, to_global_batch(host_batch(0, c), mesh))
  assert int(m["finite"]) == 1 and int(state["step"]) == 2
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(state["params"]), before["params"])
  assert all(jax.tree.leaves(changed))


def test_mtp_targets_predict_two_ahead_within_a_segment():
  batch = dict(targets=np.array([[1, 2, 3, 4, 5]]), loss_mask=np.array([[1, 1, 1, 0, 1]], bool),
               segment_ids=np.array([[1, 1, 1, 1, 2]]))
  t, m = sp.mtp_targets(batch)
  np.testing.assert_array_equal(t, [[2, 3, 4, 5, 5]])
  np.testing.assert_array_equal(m, [[1, 1, 0, 0, 0]])


@pytest.mark.parametrize("field,value", [("trainer.optimizer", "sgd"), ("trainer.max_bad_steps", 0),
                                         ("train.steps", 0), ("model.qk_rope_head_dim", 7)])
def test_bad_config_fails_before_compiling(field, value):
  c = text_config(data=-1)
  group, key = field.split(".")
  c[group][key] = value
  with pytest.raises(ConfigError, match=key):
    prepare_config(c)


def test_trainer_accepts_a_locked_config_and_rejects_a_changed_optimizer():
  """Trainer.run compares configs by value: a locked flag config and its unlocked per-arm copy are the same run
  (`make demo` passes a locked one), a different optimizer setting is not."""
  import types  # noqa: PLC0415

  import ml_collections  # noqa: PLC0415

  from k25jax.train.loop import Trainer  # noqa: PLC0415
  locked = prepare_config(get_config("tiny"))
  locked.lock()
  trainer = types.SimpleNamespace(config=locked)
  copy = ml_collections.ConfigDict(locked.to_dict())
  Trainer._check_compatible(trainer, copy)
  copy.optim.momentum = 0.9
  with pytest.raises(ValueError, match="config.optim"):
    Trainer._check_compatible(trainer, copy)
