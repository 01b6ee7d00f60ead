"""MuonClip: Muon dimension numbers, Muon updates, per-head QK-Clip, the WSD schedule, a sharded train step."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from optax.contrib import MuonDimensionNumbers as MDN

from k25jax import sharding as shd
from k25jax.configs import ConfigError, get_config
from k25jax.configs.optim import optim_config
from k25jax.model import K2LM, text_inputs
from k25jax.model.projector import PatchMergerProjector
from k25jax.model.vision import MoonViT3D
from k25jax.optim import make_optimizer, muon_dimension_numbers, qk_clip, weight_decay_mask, wsd_schedule
from k25jax.optim.muon import orthogonalize
from k25jax.train import simple
from k25jax.train.loss import cross_entropy

IS_DIM = lambda d: d is None or isinstance(d, MDN)


def _config(**model):
  config = get_config("tiny")
  config.optim = optim_config("tiny")
  config.model.update(model)
  return config


def _abstract_params(config):
  x = text_inputs(1, 8)
  v = jax.eval_shape(K2LM(config.model).init, jax.random.key(0), x["tokens"], x["positions"], x["segment_ids"])
  return nn.unbox(v["params"])


def _multimodal_params(config):
  c = config.model.vision
  d_in = c.in_channels * c.patch_size ** 2
  grid = jax.ShapeDtypeStruct((1, 3), jnp.int32)
  tower = jax.eval_shape(MoonViT3D(c).init, jax.random.key(0), jax.ShapeDtypeStruct((4, d_in), jnp.float32),
                         jax.ShapeDtypeStruct((4,), jnp.int32), grid)
  proj = jax.eval_shape(PatchMergerProjector(c, config.model.hidden_size).init, jax.random.key(0),
                        jax.ShapeDtypeStruct((4, c.hidden_size), jnp.float32), grid,
                        jax.ShapeDtypeStruct((1,), bool))
  return {"language_model": _abstract_params(config), "vision_tower": nn.unbox(tower["params"]),
          "mm_projector": nn.unbox(proj["params"])}


def _flat(tree, is_leaf=None):
  name = lambda k: str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return {"/".join(map(name, p)): v for p, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)}


@pytest.mark.parametrize("multimodal", [False, True])
def test_dimension_numbers_route_every_parameter(multimodal):
  config = _config(num_nextn_predict_layers=1)
  params = _multimodal_params(config) if multimodal else _abstract_params(config)
  dims = _flat(muon_dimension_numbers(params), IS_DIM)
  shapes = {k: v.shape for k, v in _flat(params).items()}
  assert dims.keys() == shapes.keys()
  lm = "language_model/" if multimodal else ""
  for key in ("embed_tokens/embedding", "lm_head/kernel", "norm/weight", "moe_layers/input_layernorm/weight",
              "dense_layers/self_attn/q_a_layernorm/weight", "mtp/enorm/weight"):
    assert dims[lm + key] is None, key
  # Scanned stacks: layer axis 0 is a batch axis; routed experts [L, E, in, out] have two batch axes.
  assert dims[lm + "moe_layers/mlp/experts_gate_proj"] == MDN((2,), (3,))
  assert dims[lm + "moe_layers/mlp/gate/kernel"] == MDN((1,), (2,))      # router -> Muon
  assert dims[lm + "dense_layers/self_attn/q_b_proj/kernel"] == MDN((1,), (2,))
  assert dims[lm + "mtp/block/mlp/experts_down_proj"] == MDN((1,), (2,))  # unscanned MTP layer
  assert dims[lm + "mtp/eh_proj/kernel"] == MDN((0,), (1,))
  if multimodal:
    assert dims["vision_tower/blocks/wqkv/kernel"] == MDN((1,), (3, 4))
    assert dims["vision_tower/patch_embed/proj/kernel"] is None
    assert dims["vision_tower/patch_embed/pos_emb"] is None
    assert dims["mm_projector/proj_0/kernel"] == MDN((0,), (1,))
    assert dims["mm_projector/pre_norm/scale"] is None
  for key, shape in shapes.items():
    d = dims[key]
    parts = key.split("/")
    if d is None:
      continue
    # Every Muon parameter: reduction/output axes are the trailing matrix axes, the rest are stack axes.
    n_stack = sum(p in ("dense_layers", "moe_layers", "blocks") for p in parts) + parts[-1].startswith("experts_")
    assert min(d.reduction_axis + d.output_axis) == n_stack, key
    assert max(d.reduction_axis + d.output_axis) == len(shape) - 1, key
  n_muon = sum(d is not None for d in dims.values())
  n_matrix = sum(k.endswith("kernel") or "/experts_" in k for k in shapes) - 1 - multimodal  # minus head, patch
  assert n_muon == n_matrix


def test_dimension_numbers_reject_unknown_parameters():
  with pytest.raises(ValueError, match="no rule for parameter mystery/table"):
    muon_dimension_numbers({"mystery": {"table": jnp.zeros((3, 4))}})
  with pytest.raises(ValueError, match="moe_layers/mlp/experts_up_proj has shape"):
    muon_dimension_numbers({"moe_layers": {"mlp": {"experts_up_proj": jnp.zeros((4, 8, 16))}}})


def test_weight_decay_mask_skips_norms_and_biases():
  mask = _flat(weight_decay_mask(_multimodal_params(_config())))
  for key, decay in mask.items():
    assert decay == (key.split("/")[-1] not in ("weight", "scale", "bias")), key
  assert mask["language_model/embed_tokens/embedding"] and mask["language_model/lm_head/kernel"]


def _muon_update(params, grads, ns_dtype="float32"):
  config = _config()
  config.optim.ns_dtype = ns_dtype
  config.optim.schedule.warmup_frac = 0.0
  config.optim.weight_decay = 0.0
  config.train.steps = 10
  tx = make_optimizer(config, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  return updates, config.optim.learning_rate


def _spread_matrix(rng, n, m, lo=1.0, hi=30.0):
  """A random n x m matrix with singular values spread over [lo, hi]."""
  u, _ = np.linalg.qr(rng.normal(size=(n, n)))
  v, _ = np.linalg.qr(rng.normal(size=(m, m)))
  s = np.geomspace(lo, hi, min(n, m))
  return (u[:, :len(s)] * s) @ v[:len(s)]


def _check_orthogonal(update, lr):
  n, m = update.shape
  sv = np.linalg.svd(np.asarray(update), compute_uv=False) / (lr * 0.2 * math.sqrt(max(n, m)))
  assert sv.max() / sv.min() < 1.8 and 0.6 < sv.min() and sv.max() < 1.25, sv   # quintic NS: S' ~ [0.68, 1.13]
  rms = float(np.sqrt(np.mean(np.asarray(update) ** 2)))
  assert 0.14 * lr < rms < 0.26 * lr, rms / lr                                  # consistent_rms = 0.2


def _reference_newton_schulz(g: np.ndarray, steps: int = 5) -> np.ndarray:
  """Moonlight's quintic iteration (digest §8) in float64: normalise, transpose if tall, 5 steps."""
  a, b, c = 3.4445, -4.7750, 2.0315
  x = g.astype(np.float64)
  tall = x.shape[0] > x.shape[1]
  x = (x.T if tall else x) / np.linalg.norm(x)
  for _ in range(steps):
    s = x @ x.T
    x = a * x + (b * s + c * s @ s) @ x
  return x.T if tall else x


