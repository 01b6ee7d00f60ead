"""Model FLOPs of the Kimi K2 LM, for MFU (MaxText's convention: MFU = model FLOPs per step / step time / peak).

Per token, forward:
  2 x (active matrix parameters)   every matmul the token goes through: attention projections, the dense MLP or
                                   the router + k routed experts + shared experts, and the LM head; the embedding
                                   lookup and norms are not matmuls and are not counted
  + attention                      per layer 2 H (d_qk + d_v) x mean causal context (seq_len / 2, the causal halving
                                   MaxText adopted), i.e. QK^T and AV
Training = 3 x forward (backward = 2 x forward). Recomputation from remat is not counted (model FLOPs, not
hardware FLOPs).
"""

from __future__ import annotations

import ml_collections


def matmul_params_per_token(m: ml_collections.ConfigDict) -> int:
  """Active matrix parameters per token (the LM head included, embedding excluded)."""
  d, h = m.hidden_size, m.num_attention_heads
  qk, v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
  q = d * m.q_lora_rank + m.q_lora_rank * h * qk if m.q_lora_rank else d * h * qk
  attn = q + d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * h * (m.qk_nope_head_dim + v) + h * v * d
  dense = 3 * d * m.intermediate_size
  moe = d * m.n_routed_experts + 3 * d * m.moe_intermediate_size * (m.num_experts_per_tok + m.n_shared_experts)
  n_dense = m.first_k_dense_replace
  n_moe = m.num_hidden_layers - n_dense
  return m.num_hidden_layers * attn + n_dense * dense + n_moe * moe + d * m.vocab_size


def attention_flops_per_token(m: ml_collections.ConfigDict, seq_len: int) -> float:
  qk, v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
  return m.num_hidden_layers * 2 * m.num_attention_heads * (qk + v) * seq_len / 2


def train_flops_per_token(m: ml_collections.ConfigDict, seq_len: int) -> float:
  return 3 * (2 * matmul_params_per_token(m) + attention_flops_per_token(m, seq_len))


def vision_train_flops(v: ml_collections.ConfigDict, text_hidden: int, item_patches, item_tokens) -> float:
  """Model FLOPs of one training step of MoonViT-3D + projector (digest §1.3) on the given media items.

  Forward: 2 x matmul parameters per patch (patch embedding, per layer wqkv/wo/fc0/fc1), attention within each
  item (2 x 2 x D x n_i per patch, QK^T and AV over the item's n_i patches: packing masks the rest), and the
  projector (4D -> 4D -> text width) per merged token; training = 3 x forward.
  """
  d, i = v.hidden_size, v.intermediate_size
  patch_dim = v.in_channels * v.patch_size ** 2
  per_patch = 2 * (patch_dim * d + v.num_hidden_layers * (4 * d * d + 2 * d * i))
  attn = v.num_hidden_layers * 4 * d * sum(int(n) ** 2 for n in item_patches)
  merged = 4 * d
  proj = 2 * (merged * merged + merged * text_hidden) * sum(int(t) for t in item_tokens)
  return 3 * (per_patch * sum(int(n) for n in item_patches) + attn + proj)
