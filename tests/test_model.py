"""Kimi K2 LM: MLA vs an independent reference, router invariants, dispatch equality, sharding, balancing."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from k25jax import sharding as shd
from k25jax.configs import ConfigError, get_config, validate
from k25jax.model import K2LM, text_inputs
from k25jax.model import moe as moe_lib
from k25jax.model import rope
from k25jax.model.lm import freeze
from k25jax.model.mla import MLA
from k25jax.model.summary import count_lm


def tiny(**overrides):
  c = get_config("tiny")
  for k, v in overrides.items():
    c.model[k] = v
  return validate(c)


def init_params(config, seed=0, batch=2, length=8):
  x = text_inputs(batch, length)
  v = K2LM(config.model).init(jax.random.key(seed), x["tokens"], x["positions"], x["segment_ids"])
  v = shd.unbox(v)
  # Non-trivial norms and correction biases so a wrong port cannot hide behind defaults.
  rng = np.random.default_rng(seed)
  v = jax.tree_util.tree_map_with_path(
      lambda p, a: a + 0.1 * rng.standard_normal(a.shape).astype(a.dtype)
      if any(getattr(k, "key", "") in ("weight", "e_score_correction_bias") for k in p) else a, v)
  return v


def forward(config, v, tokens, positions, segment_ids):
  return K2LM(config.model).apply(v, tokens, positions, segment_ids)


# ---------------------------------------------------------------------------------------------- MLA reference
def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope_complex(x, pos, inv_freq):
  """x [L, R]: rotation of adjacent pairs as complex multiplication (independent of the model's arithmetic)."""
  z = (x[:, 0::2] + 1j * x[:, 1::2]) * np.exp(1j * pos[:, None] * inv_freq)
  out = np.empty_like(x)
  out[:, 0::2], out[:, 1::2] = z.real, z.imag
  return out


def mla_reference(p, x, m):
  """Plain multi-head attention over one sequence x [L, D] built from MLA's weights (DeepSeek-V3 equations)."""
  L = x.shape[0]
  H, nope, rd, vd = m.num_attention_heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
  q = _rms(x @ p["q_a_proj"]["kernel"], p["q_a_layernorm"]["weight"], 1e-6) @ p["q_b_proj"]["kernel"]
  q = q.reshape(L, H, nope + rd)
  ckv = x @ p["kv_a_proj_with_mqa"]["kernel"]
  c, kr = ckv[:, :m.kv_lora_rank], ckv[:, m.kv_lora_rank:]
  kv = (_rms(c, p["kv_a_layernorm"]["weight"], 1e-6) @ p["kv_b_proj"]["kernel"]).reshape(L, H, nope + vd)
  inv_freq = 1.0 / (m.rope_theta ** (np.arange(0, rd, 2) / rd))
  pos = np.arange(L, dtype=np.float64)
  qr = np.stack([_rope_complex(q[:, h, nope:], pos, inv_freq) for h in range(H)], 1)
  kr = _rope_complex(kr, pos, inv_freq)
  out = np.zeros((L, H, vd))
  for h in range(H):
    s = (q[:, h, :nope] @ kv[:, h, :nope].T + qr[:, h] @ kr.T) / np.sqrt(nope + rd)
    s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    out[:, h] = (a / a.sum(-1, keepdims=True)) @ kv[:, h, nope:]
  return out.reshape(L, H * vd) @ p["o_proj"]["kernel"]


def test_mla_matches_plain_attention_reference():
  c = tiny()
  v = init_params(c)
  p = jax.tree.map(lambda a: np.asarray(a[0], np.float64), v["params"]["dense_layers"]["self_attn"])
  x = np.random.default_rng(1).standard_normal((2, 12, c.model.hidden_size))
  pos = np.broadcast_to(np.arange(12), (2, 12))
  out, max_logit = MLA(freeze(c.model)).apply({"params": jax.tree.map(jnp.float32, p)}, jnp.float32(x), pos,
                                              np.ones((2, 12), np.int32))
  for b in range(2):
    np.testing.assert_allclose(np.asarray(out[b]), mla_reference(p, x[b], c.model), atol=2e-5, rtol=2e-4)
  assert max_logit.shape == (c.model.num_attention_heads,)


def test_max_logit_is_max_of_valid_pre_softmax_logits():
  c = tiny()
  v = init_params(c)
  p = jax.tree.map(lambda a: a[0], v["params"]["dense_layers"]["self_attn"])
  x = jax.random.normal(jax.random.key(2), (1, 6, c.model.hidden_size)) * 3
  pos = jnp.arange(6)[None]
  mla = MLA(freeze(c.model))
  q_nope, q_rot = mla.apply({"params": p}, x, pos, method=MLA.project_q)
  lat, k_rot = mla.apply({"params": p}, x, pos, method=MLA.project_latent)
  k_nope, _ = mla.apply({"params": p}, lat, method=MLA.expand_kv)
  s = (jnp.einsum("bqhd,bkhd->hqk", q_nope, k_nope) + jnp.einsum("bqhd,bkd->hqk", q_rot, k_rot))
  s = s * rope.softmax_scale(c.model)
  expected = jnp.max(jnp.where(jnp.tril(jnp.ones((6, 6), bool)), s, -jnp.inf), axis=(1, 2))
  _, got = mla.apply({"params": p}, x, pos, jnp.ones((1, 6), jnp.int32))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block", [1, 5, 8])
def test_causal_query_blocks_equal_one_block(block):
  """Query blocks that skip later-slot keys give the same outputs, max logits and gradients on packed rows."""
  c = tiny()
  v = init_params(c)
  p = jax.tree.map(lambda a: a[0], v["params"]["dense_layers"]["self_attn"])
  x = jax.random.normal(jax.random.key(3), (2, 16, c.model.hidden_size)) * 2
  seg = jnp.int32([[1] * 7 + [2] * 6 + [0] * 3, [1] * 16])                # two packed segments + padding
  pos = jnp.int32([list(range(7)) + list(range(6)) + [0] * 3, list(range(16))])

  def run(q_block):
    m = c.model.copy_and_resolve_references()
    m.attention_q_block = q_block
    f = lambda p, x: MLA(freeze(m)).apply({"params": p}, x, pos, seg)
    (out, mx), vjp = jax.vjp(f, p, x)
    return out, mx, vjp((jnp.cos(out) * (seg > 0)[..., None], jnp.zeros_like(mx)))

  ref, blocked = run(0), run(block)
  valid = np.asarray(seg > 0)
  np.testing.assert_allclose(np.asarray(blocked[0])[valid], np.asarray(ref[0])[valid], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(blocked[1], ref[1], atol=1e-6)
  for a, b in zip(jax.tree.leaves(blocked[2]), jax.tree.leaves(ref[2])):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_yarn_matches_transformers():
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale
  c = get_config("k25_full")
  m = c.model
  hf = transformers.DeepseekV3Config(
      hidden_size=64, num_attention_heads=4, qk_rope_head_dim=m.qk_rope_head_dim, qk_nope_head_dim=128,
      max_position_embeddings=m.max_position_embeddings,
      rope_parameters=dict(rope_type="yarn", rope_theta=m.rope_theta, factor=m.rope_scaling.factor,
                           original_max_position_embeddings=m.rope_scaling.original_max_position_embeddings,
                           beta_fast=m.rope_scaling.beta_fast, beta_slow=m.rope_scaling.beta_slow,
                           mscale=m.rope_scaling.mscale, mscale_all_dim=m.rope_scaling.mscale_all_dim))
  hf.head_dim = m.qk_rope_head_dim
  inv_hf, factor_hf = ROPE_INIT_FUNCTIONS["yarn"](hf)
  inv, factor = rope.inv_freq_and_attention_factor(m)
  np.testing.assert_allclose(inv, inv_hf.numpy(), rtol=1e-6)
  assert factor == pytest.approx(factor_hf)
  assert rope.softmax_scale(m) == pytest.approx(yarn_apply_mscale(hf.rope_parameters, 192 ** -0.5))
  assert rope.softmax_scale(m) == pytest.approx(192 ** -0.5 * (0.1 * np.log(64) + 1) ** 2)


# ---------------------------------------------------------------------------------------------- router
def test_router_bias_changes_selection_not_weights():
  m = tiny().model
  scores = jax.nn.sigmoid(jax.random.normal(jax.random.key(0), (64, m.n_routed_experts)))
  idx0, w0 = moe_lib.route(scores, jnp.zeros(m.n_routed_experts), m)
  bias = jnp.zeros(m.n_routed_experts).at[3].set(10.0)
  idx1, w1 = moe_lib.route(scores, bias, m)
  assert bool(jnp.all(jnp.any(idx1 == 3, axis=-1)))             # the bias forces expert 3 into every top-k
  assert not bool(jnp.all(jnp.any(idx0 == 3, axis=-1)))
  for idx, w in ((idx0, w0), (idx1, w1)):
    np.testing.assert_allclose(w.sum(-1), m.routed_scaling_factor, rtol=1e-5)
    s = jnp.take_along_axis(scores, idx, -1)
    np.testing.assert_allclose(w, s / s.sum(-1, keepdims=True) * m.routed_scaling_factor, rtol=1e-5)


def test_route_local_equals_route_on_a_sharded_batch():
  """Routing on each device's own rows (an 8-device data x expert mesh, group-limited top-k) gives the same
  experts and weights as routing the whole batch at once."""
  cfg = tiny(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3)
  cfg.mesh.update(data=4, expert=2)
  m = cfg.model
  scores = jax.nn.sigmoid(jax.random.normal(jax.random.key(0), (64, 8)))
  bias = 0.1 * jax.random.normal(jax.random.key(1), (8,))
  idx_ref, w_ref = moe_lib.route(scores, bias, m)
  mesh = shd.make_mesh(cfg)
  with jax.set_mesh(mesh):
    rows = jax.device_put(scores, jax.sharding.NamedSharding(mesh, jax.P(shd.BATCH_AXES, None)))
    idx, w = jax.jit(lambda s, b: moe_lib.route_local(s, b, m))(rows, bias)
  assert mesh.size == 8 and idx.sharding.spec[0] == shd.BATCH_AXES
  np.testing.assert_array_equal(idx, idx_ref)
  np.testing.assert_allclose(w, w_ref, rtol=1e-6)


def test_group_limited_routing_matches_reference():
  m = tiny(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3).model
  rng = np.random.default_rng(0)
  scores = 1 / (1 + np.exp(-rng.standard_normal((32, 8))))
  bias = rng.standard_normal(8) * 0.1
  idx, w = moe_lib.route(jnp.float32(scores), jnp.float32(bias), m)
  for t in range(32):
    choice = scores[t] + bias
    groups = choice.reshape(4, 2)
    gs = np.sort(groups, -1)[:, -2:].sum(-1)
    keep = np.argsort(-gs)[:2]
    masked = np.where(np.repeat(np.isin(np.arange(4), keep), 2), choice, 0.0)
    ref = set(np.argsort(-masked)[:3])
    assert set(np.asarray(idx[t]).tolist()) == ref
    assert set(np.asarray(idx[t]).tolist()) <= set(np.concatenate([np.arange(2 * g, 2 * g + 2) for g in keep]))


def test_bias_update_balances_skewed_load():
  m = tiny(n_routed_experts=8, num_experts_per_tok=2).model
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((512, 8)) + np.linspace(2.0, -2.0, 8)     # expert 0 strongly preferred
  scores = jax.nn.sigmoid(jnp.float32(logits))
  bias = jnp.zeros(8)

  def imbalance(bias):
    idx, _ = moe_lib.route(scores, bias, m)
    load = jnp.zeros(8).at[idx.reshape(-1)].add(1.0)
    return load, float(load.max() / load.mean())

  load, before = imbalance(bias)
  for _ in range(300):
    bias = moe_lib.update_correction_bias(bias, load, 0.01)
    load, after = imbalance(bias)
  assert before > 2.5 and after < 1.3, (before, after)


def test_sequence_aux_loss_value():
  rng = np.random.default_rng(0)
  scores = 1 / (1 + np.exp(-rng.standard_normal((2, 5, 4))))
  idx = np.argsort(-scores, -1)[..., :2]
  valid = np.ones((2, 5), bool)
  got = moe_lib.sequence_aux_loss(jnp.float32(scores), jnp.int32(idx), jnp.bool_(valid), 2)
  ref = []
  for b in range(2):
    f = np.array([(idx[b] == i).sum() for i in range(4)]) * 4 / (2 * 5)
    p = (scores[b] / scores[b].sum(-1, keepdims=True)).mean(0)
    ref.append((f * p).sum())
  np.testing.assert_allclose(got, np.mean(ref), rtol=1e-5)


# ---------------------------------------------------------------------------------------------- dispatch
def _naive_moe(x, idx, w, wg, wu, wd):
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for j in range(idx.shape[1]):
      e = idx[t, j]
      g, u = x[t] @ wg[e], x[t] @ wu[e]
      y[t] += w[t, j] * ((g / (1 + np.exp(-g))) * u) @ wd[e]
  return y


# blocked: (min block, max chunk) from one chunk size (1, 1) to several chunks of several sizes per group.
@pytest.mark.parametrize("name,block,max_block", [("ragged", 0, 0), ("dense", 0, 0), ("blocked", 1, 1),
                                                  ("blocked", 3, 24), ("blocked", 4, 8), ("blocked", 64, 512)])
def test_dispatch_equals_per_token_loop(name, block, max_block):
  rng = np.random.default_rng(0)
  t, d, f, e, k = 37, 16, 8, 6, 2
  x = rng.standard_normal((t, d)).astype(np.float32)
  idx = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
  idx[:20, 0] = 1                                                        # a skewed group
  w = rng.random((t, k)).astype(np.float32)
  wg, wu = rng.standard_normal((2, e, d, f)).astype(np.float32) * 0.3
  wd = rng.standard_normal((e, f, d)).astype(np.float32) * 0.3
  fn = moe_lib.get_dispatch(name, block, max_block) if block else moe_lib.get_dispatch(name)
  got = jax.jit(fn)(x, idx, w, wg, wu, wd)
  np.testing.assert_allclose(got, _naive_moe(x, idx, w, wg, wu, wd), atol=1e-4, rtol=1e-4)


def test_swiglu_vjp_equals_autodiff():
  from k25jax.model.layers import swiglu
  g, u, dh = (jnp.asarray(np.random.default_rng(i).normal(size=(5, 7)) * 3, jnp.float32) for i in range(3))
  got = jax.vjp(swiglu, g, u)[1](dh)
  want = jax.vjp(lambda g, u: jax.nn.silu(g) * u, g, u)[1](dh)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _dispatch_problem(seed, t=24, d=8, f=6, e=4, k=2):
  rng = np.random.default_rng(seed)
  x = jnp.float32(rng.standard_normal((t, d)))
  idx = jnp.int32(np.stack([rng.choice(e, k, replace=False) for _ in range(t)]))
  w = jnp.float32(rng.random((t, k)))
  ws = [jnp.float32(rng.standard_normal(s) * 0.3) for s in ((e, d, f), (e, d, f), (e, f, d))]
  return x, idx, w, ws


def _value_and_grads(fn, x, idx, w, ws):
  loss = lambda x, w, *ws: jnp.sum(jnp.sin(fn(x, idx, w, *ws)))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(x, w, *ws)


@pytest.mark.parametrize("block,max_block", [(1, 1), (2, 16), (4, 512)])
def test_dispatch_gradients_agree(block, max_block):
  x, idx, w, ws = _dispatch_problem(1)
  ref = _value_and_grads(moe_lib.get_dispatch("ragged"), x, idx, w, ws)
  for name in ("blocked", "dense"):
    got = _value_and_grads(moe_lib.get_dispatch(name, block, max_block), x, idx, w, ws)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
      np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_blocked_dispatch_in_bfloat16_tracks_float32():
  """bf16 activations and weights (f32 weight-grad accumulation inside): values and gradients within bf16 error."""
  x, idx, w, ws = _dispatch_problem(4, t=40, d=16, f=8, e=4)
  fn = moe_lib.get_dispatch("blocked", 4, 16)
  ref = _value_and_grads(fn, x, idx, w, ws)
  got = _value_and_grads(fn, x.astype(jnp.bfloat16), idx, w, [a.astype(jnp.bfloat16) for a in ws])
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    assert b.dtype == a.dtype or b.dtype == jnp.bfloat16
    scale = float(jnp.max(jnp.abs(a)))
    np.testing.assert_allclose(np.asarray(b, np.float32), a, atol=3e-2 * scale, rtol=0)


def test_grouped_chunks_cover_each_group_exactly_once():
  """The chunk plan of the blocked dispatch tiles every expert's padded group with no gap and no overlap."""
  from k25jax.model import grouped
  rng = np.random.default_rng(2)
  e, block = 7, 4
  idx = jnp.int32(np.stack([rng.choice(e, 3, replace=False) for _ in range(50)]))
  idx = idx.at[:30, 0].set(5)                                            # one long group: several big chunks
  lay = grouped.layout(idx, e, block)
  sizes = grouped.chunk_sizes(block, 16)
  covered = np.full(grouped.num_slots(idx.size, e, block), -1)
  for size, (starts, experts, count) in zip(sizes, grouped.chunk_plan(lay, idx.size, sizes)):
    for start, expert in zip(np.asarray(starts)[:int(count)], np.asarray(experts)[:int(count)]):
      assert np.all(covered[start:start + size] == -1), "chunks overlap"
      covered[start:start + size] = expert
  for expert, (off, n) in enumerate(zip(np.asarray(lay.offsets), np.asarray(lay.padded))):
    assert np.all(covered[off:off + n] == expert)
  assert (covered >= 0).sum() == int(np.asarray(lay.padded).sum())
  assert np.array_equal(np.bincount(np.asarray(idx).ravel(), minlength=e), np.asarray(lay.sizes))


@pytest.mark.parametrize("mesh_cfg", [dict(data=8, fsdp=1, expert=1, tensor=1),
                                      dict(data=2, fsdp=2, expert=1, tensor=2)], ids=("8x1x1x1", "2x2x1x2"))
def test_data_local_dispatch_equals_global(mesh_cfg):
  """Under a mesh the token-local dispatches run per device (weights split over tensor); values and gradients
  equal the single-device call."""
  x, idx, w, ws = _dispatch_problem(3, t=32)
  c = tiny()
  c.mesh.update(**mesh_cfg)
  mesh = shd.make_mesh(c)
  for name in ("blocked", "ragged", "dense"):
    fn = moe_lib.get_dispatch(name, 2, 8)
    ref = _value_and_grads(fn, x, idx, w, ws)
    with jax.set_mesh(mesh):
      got = _value_and_grads(fn, jax.device_put(x, shd.batch_sharding(mesh)), idx, w, ws)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- whole model
def test_packed_segments_equal_separate_sequences():
  c = tiny()
  v = init_params(c)
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 275, 5), rng.integers(0, 275, 7)
  tokens = np.concatenate([a, b, [0, 0, 0, 0]])[None]
  positions = np.concatenate([np.arange(5), np.arange(7), np.zeros(4, int)])[None]
  seg = np.concatenate([np.ones(5), 2 * np.ones(7), np.zeros(4)]).astype(np.int32)[None]
  packed, _ = forward(c, v, tokens, positions, seg)
  for s, (lo, hi) in enumerate(((0, 5), (5, 12)), start=1):
    alone, _ = forward(c, v, tokens[:, lo:hi], positions[:, lo:hi], np.ones((1, hi - lo), np.int32))
    np.testing.assert_allclose(packed[:, lo:hi], alone, atol=1e-5, rtol=1e-5)


def test_remat_and_dispatch_do_not_change_logits():
  base = tiny(moe_dispatch="ragged")
  v = init_params(base)
  x = text_inputs(2, 8)
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 275)
  ref, ref_aux = forward(base, v, tokens, x["positions"], x["segment_ids"])
  for dispatch, policy in (("blocked", "full"), ("dense", "dots"), ("blocked", "none")):
    c = tiny(moe_dispatch=dispatch, remat_policy=policy)
    out, aux = forward(c, v, tokens, x["positions"], x["segment_ids"])
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(aux["expert_load"], ref_aux["expert_load"])
  assert float(ref_aux["expert_load"].sum()) == 2 * 8 * 2 * base.model.num_experts_per_tok


