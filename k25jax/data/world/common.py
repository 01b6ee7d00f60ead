"""Shared pieces of the procedural world: seeding, the item record, fonts, conversation/document builders.

The world supplies small, checkable stand-ins for the pre-training and evaluation data categories of the
report (digest §2.1 Table 1 categories, §2.2 vision data kinds: OCR, knowledge, perception, interleaving).
Every item is a pure function of (domain, seed, index): `np.random.default_rng([seed, index, domain_id])`,
so any index is reachable without generating the earlier ones.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import numpy as np
from PIL import ImageFont

# Seeds at or above this value are reserved for the held-out evaluation suite (`k25jax.evals`), so training
# streams and evaluation items can never coincide.
EVAL_SEED_BASE = 2**31
_SEED_LIMIT = 2**32

# Stable ids: the third entry of every item's seed sequence. Never renumber (it would change every item).
DOMAIN_IDS = {"ocr": 1, "shapes": 2, "charts": 3, "mazes": 4, "knowledge": 5, "knowledge_cards": 6,
              "arithmetic": 7, "programs": 8}

FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
              "DejaVuSansMono.ttf", "DejaVuSansCondensed.ttf")

# How an item's answer is scored (implemented in `k25jax.evals.scorers`): case-insensitive exact match,
# case-sensitive exact match (program output), 1 - normalised edit distance (OCR), numeric tolerance.
SCORERS = ("exact", "cased", "ned", "numeric")


@dataclasses.dataclass(frozen=True)
class WorldItem:
  """One generated item, before it is shaped into a conversation or a document.

  question: the user's text. answer: the short gold answer (what scorers compare against).
  response: the assistant's text (a worked solution ending in "Answer: <answer>", or just the answer).
  image: RGB uint8 [H, W, 3] or None. choices: candidate answers for likelihood scoring (contains `answer`).
  scorer: one of SCORERS. caption: the pre-training text that goes with the item (image caption or prose).
  meta: the domain's specification (scene, grid, path, program, ...) for checks and tools.
  """
  domain: str
  question: str
  answer: str
  response: str
  image: np.ndarray | None
  choices: tuple[str, ...]
  scorer: str
  caption: str
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def check_seed(domain: str, seed: int, index: int, *, held_out: bool) -> None:
  """Validates (domain, seed, index) and the train/eval seed split (see EVAL_SEED_BASE)."""
  if domain not in DOMAIN_IDS:
    raise ValueError(f"world: unknown domain {domain!r}; choose one of {sorted(DOMAIN_IDS)}")
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < _SEED_LIMIT:
    raise ValueError(f"world[{domain}]: seed {seed!r} must be an int in [0, 2**32)")
  if not isinstance(index, (int, np.integer)) or index < 0:
    raise ValueError(f"world[{domain}]: index {index!r} must be a non-negative int")
  if held_out and seed < EVAL_SEED_BASE:
    raise ValueError(f"world[{domain}]: held-out seed {seed} must be >= EVAL_SEED_BASE (2**31); "
                     "pass EVAL_SEED_BASE + k")
  if not held_out and seed >= EVAL_SEED_BASE:
    raise ValueError(f"world[{domain}]: seed {seed} is reserved for evaluation (>= 2**31); use a training "
                     "seed below 2**31, or held_out=True for evaluation items")


def item_rng(domain: str, seed: int, index: int) -> np.random.Generator:
  """The item's generator: `default_rng([seed, index, domain_id])` (independent of every other item)."""
  return np.random.default_rng([int(seed), int(index), DOMAIN_IDS[domain]])


@functools.lru_cache(maxsize=None)
def font(size: int, name: str = "DejaVuSans.ttf") -> ImageFont.FreeTypeFont:
  """A DejaVu font (ENVIRONMENT.md §5). Falls back, with a logged warning, to Pillow's built-in scalable font."""
  try:
    return ImageFont.truetype(name, size)
  except OSError:
    logging.warning("world: font %s not found (install fonts-dejavu-core); using ImageFont.load_default(size=%d)",
                    name, size)
    return ImageFont.load_default(size=size)


def shuffled_choices(rng: np.random.Generator, answer: str, distractors, k: int = 4) -> tuple[str, ...]:
  """`answer` plus up to k-1 distinct distractors, in a random (rng-determined) order."""
  key = lambda s: " ".join(s.split())  # multi-line and one-line forms of the same text are one choice
  pool, seen = [], {key(answer)}
  for d in map(str, distractors):
    if key(d) not in seen:
      seen.add(key(d))
      pool.append(d)
  picked = [pool[i] for i in sorted(rng.choice(len(pool), size=min(k - 1, len(pool)), replace=False))]
  out = [answer] + picked
  return tuple(out[i] for i in rng.permutation(len(out)))


def add_noise(rng: np.random.Generator, img: np.ndarray, sigma: float) -> np.ndarray:
  """Adds light Gaussian pixel noise and returns uint8."""
  noisy = img.astype(np.float32) + rng.normal(0.0, sigma, img.shape).astype(np.float32)
  return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def to_conversation(item: WorldItem, *, with_answer: bool = True) -> dict:
  """The conversation record of `k25jax.data.example`: question (+ image) in a user turn, then the answer
  (`with_answer=False`: the prompt alone, its meta holding only the domain)."""
  content = ([{"type": "image", "image": item.image}] if item.image is not None else [])
  content.append({"type": "text", "text": item.question})
  messages = [{"role": "user", "content": content}]
  if not with_answer:  # a prompt: nothing in it may reveal the answer
    return {"messages": messages, "meta": {"domain": item.domain}}
  messages.append({"role": "assistant", "content": [{"type": "text", "text": item.response}]})
  meta = {"domain": item.domain, "answer": item.answer, "choices": list(item.choices), "scorer": item.scorer}
  return {"messages": messages, "meta": meta}


def to_document(item: WorldItem) -> dict:
  """The pre-training document record: image then caption (interleaved), or the text alone."""
  parts = ([{"type": "image", "image": item.image}] if item.image is not None else [])
  parts.append({"type": "text", "text": item.caption})
  return {"document": parts, "meta": {"domain": item.domain, "answer": item.answer}}