# bf16 operands (k25_full's default, as the Muon reference) round each product's inputs to 8 bits of mantissa.
@pytest.mark.parametrize("ns_dtype,tol", [("float32", 2e-3), ("bfloat16", 3e-2)])
def test_muon_update_of_a_matrix_has_equal_singular_values(ns_dtype, tol):
  rng = np.random.default_rng(0)
  g = _spread_matrix(rng, 40, 24)
  params = {"proj": {"kernel": jnp.zeros((40, 24))}, "norm": {"weight": jnp.ones((24,))}}
  updates, lr = _muon_update(params, {"proj": {"kernel": jnp.asarray(g, jnp.float32)},
                                      "norm": {"weight": jnp.ones((24,))}}, ns_dtype)
  _check_orthogonal(updates["proj"]["kernel"], lr)
  # First step: Nesterov momentum is a multiple of g, which NS normalises away; then 0.2 * sqrt(max(n, m)) * lr.
  want = -lr * 0.2 * math.sqrt(40) * _reference_newton_schulz(g)
  np.testing.assert_allclose(updates["proj"]["kernel"], want, rtol=0, atol=tol * np.abs(want).max())
  # The norm went to AdamW: its first update is -lr * sign(g) (bias-corrected m / sqrt(v)).
  np.testing.assert_allclose(updates["norm"]["weight"], -lr, rtol=1e-5)


