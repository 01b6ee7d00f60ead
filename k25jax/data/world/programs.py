"""Programs domain: tiny Python programs and their exact printed output (digest §2.1 "Code").

Outputs come from actually running the program (`run_program`) in a restricted namespace. Programs cannot loop
forever by construction: the checker admits no `while`, no function or class definitions, no imports, and
`for` loops only over `range` with small constant bounds or over string/list literals.
"""

from __future__ import annotations

import ast

import numpy as np

from k25jax.data.world import common

WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "robot", "zebra")
MAX_RANGE = 20
_METHODS = frozenset({"upper", "lower", "title", "replace", "count", "append", "sort", "reverse", "join"})
_BUILTINS = {"range": range, "len": len, "str": str, "int": int, "sum": sum, "max": max, "min": min,
             "sorted": sorted, "abs": abs}
_FORBIDDEN = (ast.While, ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
              ast.Lambda, ast.Global, ast.Nonlocal, ast.With, ast.Try, ast.Delete, ast.Await, ast.Yield)


def check_program(source: str) -> ast.Module:
  """Parses `source` and rejects anything outside the terminating subset described in the module doc."""
  tree = ast.parse(source)
  for node in ast.walk(tree):
    if isinstance(node, _FORBIDDEN):
      raise ValueError(f"programs: {type(node).__name__} is not allowed (line {node.lineno}); use `for` over a "
                       "constant range and plain statements")
    if isinstance(node, ast.Attribute) and (node.attr not in _METHODS or node.attr.startswith("_")):
      raise ValueError(f"programs: attribute .{node.attr} is not allowed; allowed methods: {sorted(_METHODS)}")
    if isinstance(node, ast.Name) and node.id.startswith("__"):
      raise ValueError(f"programs: name {node.id} is not allowed")
    if isinstance(node, ast.For):
      it = node.iter
      literal = isinstance(it, (ast.List, ast.Tuple)) or (isinstance(it, ast.Constant) and isinstance(it.value, str))
      bounded = (isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "range"
                 and all(isinstance(a, ast.Constant) and isinstance(a.value, int) and abs(a.value) <= MAX_RANGE
                         for a in it.args))
      if not (literal or bounded):
        raise ValueError(f"programs: loop on line {node.lineno} must iterate over range(<consts <= {MAX_RANGE}>) "
                         "or a literal")
  return tree


def run_program(source: str) -> str:
  """Runs a checked program with only safe builtins and returns what it printed (lines joined by newlines)."""
  tree = check_program(source)
  lines: list[str] = []
  out = lambda *args, sep=" ": lines.append(sep.join(str(a) for a in args))
  exec(compile(tree, "<program>", "exec"), {"__builtins__": {**_BUILTINS, "print": out}})  # noqa: S102
  return "\n".join(lines)


def _source(rng: np.random.Generator) -> str:
  r = lambda lo, hi: int(rng.integers(lo, hi + 1))
  w = WORDS[rng.integers(len(WORDS))]
  kind = rng.integers(6)
  if kind == 0:
    return f"s = 0\nfor i in range({r(2, 6)}):\n    s += i * {r(1, 5)}\nprint(s)"
  if kind == 1:
    return f"w = \"{w}\"\nprint(w[::-1]{('.upper()', '')[r(0, 1)]})"
  if kind == 2:
    return f"t = \"\"\nfor c in \"{w[:r(3, 5)]}\":\n    t = c + t\nprint(t)"
  if kind == 3:
    return f"n = 0\nfor i in range({r(5, 15)}):\n    if i % {r(2, 4)} == 0:\n        n += 1\nprint(n)"
  if kind == 4:
    return f"x = {r(1, 9)}\nfor i in range({r(2, 3)}):\n    x = x * 2 - {r(1, 5)}\n    print(x)"
  xs = [r(0, 9) for _ in range(r(3, 4))]
  return f"xs = {xs}\nxs.sort()\nprint(xs[0], xs[-1], len(xs))"


def _distractors(answer: str) -> list[str]:
  tokens = answer.split()
  out = [answer[::-1], answer.upper(), answer.lower(), " ".join(tokens[::-1]), answer[:-1]]
  for d in (-1, 1, 2):  # shift the last number, if there is one
    if tokens and tokens[-1].lstrip("-").isdigit():
      out.append(" ".join(tokens[:-1] + [str(int(tokens[-1]) + d)]) if len(tokens) > 1 else str(int(tokens[-1]) + d))
  return [d for d in out if d]


def sample(rng: np.random.Generator, *, held_out: bool = False) -> common.WorldItem:
  """One program; the answer is its printed output."""
  del held_out
  source = _source(rng)
  answer = run_program(source)
  return common.WorldItem(
      domain="programs", question=f"What does this program print?\n{source}", answer=answer, response=answer,
      image=None, choices=common.shuffled_choices(rng, answer, _distractors(answer)), scorer="cased",
      caption=f"{source}\n# Output:\n# " + answer.replace("\n", "\n# "), meta={"source": source})
