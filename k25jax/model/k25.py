"""Kimi K2.5 multimodal model: MoonViT-3D -> tpool merger + projector -> K2 LM (digest §1.2-1.3; DESIGN "model").

Early fusion: text is embedded, the vision tokens of all media items (in item order) replace the embeddings at the
`<|media_pad|>` positions (row-major over the batch), and the LM runs on the result (HF `masked_scatter`).

Submodules (checkpoint prefixes): `language_model` (K2LM), `vision_tower` (MoonViT3D), `mm_projector`
(PatchMergerProjector). Name maps are in the docstrings of `k25jax.model.vision` and `k25jax.model.projector`.

Contract: the number of media_pad tokens in `tokens` equals the number of valid vision tokens (sum over valid
items of (h/kh)(w/kw)). It cannot be checked under jit; the packer guarantees it, and `check_media_alignment`
checks it on the host. Surplus pad tokens keep their own embedding; surplus vision tokens are dropped.

The vision path runs alone with `method=K25Model.encode_media` (only the `vision_tower` and `mm_projector`
params are needed), and its output feeds the LM through `method=K25Model.forward_with_vision_tokens`, which is
what DEP (digest §7) uses to run the encoder separately and back-propagate through its output.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from k25jax.configs.validate import ConfigError
from k25jax.model.lm import K2LM
from k25jax.model.projector import PatchMergerProjector
from k25jax.model.vision import MoonViT3D, item_patch_starts


def scatter_media(embeds: jax.Array, tokens: jax.Array, vision_tokens: jax.Array, vision_valid: jax.Array,
                  media_pad_id: int) -> jax.Array:
  """embeds [B, L, D] with the k-th media_pad position (row-major) replaced by vision token k (HF masked_scatter).

  Valid vision tokens form a prefix of `vision_tokens` [N, D]; pad positions beyond their count are left as is.
  """
  b, l, d = embeds.shape
  is_pad = (jnp.asarray(tokens) == media_pad_id).reshape(-1)
  rank = jnp.cumsum(is_pad.astype(jnp.int32)) - 1
  take = is_pad & (rank < jnp.sum(jnp.asarray(vision_valid, jnp.int32)))
  src = vision_tokens[jnp.clip(rank, 0, vision_tokens.shape[0] - 1)].astype(embeds.dtype)
  return jnp.where(take[:, None], src, embeds.reshape(-1, d)).reshape(b, l, d)


class K25Model(nn.Module):
  """K2.5 = K2 LM + MoonViT-3D + patch-merger projector (digest §1.2-1.3). `config` is `config.model`."""
  config: ml_collections.ConfigDict

  def setup(self) -> None:
    m = self.config
    if not m.vision.enabled:
      raise ConfigError("K25Model needs model.vision.enabled=True; use K2LM for a text-only model")
    self.language_model = K2LM(m)
    self.vision_tower = MoonViT3D(m.vision)
    self.mm_projector = PatchMergerProjector(m.vision, m.hidden_size)

  def encode_media(self, patches: jax.Array, patch_item_ids: jax.Array, item_grid: jax.Array,
                   item_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Vision path alone: packed patches -> (tokens [P // (kh*kw), hidden] in item order, valid [N])."""
    hidden = self.vision_tower(patches, patch_item_ids, item_grid)
    starts = item_patch_starts(patch_item_ids, item_grid.shape[0])
    return self.mm_projector(hidden, item_grid, item_valid, starts)

  def forward_with_vision_tokens(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                                 vision_tokens: jax.Array, vision_valid: jax.Array, *,
                                 media_pad_id: int) -> tuple[jax.Array, dict]:
    """LM on text embeddings with precomputed vision tokens scattered at the media_pad positions."""
    embeds = scatter_media(self.language_model.embed(tokens), tokens, vision_tokens, vision_valid, media_pad_id)
    return self.language_model(tokens, positions, segment_ids, input_embeds=embeds)

  def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, patches: jax.Array,
               patch_item_ids: jax.Array, item_grid: jax.Array, item_valid: jax.Array, *,
               media_pad_id: int) -> tuple[jax.Array, dict]:
    """tokens/positions/segment_ids [B, L] + packed media -> (logits [B, L, V], aux of the LM)."""
    vision_tokens, vision_valid = self.encode_media(patches, patch_item_ids, item_grid, item_valid)
    return self.forward_with_vision_tokens(tokens, positions, segment_ids, vision_tokens, vision_valid,
                                           media_pad_id=media_pad_id)


def media_inputs(vision: ml_collections.ConfigDict, num_patches: int, max_items: int) -> dict[str, jax.Array]:
  """Dummy (all-padding) media inputs for `init` / `eval_shape`."""
  return dict(patches=jnp.zeros((num_patches, vision.in_channels * vision.patch_size ** 2), jnp.float32),
              patch_item_ids=jnp.zeros((num_patches,), jnp.int32),
              item_grid=jnp.zeros((max_items, 3), jnp.int32), item_valid=jnp.zeros((max_items,), bool))


def vision_param_shapes(model_cfg: ml_collections.ConfigDict) -> Any:
  """Abstract `params` of the vision path (`vision_tower`, `mm_projector`) of K25Model, via eval_shape."""
  x = media_inputs(model_cfg.vision, 4, 1)
  abstract = jax.eval_shape(lambda k: K25Model(model_cfg).init(k, **x, method=K25Model.encode_media),
                            jax.random.key(0))
  return nn.unbox(abstract)["params"]


def count_vision_params(config: ml_collections.ConfigDict) -> dict[str, int]:
  """`vision_params` / `projector_params` of a full config (for `k25jax.model.summary`)."""
  p = vision_param_shapes(config.model)
  size = lambda t: int(sum(np.prod(a.shape) for a in jax.tree.leaves(t)))
  return dict(vision_params=size(p["vision_tower"]), projector_params=size(p["mm_projector"]))


def check_media_alignment(tokens: np.ndarray, item_grid: np.ndarray, item_valid: np.ndarray, *, media_pad_id: int,
                          merge_kernel_size: tuple[int, int] = (2, 2), num_vision_slots: int | None = None) -> None:
  """Host-side check that media_pad tokens and valid vision tokens match in number (the packer's guarantee).

  Raises ValueError with both counts. `num_vision_slots` (P // (kh*kw)), when given, must hold all tokens.
  """
  kh, kw = merge_kernel_size
  grid, valid = np.asarray(item_grid), np.asarray(item_valid).astype(bool)
  n_vis = int(np.sum(np.where(valid, (grid[:, 1] // kh) * (grid[:, 2] // kw), 0)))
  n_pad = int(np.sum(np.asarray(tokens) == media_pad_id))
  if n_pad != n_vis:
    raise ValueError(f"tokens hold {n_pad} media_pad tokens (id {media_pad_id}) but the valid media items give "
                     f"{n_vis} vision tokens ((h/{kh})*(w/{kw}) per item); expand each placeholder to its item's "
                     "token count and keep items and placeholders in the same order")
  if num_vision_slots is not None and n_vis > num_vision_slots:
    raise ValueError(f"{n_vis} vision tokens exceed the {num_vision_slots} static slots (num_patches // "
                     f"{kh * kw}); raise the patch budget")