def test_decoupled_weight_decay_skips_norms_and_biases():
  """With zero gradients both branches reduce to W <- W - lr * wd * W on decayed leaves, and no change elsewhere."""
  rng = np.random.default_rng(2)
  params = {"embed_tokens": {"embedding": rng.normal(size=(16, 8))}, "proj": {"kernel": rng.normal(size=(8, 12)),
                                                                               "bias": rng.normal(size=(12,))},
            "norm": {"weight": rng.normal(size=(8,))}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  config = _config()
  config.optim.schedule.warmup_frac = 0.0
  tx = make_optimizer(config, params)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  lr, wd = config.optim.learning_rate, config.optim.weight_decay
  for key in ("embed_tokens", "proj"):
    w = params[key]["embedding" if key == "embed_tokens" else "kernel"]
    got = updates[key]["embedding" if key == "embed_tokens" else "kernel"]
    np.testing.assert_allclose(got, -lr * wd * w, rtol=1e-5, err_msg=key)
  np.testing.assert_array_equal(updates["proj"]["bias"], 0.0)
  np.testing.assert_array_equal(updates["norm"]["weight"], 0.0)


def test_muon_orthogonalises_each_expert_separately():
  rng = np.random.default_rng(1)
  shape = (2, 3, 12, 20)   # [L, E, in, out]
  g = np.stack([np.stack([_spread_matrix(rng, 12, 20) for _ in range(3)]) for _ in range(2)]).astype(np.float32)
  params = {"moe_layers": {"mlp": {"experts_up_proj": jnp.zeros(shape)}}}
  wrap = lambda x: {"moe_layers": {"mlp": {"experts_up_proj": jnp.asarray(x)}}}
  u = np.asarray(_muon_update(params, wrap(g))[0]["moe_layers"]["mlp"]["experts_up_proj"])
  lr = optim_config("tiny").learning_rate
  for l in range(2):
    for e in range(3):
      _check_orthogonal(u[l, e], lr)
  # Expert 0's update ignores expert 1's gradient and equals the update of its matrix on its own.
  g2 = g.copy()
  g2[:, 1] *= -7.0
  # (f32 Newton-Schulz: the gradient clip rescales every matrix, which bf16 rounding would not leave exact)
  u2 = np.asarray(_muon_update(params, wrap(g2))[0]["moe_layers"]["mlp"]["experts_up_proj"])
  np.testing.assert_allclose(u2[:, 0], u[:, 0], rtol=1e-5, atol=1e-7)
  single, _ = _muon_update({"proj": {"kernel": jnp.zeros((12, 20))}}, {"proj": {"kernel": jnp.asarray(g[1, 2])}})
  np.testing.assert_allclose(u[1, 2], single["proj"]["kernel"], rtol=1e-4, atol=1e-7)


def test_wsd_schedule_values():
  lin = wsd_schedule(1.0, 100, 0.1, 0.2, 0.1, "linear")
  cos = wsd_schedule(1.0, 100, 0.1, 0.2, 0.1, "cosine")
  for step, want in ((0, 0.0), (5, 0.5), (10, 1.0), (50, 1.0), (80, 1.0), (90, 0.55), (85, 0.775), (100, 0.1),
                     (150, 0.1)):
    np.testing.assert_allclose(float(lin(step)), want, atol=1e-6, err_msg=f"linear step {step}")
  for step in (85, 90, 95):
    want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 80) / 20))
    np.testing.assert_allclose(float(cos(step)), want, atol=1e-6, err_msg=f"cosine step {step}")
  np.testing.assert_allclose(float(wsd_schedule(2.0, 10, 0.0, 0.0, 0.1)(50)), 2.0)   # no decay phase
  with pytest.raises(ValueError, match="warmup_frac \\+ decay_frac"):
    wsd_schedule(1.0, 100, 0.6, 0.5, 0.1)
  with pytest.raises(ValueError, match="decay_shape"):
    wsd_schedule(1.0, 100, 0.1, 0.1, 0.1, "step")


