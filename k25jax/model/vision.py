"""MoonViT-3D vision tower over a packed patch sequence (digest §1.3 steps 1-4; paper K2.5 §4.2).

Inputs (static shapes, packed on the host, see `pack_media` and `check_vision_inputs`):
  patches         f32 [P, C*p*p]  each patch flattened as (C, p, p); items concatenated, each item in raster order
                                  frame-major, then row, then column (the order of HF `pixel_values`)
  patch_item_ids  int32 [P]       1..M = item of the patch (item m is row m-1 of `item_grid`); 0 = padding
  item_grid       int32 [M, 3]    (t, h, w) patches per item; invalid (padding) items have grid 0
  item_valid      bool  [M]
Items occupy the patch sequence contiguously in item order from position 0, padding at the end; positions
(frame, row, column) are derived from `item_grid` on device. Attention is bidirectional within each item only
(all frames of a video chunk together, "spatial_temporal") and masked on item ids; with
`attention_impl="chunked"` every item must have at most `max_item_patches` patches.

Computation (matches transformers `Kimi_K25VisionModel`):
  1. patch embedding `proj` (the stride-14 Conv2d as a matmul over flattened patches);
  2. learned pos-emb [Hp, Wp, D], bicubically resized (Keys a=-0.75, align_corners=False, clamped borders, i.e.
     PyTorch `F.interpolate`) to each item's (h, w); for t > 1, frame f adds row f of a fixed sin-cos table;
  3. 27 pre-LN blocks: x += wo(attn(rope2d(wqkv(norm0 x)))), x += fc1(gelu_tanh(fc0(norm1 x)));
     2D RoPE on interleaved pairs, pair i rotated by (column if i even else row) * theta^(-4(i//2)/head_dim),
     repeated over frames (no temporal rope);
  4. `final_layernorm`.

Parameter names follow the released checkpoint (`vision_tower.` prefix there; blocks are scanned here, so
`encoder.blocks.{i}.X` is row i of `blocks/X`). Released/`save_pretrained` tensor -> this module:
  patch_embed.proj.weight [D,C,p,p]    -> patch_embed/proj/kernel [C*p*p, D] = weight.reshape(D, -1).T
  patch_embed.proj.bias                -> patch_embed/proj/bias
  patch_embed.pos_emb.weight [Hp,Wp,D] -> patch_embed/pos_emb (same layout)
  encoder.blocks.i.wqkv.weight [3D,D]  -> blocks/wqkv/kernel[i] [D,3,heads,hd] = weight.reshape(3,heads,hd,D)
                                          .transpose(3,0,1,2) (released interleaved-pair layout; HF in memory
                                          splits it into q/k/v_proj and permutes q,k to rotate-half)
  encoder.blocks.i.wqkv.bias [3D]      -> blocks/wqkv/bias[i] [3,heads,hd]
  encoder.blocks.i.wo.weight [D,D]     -> blocks/wo/kernel[i] [heads,hd,D] = weight.T.reshape(heads,hd,D)
  encoder.blocks.i.wo.bias             -> blocks/wo/bias[i]
  encoder.blocks.i.norm0/norm1.{weight,bias} -> blocks/norm0|norm1/{scale,bias}[i]   (HF: norm1|norm2)
  encoder.blocks.i.mlp.fc0/fc1.weight  -> blocks/mlp/fc0|fc1/kernel[i] = weight.T       (HF: mlp.fc1|fc2)
  encoder.final_layernorm.{weight,bias} -> final_layernorm/{scale,bias}
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from k25jax.configs.vision import validate_vision
from k25jax.model.block_attention import block_attention

_BICUBIC_A = -0.75  # Keys kernel of PyTorch's bicubic interpolation


def _part(init, names: Sequence[str | None]):
  return nn.with_logical_partitioning(init, tuple(names))


# ----------------------------------------------------------------------------------------------- positions


def bicubic_weights(index: jax.Array, out_size: jax.Array, in_size: int) -> jax.Array:
  """Row `index` of the [out_size, in_size] bicubic resize matrix, for arrays of indices and sizes.

  PyTorch `F.interpolate(mode='bicubic', align_corners=False)` along one axis (digest §1.3 step 2): source
  coordinate (i + 0.5) * in/out - 0.5, four Keys (a = -0.75) taps at floor-1..floor+2, taps clamped to the
  border (so border weights accumulate). Returns f32 [..., in_size].
  """
  index = jnp.asarray(index, jnp.float32)
  src = (index + 0.5) * (in_size / jnp.maximum(jnp.asarray(out_size, jnp.float32), 1.0)) - 0.5
  floor = jnp.floor(src)
  offsets = jnp.arange(-1, 3, dtype=jnp.float32)
  dist = jnp.abs(src[..., None] - floor[..., None] - offsets)
  a = _BICUBIC_A
  near = ((a + 2) * dist - (a + 3)) * dist * dist + 1
  far = ((a * dist - 5 * a) * dist + 8 * a) * dist - 4 * a
  w = jnp.where(dist <= 1, near, far)
  taps = jnp.clip(floor[..., None] + offsets, 0, in_size - 1).astype(jnp.int32)
  return jnp.sum(jax.nn.one_hot(taps, in_size, dtype=jnp.float32) * w[..., None], axis=-2)


def bicubic_resize_matrix(out_size: int, in_size: int) -> jax.Array:
  """[out_size, in_size] matrix A with A @ x == PyTorch bicubic resize of x along axis 0 (digest §1.3)."""
  return bicubic_weights(jnp.arange(out_size), out_size, in_size)


def time_embedding_table(num_frames: int, dim: int) -> np.ndarray:
  """[num_frames + 1, dim] fixed sin-cos time table; row 0 is zero (images), row f+1 is frame f (digest §1.3)."""
  inv = 1.0 / (10000.0 ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  freqs = np.outer(np.arange(num_frames, dtype=np.float32), inv)
  table = np.concatenate([np.sin(freqs), np.cos(freqs)], axis=1)
  return np.concatenate([np.zeros((1, dim), np.float32), table], axis=0).astype(np.float32)


def item_patch_starts(patch_item_ids: jax.Array, num_items: int) -> jax.Array:
  """First patch index of every item (ids 1..M, 0 = padding), read from the ids themselves.

  A global batch concatenates every host's patch budget, each ending in padding, so items are contiguous and in
  order but not gap-free: starts cannot be cumulative grid sizes. Items without patches get a start past the end.
  """
  ids = jnp.asarray(patch_item_ids, jnp.int32)
  p = ids.shape[0]
  idx = jnp.where(ids > 0, jnp.arange(p, dtype=jnp.int32), p)
  return jnp.minimum(jax.ops.segment_min(idx, jnp.maximum(ids - 1, 0), num_segments=num_items), p)


def patch_positions(patch_item_ids: jax.Array, item_grid: jax.Array) -> dict[str, jax.Array]:
  """Per-patch (item, frame, row, col) and its item's (t, h, w), derived on device (digest §1.3).

  Items are contiguous runs of patches in item order (padding may sit between them, e.g. at host boundaries);
  padding patches get zeros and a 1x1x1 grid so that nothing divides by zero.
  """
  grid, patch_item_ids = jnp.asarray(item_grid, jnp.int32), jnp.asarray(patch_item_ids, jnp.int32)
  starts = item_patch_starts(patch_item_ids, grid.shape[0])
  pad = patch_item_ids <= 0
  item = jnp.maximum(patch_item_ids - 1, 0)
  g = jnp.where(pad[:, None], 1, grid[item])
  t, h, w = g[:, 0], jnp.maximum(g[:, 1], 1), jnp.maximum(g[:, 2], 1)
  within = jnp.where(pad, 0, jnp.arange(patch_item_ids.shape[0]) - starts[item])
  return dict(item=item, frame=within // (h * w), row=(within % (h * w)) // w, col=within % w, t=t, h=h, w=w)


def rope_2d(x: jax.Array, row: jax.Array, col: jax.Array, theta: float) -> jax.Array:
  """2D RoPE on interleaved pairs, in f32 (digest §1.3 step 3): x [P, heads, hd], row/col [P].

  Pair i = dims (2i, 2i+1) rotates by angle (col if i is even else row) * theta^(-4 (i // 2) / hd).
  """
  hd = x.shape[-1]
  inv = 1.0 / (theta ** (np.arange(0, hd // 2, 2, dtype=np.float32) / (hd // 2)))
  ang = jnp.stack([col.astype(jnp.float32)[:, None] * inv, row.astype(jnp.float32)[:, None] * inv], axis=-1)
  ang = ang.reshape(x.shape[0], 1, hd // 2)
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], hd // 2, 2)
  x0, x1 = xf[..., 0], xf[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------------------------- modules


class PatchEmbed(nn.Module):
  """Patch projection + resized learned pos-emb + time embedding (digest §1.3 steps 1-2)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, patches: jax.Array, pos: dict[str, jax.Array]) -> jax.Array:
    c = self.config
    d, hp, wp = c.hidden_size, c.pos_emb_height, c.pos_emb_width
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    x = nn.Dense(d, dtype=dt, param_dtype=pdt, name="proj",
                 kernel_init=_part(nn.initializers.lecun_normal(), ("patch_in", "vit_embed")),
                 bias_init=_part(nn.initializers.zeros, ("vit_embed",)))(patches)
    table = self.param("pos_emb", _part(nn.initializers.normal(c.initializer_range),
                                        ("pos_h", "pos_w", "vit_embed")), (hp, wp, d), pdt)
    # Per-patch separable bicubic weights; their outer product [P, Hp*Wp] (4096 floats a patch at full size)
    # times the flattened table is the patch's row of the resized pos-emb.
    wr = bicubic_weights(pos["row"], pos["h"], hp)
    wc = bicubic_weights(pos["col"], pos["w"], wp)
    w2 = (wr[:, :, None] * wc[:, None, :]).reshape(-1, hp * wp)
    pe = jnp.dot(w2, table.reshape(hp * wp, d).astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    frame_index = jnp.where(pos["t"] > 1, pos["frame"] + 1, 0)
    pe = pe + jnp.asarray(time_embedding_table(c.pos_emb_time, d))[frame_index]
    return (x.astype(jnp.float32) + pe).astype(dt)


class VisionMLP(nn.Module):
  """fc1(gelu_tanh(fc0(x))) (digest §1.3 step 4)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    kw = dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    h = nn.Dense(c.intermediate_size, name="fc0", **kw,
                 kernel_init=_part(nn.initializers.lecun_normal(), ("vit_embed", "vit_mlp")),
                 bias_init=_part(nn.initializers.zeros, ("vit_mlp",)))(x)
    h = jax.nn.gelu(h, approximate=True)
    return nn.Dense(c.hidden_size, name="fc1", **kw,
                    kernel_init=_part(nn.initializers.lecun_normal(), ("vit_mlp", "vit_embed")),
                    bias_init=_part(nn.initializers.zeros, ("vit_embed",)))(h)


class Projection(nn.Module):
  """x @ kernel + bias contracting the last `n_in` axes of x into `features`, with logical names on the kernel.

  Multi-axis kernels (wqkv [D, 3, heads, hd], wo [heads, hd, D]) are created in their final shape so that their
  logical names apply at init (flax `DenseGeneral` initialises a flattened kernel, which breaks under a mesh).
  """
  features: tuple[int, ...]
  n_in: int
  names: tuple[str | None, ...]
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    n_in, n_out = self.n_in, len(self.features)
    shape = tuple(x.shape[-n_in:]) + tuple(self.features)
    init = nn.initializers.lecun_normal(in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param("kernel", _part(init, self.names), shape, pdt)
    bias = self.param("bias", _part(nn.initializers.zeros, self.names[n_in:]), tuple(self.features), pdt)
    y = jax.lax.dot_general(x.astype(dt), kernel.astype(dt),
                            ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
    return y + bias.astype(dt)


def _layer_norm(c: ml_collections.ConfigDict, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
                      scale_init=_part(nn.initializers.ones, ("norm",)),
                      bias_init=_part(nn.initializers.zeros, ("norm",)), name=name)


def _shift_chunks(x: jax.Array, offset: int) -> jax.Array:
  """y[j] = x[j + offset] along axis 0, zero-filled outside (a static slice and pad: a halo exchange when sharded)."""
  if offset == 0:
    return x
  fill = [(0, 0)] * (x.ndim - 1)
  if offset > 0:
    return jnp.pad(x[offset:], [(0, offset)] + fill)
  return jnp.pad(x[:offset], [(-offset, 0)] + fill)


def packed_attention(q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array, *, impl: str = "dense",
                     chunk: int = 1024, max_item_patches: int = 16384) -> jax.Array:
  """Bidirectional attention within each packed item (digest §1.3 step 3): q, k, v [P, heads, hd], ids [P].

  Query i attends to keys j with ids[j] == ids[i] > 0, softmax in f32. `dense` materialises the [heads, P, P]
  logits. `chunked` gives the same valid rows in O(P * window) memory: the sequence is cut into chunks of `chunk`
  patches; items are contiguous runs of at most `max_item_patches` patches, so a query's keys lie within
  n = ceil((max_item_patches - 1) / chunk) chunks on either side; those 2n+1 key chunks are visited by a
  `lax.scan` with an online softmax (flash attention), its body rematerialised so that the backward pass keeps
  only the running (max, sum, output) per step. `blocks` (`k25jax.model.block_attention`) visits only the
  (query block, key block) pairs of `chunk` patches that share an item, a data-dependent list, so its work follows
  the items packed and needs no item bound. Padding rows (id 0) are not defined: dense gives them a uniform mix
  over all keys, chunked and blocks give zeros; downstream drops them.
  """
  p, heads, hd = q.shape
  dt = v.dtype
  scale = hd ** -0.5
  if impl == "dense":
    mask = (ids[:, None] == ids[None, :]) & (ids[None, :] > 0)
    logits = jnp.einsum("qhd,khd->hqk", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    return jnp.einsum("hqk,khd->qhd", probs, v)
  if impl == "blocks":
    return block_attention(q, k, v, ids, chunk)
  c = min(chunk, p)
  pad = -p % c
  if pad:
    q, k, v = (jnp.pad(a, ((0, pad), (0, 0), (0, 0))) for a in (q, k, v))
    ids = jnp.pad(ids, (0, pad))
  nc = (p + pad) // c
  n = min(-(-(max_item_patches - 1) // c), nc - 1)
  to_chunks = lambda a: nn.with_logical_constraint(a.reshape(nc, c, *a.shape[1:]),  # noqa: E731
                                                   ("patch", None, "act_heads", None)[:a.ndim + 1])
  qc, kc, vc, idc = (to_chunks(a) for a in (q, k, v, ids))
  offsets = range(-n, n + 1)
  windows = tuple(jnp.stack([_shift_chunks(a, o) for o in offsets]) for a in (kc, vc, idc))
  neg = jnp.finfo(jnp.float32).min

  @jax.checkpoint
  def visit(carry, window):
    acc, m, l = carry
    kb, vb, ib = window
    s = jnp.einsum("jqhd,jkhd->jhqk", qc, kb, preferred_element_type=jnp.float32) * scale
    mask = (idc[:, None, :, None] == ib[:, None, None, :]) & (ib[:, None, None, :] > 0)
    m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, neg), axis=-1))
    e = jnp.exp(jnp.where(mask, s - m_new[..., None], -jnp.inf))  # masking the argument keeps gradients finite
    alpha = jnp.exp(m - m_new)
    acc = alpha[..., None] * acc + jnp.einsum("jhqk,jkhd->jhqd", e.astype(dt), vb,
                                              preferred_element_type=jnp.float32)
    return (acc, m_new, alpha * l + jnp.sum(e, axis=-1)), None

  init = (jnp.zeros((nc, heads, c, hd), jnp.float32), jnp.full((nc, heads, c), neg, jnp.float32),
          jnp.zeros((nc, heads, c), jnp.float32))
  vma = tuple(sorted(jax.typeof(qc).manual_axis_type.varying))  # shard_map axes q varies over (DEP phase 1)
  if vma:  # the scan carry must vary over the same axes as the body's output
    init = jax.lax.pcast(init, vma, to="varying")
  (acc, _, l), _ = jax.lax.scan(visit, init, windows)
  out = acc / jnp.where(l > 0, l, 1.0)[..., None]
  return out.transpose(0, 2, 1, 3).reshape(nc * c, heads, hd)[:p].astype(dt)


class VisionBlock(nn.Module):
  """Pre-LN encoder block with per-item bidirectional attention and 2D RoPE (digest §1.3 step 4).

  Attention (`packed_attention`, `config.attention_impl`) is masked to same-item pairs; padding rows are dropped
  downstream.
  """
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, ids: jax.Array, row: jax.Array, col: jax.Array) -> tuple[jax.Array, None]:
    c = self.config
    heads = c.num_attention_heads
    hd = c.hidden_size // heads
    qkv = Projection((3, heads, hd), 1, ("vit_embed", None, "vit_heads", None), c, name="wqkv")(
        _layer_norm(c, "norm0")(x))
    q = rope_2d(qkv[:, 0], row, col, c.rope_theta)
    k = rope_2d(qkv[:, 1], row, col, c.rope_theta)
    o = packed_attention(q, k, qkv[:, 2], ids, impl=c.attention_impl, chunk=c.attention_chunk,
                         max_item_patches=c.max_item_patches)
    x = x + Projection((c.hidden_size,), 2, ("vit_heads", None, "vit_embed"), c, name="wo")(o)
    x = nn.with_logical_constraint(x, ("patch", "act_vit_embed"))
    x = x + VisionMLP(c, name="mlp")(_layer_norm(c, "norm1")(x))
    return nn.with_logical_constraint(x, ("patch", "act_vit_embed")), None


_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots}


class MoonViT3D(nn.Module):
  """The MoonViT-3D tower (digest §1.3 steps 1-4): packed patches -> final-LN hidden states [P, D].

  `config` is `config.model.vision`. Blocks are scanned (`blocks`, leading axis `layers`), optionally remat'd
  (`remat_policy`: none | full | dots).
  """
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, patches: jax.Array, patch_item_ids: jax.Array, item_grid: jax.Array) -> jax.Array:
    c = self.config
    validate_vision(c)
    p, m = patches.shape[0], item_grid.shape[0]
    d_in = c.in_channels * c.patch_size ** 2
    if patches.ndim != 2 or patches.shape[1] != d_in:
      raise ValueError(f"patches has shape {patches.shape}; expected [P, {d_in}] = [P, in_channels * "
                       f"patch_size**2] (flatten each patch as (C, p, p))")
    if patch_item_ids.shape != (p,) or item_grid.shape != (m, 3):
      raise ValueError(f"patch_item_ids {patch_item_ids.shape} / item_grid {item_grid.shape}: expected [{p}] "
                       f"and [M, 3] (t, h, w per item)")
    patch_item_ids = jnp.asarray(patch_item_ids, jnp.int32)
    pos = patch_positions(patch_item_ids, item_grid)
    x = PatchEmbed(c, name="patch_embed")(patches, pos)
    x = nn.with_logical_constraint(x, ("patch", "act_vit_embed"))
    block = VisionBlock
    if c.remat_policy != "none":
      block = nn.remat(block, policy=_REMAT_POLICIES[c.remat_policy], prevent_cse=False)
    stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_hidden_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(c, name="blocks")(x, patch_item_ids, pos["row"], pos["col"])
    return _layer_norm(c, "final_layernorm")(x)


# ----------------------------------------------------------------------------------------------- host helpers


def patchify(frames: np.ndarray, patch_size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
  """[T, C, H, W] pixels -> (patches [T*h*w, C*p*p] frame-major raster order, grid (T, h, w)) (digest §1.3).

  H and W must be multiples of `patch_size` (the media preprocessing pads them).
  """
  t, ch, hh, ww = frames.shape
  if hh % patch_size or ww % patch_size:
    raise ValueError(f"frames of size {hh}x{ww} are not multiples of patch_size={patch_size}; pad or resize "
                     "them first")
  h, w = hh // patch_size, ww // patch_size
  x = frames.reshape(t, ch, h, patch_size, w, patch_size).transpose(0, 2, 4, 1, 3, 5)
  return x.reshape(t * h * w, ch * patch_size * patch_size), (t, h, w)


def pack_media(items: Sequence[tuple[np.ndarray, tuple[int, int, int]]], num_patches: int,
               max_items: int) -> dict[str, np.ndarray]:
  """Packs (patches, grid) items into the tower's fixed-shape inputs (module docstring).

  Raises ValueError when the items exceed the patch or item budget.
  """
  if len(items) > max_items:
    raise ValueError(f"{len(items)} media items exceed max_items={max_items}; raise the item budget")
  total = sum(int(np.prod(g)) for _, g in items)
  if total > num_patches:
    raise ValueError(f"media items need {total} patches but the budget is num_patches={num_patches}; raise "
                     "it or drop items")
  dim = items[0][0].shape[1] if items else 0
  patches = np.zeros((num_patches, dim), np.float32)
  ids = np.zeros((num_patches,), np.int32)
  grid = np.zeros((max_items, 3), np.int32)
  valid = np.zeros((max_items,), bool)
  off = 0
  for i, (x, g) in enumerate(items):
    n = int(np.prod(g))
    if x.shape[0] != n:
      raise ValueError(f"media item {i} has {x.shape[0]} patches but its grid {tuple(g)} needs {n}")
    patches[off:off + n], ids[off:off + n] = x, i + 1
    grid[i], valid[i] = g, True
    off += n
  return dict(patches=patches, patch_item_ids=ids, item_grid=grid, item_valid=valid)


def check_vision_inputs(patch_item_ids: np.ndarray, item_grid: np.ndarray, item_valid: np.ndarray,
                        config: ml_collections.ConfigDict) -> None:
  """Host-side check of the packing contract (cannot be checked under jit); raises ValueError naming the item.

  Valid items: 1 <= t <= pos_emb_time, h and w multiples of the merge kernel; their patches contiguous in item
  order from position 0; invalid items: grid 0 and no patches; the rest of the sequence is padding (id 0).
  """
  ids, grid, valid = np.asarray(patch_item_ids), np.asarray(item_grid), np.asarray(item_valid)
  kh, kw = (int(k) for k in config.merge_kernel_size)
  chunked = config.attention_impl == "chunked"
  expected = []
  for i, ((t, h, w), ok) in enumerate(zip(grid.tolist(), valid.tolist())):
    if not ok:
      if t or h or w:
        raise ValueError(f"media item {i} is invalid but has grid {(t, h, w)}; set its grid to (0, 0, 0)")
      continue
    if not 1 <= t <= config.pos_emb_time:
      raise ValueError(f"media item {i} has t={t} frames; a chunk holds 1..pos_emb_time={config.pos_emb_time} "
                       "frames: split the video into chunks")
    if h <= 0 or w <= 0 or h % kh or w % kw:
      raise ValueError(f"media item {i} has grid h={h}, w={w}; both must be positive multiples of the merge "
                       f"kernel {(kh, kw)}: pad the image to a multiple of {kh * config.patch_size} pixels")
    if chunked and t * h * w > config.max_item_patches:
      raise ValueError(f"media item {i} has t*h*w={t * h * w} patches but chunked attention needs at most "
                       f"model.vision.max_item_patches={config.max_item_patches}: resize it smaller or raise "
                       "max_item_patches")
    expected.append(np.full((t * h * w,), i + 1, np.int32))
  exp = np.concatenate(expected) if expected else np.zeros((0,), np.int32)
  if exp.size > ids.size:
    raise ValueError(f"media items need {exp.size} patches but patch_item_ids has only {ids.size}")
  exp = np.concatenate([exp, np.zeros((ids.size - exp.size,), np.int32)])
  bad = np.nonzero(exp != ids)[0]
  if bad.size:
    j = int(bad[0])
    raise ValueError(f"patch_item_ids[{j}]={ids[j]} but the packing contract expects {exp[j]}: items must be "
                     "contiguous in item order from position 0 with t*h*w patches each, then padding (id 0)")
