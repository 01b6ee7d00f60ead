"""DEP (digest §7): the balancer's bounds and index maps, DEP gradients == integrated gradients on several meshes,
phase 1 keeps no activations, and the DEP step trains."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from k25jax import sharding as shd
from k25jax.configs import get_config
from k25jax.data.pipeline import to_global_batch
from k25jax.data.tokenizer import ByteTokenizer
from k25jax.train import balance, dep
from k25jax.train.state import abstract_state, build_model, init_state
from k25jax.train.step import make_loss_fn

PAD = ByteTokenizer().media_pad_id
MESHES = [(8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 2, 2)]


# ----------------------------------------------------------------------------------------------- balancer


def _opt_makespan(sizes, d):
  """Exact minimum max-load by brute force (tiny instances only)."""
  return min(np.bincount(a, weights=sizes, minlength=d).max() for a in itertools.product(range(d), repeat=len(sizes)))


def test_lpt_within_graham_bound_and_mean_plus_largest():
  rng = np.random.default_rng(0)
  for _ in range(30):
    d = int(rng.integers(2, 4))
    sizes = rng.integers(1, 40, size=int(rng.integers(d + 1, 8)))
    dev = balance.lpt_assign(sizes, d, patch_budget=10 ** 6, max_items=100)
    loads = np.bincount(dev, weights=sizes, minlength=d)
    assert loads.sum() == sizes.sum() and (dev >= 0).all()
    assert loads.max() <= (4 / 3 - 1 / (3 * d)) * _opt_makespan(sizes, d) + 1e-9
    assert loads.max() <= sizes.sum() / d + sizes.max()


def test_lpt_respects_budgets_and_rejects_oversized_items():
  sizes = np.array([30, 30, 20, 20, 10, 10, 8, 8, 4, 4])
  dev = balance.lpt_assign(sizes, 4, patch_budget=40, max_items=3)
  assert np.bincount(dev, weights=sizes, minlength=4).max() <= 40
  assert np.bincount(dev, minlength=4).max() <= 3
  with pytest.raises(ValueError, match=r"media item 1 has 50 patches.*budget 40"):
    balance.lpt_assign(np.array([10, 50]), 4, patch_budget=40, max_items=3)
  with pytest.raises(ValueError, match="could not place"):
    balance.lpt_assign(np.array([30, 30, 30]), 2, patch_budget=40, max_items=3)


def _skewed(seed, num_patches=1024, max_items=48):
  return dep.synthetic_batch(np.random.default_rng(seed), batch_size=8, seq_len=128, num_patches=num_patches,
                             max_items=max_items, vocab_size=512, media_pad_id=PAD, patch_dim=588, max_side=12)


def test_plan_maps_are_consistent_and_balanced():
  b = _skewed(1)
  d, pd, md = 8, 320, 32
  plan = balance.plan_media(b["patch_item_ids"], b["item_grid"], b["item_valid"], num_devices=d, patch_budget=pd,
                            max_items=md, merge_kernel=(2, 2), num_vision_slots=1024 // 4)
  sizes = b["item_grid"].prod(1)[b["item_valid"]]
  # Every valid patch lands exactly once, with the right local item's grid; padding slots are empty.
  src = plan.patch_src[plan.patch_src >= 0]
  assert np.array_equal(np.sort(src), np.nonzero(b["patch_item_ids"] > 0)[0])
  packed = balance.take_rows(b["patches"], plan.patch_src)
  for dv in range(d):
    ids = plan.patch_item_ids[dv]
    assert np.array_equal(packed[dv][ids > 0], b["patches"][plan.patch_src[dv][ids > 0]])
    assert (packed[dv][ids == 0] == 0).all()
    for j in range(md):
      assert (ids == j + 1).sum() == plan.item_grid[dv, j].prod() * plan.item_valid[dv, j]
  # token_src and token_dst are inverse permutations on the valid tokens.
  n = int(plan.token_valid.sum())
  assert n == (b["tokens"] == PAD).sum() and plan.token_valid[:n].all()
  flat_dst = plan.token_dst.reshape(-1)
  assert np.array_equal(flat_dst[plan.token_src[:n]], np.arange(n))
  assert (plan.token_src[n:] == -1).all() and np.sort(flat_dst[flat_dst >= 0]).tolist() == list(range(n))
  # Loads: within budget and LPT's bound; better than the in-order (image-count) baseline on skewed sizes.
  assert plan.loads.sum() == sizes.sum() and plan.loads.max() <= pd
  assert plan.loads.max() <= sizes.sum() / d + sizes.max()
  naive = balance.plan_media(b["patch_item_ids"], b["item_grid"], b["item_valid"], num_devices=d, patch_budget=1024,
                             max_items=48, merge_kernel=(2, 2), num_vision_slots=256, balance=False)
  assert plan.stats()["max_over_mean"] < naive.stats()["max_over_mean"]


def test_item_layout_rejects_broken_packing():
  b = _skewed(2)
  ids = b["patch_item_ids"].copy()
  ids[np.nonzero(ids == 2)[0][0]] = 3
  with pytest.raises(ValueError, match="media item 1 .* patches in patch_item_ids"):
    balance.item_layout(ids, b["item_grid"], b["item_valid"])


# ----------------------------------------------------------------------------------------------- DEP step


def _config(mesh_shape):
  cfg = get_config("tiny")
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.expert, cfg.mesh.tensor = mesh_shape
  cfg.model.num_hidden_layers = 2            # one dense + one MoE layer
  cfg.model.vision.num_hidden_layers = 1
  cfg.data.patch_budget, cfg.data.max_items = 256, 16
  cfg.trainer.optimizer = "adamw"
  cfg.train.learning_rate = 3e-3
  return cfg


@pytest.fixture(scope="module")
def reference():
  """Initial state, a batch, and jax.grad of the integrated K25Model loss, on one device: an unsharded reference
  for the DEP runs on every mesh. (On 8 fake CPU devices this gradient intermittently aborted: XLA:CPU ran its
  collective-permute before an all-reduce on one device and in the other order on the rest, and the rendezvous
  timed out after 40 s.)"""
  cfg = _config((1, 1, 1, 1))
  mesh = shd.make_mesh(cfg, jax.devices()[:1])
  model = build_model(cfg)
  state, shardings, _ = init_state(cfg, mesh, model)
  batch = dep.synthetic_batch(np.random.default_rng(0), batch_size=8, seq_len=32, num_patches=256, max_items=16,
                              vocab_size=cfg.model.vocab_size, media_pad_id=PAD, patch_dim=588, max_side=6)
  loss_fn = make_loss_fn(cfg, model, PAD)
  grads = jax.jit(jax.grad(lambda p, m, b: loss_fn(p, m, b)[0]))(state["params"], state["moe_state"],
                                                                  to_global_batch(batch, mesh))
  return jax.device_get(state), batch, jax.device_get(grads)


@pytest.fixture(scope="module")
def dep_runs(reference):
  """mesh shape -> (config, mesh, state on that mesh, DEP step)."""
  host_state, _, _ = reference
  out = {}
  for shape in MESHES:
    cfg = _config(shape)
    mesh = shd.make_mesh(cfg)
    model = build_model(cfg)
    _, shardings, tx = abstract_state(cfg, mesh, model)
    state = jax.device_put(host_state, shardings)
    out[shape] = cfg, mesh, state, dep.make_dep_train_step(cfg, mesh, model, tx, shardings, media_pad_id=PAD)
  return out


@pytest.mark.parametrize("shape", MESHES)
def test_dep_gradients_equal_integrated(reference, dep_runs, shape):
  _, batch, ref = reference
  cfg, mesh, state, step = dep_runs[shape]
  grads, (loss, _, _, plan) = step.grads(state["params"], state["moe_state"], to_global_batch(batch, mesh))
  assert plan.loads.sum() == batch["item_grid"].prod(1)[batch["item_valid"]].sum()
  assert step.budgets[2] and plan.patch_src.shape[1] == balance.fitted_budget(plan.loads.max(), 4, 256)
  assert (plan.loads > 0).sum() >= 4                        # the media really are spread over the devices
  for part in ("language_model", "vision_tower", "mm_projector"):
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads[part]), jax.tree.leaves(ref[part])):
      g = np.asarray(g)
      assert g.shape == r.shape
      scale = float(np.abs(r).max())
      assert np.abs(g - r).max() <= 1e-4 * scale + 1e-8, (part, jax.tree_util.keystr(path))
  assert np.abs(ref["vision_tower"]["blocks"]["wqkv"]["kernel"]).max() > 0
  assert np.abs(ref["mm_projector"]["proj_0"]["kernel"]).max() > 0


def test_phase1_program_returns_only_vision_tokens(reference, dep_runs):
  """Phase 1 is its own program whose only output is the placeholder-order tokens: no activation survives it."""
  _, batch, _ = reference
  cfg, mesh, state, step = dep_runs[(2, 2, 2, 1)]
  gb = to_global_batch(batch, mesh)
  plan = step.plan(gb)
  arrays = {k: jnp.asarray(v) for k, v in plan.device_arrays().items()}
  vp = {k: state["params"][k] for k in dep.VISION_KEYS}
  with jax.set_mesh(mesh):
    compiled = step.phases["vision_forward"].lower(vp, gb["patches"], arrays).compile()
  out = jax.eval_shape(step.phases["vision_forward"], vp, gb["patches"], arrays)
  assert out.shape == (256 // 4, cfg.model.hidden_size)     # [N, D_text]
  mem = compiled.memory_analysis()
  assert mem.output_size_in_bytes == out.size * out.dtype.itemsize  # replicated: one full copy per device


def test_dep_step_trains(reference, dep_runs):
  _, batch, _ = reference
  cfg, mesh, state, step = dep_runs[(2, 2, 2, 1)]
  state = jax.tree.map(lambda x: x.copy(), state)            # the update donates its input
  gb = to_global_batch(batch, mesh)
  losses = []
  for _ in range(5):
    state, metrics = step(state, gb)
    losses.append(float(metrics["loss"]))
    assert int(metrics["finite"]) == 1 and metrics["dep_load_max_over_mean"] >= 1.0
  assert losses[-1] < losses[0] - 0.3, losses
  assert int(state["step"]) == 5


# ----------------------------------------------------------------------------------------------- fitted budgets


def test_fitted_budget_ladder():
  rungs = [balance.fitted_budget(load, 4, cap=4096) for load in range(0, 3000)]
  assert rungs[0] == 4 and all(r % 4 == 0 for r in rungs)
  assert all(a <= b for a, b in zip(rungs, rungs[1:]))                     # monotone: one compile per rung
  assert all(load <= r <= max(4, 1.5 * (4 * -(-load // 4))) for load, r in enumerate(rungs))
  assert sorted(set(rungs))[:8] == [4, 8, 12, 16, 24, 32, 48, 64]          # {2^n, 3 * 2^(n-1)} x 4
  assert balance.fitted_budget(5000, 4, cap=4096) == 4096


def test_fitted_plan_keeps_assignment_and_shrinks_slots():
  b = _skewed(3)
  kw = dict(num_devices=8, patch_budget=1024, max_items=48, merge_kernel=(2, 2), num_vision_slots=256)
  fixed = balance.plan_media(b["patch_item_ids"], b["item_grid"], b["item_valid"], **kw)
  fitted = balance.plan_media(b["patch_item_ids"], b["item_grid"], b["item_valid"], fit=True, **kw)
  pd = fitted.patch_src.shape[1]
  assert pd == balance.fitted_budget(fixed.loads.max(), 4, 1024) < 1024
  assert fitted.token_dst.shape == (8, pd // 4) and fitted.item_grid.shape[1] == min(48, pd // 4)
  assert np.array_equal(fitted.device_of_item, fixed.device_of_item) and np.array_equal(fitted.loads, fixed.loads)
  # The same patches and tokens land on each device, in the same slots (the fixed plan only adds padding).
  assert np.array_equal(fitted.patch_src, fixed.patch_src[:, :pd]) and (fixed.patch_src[:, pd:] == -1).all()
  flat = lambda p: p.token_dst.reshape(-1)[p.token_src[:int(p.token_valid.sum())]]
  assert np.array_equal(flat(fitted), flat(fixed))


# ----------------------------------------------------------------------------------------------- FLOP model


def _xla_flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_vision_flops_match_xla():
  """One item filling the pack (no padding, the packed attention is exactly per item) and one layer (XLA's cost
  analysis counts a scan body once); XLA adds the elementwise work (norms, softmax, RoPE, GELU, ~16%)."""
  from k25jax.model.k25 import K25Model, media_inputs
  from k25jax.train import dep_flops
  cfg = get_config("tiny")
  cfg.model.vision.update(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
  grid = np.array([[2, 6, 8]], np.int32)
  n = int(grid.prod())
  model = K25Model(cfg.model)
  x = dict(patches=jnp.ones((n, 588)), patch_item_ids=jnp.ones((n,), jnp.int32), item_grid=jnp.asarray(grid),
           item_valid=jnp.ones((1,), bool))
  variables = jax.tree.map(jnp.asarray, shd.unbox(model.init(jax.random.key(0), **media_inputs(cfg.model.vision, n, 1),
                                                             method=K25Model.encode_media)))
  xla = _xla_flops(lambda v: model.apply(v, **x, method=K25Model.encode_media)[0], variables)
  ours = dep_flops.vision_forward_flops(cfg.model.vision, cfg.model.hidden_size, grid)
  assert ours["total"] <= xla <= 1.25 * ours["total"], (xla, ours)      # dropping any term breaks this


def test_lm_flops_match_xla_and_bounds():
  from k25jax.model.lm import K2LM
  from k25jax.train import dep_flops
  cfg = get_config("tiny")
  cfg.model.num_hidden_layers = cfg.model.first_k_dense_replace = 1       # one dense layer: no scan, no routing
  b, length = 2, 32
  tokens = jnp.ones((b, length), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(length), (b, length))
  lm = K2LM(cfg.model)
  variables = shd.unbox(lm.init(jax.random.key(0), tokens, pos, tokens))
  xla = _xla_flops(lambda v: lm.apply(v, tokens, pos, tokens)[0], variables)
  ours = dep_flops.lm_forward_flops(cfg.model, b, length)
  # XLA computes the whole L x L score matrix (masked after); the count keeps the causal (L+1)/2 mean context.
  causal = ours - dep_flops.lm_forward_flops(cfg.model, b, length, attention=False)
  assert ours <= xla <= 1.15 * (ours + causal * (length - 1) / (length + 1)), (xla, ours)
  # Bounds: DEP executes one more vision forward than the un-remat'd integrated step, equal when remat'd.
  grid, valid = np.array([[1, 4, 4], [1, 8, 6]]), np.array([True, True])
  bounds = dep_flops.efficiency_bounds(cfg, grid, valid)
  v = dep_flops.vision_forward_flops(cfg.model.vision, cfg.model.hidden_size, grid, valid)
  assert bounds["vision_extra_flops_dep"] - bounds["vision_extra_flops_integrated"] == pytest.approx(v["total"])
  t = bounds["text_train_flops"]
  assert bounds["efficiency_bound_dep"] == pytest.approx(t / (t + 4 * v["total"] - v["patch_embed"]))
  cfg.model.vision.remat_policy = "full"
  bounds = dep_flops.efficiency_bounds(cfg, grid, valid)
  assert bounds["efficiency_bound_dep"] == pytest.approx(bounds["efficiency_bound_integrated"])
  assert bounds["efficiency_bound_dep"] < 1