def test_make_optimizer_config_errors():
  config = get_config("tiny")
  del config["optim"]
  params = {"proj": {"kernel": jnp.zeros((4, 4))}}
  with pytest.raises(ConfigError, match="config.optim is missing"):
    make_optimizer(config, params)
  config.optim = optim_config("tiny")
  config.optim.name = "sgd"
  with pytest.raises(ConfigError, match="optim.name='sgd'"):
    make_optimizer(config, params)


# ------------------------------------------------------------------------------------------------- QK-Clip

def _max_logits_fn(config, moe_state, batch):
  """params -> aux of the LM on `batch` (one compilation per test)."""
  apply = jax.jit(lambda p: K2LM(config.model).apply({"params": p, "moe_state": moe_state}, batch["tokens"],
                                                     batch["positions"], batch["segment_ids"])[1])
  return lambda params: jax.tree.map(np.asarray, apply(params))


def _forced_columns(config, params, attn_path, layer, head):
  """Bool masks (q kernel, kv_b kernel) of the columns QK-Clip may change for one head."""
  m = config.model
  nope, rope_d, vd = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
  q_name = "q_b_proj" if m.q_lora_rank else "q_proj"
  attn = params
  for k in attn_path:
    attn = attn[k]
  q_mask, kv_mask = np.zeros(attn[q_name]["kernel"].shape, bool), np.zeros(attn["kv_b_proj"]["kernel"].shape, bool)
  sel = (layer,) if layer is not None else ()
  q_mask[sel + (Ellipsis, slice(head * (nope + rope_d), (head + 1) * (nope + rope_d)))] = True
  kv_mask[sel + (Ellipsis, slice(head * (nope + vd), head * (nope + vd) + nope))] = True   # k_nope, not v
  return {"/".join(attn_path + (q_name, "kernel")): q_mask, "/".join(attn_path + ("kv_b_proj", "kernel")): kv_mask}


