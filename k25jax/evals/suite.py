"""The held-out six-category evaluation suite of Table 1 (digest §2.1), on procedural-world items (digest §9:
small-scale proxies for the categories, whose real benchmarks the report does not name).

Held out by construction: items come from `k25jax.data.world` with seeds >= `EVAL_SEED_BASE`, which the world
refuses for training, and knowledge questions ask only about the entities kept out of training QA.
Fixed size: item i of a category is a pure function of (suite seed, category, i).

Item providers: each category holds an ordered registry of named providers, `provider(seed, index) -> EvalItem`.
Item i of a category comes from provider i % k (k providers) at index i // k, so extra sources (e.g. real
Fashion-MNIST images for Vision Knowledge) join with `register_provider` or the `providers=` argument.

Text-only runs (`with_images=False`): image parts are removed from every prompt and the questions stay, so a
text-only model answers vision items blind; the same items and n keep scores comparable with image runs (its
vision scores measure answer priors, not perception).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

import numpy as np

from k25jax.data import world
from k25jax.evals import scorers

CATEGORIES = ("Vision Knowledge", "Vision Reasoning", "OCR", "Text Knowledge", "Text Reasoning", "Code")


@dataclasses.dataclass(frozen=True)
class EvalItem:
  """One evaluation item. prompt: a conversation holding the prompt turns only; choices: candidate answers for
  likelihood scoring (containing `answer`); scorer: a key of `scorers.SCORERS`; source: the provider's name."""
  prompt: dict
  answer: str
  choices: tuple[str, ...]
  scorer: str
  source: str


Provider = Callable[[int, int], EvalItem]


def world_provider(domain: str) -> Provider:
  """A provider of held-out items of a world domain."""
  if domain not in world.DOMAINS:
    raise ValueError(f"world_provider: unknown domain {domain!r}; choose one of {sorted(world.DOMAINS)}")

  def provide(seed: int, index: int) -> EvalItem:
    item = world.generate(domain, seed, index, held_out=True)
    prompt = world.common.to_conversation(item, with_answer=False)
    return EvalItem(prompt=prompt, answer=item.answer, choices=item.choices, scorer=item.scorer, source=domain)

  return provide


_REGISTRY: dict[str, dict[str, Provider]] = {
    "Vision Knowledge": {"knowledge_cards": world_provider("knowledge_cards")},
    "Vision Reasoning": {d: world_provider(d) for d in ("shapes", "charts", "mazes")},
    "OCR": {"ocr": world_provider("ocr")},
    "Text Knowledge": {"knowledge": world_provider("knowledge")},
    "Text Reasoning": {"arithmetic": world_provider("arithmetic")},
    "Code": {"programs": world_provider("programs")},
}


def _check_category(category: str) -> None:
  if category not in CATEGORIES:
    raise ValueError(f"eval suite: unknown category {category!r}; use one of {CATEGORIES} (spelled as Table 1)")


def register_provider(category: str, name: str, provider: Provider) -> None:
  """Adds a named item provider to a category (after the built-in ones). Names are unique per category."""
  _check_category(category)
  if name in _REGISTRY[category]:
    raise ValueError(f"register_provider: {category!r} already has a provider named {name!r}; pick another name")
  _REGISTRY[category][name] = provider


def default_providers() -> dict[str, dict[str, Provider]]:
  """A copy of the registry: category -> {name: provider}, in registration order."""
  return {c: dict(p) for c, p in _REGISTRY.items()}


