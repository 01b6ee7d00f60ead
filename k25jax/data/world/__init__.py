"""The procedural world: unbounded, deterministic generators of checkable multimodal examples.

Small stand-ins for the report's data categories (digest §2.1 Table 1, §2.2 data kinds): OCR renders,
shape scenes, charts and mazes (vision reasoning), a fictional knowledge base as prose and image cards,
arithmetic word problems and tiny programs. Every item is a pure function of (domain, seed, index) via
`np.random.default_rng([seed, index, domain_id])`; seeds >= EVAL_SEED_BASE are reserved for the held-out suite.

  make_example(domain, seed, index) -> conversation (user question [+ image], assistant answer)
  make_document(domain, seed, index) -> pre-training document (text, or image followed by its caption)
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from k25jax.data.world import arithmetic, charts, common, knowledge, mazes, ocr, programs, shapes
from k25jax.data.world.common import DOMAIN_IDS, EVAL_SEED_BASE, WorldItem

DOMAINS: dict[str, str] = {"ocr": "vision", "shapes": "vision", "charts": "vision", "mazes": "vision",
                           "knowledge": "text", "knowledge_cards": "vision", "arithmetic": "text",
                           "programs": "text"}

SAMPLERS: dict[str, Callable[..., WorldItem]] = {
    "ocr": ocr.sample, "shapes": shapes.sample, "charts": charts.sample, "mazes": mazes.sample,
    "knowledge": knowledge.sample, "knowledge_cards": knowledge.sample_card, "arithmetic": arithmetic.sample,
    "programs": programs.sample}

# Domains whose pre-training documents are not the item's own caption (knowledge covers every entity).
_DOCUMENTS: dict[str, Callable[[np.random.Generator], dict]] = {
    "knowledge": knowledge.document, "knowledge_cards": knowledge.document_card}


def generate(domain: str, seed: int, index: int, *, held_out: bool = False) -> WorldItem:
  """The `index`-th item of `domain` for `seed` (any index directly; held_out needs seed >= EVAL_SEED_BASE)."""
  common.check_seed(domain, seed, index, held_out=held_out)
  return SAMPLERS[domain](common.item_rng(domain, seed, index), held_out=held_out)


def make_example(domain: str, seed: int, index: int, *, held_out: bool = False) -> dict:
  """A conversation (format of `k25jax.data.example`): question [+ image] in the user turn, answer after it."""
  return common.to_conversation(generate(domain, seed, index, held_out=held_out))


def make_document(domain: str, seed: int, index: int) -> dict:
  """A pre-training document: text, or an image followed by its caption (interleaved image-text)."""
  common.check_seed(domain, seed, index, held_out=False)
  rng = common.item_rng(domain, seed, index)
  if domain in _DOCUMENTS:
    return _DOCUMENTS[domain](rng)
  return common.to_document(SAMPLERS[domain](rng, held_out=False))


__all__ = ["DOMAINS", "DOMAIN_IDS", "EVAL_SEED_BASE", "SAMPLERS", "WorldItem", "generate", "make_document",
           "make_example", "arithmetic", "charts", "knowledge", "mazes", "ocr", "programs", "shapes"]
