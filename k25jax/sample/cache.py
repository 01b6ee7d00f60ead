"""MLA's compressed decode cache and absorbed-form attention over it (digest §1.1, "MLA forward pass").

Per token and layer the cache holds only what `MLA.project_latent` returns: the normed latent c_kv [kv_lora] and
the roped shared key k_rot [rope], concatenated into kv_lora + rope values (576 at full size), instead of
H * (nope + v) + H * rope expanded keys/values. Decode never expands them (DeepSeek-V3's absorbed form): with
kv_b_proj = [W_uk | W_uv] per head,

  q_nope . k_nope = q_nope . (c W_uk) = (q_nope W_uk^T) . c        (a query in latent space)
  sum_s p_s v_s   = (sum_s p_s c_s) W_uv                            (attention over latents, then W_uv)

Layout: `latent` [layers, B, max_len, kv_lora + rope], dtype = compute dtype by default. Sharding comes from
the logical names `CACHE_AXES` = (layers, batch, length, act_kv_lora) through the mesh rules: under the default
rules the batch is split over `("data", "fsdp", "expert")` and layers, slots and the latent are replicated (the
latent is shared by all heads, so splitting it over `tensor` would add a reduction inside every logit; the heads
are split over `tensor` in the projections instead). Rules that map `act_kv_lora` to `tensor` shard the latent
too. The latent's name is not the weights' `kv_lora`: that one claims `fsdp`, and a mesh axis serves one name
per array, which would leave the batch unsplit.

Slots are left-padded: every row's prompt ends at slot P - 1 (P = prompt bucket) and generated token t sits at
slot P + t, so one `dynamic_update_slice` writes a step for the whole batch. A slot's segment id is 1 when it
holds a real token and 0 otherwise; its position counts from the row's first real token. Those two arrays feed
`k25jax.model.mla.attention_mask`, the same mask the model's forward uses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from k25jax.kernels import absorbed_attention_cpu
from k25jax.model.layers import dtype_of
from k25jax.model.mla import NEG_INF
from k25jax.sharding import BATCH_AXES, logical_sharding

CACHE_AXES = ("layers", "batch", "length", "act_kv_lora")


def latent_width(m: ml_collections.ConfigDict) -> int:
  """kv_lora + rope values cached per token and layer (576 for the released K2.5)."""
  return int(m.kv_lora_rank + m.qk_rope_head_dim)


def init_cache(m: ml_collections.ConfigDict, batch: int, max_len: int, dtype: str | None = None) -> jax.Array:
  """Zeroed latent cache [num_hidden_layers, batch, max_len, kv_lora + rope] (dtype: `m.dtype` unless given)."""
  return jnp.zeros((m.num_hidden_layers, batch, max_len, latent_width(m)), dtype_of(dtype or m.dtype))


def cache_sharding(mesh: Mesh, rules) -> NamedSharding:
  """The cache's sharding under logical-axis `rules` (module docstring)."""
  return logical_sharding(mesh, rules, CACHE_AXES)


def slot_segments_and_positions(lengths: jax.Array, prompt_len: int, max_len: int
                                ) -> tuple[jax.Array, jax.Array]:
  """Segment ids [B, max_len] (1 = a real token's slot, prompt padding 0) and positions of left-padded rows.

  Row b's prompt of `lengths[b]` tokens fills slots [P - len_b, P); generated tokens follow at P, P + 1, ...
  Slots after the current step carry segment 1 but positions beyond the query, so causality masks them.
  """
  slots = jnp.arange(max_len, dtype=jnp.int32)[None, :]
  start = (prompt_len - lengths.astype(jnp.int32))[:, None]
  segment_ids = (slots >= start).astype(jnp.int32)
  positions = jnp.maximum(slots - start, 0)
  return segment_ids, positions


def absorbed_attention(q_nope: jax.Array, q_rot: jax.Array, latent: jax.Array, kv_b_kernel: jax.Array,
                       mask: jax.Array, scale: float, kv_lora: int) -> jax.Array:
  """Attention of queries over cached latents without expanding keys or values (module docstring).

  q_nope [B,L,H,nope], q_rot [B,L,H,rope] (roped), latent [B,S,kv_lora+rope] (c_kv | k_rot), kv_b_kernel
  [kv_lora, H*(nope+v)] (kv_b_proj, per head k_nope columns then v columns), mask [B,L,S] bool.
  Returns [B, L, H, v] in q's dtype. Logits and softmax statistics in f32.

  The latent-space query [q_nope W_uk^T | q_rot] meets the whole cached row [c | k_rot] in ONE batched matmul
  (q_lat.c + q_rot.k_rot), and probabilities multiply whole rows before the k_rot columns are dropped: the
  cache is never sliced (a slice is a copy of the cache per layer and step on XLA:CPU). Queries and heads share
  the matmul's row dimension, so both products are plain [B] batched matmuls.
  """
  b, l, h, nope = q_nope.shape
  w = kv_b_kernel.astype(q_nope.dtype).reshape(kv_lora, h, -1)
  w_uk, w_uv = w[..., :nope], w[..., nope:]
  q_lat = jnp.einsum("blhn,chn->blhc", q_nope, w_uk)
  q = jnp.concatenate([q_lat, q_rot.astype(q_lat.dtype)], axis=-1).reshape(b, l * h, -1)
  rows = latent.astype(q.dtype)
  logits = jnp.einsum("bmw,bsw->bms", q, rows, preferred_element_type=jnp.float32) * scale
  keep = jnp.broadcast_to(mask[:, :, None], (b, l, h, mask.shape[-1])).reshape(b, l * h, -1)
  probs = jax.nn.softmax(jnp.where(keep, logits, NEG_INF), axis=-1)
  o_lat = jnp.einsum("bms,bsw->bmw", probs.astype(rows.dtype), rows)[..., :kv_lora].reshape(b, l, h, kv_lora)
  return jnp.einsum("blhc,chv->blhv", o_lat, w_uv)


def absorbed_attention_kernel(q_nope: jax.Array, q_rot: jax.Array, latent: jax.Array, kv_b_kernel: jax.Array,
                              mask: jax.Array, scale: float, kv_lora: int) -> jax.Array:
  """`absorbed_attention` through the XLA:CPU kernel (`k25jax.kernels.absorbed_attention_cpu`; float32,
  forward only), each device on its own rows and heads: `jax.shard_map` with the batch over the batch axes and the
  heads (and kv_b_proj's per-head columns) over `tensor`. Without a context mesh, or on one device, the kernel
  itself."""
  kernel = lambda *a: absorbed_attention_cpu.absorbed_attention(*a, scale, kv_lora)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(q_nope, q_rot, latent, kv_b_kernel, mask)
  heads, rows = P(BATCH_AXES, None, "tensor", None), P(BATCH_AXES, None, None)
  return jax.shard_map(kernel, in_specs=(heads, heads, rows, P(None, "tensor"), rows), out_specs=heads,
                       check_vma=False)(q_nope, q_rot, latent, kv_b_kernel, mask)
