"""The records that flow through the input pipeline (shared contract of the data modules).

A *conversation* (chat SFT/RL, evaluation) or a *document* (pre-training text or interleaved image-text) is
turned by `k25jax.data.chat` into an `Encoded` example: token ids with the media placeholders already expanded to
one `<|media_pad|>` per visual token, a loss mask, and the preprocessed media items in placeholder order.
Packing (`k25jax.data.packing`) turns a stream of `Encoded` into fixed-shape batches.

Conversation format (plain dicts, so generators and JSON files share it):
  {"messages": [{"role": "system"|"user"|"assistant"|"tool",
                 "content": [{"type": "text", "text": str},
                             {"type": "image", "image": PIL.Image | np.ndarray},
                             {"type": "video", "frames": list[np.ndarray], "fps": float}],
                 "tool_calls": [{"name": str, "arguments": str}]  # optional, assistant only
                }, ...],
   "meta": {"domain": str, "answer": str, ...}}
Document format (pre-training): {"document": [content parts as above], "meta": {...}}.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass
class Encoded:
  """One tokenised example.

  tokens: int32 [n], placeholders expanded (one media_pad id per visual token, digest §1.2).
  loss_mask: bool [n], True where the token is a training target (assistant turns / document text).
  media: `k25jax.data.media.MediaItem`s in the order of their placeholders.
  modality: "text" if no media else "vision" (used by the mixture schedule and the metrics).
  domain: source name inside the modality (e.g. "shakespeare", "ocr", "fashion_mnist").
  meta: free-form (answers for evaluation, ids).
  """
  tokens: np.ndarray
  loss_mask: np.ndarray
  media: list = dataclasses.field(default_factory=list)
  modality: str = "text"
  domain: str = ""
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.tokens = np.asarray(self.tokens, np.int32)
    self.loss_mask = np.asarray(self.loss_mask, bool)
    if self.tokens.ndim != 1 or self.tokens.shape != self.loss_mask.shape:
      raise ValueError(f"Encoded: tokens {self.tokens.shape} and loss_mask {self.loss_mask.shape} must be "
                       "equal-length 1-D arrays")
