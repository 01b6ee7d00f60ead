"""Sampling engine with MLA's latent cache (k25jax.sample), checked against the model's own full forward."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from k25jax.configs import ConfigError, get_config
from k25jax.configs.sample import sample_config
from k25jax.kernels import build
from k25jax.model import K2LM, text_inputs
from k25jax.model.moe import MoE
from k25jax.sample import (engine, filter_logits, forward_with_cache, generate, init_cache,
                            logits_from_hidden, sample_tokens)
from k25jax.sample.cache import cache_sharding, slot_segments_and_positions
from k25jax.sharding import BATCH_AXES, batch_sharding, get_rules, init_sharded, make_mesh

PROMPTS = [[5, 17, 301], [9, 2, 44, 101, 7, 260, 33], [480], [12, 12, 99, 3, 450]]
MAX_NEW = 8
REF_LEN = 24          # fixed width of the recompute reference, so it compiles once


@pytest.fixture(scope="module")
def setup():
  config = get_config("tiny")
  config.model.initializer_range = 0.15      # peaked logits: random-init near-ties would make argmax fragile
  mesh, rules = make_mesh(config), get_rules(config)
  x = text_inputs(1, 8)
  model = K2LM(config.model)
  variables, _ = init_sharded(model.init, mesh, rules, jax.random.key(0), x["tokens"], x["positions"],
                              x["segment_ids"])
  bias = variables["moe_state"]["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"]
  variables["moe_state"]["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"] = (
      0.05 * jax.random.normal(jax.random.key(1), bias.shape))
  return config, mesh, model, variables["params"], variables["moe_state"]


@pytest.fixture(scope="module")
def reference_logits(setup):
  """Full forward (model.apply) on one right-padded row of REF_LEN tokens -> log-softmax [REF_LEN, V]."""
  _, _, model, params, state = setup
  params, state = jax.device_get((params, state))

  @jax.jit
  def run(tokens, length):
    pos = jnp.arange(REF_LEN, dtype=jnp.int32)[None]
    seg = (pos < length).astype(jnp.int32)
    logits, _ = model.apply({"params": params, "moe_state": state}, tokens[None], pos, seg)
    return jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)

  def call(seq):
    row = np.zeros((REF_LEN,), np.int32)
    row[:len(seq)] = seq
    return np.asarray(run(jnp.asarray(row), len(seq)))

  return call


def recompute_greedy(reference_logits, prompt, n):
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(np.argmax(reference_logits(seq)[len(seq) - 1])))
  return seq[len(prompt):]


@pytest.fixture(scope="module")
def greedy_out(setup):
  config, mesh, _, params, state = setup
  return generate(params, state, config, PROMPTS, max_new_tokens=MAX_NEW, rng=jax.random.key(0), greedy=True,
                  mesh=mesh)


def test_absorbed_cache_forward_equals_model_forward(setup):
  """Prefill through the latent cache in absorbed form gives the model's own (expanded MLA) logits."""
  config, _, model, params, state = setup
  params, state = jax.device_get((params, state))
  m = config.model
  lengths = jnp.array([6, 3], jnp.int32)
  tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, m.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32), (2, 8))
  seg = (pos < lengths[:, None]).astype(jnp.int32)
  want, _ = model.apply({"params": params, "moe_state": state}, tokens, pos, seg)
  # A left-padded layout of the same rows, as the engine uses (prompt ends at slot P - 1).
  kv_seg, kv_pos = slot_segments_and_positions(lengths, 8, 8)
  left = jnp.stack([jnp.roll(tokens[i], 8 - int(lengths[i])) for i in range(2)])
  x = model.apply({"params": params}, left, method=K2LM.embed)
  h, cache = forward_with_cache(params, state, m, x, init_cache(m, 2, 8), 0, kv_pos, kv_seg, kv_seg, kv_pos)
  got = logits_from_hidden(params, m, h)
  for i in range(2):
    n = int(lengths[i])
    np.testing.assert_allclose(got[i, 8 - n:], want[i, :n], rtol=1e-4, atol=1e-4)
  assert cache.shape == (m.num_hidden_layers, 2, 8, m.kv_lora_rank + m.qk_rope_head_dim)
  # last_only (prefill): the same cache, and the last position's state alone.
  h_last, cache_last = forward_with_cache(params, state, m, x, init_cache(m, 2, 8), 0, kv_pos, kv_seg, kv_seg,
                                          kv_pos, last_only=True)
  assert h_last.shape == (2, 1, m.hidden_size)
  np.testing.assert_allclose(h_last, h[:, -1:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cache_last, cache, rtol=1e-6, atol=1e-6)
  # A cache with slots for generated tokens: attending over every slot (the later ones are masked) or over the
  # prompt's only, as prefill does, gives the real tokens the same states and the prompt the same latents.
  kv_seg12, kv_pos12 = slot_segments_and_positions(lengths, 8, 12)
  for s in (12, 8):
    h_long, cache_long = forward_with_cache(params, state, m, x, init_cache(m, 2, 12), 0, kv_pos, kv_seg,
                                            kv_seg12[:, :s], kv_pos12[:, :s])
    for i in range(2):
      real = slice(8 - int(lengths[i]), 8)
      np.testing.assert_allclose(h_long[i, real], h[i, real], rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(cache_long[:, i, real], cache[:, i, real], rtol=1e-6, atol=1e-6)
    assert not np.any(cache_long[:, :, 8:])


def test_greedy_with_cache_equals_recompute(setup, greedy_out, reference_logits):
  assert greedy_out["tokens"].shape == (len(PROMPTS), MAX_NEW)
  np.testing.assert_array_equal(greedy_out["lengths"], MAX_NEW)
  for i, prompt in enumerate(PROMPTS):
    assert greedy_out["tokens"][i].tolist() == recompute_greedy(reference_logits, prompt, MAX_NEW), i


def test_logprobs_equal_teacher_forced_forward(setup, reference_logits):
  config, mesh, _, params, state = setup
  out = generate(params, state, config, PROMPTS, max_new_tokens=MAX_NEW, rng=jax.random.key(7), temperature=1.5,
                 top_p=0.95, mesh=mesh)
  for i, prompt in enumerate(PROMPTS):
    gen = out["tokens"][i].tolist()
    lp = reference_logits(prompt + gen)
    want = [lp[len(prompt) - 1 + t, tok] for t, tok in enumerate(gen)]
    np.testing.assert_allclose(out["logprobs"][i], want, rtol=1e-4, atol=1e-4)


def test_prompt_alone_equals_prompt_in_batch_of_longer_prompts(setup, greedy_out):
  config, mesh, _, params, state = setup
  long = [[int(t) for t in np.arange(20) * 7 % 500 + 1], list(range(30, 55))]       # bucket 32, not 16
  batched = generate(params, state, config, long + [PROMPTS[0]], max_new_tokens=MAX_NEW, rng=jax.random.key(0),
                     greedy=True, mesh=mesh)
  np.testing.assert_array_equal(batched["tokens"][2], greedy_out["tokens"][0])
  np.testing.assert_allclose(batched["logprobs"][2], greedy_out["logprobs"][0], rtol=1e-4, atol=1e-5)


def test_stop_tokens_end_sequences(setup, greedy_out):
  config, mesh, _, params, state = setup
  stop = int(greedy_out["tokens"][0, 2])
  out = generate(params, state, config, PROMPTS, max_new_tokens=MAX_NEW, rng=jax.random.key(0), greedy=True,
                 stop_tokens=(stop,), mesh=mesh)
  for i in range(len(PROMPTS)):
    full = greedy_out["tokens"][i].tolist()
    n = full.index(stop) + 1 if stop in full else MAX_NEW
    assert out["lengths"][i] == n, i
    assert out["tokens"][i, :n].tolist() == full[:n]
    assert np.all(out["tokens"][i, n:] == 0) and np.all(out["logprobs"][i, n:] == 0)
  assert out["lengths"][0] == 3
  # Checking for all-stopped rows after every step (not every 8th, the default) changes nothing but the steps run.
  every_step = config.copy_and_resolve_references()
  every_step.sample = ml_collections.ConfigDict(dict(done_check_every=1))
  again = generate(params, state, every_step, PROMPTS, max_new_tokens=MAX_NEW, rng=jax.random.key(0), greedy=True,
                   stop_tokens=(stop,), mesh=mesh)
  for key in out:
    np.testing.assert_array_equal(again[key], out[key])


def test_top_k_one_equals_greedy_and_sampling_is_reproducible(setup, greedy_out):
  config, mesh, _, params, state = setup
  kw = dict(max_new_tokens=MAX_NEW, mesh=mesh)
  top1 = generate(params, state, config, PROMPTS, rng=jax.random.key(5), top_k=1, temperature=3.0, **kw)
  np.testing.assert_array_equal(top1["tokens"], greedy_out["tokens"])
  np.testing.assert_allclose(top1["logprobs"], greedy_out["logprobs"], rtol=1e-5)
  a = generate(params, state, config, PROMPTS, rng=jax.random.key(11), temperature=2.0, **kw)
  b = generate(params, state, config, PROMPTS, rng=jax.random.key(11), temperature=2.0, **kw)
  c = generate(params, state, config, PROMPTS, rng=jax.random.key(12), temperature=2.0, **kw)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert not np.array_equal(a["tokens"], c["tokens"])


def test_one_device_and_eight_devices_agree(setup, greedy_out):
  """Same greedy tokens, and the same samples for a fixed key (per-row keys ignore batch padding/sharding). The
  one-device greedy run decodes the prompts twice over with XLA's `dense` decode dispatch (forced through
  `sample.decode_moe_dispatch`; 8 rows x top-2 = 2 x 8 experts is where `auto` picks it without the kernel),
  the 8-device runs with the routed-experts kernel (`auto` on CPU in float32)."""
  config, mesh8, _, params, state = setup
  assert mesh8.size == 8
  mesh1 = make_mesh(config, jax.devices()[:1])
  with jax.set_mesh(mesh8):
    assert engine.decode_moe_config(engine.freeze(config.model), len(PROMPTS)).moe_dispatch == (
        "cpu_kernel" if build.host_has_avx512() else "blocked")
  dense = config.copy_and_resolve_references()
  dense.sample = ml_collections.ConfigDict(dict(decode_moe_dispatch="dense"))
  one = generate(params, state, dense, PROMPTS * 2, max_new_tokens=MAX_NEW, rng=jax.random.key(0), greedy=True,
                 mesh=mesh1)
  for half in (one["tokens"][:len(PROMPTS)], one["tokens"][len(PROMPTS):]):
    np.testing.assert_array_equal(half, greedy_out["tokens"])
  for half in (one["logprobs"][:len(PROMPTS)], one["logprobs"][len(PROMPTS):]):
    np.testing.assert_allclose(half, greedy_out["logprobs"], rtol=1e-4, atol=1e-5)
  s1 = generate(params, state, config, PROMPTS, max_new_tokens=MAX_NEW, rng=jax.random.key(11), temperature=2.0,
                mesh=mesh1)
  s8 = generate(params, state, config, PROMPTS, max_new_tokens=MAX_NEW, rng=jax.random.key(11), temperature=2.0,
                mesh=mesh8)
  np.testing.assert_array_equal(s1["tokens"], s8["tokens"])


def test_prepared_decode_weights_give_the_same_generation(setup, greedy_out):
  """generate with `prepare_decode`'s weights (per-layer slices, packed experts, one host buffer for the 8 CPU
  devices) equals generate that lays them out in its program; weights of other parameters, or of another mesh or
  config, are refused."""
  config, mesh, _, params, state = setup
  prepared = engine.prepare_decode(params, state, config, mesh)
  kernel = prepared.arrays["layers"][-1]["experts"][0]
  assert kernel.ndim == 4   # tile-packed for the CPU kernel
  assert len({s.data.unsafe_buffer_pointer() for s in kernel.addressable_shards}) == 1
  out = generate(params, state, config, PROMPTS, max_new_tokens=MAX_NEW, rng=jax.random.key(0), greedy=True,
                 mesh=mesh, decode_weights=prepared)
  np.testing.assert_array_equal(out["tokens"], greedy_out["tokens"])
  np.testing.assert_array_equal(out["logprobs"], greedy_out["logprobs"])
  other = jax.tree.map(lambda a: a + 0, params)
  with pytest.raises(ValueError, match="prepared from other parameters"):
    generate(other, state, config, PROMPTS, max_new_tokens=2, rng=jax.random.key(0), mesh=mesh,
             decode_weights=prepared)
  with pytest.raises(ValueError, match="another mesh or config"):
    generate(params, state, config, PROMPTS, max_new_tokens=2, rng=jax.random.key(0),
             mesh=make_mesh(config, jax.devices()[:4]), decode_weights=prepared)


def test_input_embeds_prefill_equals_token_prefill(setup, greedy_out):
  config, mesh, model, params, state = setup
  tokens = np.zeros((len(PROMPTS), 7), np.int32)
  for i, p in enumerate(PROMPTS):
    tokens[i, :len(p)] = p
  lengths = np.array([len(p) for p in PROMPTS])
  embeds = model.apply({"params": jax.device_get(params)}, jnp.asarray(tokens), method=K2LM.embed)
  out = generate(params, state, config, (tokens, lengths), max_new_tokens=MAX_NEW, rng=jax.random.key(0),
                 greedy=True, input_embeds=embeds, mesh=mesh)
  np.testing.assert_array_equal(out["tokens"], greedy_out["tokens"])


def test_decode_moe_config_picks_the_kernel_or_the_dispatch_for_the_rows():
  """`auto` on CPU: the routed-experts kernel in float32. Without it (bfloat16 here, or no kernels): `dense` once
  tokens * top-k >= 2 x experts (its equality with the per-token reference is tests/test_model.py's), below that
  `blocked` with a shrunken tile; tokens count per device (a data-parallel mesh splits the rows). `ragged` is
  kept, and a named choice is used as given."""
  m = get_config("tiny").model          # 8 experts, top-2, blocked tile 64
  m.moe_dispatch = "blocked"
  # Hosts without AVX-512 build no kernels (k25jax/kernels/vec.h) and take the dispatch chosen without them.
  assert engine.decode_moe_config(engine.freeze(m), 8).moe_dispatch == (
      "cpu_kernel" if build.host_has_avx512() else "dense")
  assert engine.decode_moe_config(engine.freeze(m), 8, "dense").moe_dispatch == "dense"
  assert engine.decode_moe_config(engine.freeze(m), 8, kernels=False).moe_dispatch == "dense"
  m.dtype = "bfloat16"
  assert engine.decode_moe_config(engine.freeze(m), 8).moe_dispatch == "dense"
  for rows, tile in ((3, 1), (4, 1), (7, 2)):
    cfg_rows = engine.decode_moe_config(engine.freeze(m), rows)
    assert (cfg_rows.moe_dispatch, cfg_rows.moe_block_size) == ("blocked", tile)
  cfg = get_config("tiny")
  cfg.mesh.update(data=2)
  with jax.set_mesh(make_mesh(cfg, jax.devices()[:2])):    # each device decodes its own half of the rows
    assert engine.decode_moe_config(engine.freeze(m), 8).moe_dispatch == "blocked"
    assert engine.decode_moe_config(engine.freeze(m), 16).moe_dispatch == "dense"
  m.moe_dispatch = "ragged"
  assert engine.decode_moe_config(engine.freeze(m), 64).moe_dispatch == "ragged"


def test_cache_is_split_over_the_batch_axes():
  """The latent cache's batch is split over every batch axis under both rule sets (its latent dim must not
  claim `fsdp`, which the weights' `kv_lora` name maps to), and the latent is replicated."""
  cfg = get_config("tiny")
  cfg.mesh.update(data=2, fsdp=2, expert=2)
  mesh = make_mesh(cfg)
  for rules in ("default", "fsdp"):
    assert cache_sharding(mesh, get_rules(rules)).spec == jax.P(None, BATCH_AXES, None, None)


def test_decode_program_needs_no_gathers_on_a_data_parallel_mesh(setup):
  """On a data-parallel mesh each device decodes its own rows: the compiled program (prefill + decode loop) has
  no all-gather (the router's top-k and the per-layer cache slices once gathered the batch every step) and one
  all-reduce, the loop's all-rows-done check; also on decode weights prepared beforehand (`prepare_decode`) and
  with the attention kernel."""
  config, _, _, params, state = setup
  cfg = get_config("tiny")
  cfg.mesh.update(data=2)
  mesh, rules = make_mesh(cfg, jax.devices()[:2]), get_rules(cfg)
  m = engine.freeze(config.model)
  shardings = engine._variable_shardings(m, mesh, rules)
  placed = (jax.device_put(params, shardings["params"]), jax.device_put(state, shardings["moe_state"]))
  inputs = (jax.device_put(np.ones((4, 8), np.int32), batch_sharding(mesh, 2)),
            jax.device_put(np.full((4,), 8, np.int32), batch_sharding(mesh, 1)), None, jax.random.key(0),
            jnp.float32(1), jnp.int32(0), jnp.float32(1), jnp.bool_(True), jnp.full((8,), -1, jnp.int32))
  prepared = engine.prepare_decode(*placed, cfg, mesh).arrays
  for decode, attention_kernel in ((None, False), (prepared, False), (prepared, build.host_has_avx512())):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      fn = engine._compiled(m, engine.decode_moe_config(m, 4), 4, "", 0, attention_kernel)
      hlo = fn.lower(*placed, decode, *inputs).compile().as_text()
    ops = re.findall(r"= \S+ (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(",
                     hlo)
    assert ops == ["all-reduce"], ops


def test_small_batch_decode_path_equals_recompute(setup, reference_logits):
  """One prompt on one device with `sample.cpu_kernels` off: tokens * top-k < experts, so the MoE runs
  `blocked` with a one-row tile."""
  config, _, _, params, state = setup
  mesh1 = make_mesh(config, jax.devices()[:1])
  with jax.set_mesh(mesh1):
    m_step = engine.decode_moe_config(engine.freeze(config.model), 1, kernels=False)
  assert (m_step.moe_dispatch, m_step.moe_block_size) == ("blocked", 1)
  xla = config.copy_and_resolve_references()
  xla.sample = ml_collections.ConfigDict(dict(cpu_kernels=False))
  out = generate(params, state, xla, PROMPTS[1:2], max_new_tokens=MAX_NEW, rng=jax.random.key(0),
                 greedy=True, mesh=mesh1)
  assert out["tokens"][0].tolist() == recompute_greedy(reference_logits, PROMPTS[1], MAX_NEW)


def test_unfiltered_sampling_draws_from_tempered_logits():
  """Without top-k / top-p the draw skips the filter; it equals a categorical draw from logits / temperature
  with row b's key fold_in(key, b), and greedy takes the argmax."""
  logits = jax.random.normal(jax.random.key(0), (5, 40)) * 3
  key, temp = jax.random.key(9), jnp.float32(1.7)
  got, lp = sample_tokens(logits, key, temp, jnp.int32(0), jnp.float32(1.0), jnp.bool_(False))
  want = [jax.random.categorical(jax.random.fold_in(key, i), logits[i] / temp) for i in range(5)]
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(lp, jax.nn.log_softmax(logits)[jnp.arange(5), got], rtol=1e-6)
  greedy, _ = sample_tokens(logits, key, temp, jnp.int32(0), jnp.float32(1.0), jnp.bool_(True))
  np.testing.assert_array_equal(greedy, np.argmax(logits, axis=-1))


def test_first_argmax_is_argmax_with_ties():
  """Rows with ties (first maximal index wins), -inf entries and one NaN row (clamped into the vocabulary)."""
  logits = np.random.default_rng(0).integers(-3, 3, (64, 40)).astype(np.float32)
  logits[1, :] = -np.inf
  logits[2, 5] = np.inf
  np.testing.assert_array_equal(jax.jit(engine.first_argmax)(logits), np.argmax(logits, axis=-1))
  logits[3, :] = np.nan
  assert 0 <= int(engine.first_argmax(logits)[3]) < 40


def test_filter_logits_matches_numpy_top_k_top_p():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 20)).astype(np.float32) * 2
  for k, p, temp in ((0, 0.6, 1.0), (5, 1.0, 0.7), (4, 0.5, 1.3), (0, 1.0, 1.0)):
    got = np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), jnp.float32(temp), jnp.int32(k),
                                               jnp.float32(p))))
    for row, got_row in zip(logits / temp, got):
      order = np.argsort(-row)
      keep = order[:k] if k else order
      probs = np.exp(row[keep] - row[keep].max())
      probs /= probs.sum()
      n = len(keep) if p >= 1 else int(np.searchsorted(np.cumsum(probs), p) + 1)
      assert set(np.flatnonzero(got_row)) == set(keep[:n].tolist()), (k, p)


