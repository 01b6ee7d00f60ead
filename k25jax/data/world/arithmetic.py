"""Arithmetic domain: short word problems with worked step-by-step solutions (digest §2.1 "Text Reasoning")."""

from __future__ import annotations

import operator

import numpy as np

from k25jax.data.world import common

NAMES = (("Ana", "she"), ("Ben", "he"), ("Caro", "she"), ("Dev", "he"), ("Eli", "she"), ("Finn", "he"))
ITEMS = ("apple", "pen", "card", "shell", "coin", "book", "marble", "stamp")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.floordiv}


def _problem(rng: np.random.Generator) -> tuple[str, list[tuple[int, str, int]]]:
  """A question and its steps as (left, op, right); each step's left operand may be the previous result."""
  (name, pron), item = NAMES[rng.integers(len(NAMES))], ITEMS[rng.integers(len(ITEMS))]
  r = lambda lo, hi: int(rng.integers(lo, hi + 1))
  kind = rng.integers(4)
  if kind == 0:
    a, b = r(2, 30), r(2, 30)
    c = r(1, a + b)
    return (f"{name} has {a} {item}s, buys {b} more and gives away {c}. How many {item}s does {pron} have now?",
            [(a, "+", b), (a + b, "-", c)])
  if kind == 1:
    a, b = r(2, 9), r(2, 12)
    return f"{name} buys {a} boxes of {b} {item}s. How many {item}s is that?", [(a, "*", b)]
  if kind == 2:
    b, k = r(2, 9), r(2, 12)
    return (f"{name} shares {b * k} {item}s equally among {b} friends. How many does each friend get?",
            [(b * k, "/", b)])
  a, b, c = r(1, 40), r(2, 6), r(2, 9)
  return (f"{name} has {a} {item}s and buys {b} bags of {c}. How many {item}s does {pron} have now?",
          [(b, "*", c), (a, "+", b * c)])


def sample(rng: np.random.Generator, *, held_out: bool = False) -> common.WorldItem:
  """One problem; the response shows each step as "x op y = z." and ends with "Answer: <n>"."""
  del held_out
  question, steps = _problem(rng)
  lines = []
  for x, op, y in steps:
    z = OPS[op](x, y)
    lines.append(f"{x} {op} {y} = {z}.")
  answer = str(z)
  response = " ".join(lines) + f" Answer: {answer}"
  distractors = [str(int(answer) + d) for d in (-10, -2, -1, 1, 2, 10) if int(answer) + d >= 0]
  return common.WorldItem(
      domain="arithmetic", question=question, answer=answer, response=response, image=None,
      choices=common.shuffled_choices(rng, answer, distractors), scorer="numeric",
      caption=f"{question} {response}", meta={"steps": steps})