MESHES = [dict(data=8, fsdp=1, expert=1, tensor=1), dict(data=2, fsdp=2, expert=2, tensor=1),
          dict(data=1, fsdp=2, expert=2, tensor=2), dict(data=1, fsdp=1, expert=4, tensor=2)]


@pytest.mark.parametrize("mesh_cfg", MESHES, ids=lambda m: "x".join(str(v) for v in m.values()))
def test_sharded_forward_and_grads_equal_single_device(mesh_cfg):
  c = tiny(moe_dispatch="auto")
  for k, val in mesh_cfg.items():
    c.mesh[k] = val
  validate(c)
  v = init_params(c)
  tokens = jax.random.randint(jax.random.key(0), (8, 16), 0, 275)
  x = text_inputs(8, 16)
  single = tiny(moe_dispatch="ragged")

  def loss(params, config, tokens):
    logits, aux = forward(config, {"params": params, "moe_state": v["moe_state"]}, tokens, x["positions"],
                          x["segment_ids"])
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), (logits, aux)

  (l0, (ref, ref_aux)), g0 = jax.value_and_grad(loss, has_aux=True)(v["params"], single, tokens)
  mesh = shd.make_mesh(c)
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.get_rules(c)):
    sharded_tokens = jax.device_put(tokens, shd.batch_sharding(mesh))
    grad_fn = jax.jit(jax.value_and_grad(lambda p, t: loss(p, c, t), has_aux=True))
    (l1, (out, aux)), g1 = grad_fn(v["params"], sharded_tokens)
  np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(aux["expert_load"], ref_aux["expert_load"])
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-3)