@pytest.mark.parametrize("variant", ["q_lora_mtp", "q_proj_multimodal_prefix"])
def test_qk_clip_bounds_recomputed_max_logit(variant):
  """Force one head over tau by scaling its q columns, clip, re-run: its max logit is tau, nothing else moves.

  The forced head is the last one any logit depends on (the MTP layer, or the last decoder layer without MTP), so
  clipping it changes no other layer's inputs and its recomputed max logit is exactly gamma * S = tau.
  """
  mtp_on = variant == "q_lora_mtp"
  config = _config(num_nextn_predict_layers=1) if mtp_on else _config(q_lora_rank=0)
  m = config.model
  nope, rope_d, h = m.qk_nope_head_dim, m.qk_rope_head_dim, m.num_attention_heads
  q_name = "q_b_proj" if m.q_lora_rank else "q_proj"
  batch = simple.synthetic_batch(np.random.default_rng(0), 2, 16, m.vocab_size)
  x = text_inputs(1, 8)
  variables = jax.jit(K2LM(m).init)(jax.random.key(3), x["tokens"], x["positions"], x["segment_ids"])
  moe_state = variables["moe_state"]
  params = jax.tree.map(np.array, nn.unbox(variables["params"]))
  run = _max_logits_fn(config, moe_state, batch)
  aux0 = run(params)
  tau = 1.5 * float(np.max([np.max(v) for k, v in aux0.items() if k.endswith("max_logits")]))
  head = 2
  if mtp_on:
    attn_path, layer, s_head = ("mtp", "block", "self_attn"), None, float(aux0["mtp_max_logits"][head])
  else:
    attn_path, layer = ("moe_layers", "self_attn"), m.num_hidden_layers - m.first_k_dense_replace - 1
    s_head = float(aux0["max_logits"][-1, head])
  allowed = _forced_columns(config, params, attn_path, layer, head)
  q_kernel = params
  for k in attn_path + (q_name, "kernel"):
    q_kernel = q_kernel[k]
  sel = (layer,) if layer is not None else ()
  q_kernel[sel + (Ellipsis, slice(head * (nope + rope_d), (head + 1) * (nope + rope_d)))] *= 4.0 * tau / s_head
  aux1 = run(params)
  s1, mtp1 = np.asarray(aux1["max_logits"]), aux1.get("mtp_max_logits")
  s_forced = float(mtp1[head]) if mtp_on else float(s1[-1, head])
  assert s_forced > 3 * tau and (s1 > tau).sum() == (0 if mtp_on else 1)

  tree = params if mtp_on else {"language_model": params}
  clip = jax.jit(lambda p, s, sm: qk_clip(p, s, config, tau=tau, mtp_max_logits=sm))
  clipped, metrics = clip(tree, aux1["max_logits"], mtp1)
  new = jax.tree.map(np.asarray, clipped if mtp_on else clipped["language_model"])
  np.testing.assert_allclose(metrics["qk_clip_fraction"], 1 / (s1.size + (h if mtp_on else 0)), rtol=1e-6)
  np.testing.assert_allclose(metrics["max_logit"], s_forced, rtol=1e-6)

  aux2 = run(new)
  s2 = np.asarray(aux2["max_logits"])
  s2_forced = float(aux2["mtp_max_logits"][head]) if mtp_on else float(s2[-1, head])
  np.testing.assert_allclose(s2_forced, tau, rtol=1e-5)
  assert (s2 <= tau * (1 + 1e-6)).all()   # f32 rounding of the recomputed logits
  if mtp_on:
    assert (np.asarray(aux2["mtp_max_logits"]) <= tau * (1 + 1e-5)).all()

  # Only the forced head's q and k_nope columns change (v columns, the rope key, all else bit-identical), by
  # sqrt(gamma) on q_nope / k_nope and gamma on q_rot.
  gamma = tau / s_forced
  before, after = _flat(params), _flat(new)
  assert before.keys() == after.keys()
  for key, old in before.items():
    mask = allowed.get(key, np.zeros(old.shape, bool))
    np.testing.assert_array_equal(after[key][~mask], old[~mask], err_msg=key)
  q_key, kv_key = list(allowed)
  q_old, q_new = before[q_key][sel], after[q_key][sel]
  base = head * (nope + rope_d)
  np.testing.assert_allclose(q_new[..., base:base + nope], q_old[..., base:base + nope] * math.sqrt(gamma),
                             rtol=1e-6)
  np.testing.assert_allclose(q_new[..., base + nope:base + nope + rope_d],
                             q_old[..., base + nope:base + nope + rope_d] * gamma, rtol=1e-6)
  np.testing.assert_allclose(after[kv_key][allowed[kv_key]], before[kv_key][allowed[kv_key]] * math.sqrt(gamma),
                             rtol=1e-6)


