"""Language-model losses in f32: masked next-token cross-entropy and the optional z-loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array, z_loss: float = 0.0
                  ) -> tuple[jax.Array, dict]:
  """Mean CE over `mask` positions. logits [B, L, V] (any dtype, computed in f32), targets/mask [B, L]."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  m = mask.astype(jnp.float32)
  n = jnp.maximum(m.sum(), 1.0)
  ce = jnp.sum((lse - target_logit) * m) / n
  loss = ce
  metrics = {"ce": ce, "tokens": m.sum()}
  if z_loss:
    zl = z_loss * jnp.sum(jnp.square(lse) * m) / n
    loss = loss + zl
    metrics["z_loss"] = zl
  return loss, metrics
