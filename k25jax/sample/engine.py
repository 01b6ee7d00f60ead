"""Generation with MLA's compressed cache: prefill, then a jitted decode loop (DESIGN "generation"; digest §1.1).

The decode forward runs the LM's own sub-modules on its parameter tree (one source of truth for the math):
`RMSNorm`, `MLA.project_q` / `MLA.project_latent` / `o_proj`, `MoE` (router, correction bias and the dispatch the
config selects) or `SwiGLU`, `K2LM.embed`, `K2LM.norm` + `K2LM.head`, each through `Module.apply(..., method=...)`.
Only attention differs from the training forward: it runs in DeepSeek-V3's absorbed form over the latent cache
(`k25jax.sample.cache`). Prefill uses the same path with all prompt slots as queries, scanned over the layer
stacks. Decode steps run inside one `lax.while_loop` with the layers unrolled over per-layer weights and one
latent cache per layer, sliced once before the loop (no per-step weight or cache copies); their MoE dispatch is
chosen for a step's few rows (`decode_moe_config`; on CPU in float32 the routed-experts kernel,
`k25jax.kernels.routed_experts_cpu`, whose tile-packed expert weights are prepared once, before the loop), and
on CPU in float32 their attention runs as one kernel per layer (`k25jax.kernels.absorbed_attention_cpu`).
`prepare_decode` does that layout once for many calls (RL rollouts, evaluation sweeps, the benchmark), and on a
host's CPU devices gives every device the same buffer of each weight instead of a copy each.

Padding side: prompts are LEFT-padded to a bucket P (a power of two), so every row's last prompt token sits at
slot P - 1 and generated token t at slot P + t; positions count from each row's first real token, so a prompt
gives the same tokens alone or beside longer prompts. Inputs are given right-padded (or as lists) and re-aligned
inside the program.

One compiled program per (batch, prompt bucket, max_new_tokens, stop tokens / 8, embeds or not, mesh);
temperature, top-k, top-p and greedy are traced values and never recompile.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from k25jax.configs import sample as sample_cfg
from k25jax.configs.validate import validate
from k25jax.kernels import absorbed_attention_cpu, build, routed_experts_cpu
from k25jax.model.layers import RMSNorm, SwiGLU, dtype_of
from k25jax.model.lm import K2LM, freeze
from k25jax.model.mla import MLA, attention_mask
from k25jax.model.moe import MoE, prepare_experts, resolve_dispatch
from k25jax.model import rope
from k25jax.sample.cache import (CACHE_AXES, absorbed_attention, absorbed_attention_kernel, init_cache,
                                slot_segments_and_positions)
from k25jax.runtime import share_host_replicas
from k25jax.sharding import BATCH_AXES, batch_sharding, get_rules, make_mesh, tree_shardings

Params = Any


# ----------------------------------------------------------------------------------------------- forward
def _decoder_layer(m, ffn, lp: Params, x: jax.Array, cache: jax.Array, layer: tuple, slot: jax.Array,
                   positions: jax.Array, mask: jax.Array, last_only: bool = False,
                   attention=absorbed_attention) -> tuple[jax.Array, jax.Array]:
  """One pre-norm decoder layer (lm.DecoderLayer) with absorbed MLA over the latent cache; writes the chunk's
  latents at `slot`. x [B,L,D], mask [B,L,S]; cache [layers,B,S,W] with `layer` = (index,), or one layer's
  [B,S,W] with `layer` = (); attention reads the first S' slots, S' = mask.shape[-1] <= S. ffn(h) is the layer's
  MoE or SwiGLU. last_only: after writing every position's
  latents, only the chunk's last position goes through attention and the feed-forward (returns x [B,1,D]).
  attention: `cache.absorbed_attention` or its CPU kernel (`cache.absorbed_attention_kernel`)."""
  norm = lambda name, y: RMSNorm(m.rms_norm_eps, m.dtype, m.param_dtype).apply({"params": lp[name]}, y)
  mla, attn_vars = MLA(m), {"params": lp["self_attn"]}
  h = norm("input_layernorm", x)
  c, k_rot = mla.apply(attn_vars, h, positions, method=MLA.project_latent)
  new = jnp.concatenate([c, k_rot.astype(c.dtype)], axis=-1).astype(cache.dtype)
  cache = jax.lax.dynamic_update_slice(cache, new.reshape((1,) * len(layer) + new.shape), (*layer, 0, slot, 0))
  latent = jax.lax.dynamic_index_in_dim(cache, layer[0], axis=0, keepdims=False) if layer else cache
  latent = latent[:, :mask.shape[-1]]   # the slots the mask covers (prefill: the prompt's)
  if last_only:
    x, h, positions, mask = x[:, -1:], h[:, -1:], positions[:, -1:], mask[:, -1:]
  q_nope, q_rot = mla.apply(attn_vars, h, positions, method=MLA.project_q)
  o = attention(q_nope, q_rot, latent, lp["self_attn"]["kv_b_proj"]["kernel"], mask, rope.softmax_scale(m),
                m.kv_lora_rank)
  o = o.reshape(*x.shape[:2], -1).astype(dtype_of(m.dtype))
  x = x + mla.apply(attn_vars, o, method=lambda mod, y: mod.o_proj(y))
  y = ffn(norm("post_attention_layernorm", x))
  return nn.with_logical_constraint(x + y, ("batch", "length", "act_embed")), cache


def _model_ffn(m, use_moe: bool, lp: Params, ls: Params, valid: jax.Array, experts: tuple | None = None):
  """The layer's feed-forward as the model computes it: `MoE` (the config's dispatch; `experts`: its expert
  weights already prepared, `moe.prepare_experts`) or `SwiGLU`."""
  if use_moe:
    return lambda h: MoE(m).apply({"params": lp["mlp"], "moe_state": ls["mlp"]}, h, valid, experts)[0]
  return SwiGLU(m.intermediate_size, m.dtype, m.param_dtype, m.initializer_range).bind({"params": lp["mlp"]})


def forward_with_cache(params: Params, moe_state: Params, m: ml_collections.ConfigDict, x: jax.Array,
                       cache: jax.Array, slot: jax.Array | int, positions: jax.Array, q_segment_ids: jax.Array,
                       kv_segment_ids: jax.Array, kv_positions: jax.Array, last_only: bool = False
                       ) -> tuple[jax.Array, jax.Array]:
  """Runs embeddings x [B,L,D] (occupying cache slots [slot, slot+L)) through every layer, absorbed MLA over the
  latent cache (digest §1.1). Returns (final hidden state before the last norm [B,L,D], updated cache).

  positions / q_segment_ids [B,L] describe the chunk; kv_segment_ids / kv_positions [B,S'] the first S' <= S
  cache slots (`cache.slot_segments_and_positions`), the ones attention reads: prefill passes the prompt's, which
  are all that its causal mask lets it see. The mask is the model's own `attention_mask`. Layers run as a scan over
  the stacked parameters (prefill); decode steps use `_decode_step`. last_only (prefill): the last layer runs
  attention and its feed-forward for the chunk's last position only, since the other positions' final states
  feed nothing but their own logits, and the hidden state returned is [B,1,D] (the cache is the same).
  """
  m = freeze(m)
  mask = attention_mask(q_segment_ids, kv_segment_ids, positions, kv_positions)
  valid = q_segment_ids > 0
  stacks = _stacks(m)
  for i, (name, use_moe, offset, count) in enumerate(stacks):
    stack = (params[name], moe_state[name] if use_moe else {})
    layer_at = lambda j, stack=stack: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, j, keepdims=False),
                                                   stack)

    def body(carry, j, use_moe=use_moe, layer_at=layer_at, offset=offset):
      x, cache = carry
      lp, ls = layer_at(j)
      ffn = _model_ffn(m, use_moe, lp, ls, valid)
      return _decoder_layer(m, ffn, lp, x, cache, (offset + j,), slot, positions, mask), None

    split = int(last_only and i == len(stacks) - 1)
    (x, cache), _ = jax.lax.scan(body, (x, cache), jnp.arange(count - split, dtype=jnp.int32))
    if split:
      lp, ls = layer_at(count - 1)
      ffn = _model_ffn(m, use_moe, lp, ls, valid[:, -1:])
      x, cache = _decoder_layer(m, ffn, lp, x, cache, (offset + count - 1,), slot, positions, mask, last_only=True)
  return x, cache


def _stacks(m) -> list[tuple[str, bool, int, int]]:
  """(parameter stack, is MoE, first layer, layer count) for the non-empty layer stacks."""
  n_dense = m.first_k_dense_replace
  stacks = [("dense_layers", False, 0, n_dense), ("moe_layers", True, n_dense, m.num_hidden_layers - n_dense)]
  return [s for s in stacks if s[3]]


_TOP = ("embed_tokens", "norm", "lm_head")   # the LM's parameters outside the layer stacks


def _decode_arrays(params: Params, moe_state: Params, m_step) -> dict:
  """The weights decode steps read: the LM's embedding, final norm and head, and per layer its parameters sliced
  out of the stacks (a scan would dynamic-slice, i.e. copy, every weight at every step), its MoE state and its
  expert weights in the decode dispatch's layout (`moe.prepare_experts`, e.g. tile-packed for the CPU kernel) in
  place of the stored ones."""
  layers = []
  for name, use_moe, _, count in _stacks(m_step):
    for j in range(count):
      lp = jax.tree.map(lambda a: a[j], params[name])
      layer = dict(lp=lp)
      if use_moe:
        stored = tuple(lp["mlp"][f"experts_{p}_proj"] for p in ("gate", "up", "down"))
        layer.update(lp=dict(lp, mlp={k: v for k, v in lp["mlp"].items() if not k.startswith("experts_")}),
                     ls=jax.tree.map(lambda a: a[j], moe_state[name]),
                     experts=prepare_experts(m_step.moe_dispatch, *stored))
      layers.append(layer)
  return dict(top={k: params[k] for k in _TOP}, layers=layers)


_decode_arrays_jit = jax.jit(_decode_arrays, static_argnums=2)


def _decode_layers(arrays: dict, m_step, batch: int) -> list[dict]:
  """Each layer's parameters (`_decode_arrays`) with its feed-forward: `MoE` with the dispatch of
  `decode_moe_config` on the prepared expert weights, or `SwiGLU`."""
  valid = jnp.ones((batch, 1), bool)
  return [dict(lp=layer["lp"], ffn=_model_ffn(m_step, "experts" in layer, layer["lp"], layer.get("ls", {}), valid,
                                              layer.get("experts"))) for layer in arrays["layers"]]


def _decode_step(layers: list[dict], m_step, x: jax.Array, caches: list[jax.Array], slot: jax.Array,
                 positions: jax.Array, mask: jax.Array, attention=absorbed_attention
                 ) -> tuple[jax.Array, list[jax.Array]]:
  """One decode step through every layer, unrolled over `_decode_layers` with one latent cache [B,S,W] per
  layer (updated in place at `slot`). Returns (hidden state before the last norm, caches)."""
  out = []
  for layer, cache in zip(layers, caches):
    x, cache = _decoder_layer(m_step, layer["ffn"], layer["lp"], x, cache, (), slot, positions, mask,
                              attention=attention)
    out.append(cache)
  return x, out


def embed(params: Params, m: ml_collections.ConfigDict, tokens: jax.Array) -> jax.Array:
  """`K2LM.embed` on the LM's parameters."""
  return K2LM(freeze(m)).apply({"params": params}, tokens, method=K2LM.embed)


def logits_from_hidden(params: Params, m: ml_collections.ConfigDict, h: jax.Array) -> jax.Array:
  """`K2LM.head(K2LM.norm(h))` on the LM's parameters, as f32. h [B, L, D] -> [B, L, V]."""
  out = K2LM(freeze(m)).apply({"params": params}, h, method=lambda mod, y: mod.head(mod.norm(y)))
  return out.astype(jnp.float32)


# ----------------------------------------------------------------------------------------------- sampling
def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """logits / temperature, then top-k (k = 0: off), then top-p (nucleus; 1: off), as HF's warpers order them.

  logits [B, V] f32; the other arguments are traced scalars. Removed entries become -inf. Ties at a threshold
  are kept.
  """
  x = logits / temperature
  v = x.shape[-1]
  desc = -jnp.sort(-x, axis=-1)
  use_k = top_k > 0
  kth = jax.lax.dynamic_index_in_dim(desc, jnp.clip(top_k - 1, 0, v - 1), axis=-1)
  x = jnp.where(use_k & (x < kth), -jnp.inf, x)
  desc = jnp.where(use_k & (jnp.arange(v) >= top_k), -jnp.inf, desc)
  probs = jax.nn.softmax(desc, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = (mass_before < top_p) | (top_p >= 1.0)
  n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(desc, n_keep - 1, axis=-1)
  return jnp.where(x < threshold, -jnp.inf, x)


def first_argmax(logits: jax.Array) -> jax.Array:
  """`jnp.argmax(logits, -1)` (the first maximal index) as a max and a min over indices: XLA:CPU runs argmax's
  (value, index) pair reduction as a slow variadic reduce."""
  v = logits.shape[-1]
  first = jnp.min(jnp.where(logits == logits.max(-1, keepdims=True), jnp.arange(v, dtype=jnp.int32), v), axis=-1)
  return jnp.minimum(first, v - 1)   # rows of NaN match nothing


def sample_tokens(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, greedy: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next tokens [B] and their log-probabilities under the RAW model (log-softmax of the unfiltered logits at
  temperature 1), which is what RL objectives (digest §4.1) need, whatever temperature/top-k/top-p sampled.

  Row b draws with `fold_in(key, b)`, so a row's sample does not depend on the batch padding or the mesh.
  Greedy steps skip drawing, and draws without top-k / top-p skip the sort (`lax.cond`: on a small model these
  cost more than a decode step's matmuls).
  """
  def draw():
    filtered = jax.lax.cond((top_k > 0) | (top_p < 1.0), filter_logits, lambda x, t, *_: x / t,
                            logits, temperature, top_k, top_p)
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(logits.shape[0], dtype=jnp.int32))
    return jax.vmap(jax.random.categorical)(row_keys, filtered).astype(jnp.int32)

  tokens = jax.lax.cond(greedy, lambda: first_argmax(logits), draw)
  logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
  return tokens, logprobs


# ----------------------------------------------------------------------------------------------- program
def _left_align(x: jax.Array, lengths: jax.Array, fill) -> jax.Array:
  """Right-padded rows [B, P, ...] -> left-padded (row b's len_b items end at P - 1), `fill` elsewhere."""
  p = x.shape[1]
  src = jnp.arange(p, dtype=jnp.int32)[None, :] - (p - lengths)[:, None]
  gathered = jnp.take_along_axis(x, jnp.clip(src, 0, p - 1).reshape(*src.shape, *([1] * (x.ndim - 2))), axis=1)
  return jnp.where((src >= 0).reshape(*src.shape, *([1] * (x.ndim - 2))), gathered, fill)


def _program(params, moe_state, decode, tokens, lengths, input_embeds, rng, temperature, top_k, top_p, greedy, stop,
             *, m, m_step, max_new: int, cache_dtype: str, pad_id: int, attention_kernel: bool,
             done_check_every: int):
  """Prefill (config m) + `lax.while_loop` decode (config m_step, `decode_moe_config`; attention through the CPU
  kernel when `attention_kernel`) on the decode weights `decode` (`_decode_arrays`; None: sliced here), checking
  whether every row has stopped once per `done_check_every` steps (the check reduces over devices). tokens
  [B,P] right-padded, lengths [B] -> (tokens, logprobs, lengths)."""
  b, p = tokens.shape
  max_len = p + max_new - 1
  lengths = lengths.astype(jnp.int32)
  kv_seg, kv_pos = slot_segments_and_positions(lengths, p, max_len)
  if input_embeds is None:
    x = embed(params, m, _left_align(tokens, lengths, pad_id))
  else:
    x = _left_align(input_embeds.astype(dtype_of(m.dtype)), lengths, 0)
  cache = nn.with_logical_constraint(init_cache(m, b, max_len, cache_dtype or None), CACHE_AXES)
  h, cache = forward_with_cache(params, moe_state, m, x, cache, 0, kv_pos[:, :p], kv_seg[:, :p], kv_seg[:, :p],
                                kv_pos[:, :p], last_only=True)
  sample = functools.partial(sample_tokens, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
  tok, lp = sample(logits_from_hidden(params, m, h)[:, 0], jax.random.fold_in(rng, 0))
  out_tok = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(tok)
  out_lp = jnp.zeros((b, max_new), jnp.float32).at[:, 0].set(lp)
  done = jnp.isin(tok, stop)
  n_gen = jnp.ones((b,), jnp.int32)

  def cond(carry):
    step, _, _, _, _, done, _ = carry
    return (step < max_new) & ~jnp.all(done)

  decode = _decode_arrays(params, moe_state, m_step) if decode is None else decode
  layers = _decode_layers(decode, m_step, b)
  caches = [nn.with_logical_constraint(c, CACHE_AXES[1:]) for c in cache]

  def body(carry):
    step, caches, last, out_tok, out_lp, done, n_gen = carry
    q_pos = (lengths + step - 1)[:, None]
    mask = attention_mask(jnp.ones_like(q_pos), kv_seg, q_pos, kv_pos)
    h, caches = _decode_step(layers, m_step, embed(decode["top"], m, last[:, None]), caches, p + step - 1, q_pos,
                             mask, absorbed_attention_kernel if attention_kernel else absorbed_attention)
    tok, lp = sample(logits_from_hidden(decode["top"], m, h)[:, 0], jax.random.fold_in(rng, step))
    tok, lp = jnp.where(done, pad_id, tok), jnp.where(done, 0.0, lp)
    out_tok = jax.lax.dynamic_update_index_in_dim(out_tok, tok, step, axis=1)
    out_lp = jax.lax.dynamic_update_index_in_dim(out_lp, lp, step, axis=1)
    n_gen = n_gen + (~done).astype(jnp.int32)
    return step + 1, caches, tok, out_tok, out_lp, done | jnp.isin(tok, stop), n_gen

  def steps(carry):  # up to `done_check_every` steps between all-rows-done checks
    limit = carry[0] + done_check_every
    return jax.lax.while_loop(lambda c: (c[0] < max_new) & (c[0] < limit), body, carry)

  carry = (jnp.int32(1), caches, tok, out_tok, out_lp, done, n_gen)
  _, _, _, out_tok, out_lp, _, n_gen = jax.lax.while_loop(cond, body if done_check_every == 1 else steps, carry)
  return out_tok, out_lp, n_gen


def cpu_kernels(m: ml_collections.FrozenConfigDict) -> bool:
  """Whether the XLA:CPU kernels (routed experts, absorbed attention) can serve decode steps: on the CPU
  backend, in float32, on an AVX-512 host, once they build here (`k25jax.kernels.build`)."""
  return (jax.default_backend() == "cpu" and dtype_of(m.dtype) == jnp.float32 and build.host_has_avx512() and
          build.available(routed_experts_cpu.register, absorbed_attention_cpu.register))


@functools.lru_cache(maxsize=64)
def _with_dispatch(m: ml_collections.FrozenConfigDict, name: str, block: int | None = None
                   ) -> ml_collections.FrozenConfigDict:
  """m with `moe_dispatch` = name (and `moe_block_size` = block); cached: building a FrozenConfigDict costs about a millisecond."""
  extra = {} if block is None else {"moe_block_size": block}
  return ml_collections.FrozenConfigDict({**m.as_configdict().to_dict(), "moe_dispatch": name, **extra})


def decode_moe_config(m: ml_collections.FrozenConfigDict, batch: int, choice: str = "auto",
                      kernels: bool = True) -> ml_collections.FrozenConfigDict:
  """The model config for one-token decode steps of `batch` rows (`sample.decode_moe_dispatch` = `choice`,
  `sample.cpu_kernels` = `kernels`).

  A named dispatch is used as given. `auto` keeps `ragged` and expert-parallel `ep` (accelerators, pods) and
  replaces the CPU dispatches, which suit training's many rows per expert: where the XLA:CPU kernel builds
  (`cpu_kernels`), the `cpu_kernel` dispatch (`k25jax.kernels.routed_experts_cpu`: only the routed work, each
  chosen expert's weights read once per chunk of rows; `benchmarks.sampler`); otherwise by rows per expert on
  each device (the context mesh splits the batch over its data axes): `dense` once rows * top-k reach twice the
  expert count (every expert then holds about two rows or more and one batched product per projection beats a
  loop of per-expert tiles), below that `blocked` with its tile shrunk to the next power of two >= rows * top-k /
  experts (capped by `moe_block_size`), which skips the experts no row chose. No choice changes results, only
  the work.
  """
  if choice != "auto":
    return _with_dispatch(m, choice)
  if resolve_dispatch(m.moe_dispatch) not in ("blocked", "dense"):
    return m
  if kernels and cpu_kernels(m):
    return _with_dispatch(m, "cpu_kernel")
  mesh = jax.sharding.get_abstract_mesh()
  rows = -(-batch // (1 if mesh.empty else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))))
  if rows * m.num_experts_per_tok >= 2 * m.n_routed_experts:
    return _with_dispatch(m, "dense")
  rows_per_expert = -(-rows * m.num_experts_per_tok // m.n_routed_experts)
  return _with_dispatch(m, "blocked", min(int(m.moe_block_size), 1 << (rows_per_expert - 1).bit_length()))


@functools.lru_cache(maxsize=64)
def _compiled(m: ml_collections.FrozenConfigDict, m_step: ml_collections.FrozenConfigDict, max_new: int,
              cache_dtype: str, pad_id: int, attention_kernel: bool = False, done_check_every: int = 1):
  """The jitted program for one model config, decode-step config, max_new_tokens, decode attention and done-check
  interval (jit then caches per input shape)."""
  return jax.jit(functools.partial(_program, m=m, m_step=m_step, max_new=max_new, cache_dtype=cache_dtype,
                                   pad_id=pad_id, attention_kernel=attention_kernel,
                                   done_check_every=done_check_every))


@functools.lru_cache(maxsize=16)
def _variable_shardings(m: ml_collections.FrozenConfigDict, mesh, rules) -> dict:
  """NamedShardings of the LM's `params` / `moe_state` under `rules` (from the logical names, via eval_shape)."""
  model = K2LM(m)
  x = jnp.zeros((1, 1), jnp.int32)
  abstract = jax.eval_shape(lambda k: model.init(k, x, x, x + 1), jax.random.key(0))
  return nn.meta.unbox(tree_shardings(abstract, mesh, rules))


def _placed(params: Params, moe_state: Params, m, mesh, rules) -> tuple[Params, Params]:
  """The LM's collections placed by their logical axis names on `mesh` (no copy where they already are)."""
  shardings = _variable_shardings(m, mesh, rules)
  return jax.device_put(params, shardings["params"]), jax.device_put(moe_state, shardings.get("moe_state", {}))


@dataclasses.dataclass(frozen=True, eq=False)
class DecodeWeights:
  """The weights decode steps read, laid out once (`prepare_decode`) for any number of `generate` calls."""
  arrays: dict                    # `_decode_arrays`
  mesh: jax.sharding.Mesh
  config_key: tuple               # (model config, decode dispatch choice, CPU kernels, rules) prepared for
  sources: tuple                  # weak references to the parameter leaves they came from
  placed: bool                    # those leaves already lay on the mesh as generate places them

  def check(self, params: Params, moe_state: Params, config_key: tuple, mesh) -> None:
    """Raises ValueError when these weights do not belong to this generate call's parameters, config or mesh."""
    leaves = jax.tree.leaves((params, moe_state))
    if len(leaves) != len(self.sources) or any(r() is not a for r, a in zip(self.sources, leaves)):
      raise ValueError("decode_weights were prepared from other parameters; call prepare_decode again after the "
                       "parameters change")
    if mesh != self.mesh or config_key != self.config_key:
      raise ValueError("decode_weights were prepared for another mesh or config; call prepare_decode with the "
                       "config and mesh given to generate")


def _config_key(m: ml_collections.FrozenConfigDict, scfg, rules) -> tuple:
  return m, scfg.decode_moe_dispatch, bool(scfg.cpu_kernels), rules


def prepare_decode(params: Params, moe_state: Params, config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh | None = None) -> DecodeWeights:
  """Lays out the decode steps' weights once, for `generate(..., decode_weights=...)` calls with these parameters,
  config and mesh (default `make_mesh(config)`): per-layer slices, expert weights in the decode dispatch's layout,
  and on a host's CPU devices one buffer per weight that every device reads (`runtime.share_host_replicas`)
  instead of one copy per device. Prepare again after the parameters change."""
  validate(config)
  scfg = sample_cfg.resolve(config)
  m = freeze(config.model)
  mesh = make_mesh(config) if mesh is None else mesh
  rules = get_rules(config)
  placed = _placed(params, moe_state, m, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    m_step = decode_moe_config(m, 1, scfg.decode_moe_dispatch, bool(scfg.cpu_kernels))
    arrays = _decode_arrays_jit(*placed, m_step)
  leaves = jax.tree.leaves((params, moe_state))
  return DecodeWeights(share_host_replicas(arrays), mesh, _config_key(m, scfg, rules),
                       tuple(weakref.ref(a) for a in leaves),
                       all(a is b for a, b in zip(jax.tree.leaves(placed), leaves)))


# ----------------------------------------------------------------------------------------------- entry point
def _normalise_prompts(prompts, vocab: int) -> tuple[np.ndarray, np.ndarray]:
  """list of token lists | (tokens [B, L] right-padded, lengths [B]) -> (tokens, lengths) as numpy."""
  if isinstance(prompts, tuple) and len(prompts) == 2 and np.ndim(prompts[0]) == 2:
    tokens, lengths = np.asarray(prompts[0], np.int64), np.asarray(prompts[1], np.int64)
    if lengths.shape != (tokens.shape[0],):
      raise ValueError(f"prompt lengths have shape {lengths.shape}; pass one length per row of the "
                       f"{tokens.shape} token array")
    if np.any(lengths > tokens.shape[1]):
      raise ValueError(f"prompt lengths {lengths.tolist()} exceed the token array width {tokens.shape[1]}")
  elif isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
    rows = [np.asarray(r, np.int64).reshape(-1) for r in prompts]
    lengths = np.array([len(r) for r in rows], np.int64)
    tokens = np.zeros((len(rows), max(lengths, default=0)), np.int64)
    for i, r in enumerate(rows):
      tokens[i, :len(r)] = r
  else:
    raise TypeError(f"prompts of type {type(prompts).__name__}: pass a list of token-id lists or a tuple "
                    "(tokens [B, L] right-padded, lengths [B])")
  if tokens.shape[0] == 0:
    raise ValueError("no prompts given; pass at least one token list")
  if np.any(lengths < 1):
    raise ValueError(f"prompt(s) {np.flatnonzero(lengths < 1).tolist()} are empty; every prompt needs >= 1 "
                     "token (e.g. a BOS token)")
  in_prompt = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
  bad = in_prompt & ((tokens < 0) | (tokens >= vocab))
  if bad.any():
    row, col = np.argwhere(bad)[0]
    raise ValueError(f"prompt {row} token {col} has id {tokens[row, col]} outside the vocabulary [0, {vocab})")
  return tokens.astype(np.int32), lengths.astype(np.int32)


def bucket_length(length: int, min_bucket: int) -> int:
  """The prompt bucket: the next power of two >= max(length, min_bucket)."""
  return 1 << (max(int(length), int(min_bucket)) - 1).bit_length()


def generate(params: Params, moe_state: Params, config: ml_collections.ConfigDict, prompts, *,
             max_new_tokens: int, rng: jax.Array, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
             greedy: bool = False, stop_tokens: Sequence[int] = (), input_embeds: jax.Array | None = None,
             mesh: jax.sharding.Mesh | None = None,
             decode_weights: DecodeWeights | None = None) -> dict[str, np.ndarray]:
  """Samples continuations of a batch of prompts with the MLA latent cache (DESIGN "generation").

  params / moe_state: the LM's collections (K25Model: `params["language_model"]`, `moe_state["language_model"]`).
  prompts: a list of token-id lists, or `(tokens [B, L] right-padded, lengths [B])`. input_embeds: optional
  precomputed prompt embeddings [B, L', D] laid out like the right-padded tokens (row b's first len_b rows),
  e.g. K25Model text embeddings with vision tokens scattered in, so the vision path runs once before prefill;
  generated tokens are embedded by the LM. mesh: defaults to `make_mesh(config)`; the batch (padded to a
  multiple of the data axes with dummy rows) and cache are split over `("data", "fsdp", "expert")`.
  decode_weights: the decode steps' weights from `prepare_decode` on these params, config and mesh, reused across
  calls (otherwise each call slices and lays them out inside its program).

  Returns numpy arrays: `tokens` [B, max_new_tokens] (pad_id after a sequence ends), `logprobs` [B, max_new]
  (log-softmax of the raw model at temperature 1, whatever the sampling settings; 0 after the end), `lengths` [B]
  (generated tokens, a stop token included). A sequence ends at its first stop token or after max_new_tokens.
  """
  validate(config)
  scfg = sample_cfg.resolve(config)
  m = freeze(config.model)
  if int(max_new_tokens) < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if not greedy and not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0 for sampling; pass greedy=True for argmax decoding")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p} must lie in (0, 1]; 1 turns nucleus filtering off")
  if int(top_k) < 0:
    raise ValueError(f"top_k={top_k} must be >= 0; 0 turns top-k filtering off")
  stop = np.asarray(list(stop_tokens), np.int64).reshape(-1)
  if np.any((stop < 0) | (stop >= m.vocab_size)):
    raise ValueError(f"stop_tokens {stop.tolist()} must be token ids in [0, {m.vocab_size})")
  # Padded with -1 (matches nothing) to a multiple of 8, so the stop count rarely changes the compiled shape.
  stop = np.pad(stop, (0, max(8, -(-len(stop) // 8) * 8) - len(stop)), constant_values=-1).astype(np.int32)
  tokens, lengths = _normalise_prompts(prompts, m.vocab_size)
  b, p = tokens.shape[0], bucket_length(tokens.shape[1], scfg.min_prompt_bucket)
  if p + max_new_tokens > m.max_position_embeddings:
    raise ValueError(f"prompt bucket {p} + max_new_tokens {max_new_tokens} exceeds model.max_position_embeddings="
                     f"{m.max_position_embeddings}; shorten the prompts or generate fewer tokens")

  mesh = make_mesh(config) if mesh is None else mesh
  rules = get_rules(config)
  shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  rows = -(-b // shards) * shards
  tok_pad = np.full((rows, p), scfg.pad_id, np.int32)
  tok_pad[:b, :tokens.shape[1]] = tokens
  len_pad = np.ones((rows,), np.int32)
  len_pad[:b] = lengths
  embeds = None
  if input_embeds is not None:
    e = jnp.asarray(input_embeds)
    if e.ndim != 3 or e.shape[0] != b or e.shape[1] < tokens.shape[1] or e.shape[2] != m.hidden_size:
      raise ValueError(f"input_embeds has shape {e.shape}; expected [{b}, >= {tokens.shape[1]}, "
                       f"{m.hidden_size}] laid out like the right-padded prompts")
    embeds = jnp.pad(e[:, :p], ((0, rows - b), (0, p - min(e.shape[1], p)), (0, 0)))
    embeds = jax.device_put(embeds, batch_sharding(mesh, 3))

  if decode_weights is not None:
    decode_weights.check(params, moe_state, _config_key(m, scfg, rules), mesh)
  if decode_weights is None or not decode_weights.placed:
    params, moe_state = _placed(params, moe_state, m, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    m_step = decode_moe_config(m, rows, scfg.decode_moe_dispatch, bool(scfg.cpu_kernels))
    attention_kernel = (bool(scfg.cpu_kernels) and cpu_kernels(m) and
                        dtype_of(scfg.cache_dtype or m.dtype) == jnp.float32)
    fn = _compiled(m, m_step, int(max_new_tokens), scfg.cache_dtype, int(scfg.pad_id), attention_kernel,
                   int(scfg.done_check_every))
    out_tok, out_lp, n_gen = fn(
        params, moe_state, decode_weights and decode_weights.arrays, jax.device_put(tok_pad, batch_sharding(mesh, 2)),
        jax.device_put(len_pad, batch_sharding(mesh, 1)), embeds, rng, np.float32(temperature),
        np.int32(top_k), np.float32(top_p), np.bool_(greedy), stop)
  if jax.process_count() > 1:
    out_tok, out_lp, n_gen = multihost_utils.process_allgather((out_tok, out_lp, n_gen), tiled=True)
  return dict(tokens=np.asarray(out_tok)[:b], logprobs=np.asarray(out_lp)[:b], lengths=np.asarray(n_gen)[:b])


__all__ = ["DecodeWeights", "bucket_length", "embed", "filter_logits", "forward_with_cache", "generate",
           "logits_from_hidden", "prepare_decode", "sample_tokens"]