def test_qk_clip_input_errors():
  config = _config()
  params = _abstract_params(config)
  with pytest.raises(ValueError, match="max_logits has shape"):
    qk_clip(params, jnp.zeros((2, 4)), config, tau=10.0)
  with pytest.raises(ValueError, match="tau=0"):
    qk_clip(params, jnp.zeros((3, 4)), config, tau=0)
  mtp_config = _config(num_nextn_predict_layers=1)
  mtp_params = _abstract_params(mtp_config)
  with pytest.raises(ValueError, match="pass mtp_max_logits"):
    qk_clip(mtp_params, jnp.zeros((3, 4)), mtp_config, tau=10.0)


# ------------------------------------------------------------------------------------------------- train step

def test_muonclip_trains_tiny_lm_on_a_sharded_mesh():
  config = _config()
  config.mesh.update(data=2, fsdp=2, expert=2, tensor=1)
  config.train.steps = 20
  mesh = shd.make_mesh(config)
  rules = shd.get_rules(config)
  params = _abstract_params(config)
  tx = make_optimizer(config, params)
  state, shardings = simple.init_state(config, mesh, tx)
  model = K2LM(config.model)
  tau = config.optim.qk_clip_tau

  def step(state, batch):
    def loss_fn(params):
      logits, aux = model.apply({"params": params, "moe_state": state["moe_state"]}, batch["tokens"],
                                batch["positions"], batch["segment_ids"])
      return cross_entropy(logits, batch["targets"], batch["loss_mask"])[0], aux
    with nn.logical_axis_rules(rules):
      (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params, clip = qk_clip(optax.apply_updates(state["params"], updates), aux["max_logits"], config, tau=tau)
    return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), dict(clip, loss=loss)

  jitted = jax.jit(step, in_shardings=(shardings, shd.batch_sharding(mesh, 2)), out_shardings=(shardings, None),
                   donate_argnums=(0,))
  rng = np.random.default_rng(0)
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(config.train.steps):
      batch = shd.global_batch(simple.synthetic_batch(rng, 8, 16, config.model.vocab_size), mesh)
      state, metrics = jitted(state, batch)
      losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all()
  assert losses[-1] < 0.5 * losses[0], losses
  assert float(metrics["qk_clip_fraction"]) == 0.0 and float(metrics["max_logit"]) < tau
  kernel = state["params"]["moe_layers"]["mlp"]["experts_up_proj"]
  assert kernel.sharding == shardings["params"]["moe_layers"]["mlp"]["experts_up_proj"]


@pytest.mark.parametrize("shape, dims, spec", [
    ((3, 4, 16, 24), MDN((2,), (3,)), P(None, "expert", "fsdp", "tensor")),  # routed experts
    ((3, 16, 24), MDN((1,), (2,)), P(None, "tensor", "fsdp")),   # fewer matrices than devices
    ((13, 16, 24), MDN((1,), (2,)), P(None, None, "fsdp")),      # spread over the replicas too
    ((2, 3, 16, 24), MDN((1,), (2, 3)), P(None, None, "fsdp", "expert")),  # flattened out axes
])
def test_orthogonalize_in_the_parameter_layout_equals_unsharded(shape, dims, spec):
  """`orthogonalize` under a mesh, in the parameter's own sharding (all-to-alls inside a shard_map), gives the
  unsharded Newton-Schulz result and returns in that sharding."""
  config = _config()
  config.mesh.update(data=2, fsdp=2, expert=2, tensor=1)
  mesh = shd.make_mesh(config)
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  want = orthogonalize(x, dims, 5)
  sharding = NamedSharding(mesh, spec)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda a: orthogonalize(a, dims, 5, spec=spec), in_shardings=sharding)(
        jax.device_put(x, sharding))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  assert got.sharding.is_equivalent_to(sharding, len(shape))


def test_muon_shardings_must_cover_every_matrix():
  params = {"proj": {"kernel": jnp.zeros((8, 12))}, "other": {"kernel": jnp.zeros((8, 12))}}
  mesh = shd.make_mesh(_config())
  tx = make_optimizer(_config(), params, shardings={"proj": {"kernel": NamedSharding(mesh, P())}})
  with pytest.raises(ValueError, match="no sharding for Muon parameter other/kernel"):
    tx.update(params, tx.init(params), params)
