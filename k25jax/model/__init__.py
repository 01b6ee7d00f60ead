"""Models: the Kimi K2 LM (`lm.K2LM`) and the K2.5 multimodal model (`k25.K25Model`: MoonViT-3D + projector + LM)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from k25jax.model.lm import K2LM

__all__ = ["K2LM", "build_lm", "build_model", "init_lm", "text_inputs"]


def build_lm(config: ml_collections.ConfigDict) -> K2LM:
  """The text-only LM of a full config."""
  return K2LM(config.model)


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """K25Model when `config.model.vision.enabled`, else the text-only K2LM."""
  if config.model.vision.enabled:
    from k25jax.model.k25 import K25Model  # noqa: PLC0415 (keeps `import k25jax.model` light)
    return K25Model(config.model)
  return K2LM(config.model)


def text_inputs(batch: int, length: int) -> dict:
  """Dummy text inputs for `init` / `eval_shape` (one segment per row)."""
  tokens = jnp.zeros((batch, length), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return dict(tokens=tokens, positions=positions, segment_ids=jnp.ones((batch, length), jnp.int32))


def init_lm(model: nn.Module, rng, batch: int = 1, length: int = 8):
  x = text_inputs(batch, length)
  return model.init(rng, x["tokens"], x["positions"], x["segment_ids"])