def test_bad_inputs_raise_clear_errors(setup):
  config, mesh, _, params, state = setup
  kw = dict(max_new_tokens=2, rng=jax.random.key(0), mesh=mesh)
  with pytest.raises(ValueError, match="empty"):
    generate(params, state, config, [[1, 2], []], **kw)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    generate(params, state, config, [[1, config.model.vocab_size]], **kw)
  with pytest.raises(ValueError, match="greedy=True"):
    generate(params, state, config, [[1, 2]], temperature=0.0, **kw)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(params, state, config, [[1, 2]], **{**kw, "max_new_tokens": 0})
  bad = get_config("tiny")
  bad.sample = sample_config()
  bad.sample.pad_id = bad.model.vocab_size
  with pytest.raises(ConfigError, match="sample.pad_id"):
    generate(params, state, bad, [[1, 2]], **kw)
  bad.sample = sample_config()
  bad.sample.decode_moe_dispatch = "sparse"
  with pytest.raises(ConfigError, match="sample.decode_moe_dispatch='sparse'"):
    generate(params, state, bad, [[1, 2]], **kw)
  bad.sample = sample_config()
  bad.sample.done_check_every = 0
  with pytest.raises(ConfigError, match="sample.done_check_every=0 must be >= 1"):
    generate(params, state, bad, [[1, 2]], **kw)
  assert engine.bucket_length(17, 16) == 32 and engine.bucket_length(3, 16) == 16
