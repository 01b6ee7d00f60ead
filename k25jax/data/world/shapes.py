"""Shapes domain: scenes of coloured circles, squares and triangles with counting, attribute and spatial
questions (digest §2.1 "Vision Reasoning"; §4.2 counting-style perception)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from k25jax.data.world import common

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 220), "yellow": (230, 200, 20),
           "purple": (140, 50, 170), "orange": (240, 130, 20)}
KINDS = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
CANVAS = 112
MAX_SHAPES = 6
_MIN_SEPARATION = 10  # px between centres for "left of"/"above" to be unambiguous


def _scene(rng: np.random.Generator) -> list[dict]:
  """Non-touching shapes (bounding circles at least 3 px apart), placed by rejection sampling."""
  n = int(rng.integers(2, MAX_SHAPES + 1))
  shapes: list[dict] = []
  while len(shapes) < n:
    r = int(rng.integers(8, 14))
    x, y = (int(v) for v in rng.integers(r + 1, CANVAS - r - 1, 2))
    if all((x - s["x"]) ** 2 + (y - s["y"]) ** 2 >= (r + s["r"] + 3) ** 2 for s in shapes):
      shapes.append({"kind": KINDS[rng.integers(3)], "colour": list(COLOURS)[rng.integers(len(COLOURS))],
                     "x": x, "y": y, "r": r})
  return shapes


def render(shapes: list[dict]) -> np.ndarray:
  """Draws the scene without anti-aliasing, so every shape pixel has exactly its palette colour."""
  img = Image.new("RGB", (CANVAS, CANVAS), BACKGROUND)
  d = ImageDraw.Draw(img)
  for s in shapes:
    x, y, r, fill = s["x"], s["y"], s["r"], COLOURS[s["colour"]]
    if s["kind"] == "circle":
      d.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif s["kind"] == "square":
      h = int(r * 0.7)
      d.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    else:
      d.polygon([(x, y - r), (x - int(r * 0.87), y + r // 2), (x + int(r * 0.87), y + r // 2)], fill=fill)
  return np.asarray(img)


def _name(s: dict) -> str:
  return f"{s['colour']} {s['kind']}"


def _question(rng: np.random.Generator, shapes: list[dict]) -> tuple[str, str, str, tuple[str, ...]]:
  """(question, answer, scorer, distractors) for one feasible question kind chosen at random."""
  unique = [s for s in shapes if sum(_name(t) == _name(s) for t in shapes) == 1]
  kinds_once = [k for k in KINDS if sum(s["kind"] == k for s in shapes) == 1]
  pairs = {"left of": [(a, b) for a in unique for b in unique if b["x"] - a["x"] >= _MIN_SEPARATION],
           "above": [(a, b) for a in unique for b in unique if b["y"] - a["y"] >= _MIN_SEPARATION]}
  options = ["count_colour", "count_kind"] + (["colour_of"] if kinds_once else [])
  options += [rel for rel, p in pairs.items() if p]
  q = options[rng.integers(len(options))]
  counts = tuple(str(i) for i in range(MAX_SHAPES + 1))
  if q == "count_colour":
    c = list(COLOURS)[rng.integers(len(COLOURS))]
    return f"How many {c} shapes are there?", str(sum(s["colour"] == c for s in shapes)), "numeric", counts
  if q == "count_kind":
    k = KINDS[rng.integers(3)]
    return f"How many {k}s are there?", str(sum(s["kind"] == k for s in shapes)), "numeric", counts
  if q == "colour_of":
    k = kinds_once[rng.integers(len(kinds_once))]
    colour = next(s["colour"] for s in shapes if s["kind"] == k)
    return f"What colour is the {k}?", colour, "exact", tuple(COLOURS)
  a, b = pairs[q][rng.integers(len(pairs[q]))]
  if rng.random() < 0.5:  # ask the reversed pair too, so "no" is as common as "yes"
    a, b = b, a
  truth = (b["x"] - a["x"] if q == "left of" else b["y"] - a["y"]) >= _MIN_SEPARATION
  return f"Is the {_name(a)} {q} the {_name(b)}?", "yes" if truth else "no", "exact", ("yes", "no")


def sample(rng: np.random.Generator, *, held_out: bool = False) -> common.WorldItem:
  """One scene and one question about it; the answer is derived from the scene specification."""
  del held_out
  shapes = _scene(rng)
  question, answer, scorer, distractors = _question(rng, shapes)
  caption = "Shapes: " + ", ".join(_name(s) for s in sorted(shapes, key=lambda s: s["x"])) + " (left to right)."
  return common.WorldItem(
      domain="shapes", question=question, answer=answer, response=answer, image=render(shapes),
      choices=common.shuffled_choices(rng, answer, distractors), scorer=scorer, caption=caption,
      meta={"shapes": shapes})
