"""Answer extraction and scoring: pure functions from (generated text, gold answer) to a score in [0, 1].

Small-scale proxies for the Table 1 categories (digest §2.1, §9): exact match after normalisation for short
answers, 1 - normalised character edit distance (NED) for OCR (as in OCR benchmarks), numeric tolerance for
numbers.

Final-answer rule (`extract_answer`): if the text contains "Answer:" (any case), the answer is everything after
its last occurrence; otherwise it is the whole text. Both are stripped. Worked solutions in the world end with
"Answer: <x>", short answers are the whole response.
"""

from __future__ import annotations

import math
import re
from typing import Callable

_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_QUOTES = "\"'`"


def extract_answer(text: str) -> str:
  """The final answer in a generated text (rule in the module docstring)."""
  parts = _ANSWER.split(text)
  return parts[-1].strip()


def normalize(text: str, *, cased: bool = False) -> str:
  """Whitespace runs -> one space, surrounding quotes/backticks and one trailing period removed, casefolded
  unless `cased`."""
  s = " ".join(text.split()).strip(_QUOTES)
  if s.endswith("."):
    s = s[:-1].rstrip()
  s = s.strip(_QUOTES)
  return s if cased else s.casefold()


def exact_match(prediction: str, gold: str) -> float:
  """1.0 iff the extracted answer equals the gold answer after case-insensitive normalisation."""
  return float(normalize(extract_answer(prediction)) == normalize(gold))


def cased_match(prediction: str, gold: str) -> float:
  """Like `exact_match` but case-sensitive (program output)."""
  return float(normalize(extract_answer(prediction), cased=True) == normalize(gold, cased=True))


def edit_distance(a: str, b: str) -> int:
  """Levenshtein distance (unit-cost insert, delete, substitute)."""
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def ned_score(prediction: str, gold: str) -> float:
  """1 - edit_distance / max(len) on case-sensitive normalised strings (1.0 when both are empty)."""
  p, g = normalize(extract_answer(prediction), cased=True), normalize(gold, cased=True)
  if not p and not g:
    return 1.0
  return 1.0 - edit_distance(p, g) / max(len(p), len(g))


def parse_number(text: str) -> float | None:
  """The last number in `text` (thousands separators "1,234" allowed), or None if there is none."""
  found = _NUMBER.findall(re.sub(r"(?<=\d),(?=\d{3}\b)", "", text))
  return float(found[-1]) if found else None


def numeric_match(prediction: str, gold: str, *, rel_tol: float = 1e-6, abs_tol: float = 1e-6) -> float:
  """1.0 iff the last number of the extracted answer is within tolerance of the gold number."""
  g = parse_number(gold)
  if g is None:
    raise ValueError(f"numeric_match: gold answer {gold!r} holds no number; score it with 'exact' instead")
  p = parse_number(extract_answer(prediction))
  return float(p is not None and math.isclose(p, g, rel_tol=rel_tol, abs_tol=abs_tol))


SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact": exact_match, "cased": cased_match, "ned": ned_score, "numeric": numeric_match}


def score(scorer: str, prediction: str, gold: str) -> float:
  """Scores `prediction` against `gold` with the named scorer (one of SCORERS)."""
  if scorer not in SCORERS:
    raise ValueError(f"score: unknown scorer {scorer!r}; choose one of {sorted(SCORERS)}")
  return SCORERS[scorer](prediction, gold)
