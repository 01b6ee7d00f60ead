"""The Kimi K2 language model (DeepSeek-V3 architecture as released in Kimi-K2.5's `text_config`, digest §1.1).

  embed -> [dense layer] x first_k_dense_replace -> [MLA + MoE layer] x rest -> RMSNorm -> lm_head

Each group of identical layers is one `nn.scan` (stacked parameters with a leading `layers` axis), optionally
rematerialised, so compile time does not grow with depth. Side outputs are returned, stacked over layers:
`max_logits` [num_layers, heads] (QK-Clip, digest §8), `expert_load` [moe_layers, E] (logging and the bias
update), and `aux_loss` (the optional sequence-level balance loss). With `num_nextn_predict_layers=1` a
DeepSeek-V3 multi-token-prediction layer adds `mtp_logits` (predicting token i+2 at position i).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from k25jax.model.layers import Linear, RMSNorm, SwiGLU, dtype_of
from k25jax.model.mla import MLA
from k25jax.model.moe import MoE

REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _by_value(x):
  """A hashable, tagged key for a plain config tree (`ConfigDict.to_dict()`); `_from_key` inverts it."""
  if isinstance(x, dict):
    return "dict", tuple(sorted((k, _by_value(v)) for k, v in x.items()))
  if isinstance(x, (list, tuple)):
    return type(x).__name__, tuple(_by_value(v) for v in x)
  hash(x)
  return "leaf", x


def _from_key(key):
  tag, value = key
  if tag == "dict":
    return {k: _from_key(v) for k, v in value}
  if tag in ("list", "tuple"):
    return (list if tag == "list" else tuple)(_from_key(v) for v in value)
  return value


@functools.lru_cache(maxsize=64)
def _frozen(key) -> ml_collections.FrozenConfigDict:
  return ml_collections.FrozenConfigDict(_from_key(key))


def freeze(config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """config as a FrozenConfigDict. Equal configs give the same object (memoised by value), so the caches keyed on
  it (`jax.jit` static arguments, `functools.lru_cache`) hit on identity instead of comparing configs field by
  field (about a millisecond per `sample.generate` call)."""
  if isinstance(config, ml_collections.FrozenConfigDict):
    return config
  try:
    key = _by_value(config.to_dict())
  except TypeError:   # an unhashable field value: no memo
    return ml_collections.FrozenConfigDict(config)
  return _frozen(key)


class DecoderLayer(nn.Module):
  """Pre-norm block: x += MLA(norm(x)); x += (MoE | SwiGLU)(norm(x))."""
  config: ml_collections.FrozenConfigDict
  use_moe: bool

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, dict]:
    m = self.config
    norm = lambda name: RMSNorm(m.rms_norm_eps, m.dtype, m.param_dtype, name=name)
    attn, max_logit = MLA(m, name="self_attn")(norm("input_layernorm")(x), positions, segment_ids)
    x = x + attn
    h = norm("post_attention_layernorm")(x)
    aux = {"max_logits": max_logit}
    if self.use_moe:
      y, moe_aux = MoE(m, name="mlp")(h, segment_ids > 0)
      aux.update(moe_aux)
    else:
      y = SwiGLU(m.intermediate_size, m.dtype, m.param_dtype, m.initializer_range, name="mlp")(h)
    return nn.with_logical_constraint(x + y, ("batch", "length", "act_embed")), aux


def layer_stack(m: ml_collections.FrozenConfigDict, use_moe: bool, length: int, name: str) -> nn.Module:
  """`length` scanned copies of DecoderLayer with the configured remat policy."""
  cls = DecoderLayer
  if m.remat_policy != "none":
    cls = nn.remat(cls, policy=REMAT_POLICIES[m.remat_policy], prevent_cse=False)
  scanned = nn.scan(cls, variable_axes={"params": 0, "moe_state": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast), length=length, unroll=min(m.scan_unroll, length),
                    metadata_params={nn.PARTITION_NAME: "layers"})
  return scanned(m, use_moe, name=name)


class MTPLayer(nn.Module):
  """DeepSeek-V3 multi-token prediction: h' = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]) -> block -> norm."""
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, h, next_embeds, positions, segment_ids):
    m = self.config
    norm = lambda name: RMSNorm(m.rms_norm_eps, m.dtype, m.param_dtype, name=name)
    x = jnp.concatenate([norm("enorm")(next_embeds), norm("hnorm")(h)], axis=-1)
    x = Linear(m.hidden_size, (None, "embed"), m.dtype, m.param_dtype, m.initializer_range, name="eh_proj")(x)
    x, aux = DecoderLayer(m, use_moe=m.num_hidden_layers > m.first_k_dense_replace, name="block")(
        x, positions, segment_ids)
    return norm("shared_head_norm")(x), aux


class K2LM(nn.Module):
  """Kimi K2 decoder-only MoE LM. `config` is the `config.model` group."""
  config: ml_collections.ConfigDict

  def setup(self):
    m = freeze(self.config)
    self.m = m
    self.embed_tokens = nn.Embed(m.vocab_size, m.hidden_size, param_dtype=dtype_of(m.param_dtype),
                                 embedding_init=nn.with_logical_partitioning(
                                     nn.initializers.normal(m.initializer_range), ("vocab", "embed")))
    n_dense = m.first_k_dense_replace
    n_moe = m.num_hidden_layers - n_dense
    self.dense_layers = layer_stack(m, False, n_dense, "dense_layers") if n_dense else None
    self.moe_layers = layer_stack(m, True, n_moe, "moe_layers") if n_moe else None
    self.norm = RMSNorm(m.rms_norm_eps, m.dtype, m.param_dtype)
    self.lm_head = Linear(m.vocab_size, ("embed", "vocab"), m.dtype, m.param_dtype, m.initializer_range)
    self.mtp = MTPLayer(m) if m.num_nextn_predict_layers else None

  def embed(self, tokens: jax.Array) -> jax.Array:
    x = self.embed_tokens(tokens).astype(dtype_of(self.m.dtype))
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

  def head(self, h: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(self.lm_head(h), ("batch", "length", "act_vocab"))

  def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
               input_embeds: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """tokens/positions/segment_ids [B, L] (segment 0 = padding) -> (logits [B, L, V], aux)."""
    m = self.m
    x = self.embed(tokens) if input_embeds is None else input_embeds.astype(dtype_of(m.dtype))
    max_logits, aux = [], {}
    for stack in (self.dense_layers, self.moe_layers):
      if stack is not None:
        x, a = stack(x, positions, segment_ids)
        max_logits.append(a["max_logits"])
        for key in ("expert_load", "aux_loss"):
          if key in a:
            aux[key] = a[key]
    aux["max_logits"] = jnp.concatenate(max_logits, axis=0)
    if "aux_loss" in aux:
      aux["aux_loss"] = jnp.sum(aux["aux_loss"])
    logits = self.head(self.norm(x))
    if self.mtp is not None:
      next_embeds = self.embed(jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1))
      h_mtp, mtp_aux = self.mtp(x, next_embeds, positions, segment_ids)
      aux["mtp_logits"] = self.head(h_mtp)
      aux["mtp_max_logits"] = mtp_aux["max_logits"]
    return logits, aux
