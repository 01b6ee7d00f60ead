"""INT4 expert weights of the released checkpoint: compressed-tensors `pack-quantized` (digest §1.1, "Released
quantization": routed experts INT4, symmetric, group size 32; attention, shared experts, dense MLP and lm_head
stay bf16).

On disk a quantized linear `X.weight` [out, in] is replaced by three tensors:
  X.weight_packed  int32 [out, ceil(in / 8)]   eight 4-bit values per word; value j of a row sits in word j // 8,
                                                bits 4 (j % 8) .. 4 (j % 8) + 3, stored as q + 8 (unsigned nibble)
  X.weight_scale   float [out, in / group]      one scale per group of `group` consecutive inputs
  X.weight_shape   int   [2]                    (out, in)
and the weight is w[o, j] = q[o, j] * scale[o, j // group] with q in [-8, 7] (symmetric: no zero point).
"""

from __future__ import annotations

import numpy as np

PACKED, SCALE, SHAPE = "weight_packed", "weight_scale", "weight_shape"


def _check_bits(num_bits: int) -> int:
  if num_bits <= 0 or 32 % num_bits:
    raise ValueError(f"num_bits={num_bits} must divide 32 (pack-quantized stores 32 // num_bits values per int32)")
  return 32 // num_bits


def dequantize_pack_quantized(packed: np.ndarray, scale: np.ndarray, shape, *, group_size: int = 32,
                              num_bits: int = 4, name: str = "tensor") -> np.ndarray:
  """Unpacks and rescales one pack-quantized weight to f32 [out, in] (the layout in the module docstring)."""
  per_word = _check_bits(num_bits)
  out_dim, in_dim = (int(s) for s in np.asarray(shape).reshape(-1))
  packed = np.asarray(packed)
  if packed.shape != (out_dim, -(-in_dim // per_word)):
    raise ValueError(f"{name}: weight_packed has shape {packed.shape} but weight_shape {(out_dim, in_dim)} needs "
                     f"{(out_dim, -(-in_dim // per_word))}; the checkpoint is not {num_bits}-bit pack-quantized "
                     "along the input dimension")
  n_groups = -(-in_dim // group_size)
  scale = np.asarray(scale, np.float32)
  if scale.shape != (out_dim, n_groups):
    raise ValueError(f"{name}: weight_scale has shape {scale.shape}, expected {(out_dim, n_groups)} for group size "
                     f"{group_size}; check quantization_config.config_groups.*.weights.group_size")
  words = packed.astype(np.uint32)
  shifts = (np.arange(per_word, dtype=np.uint32) * num_bits)
  nibbles = (words[:, :, None] >> shifts) & np.uint32((1 << num_bits) - 1)
  q = nibbles.reshape(out_dim, -1)[:, :in_dim].astype(np.int32) - (1 << (num_bits - 1))
  return q.astype(np.float32) * np.repeat(scale, group_size, axis=1)[:, :in_dim]


def quantize_pack_quantized(weight: np.ndarray, *, group_size: int = 32, num_bits: int = 4
                            ) -> dict[str, np.ndarray]:
  """Symmetric group quantization of w [out, in] to the pack-quantized tensors (inverse of the loader).

  scale = absmax(group) / ((2^bits - 1) / 2), the compressed-tensors symmetric rule; q = clip(round(w / scale)).
  Returns {weight_packed, weight_scale, weight_shape}.
  """
  per_word = _check_bits(num_bits)
  w = np.asarray(weight, np.float32)
  out_dim, in_dim = w.shape
  n_groups = -(-in_dim // group_size)
  padded = np.zeros((out_dim, n_groups * group_size), np.float32)
  padded[:, :in_dim] = w
  groups = padded.reshape(out_dim, n_groups, group_size)
  scale = np.abs(groups).max(-1) / (((1 << num_bits) - 1) / 2)
  scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
  lo, hi = -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1
  q = np.clip(np.round(groups / scale[..., None]), lo, hi).astype(np.int32).reshape(out_dim, -1)[:, :in_dim]
  n_words = -(-in_dim // per_word)
  u = np.zeros((out_dim, n_words * per_word), np.uint32)
  u[:, :in_dim] = (q - lo).astype(np.uint32)
  shifts = np.arange(per_word, dtype=np.uint32) * num_bits
  words = np.bitwise_or.reduce(u.reshape(out_dim, n_words, per_word) << shifts, axis=-1)
  return {PACKED: words.view(np.int32), SCALE: scale, SHAPE: np.array([out_dim, in_dim], np.int32)}
