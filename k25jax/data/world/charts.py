"""Charts domain: bar and pie charts with labelled values; questions read a value or compare two
(digest §2.1 "Vision Reasoning"; chart reading as in CharXiv-style benchmarks, §9)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from k25jax.data.world import common

LABELS = ("ant", "bee", "cat", "dog", "elk", "fox", "owl", "yak")
PALETTE = ((220, 30, 30), (40, 70, 220), (30, 160, 50), (240, 130, 20), (140, 50, 170))
BAR_SIZE = (112, 112)
PIE_SIZE = (168, 112)
BAR_UNIT = 8  # px per unit of value; values are 1..10
_TEXT = (0, 0, 0)


def _bar(labels, values) -> np.ndarray:
  w, h = BAR_SIZE
  img = Image.new("RGB", (w, h), (255, 255, 255))
  d = ImageDraw.Draw(img)
  f = common.font(10)
  slot = w // len(labels)
  base = h - 14
  for i, (lab, v) in enumerate(zip(labels, values)):
    x0 = i * slot + (slot - 18) // 2
    d.rectangle((x0, base - v * BAR_UNIT, x0 + 17, base - 1), fill=PALETTE[i])
    d.text((x0 + 9, base - v * BAR_UNIT - 1), str(v), font=f, fill=_TEXT, anchor="mb")
    d.text((x0 + 9, base + 1), lab, font=f, fill=_TEXT, anchor="mt")
  return np.asarray(img)


def _pie(labels, values) -> np.ndarray:
  w, h = PIE_SIZE
  img = Image.new("RGB", (w, h), (255, 255, 255))
  d = ImageDraw.Draw(img)
  f = common.font(10)
  start = -90.0
  for i, (lab, v) in enumerate(zip(labels, values)):
    end = start + 3.6 * v
    d.pieslice((8, 8, 104, 104), start, end, fill=PALETTE[i])
    start = end
    y = 14 + 22 * i
    d.rectangle((112, y, 119, y + 7), fill=PALETTE[i])
    d.text((122, y + 4), f"{lab} {v}", font=f, fill=_TEXT, anchor="lm")
  return np.asarray(img)


def sample(rng: np.random.Generator, *, held_out: bool = False) -> common.WorldItem:
  """One chart (bar: values 1..10; pie: percentages in steps of 5 summing to 100) and one question."""
  del held_out
  kind = ("bar", "pie")[rng.integers(2)]
  n = int(rng.integers(3, 5) if kind == "bar" else rng.integers(2, 5))
  labels = [LABELS[i] for i in rng.choice(len(LABELS), n, replace=False)]
  if kind == "bar":
    values = [int(v) for v in rng.choice(np.arange(1, 11), n, replace=False)]
    image = _bar(labels, values)
  else:  # distinct multiples of 5, each >= 5, summing to 100
    while True:
      cuts = np.sort(rng.choice(np.arange(1, 20), n - 1, replace=False))
      values = [int(v) * 5 for v in np.diff(np.concatenate([[0], cuts, [20]]))]
      if len(set(values)) == n:
        break
    image = _pie(labels, values)
  q = rng.integers(3)
  if q == 0:
    i = int(rng.integers(n))
    question, answer, scorer = f"What is the value of {labels[i]}?", str(values[i]), "numeric"
    distractors = [str(v) for v in values] + [str(values[i] + d) for d in (-2, -1, 1, 2) if values[i] + d > 0]
  elif q == 1:
    i, j = (int(v) for v in rng.choice(n, 2, replace=False))
    question = f"Which is larger, {labels[i]} or {labels[j]}?"
    answer, scorer, distractors = labels[i] if values[i] > values[j] else labels[j], "exact", [labels[i], labels[j]]
  else:
    question, answer = "Which label has the largest value?", labels[int(np.argmax(values))]
    scorer, distractors = "exact", labels
  caption = f"A {kind} chart: " + ", ".join(f"{lab} {v}" for lab, v in zip(labels, values)) + "."
  return common.WorldItem(
      domain="charts", question=question, answer=answer, response=answer, image=image,
      choices=common.shuffled_choices(rng, answer, distractors), scorer=scorer, caption=caption,
      meta={"kind": kind, "labels": labels, "values": values})
