"""tpool patch merger + `patchmerger` projector (digest §1.3 steps 5-6; paper K2.5 §4.2 temporal pooling).

Merger: each valid item (t, h, w) gives (h/kh)(w/kw) tokens in raster order of its kh x kw blocks; a token holds
its block's kh*kw patches (in (row, col) order), each averaged over the item's t frames. Tokens of all items are
concatenated in item order into N = P // (kh*kw) static slots (an upper bound; a video chunk of t frames uses
only 1/t of its share), with a validity mask; valid tokens form a prefix.

Projector: `pre_norm` LayerNorm per patch (after the temporal mean, as in HF/vLLM) -> concat the kh*kw patches
(D*kh*kw) -> `proj_0` Linear -> exact GELU -> `proj_2` Linear to the text hidden size.

Released/`save_pretrained` names -> this module (params of `mm_projector`):
  mm_projector.pre_norm.{weight,bias} -> pre_norm/{scale,bias}
  mm_projector.proj.0.{weight,bias}   -> proj_0/{kernel = weight.T, bias}   (HF in memory: in_proj)
  mm_projector.proj.2.{weight,bias}   -> proj_2/{kernel = weight.T, bias}   (HF in memory: out_proj)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections


def _part(init, names):
  return nn.with_logical_partitioning(init, tuple(names))


def tpool_patch_merger(hidden: jax.Array, item_grid: jax.Array, item_valid: jax.Array,
                       kernel: tuple[int, int], max_frames: int, patch_starts: jax.Array | None = None
                       ) -> tuple[jax.Array, jax.Array]:
  """Spatial kh x kw merge with temporal mean over each chunk's frames (digest §1.3 step 5).

  hidden [P, D] (tower output, packing contract of `k25jax.model.vision`), item_grid [M, 3], item_valid [M];
  `max_frames` is the static bound on t; `patch_starts` [M] is each item's first patch
  (`vision.item_patch_starts`; default: items packed gap-free from 0). Returns (merged [P // (kh*kw), kh*kw, D]
  in f32, valid [N] bool).
  """
  kh, kw = kernel
  p, d = hidden.shape
  n = p // (kh * kw)
  grid = jnp.where(jnp.asarray(item_valid)[:, None], jnp.asarray(item_grid, jnp.int32), 0)
  t, h, w = grid[:, 0], grid[:, 1], grid[:, 2]
  patch_start = jnp.cumsum(t * h * w) - t * h * w if patch_starts is None else jnp.asarray(patch_starts, jnp.int32)
  ntok = (h // kh) * (w // kw)
  tok_end = jnp.cumsum(ntok)
  slot = jnp.arange(n)
  item = jnp.minimum(jnp.searchsorted(tok_end, slot, side="right"), grid.shape[0] - 1)
  valid = slot < tok_end[-1]
  q = slot - (tok_end[item] - ntok[item])
  nw = jnp.maximum(w[item] // kw, 1)
  bi, bj = q // nw, q % nw
  di, dj = jnp.arange(kh).repeat(kw), jnp.tile(jnp.arange(kw), kh)        # sub-patch order (row, col)
  rc = ((bi[:, None] * kh + di) * w[item][:, None] + bj[:, None] * kw + dj)  # [N, kh*kw] within a frame
  base = patch_start[item][:, None] + rc
  hw = (h * w)[item][:, None]
  tt = t[item]
  x32 = hidden.astype(jnp.float32)
  acc = jnp.zeros((n, kh * kw, d), jnp.float32)
  for f in range(max_frames):
    src = jnp.clip(base + f * hw, 0, p - 1)
    acc = acc + jnp.where((f < tt)[:, None, None], x32[src], 0.0)
  merged = acc / jnp.maximum(tt, 1)[:, None, None].astype(jnp.float32)
  return jnp.where(valid[:, None, None], merged, 0.0), valid


class PatchMergerProjector(nn.Module):
  """tpool merger + `patchmerger` projector (digest §1.3 steps 5-6): tower output -> text-width tokens.

  `config` is `config.model.vision`; `out_features` is the LM hidden size. Returns (tokens [N, out] in the
  compute dtype, valid [N]); invalid slots are zero.
  """
  config: ml_collections.ConfigDict
  out_features: int

  @nn.compact
  def __call__(self, hidden: jax.Array, item_grid: jax.Array, item_valid: jax.Array,
               patch_starts: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    c = self.config
    kh, kw = (int(k) for k in c.merge_kernel_size)
    dt, pdt = jnp.dtype(c.dtype), jnp.dtype(c.param_dtype)
    merged, valid = tpool_patch_merger(hidden, item_grid, item_valid, (kh, kw), c.pos_emb_time, patch_starts)
    x = nn.LayerNorm(epsilon=c.projector_ln_eps, dtype=dt, param_dtype=pdt, name="pre_norm",
                     scale_init=_part(nn.initializers.ones, ("norm",)),
                     bias_init=_part(nn.initializers.zeros, ("norm",)))(merged)
    x = x.reshape(x.shape[0], kh * kw * c.hidden_size)
    x = nn.with_logical_constraint(x, ("patch", "act_vit_embed"))
    x = nn.Dense(kh * kw * c.hidden_size, dtype=dt, param_dtype=pdt, name="proj_0",
                 kernel_init=_part(nn.initializers.lecun_normal(), ("vit_embed", "vit_mlp")),
                 bias_init=_part(nn.initializers.zeros, ("vit_mlp",)))(x)
    x = jax.nn.gelu(x, approximate=False)
    x = nn.Dense(self.out_features, dtype=dt, param_dtype=pdt, name="proj_2",
                 kernel_init=_part(nn.initializers.lecun_normal(), ("vit_mlp", "embed")),
                 bias_init=_part(nn.initializers.zeros, ("embed",)))(x)
    return jnp.where(valid[:, None], x, jnp.zeros((), x.dtype)), valid