def test_init_sharded_places_params_by_rules():
  c = tiny()
  c.mesh.update(data=1, fsdp=2, expert=2, tensor=2)
  mesh = shd.make_mesh(c)
  x = text_inputs(1, 8)
  model = K2LM(c.model)
  v, shardings = shd.init_sharded(lambda k: model.init(k, x["tokens"], x["positions"], x["segment_ids"]), mesh,
                                  shd.get_rules(c), jax.random.key(0))
  experts = v["params"]["moe_layers"]["mlp"]["experts_gate_proj"]
  assert experts.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
  assert v["params"]["embed_tokens"]["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  shard_shape = experts.addressable_shards[0].data.shape
  assert shard_shape == (2, 4, 32, 16)                                # [L, E/2, D/2, F/2]


def test_mtp_layer_outputs():
  c = tiny(num_nextn_predict_layers=1)
  v = init_params(c)
  x = text_inputs(2, 8)
  logits, aux = forward(c, v, x["tokens"], x["positions"], x["segment_ids"])
  assert aux["mtp_logits"].shape == logits.shape
  assert "mtp" in v["params"] and "eh_proj" in v["params"]["mtp"]
  assert not np.allclose(aux["mtp_logits"], logits)


# ---------------------------------------------------------------------------------------------- configs
def test_full_size_counts_match_release():
  r = count_lm(get_config("k25_full").model)
  assert abs(r["total_params"] / 1.0264e12 - 1) < 1e-3
  assert abs(r["active_params"] / 3.286e10 - 1) < 1e-3
  c = get_config("k25_full")
  c.model.num_nextn_predict_layers = 1
  r = count_lm(c.model)
  assert 1.035e12 < r["total_params"] < 1.045e12                      # the paper's "1.04T" includes one MTP layer


def test_k25_full_has_released_numbers():
  m = get_config("k25_full").model
  assert (m.num_hidden_layers, m.first_k_dense_replace, m.intermediate_size, m.hidden_size) == (61, 1, 18432, 7168)
  assert (m.num_attention_heads, m.q_lora_rank, m.kv_lora_rank) == (64, 1536, 512)
  assert (m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (128, 64, 128)
  assert (m.n_routed_experts, m.moe_intermediate_size, m.num_experts_per_tok, m.n_shared_experts) == (384, 2048, 8, 1)
  assert (m.scoring_func, m.topk_method, m.routed_scaling_factor, m.n_group) == ("sigmoid", "noaux_tc", 2.827, 1)
  assert (m.vocab_size, m.tie_word_embeddings, m.rope_theta) == (163840, False, 50000.0)
  assert (m.rope_scaling.type, m.rope_scaling.factor, m.rope_scaling.original_max_position_embeddings) == \
      ("yarn", 64.0, 4096)


@pytest.mark.parametrize("field,value,match", [
    ("model.num_experts_per_tok", 9, "exceeds model.n_routed_experts"),
    ("model.n_group", 3, "must divide"),
    ("model.topk_group", 2, "topk_group"),
    ("model.moe_dispatch", "magic", "moe_dispatch"),
    ("model.qk_rope_head_dim", 7, "even"),
    ("mesh.tensor", 3, "not divisible by mesh.tensor"),
    ("mesh.expert", 3, "n_routed_experts=8 is not divisible"),
    ("model.first_k_dense_replace", 9, "first_k_dense_replace"),
])
def test_config_errors_name_the_problem(field, value, match):
  c = get_config("tiny")
  group, name = field.split(".")
  c[group][name] = value
  with pytest.raises(ConfigError, match=match):
    validate(c)


def test_unknown_preset_and_mesh_errors():
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    get_config("huge")
  c = get_config("tiny")
  c.mesh.update(data=-1, fsdp=-1)
  with pytest.raises(ConfigError, match="at most one axis"):
    validate(c)
  c = get_config("tiny")
  c.mesh.update(data=3, fsdp=1)
  with pytest.raises(ConfigError, match="needs 3 devices"):
    shd.make_mesh(c)


def test_flops_count_matches_parameter_count():
  from k25jax.train import flops
  for preset in ("tiny", "k25_full"):
    m = get_config(preset).model
    r = count_lm(m)
    norms = m.hidden_size * (2 * m.num_hidden_layers + 1) + m.num_hidden_layers * (m.q_lora_rank + m.kv_lora_rank)
    embed = m.vocab_size * m.hidden_size
    assert flops.matmul_params_per_token(m) == r["active_params"] - embed - norms


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_attend_vjp_equals_plain_softmax_autodiff(dtype, tol):
  """The written-out attention backward equals autodiff of a plain masked softmax attention written here, with
  a fully masked (padding) query row and segment-causal masking."""
  from k25jax.model.mla import attend
  rng = np.random.default_rng(0)
  b, lq, lk, h, dn, dr, dv = 2, 5, 7, 3, 4, 2, 3
  arrays = [jnp.asarray(rng.standard_normal(s), dtype) for s in
            ((b, lq, h, dn), (b, lq, h, dr), (b, lk, h, dn), (b, lk, dr), (b, lk, h, dv))]
  mask = jnp.asarray(rng.random((b, lq, lk)) < 0.6).at[0, 1].set(False).at[:, :, 0].set(True).at[1, 3].set(False)
  cot = jnp.asarray(rng.standard_normal((b, lq, h, dv)), jnp.float32)

  def reference(qn, qr, kn, kr, v):
    f = lambda a: a.astype(jnp.float32)
    logits = (jnp.einsum("bqhd,bkhd->bhqk", f(qn), f(kn)) + jnp.einsum("bqhr,bkr->bhqk", f(qr), f(kr))) * 0.7
    probs = jax.nn.softmax(jnp.where(mask[:, None], logits, -1e30), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, f(v))

  def out_and_grads(f):
    out, vjp = jax.vjp(f, *arrays)
    return out, vjp(cot)
  got_out, got_grads = jax.jit(out_and_grads, static_argnums=0)(lambda *a: attend(*a, mask, 0.7)[0].astype(
      jnp.float32))
  want_out, want_grads = jax.jit(out_and_grads, static_argnums=0)(reference)
  np.testing.assert_allclose(got_out, want_out, rtol=tol, atol=tol)
  for got, want in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=tol, atol=tol)


def test_freeze_gives_equal_configs_one_object():
  """`freeze` memoises by value: an equal config (another ConfigDict) gives the same FrozenConfigDict, which
  equals a fresh freeze; a changed field gives another one."""
  a, b = get_config("tiny").model, get_config("tiny").model
  assert freeze(a) is freeze(b) and freeze(a) == ml_collections.FrozenConfigDict(b)
  b.num_hidden_layers = 2
  assert freeze(b) is not freeze(a) and freeze(b).num_hidden_layers == 2
  assert freeze(freeze(a)) is freeze(a)