def build_items(category: str, n: int, *, seed: int = 0,
                providers: Mapping[str, Mapping[str, Provider]] | None = None) -> list[EvalItem]:
  """The category's first n items for suite seed `seed` (0 <= seed < 2**31, mapped to EVAL_SEED_BASE + seed)."""
  _check_category(category)
  if not 0 <= seed < world.EVAL_SEED_BASE:
    raise ValueError(f"build_items: suite seed {seed} must be in [0, 2**31)")
  provs = list((providers if providers is not None else _REGISTRY).get(category, {}).items())
  if not provs:
    raise ValueError(f"build_items: category {category!r} has no providers; register one")
  items = []
  for i in range(n):
    name, provide = provs[i % len(provs)]
    item = provide(world.EVAL_SEED_BASE + seed, i // len(provs))
    if item.scorer not in scorers.SCORERS or item.answer not in item.choices:
      raise ValueError(f"build_items: provider {name!r} item {i // len(provs)} has scorer {item.scorer!r} "
                       f"(want one of {sorted(scorers.SCORERS)}) or its answer missing from its choices")
    items.append(item)
  return items


def strip_images(prompt: dict) -> dict:
  """The prompt without its image/video parts (text-only runs)."""
  messages = [{**m, "content": [p for p in m["content"] if p["type"] == "text"]} for m in prompt["messages"]]
  return {**prompt, "messages": messages}


def _categories(categories: Sequence[str] | None) -> tuple[str, ...]:
  cats = CATEGORIES if categories is None else tuple(categories)
  for c in cats:
    _check_category(c)
  return cats


def _summarise(per_item: dict[str, list[tuple[str, float]]], **extra) -> dict:
  cats = {}
  for c, scored in per_item.items():
    by_source: dict[str, list[float]] = {}
    for src, s in scored:
      by_source.setdefault(src, []).append(s)
    cats[c] = {"score": float(np.mean([s for _, s in scored])), "n": len(scored),
               "sources": {k: {"score": float(np.mean(v)), "n": len(v)} for k, v in by_source.items()}}
  return {"categories": cats, "overall": float(np.mean([v["score"] for v in cats.values()])), **extra}


def _check_n(n_per_category: int) -> None:
  if not isinstance(n_per_category, int) or n_per_category < 1:
    raise ValueError(f"eval suite: n_per_category={n_per_category!r} must be a positive int")


def run_suite(generate: Callable[[list[dict]], list[str]], *, n_per_category: int = 32,
              categories: Sequence[str] | None = None, with_images: bool = True, seed: int = 0,
              providers: Mapping[str, Mapping[str, Provider]] | None = None) -> dict:
  """Generation-based evaluation: `generate` answers each category's prompts (one call per category), each
  output is scored with its item's scorer after `scorers.extract_answer`.

  Returns {"categories": {name: {"score", "n", "sources"}}, "overall": mean of category scores,
  "with_images": bool, "mode": "generate"}.
  """
  _check_n(n_per_category)
  per_item = {}
  for c in _categories(categories):
    items = build_items(c, n_per_category, seed=seed, providers=providers)
    prompts = [it.prompt if with_images else strip_images(it.prompt) for it in items]
    outputs = list(generate(prompts))
    if len(outputs) != len(prompts) or not all(isinstance(o, str) for o in outputs):
      raise ValueError(f"run_suite[{c}]: generate must return one str per prompt; got {len(outputs)} outputs "
                       f"for {len(prompts)} prompts")
    per_item[c] = [(it.source, scorers.score(it.scorer, o, it.answer)) for it, o in zip(items, outputs)]
  return _summarise(per_item, with_images=with_images, mode="generate")


def run_suite_choice(score_fn: Callable[[list[tuple[dict, str]]], list[float]], *, n_per_category: int = 32,
                     categories: Sequence[str] | None = None, with_images: bool = True, seed: int = 0,
                     providers: Mapping[str, Mapping[str, Provider]] | None = None) -> dict:
  """Likelihood (multiple-choice) evaluation for models too small to generate well: `score_fn` returns the
  log-likelihood of each (prompt, candidate answer) pair; an item is correct iff its gold answer has the highest
  score (ties go to the first candidate in the item's fixed order).

  Same return value as `run_suite` with mode "choice" and, per category, "chance" (mean 1/len(choices)).
  """
  _check_n(n_per_category)
  per_item, chance = {}, {}
  for c in _categories(categories):
    items = build_items(c, n_per_category, seed=seed, providers=providers)
    pairs = [(it.prompt if with_images else strip_images(it.prompt), ch) for it in items for ch in it.choices]
    lls = np.asarray(score_fn(pairs), np.float64)
    if lls.shape != (len(pairs),) or not np.all(np.isfinite(lls)):
      raise ValueError(f"run_suite_choice[{c}]: score_fn must return {len(pairs)} finite floats, got shape "
                       f"{lls.shape}")
    per_item[c], start = [], 0
    for it in items:
      best = it.choices[int(np.argmax(lls[start:start + len(it.choices)]))]
      per_item[c].append((it.source, float(best == it.answer)))
      start += len(it.choices)
    chance[c] = float(np.mean([1.0 / len(it.choices) for it in items]))
  out = _summarise(per_item, with_images=with_images, mode="choice")
  for c, v in chance.items():
    out["categories"][c]["chance"] = v
  return out


def _is_result(r) -> bool:
  return isinstance(r, Mapping) and isinstance(r.get("categories"), Mapping) and "overall" in r


def format_table(results: Mapping) -> str:
  """Markdown table in the layout of Table 1: one row per run, the six categories as columns (scores x100),
  then the mean over evaluated categories. `results` is one `run_suite` result or a mapping name -> result."""
  rows = {"model": results} if _is_result(results) else results
  if not rows or not all(_is_result(r) for r in rows.values()):
    raise ValueError("format_table: pass a run_suite/run_suite_choice result or a mapping name -> result")
  lines = ["| Run | " + " | ".join(CATEGORIES) + " | Mean |", "|---" * (len(CATEGORIES) + 2) + "|"]
  for name, r in rows.items():
    cells = [f"{100 * r['categories'][c]['score']:.1f}" if c in r["categories"] else "-" for c in CATEGORIES]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {100 * r['overall']:.1f} |")
  return "\n".join(lines)
