"""Tests for the six-category suite (k25jax.evals): scorers, runners, held-out construction, table."""

import numpy as np
import pytest

from k25jax import evals
from k25jax.data import world
from k25jax.data.world import knowledge
from k25jax.evals import scorers, suite

TABLE_1 = ("Vision Knowledge", "Vision Reasoning", "OCR", "Text Knowledge", "Text Reasoning", "Code")
N = 6


def test_category_names_as_in_table_1():
  assert evals.CATEGORIES == TABLE_1
  assert set(suite.default_providers()) == set(TABLE_1)


def test_extract_and_normalise():
  assert scorers.extract_answer("3 + 4 = 7. 7 * 2 = 14. Answer: 14") == "14"
  assert scorers.extract_answer("answer: 3\nANSWER:  five ") == "five"
  assert scorers.extract_answer("  no marker\nhere ") == "no marker\nhere"
  assert scorers.normalize(' "Red." ') == "red"
  assert scorers.normalize("a\n  b", cased=True) == "a b"


def test_scorers_hand_cases():
  assert set(scorers.SCORERS) == set(world.common.SCORERS)  # every scorer the world names exists
  assert scorers.score("exact", "  Yes. ", "yes") == 1.0
  assert scorers.score("exact", "Answer: Blue", "blue") == 1.0
  assert scorers.score("exact", "blue green", "blue") == 0.0
  assert scorers.score("cased", "APPLE", "apple") == 0.0
  assert scorers.score("cased", "1\n2 ", "1\n2") == 1.0
  assert scorers.edit_distance("kitten", "sitting") == 3
  assert scorers.edit_distance("", "abc") == 3
  assert scorers.score("ned", "appla", "apple") == pytest.approx(0.8)
  assert scorers.score("ned", "apple", "apple") == 1.0
  assert scorers.score("ned", "xyz", "ab") == 0.0
  assert scorers.score("ned", "Apple", "apple") == pytest.approx(0.8)  # OCR is case-sensitive
  assert scorers.score("numeric", "The total is 1,234.", "1234") == 1.0
  assert scorers.score("numeric", "12 - 4 = 8. Answer: 8.0", "8") == 1.0
  assert scorers.score("numeric", "Answer: 9", "8") == 0.0
  assert scorers.score("numeric", "no idea", "8") == 0.0
  assert scorers.score("numeric", "-3", "-3") == 1.0
  with pytest.raises(ValueError, match="holds no number"):
    scorers.score("numeric", "8", "eight")
  with pytest.raises(ValueError, match="unknown scorer 'fuzzy'"):
    scorers.score("fuzzy", "a", "a")


def _key(prompt):
  parts = prompt["messages"][0]["content"]
  return (tuple(p["text"] for p in parts if p["type"] == "text"),
          b"".join(p["image"].tobytes() for p in parts if p["type"] == "image"))


def _gold_table(n):
  """prompt key -> gold answer, from an independent build of the same items (items are deterministic)."""
  table = {}
  for c in TABLE_1:
    for it in suite.build_items(c, n):
      assert table.setdefault(_key(it.prompt), it.answer) == it.answer  # equal prompts have equal answers
  return table


def test_run_suite_gold_and_junk():
  gold = _gold_table(N)
  calls = []

  def oracle(prompts):
    calls.append(prompts)
    return [f"Let me think. Answer: {gold[_key(p)]}" for p in prompts]

  r = evals.run_suite(oracle, n_per_category=N)
  assert r["overall"] == 1.0 and r["mode"] == "generate"
  assert {c: (v["score"], v["n"]) for c, v in r["categories"].items()} == {c: (1.0, N) for c in TABLE_1}
  assert sum(v["n"] for v in r["categories"]["Vision Reasoning"]["sources"].values()) == N
  assert all("answer" not in p["meta"] for ps in calls for p in ps)  # prompts do not leak the answer
  junk = evals.run_suite(lambda ps: ["#"] * len(ps), n_per_category=N)
  assert max(v["score"] for v in junk["categories"].values()) < 0.05
  with pytest.raises(ValueError, match="one str per prompt"):
    evals.run_suite(lambda ps: ["x"], n_per_category=2, categories=["Code"])


def test_text_only_runs_drop_images():
  seen = {}

  def gen(prompts):
    for p in prompts:
      seen.setdefault(p["meta"]["domain"], []).append(
          any(part["type"] == "image" for m in p["messages"] for part in m["content"]))
    return ["0"] * len(prompts)

  r = evals.run_suite(gen, n_per_category=3, with_images=False)
  assert not any(any(v) for v in seen.values()) and r["with_images"] is False
  assert all(v["n"] == 3 for v in r["categories"].values())  # same items, blind
  seen.clear()
  evals.run_suite(gen, n_per_category=3, categories=["OCR", "Code"])
  assert all(seen["ocr"]) and not any(seen["programs"])


def test_held_out_by_construction():
  held = {e["name"] for e in knowledge.qa_entities(held_out=True)}
  for it in suite.build_items("Text Knowledge", 20):
    assert any(name in it.prompt["messages"][0]["content"][-1]["text"] for name in held)
  for i, it in enumerate(suite.build_items("Vision Reasoning", 6, seed=7)):  # eval seed namespace
    ref = world.generate(it.source, world.EVAL_SEED_BASE + 7, i // 3, held_out=True)
    assert it.answer == ref.answer and it.prompt["messages"][0]["content"][0]["image"].tobytes() == ref.image.tobytes()
    with pytest.raises(ValueError, match="reserved for evaluation"):
      world.make_example(it.source, world.EVAL_SEED_BASE + 7, i // 3)  # training cannot reach it
  a, b = suite.build_items("OCR", 4), suite.build_items("OCR", 4)
  assert [x.answer for x in a] == [x.answer for x in b]
  assert [x.answer for x in a] != [x.answer for x in suite.build_items("OCR", 4, seed=1)]
  with pytest.raises(ValueError, match="suite seed"):
    suite.build_items("OCR", 1, seed=world.EVAL_SEED_BASE)


def test_run_suite_choice():
  gold = _gold_table(N)
  best = evals.run_suite_choice(lambda pairs: [float(c == gold[_key(p)]) for p, c in pairs], n_per_category=N)
  assert best["overall"] == 1.0 and best["mode"] == "choice"
  worst = evals.run_suite_choice(lambda pairs: [-float(c == gold[_key(p)]) for p, c in pairs], n_per_category=N)
  assert worst["overall"] == 0.0
  flat = evals.run_suite_choice(lambda pairs: [0.0] * len(pairs), n_per_category=N)
  for c in TABLE_1:  # ties pick the first candidate
    items = suite.build_items(c, N)
    assert flat["categories"][c]["score"] == pytest.approx(np.mean([it.choices[0] == it.answer for it in items]))
    assert flat["categories"][c]["chance"] == pytest.approx(np.mean([1 / len(it.choices) for it in items]))
  with pytest.raises(ValueError, match="finite floats"):
    evals.run_suite_choice(lambda pairs: [0.0], n_per_category=2, categories=["Code"])


def test_extra_providers_round_robin(monkeypatch):
  def fake(seed, index):
    assert seed >= world.EVAL_SEED_BASE
    prompt = {"messages": [{"role": "user", "content": [{"type": "text", "text": f"q{index}"}]}], "meta": {}}
    return suite.EvalItem(prompt=prompt, answer="a", choices=("a", "b"), scorer="exact", source="fake")

  provs = suite.default_providers()
  provs["Vision Knowledge"]["fake"] = fake
  items = suite.build_items("Vision Knowledge", 5, providers=provs)
  assert [it.source for it in items] == ["knowledge_cards", "fake"] * 2 + ["knowledge_cards"]
  assert [it.prompt["messages"][0]["content"][-1]["text"] for it in items[1::2]] == ["q0", "q1"]
  assert "fake" not in suite.default_providers()["Vision Knowledge"]  # a copy, not the registry

  monkeypatch.setattr(suite, "_REGISTRY", suite.default_providers())
  suite.register_provider("Vision Knowledge", "fake", fake)
  assert [it.source for it in suite.build_items("Vision Knowledge", 2)] == ["knowledge_cards", "fake"]
  with pytest.raises(ValueError, match="already has a provider named 'fake'"):
    suite.register_provider("Vision Knowledge", "fake", fake)
  with pytest.raises(ValueError, match="unknown category 'vision knowledge'"):
    suite.register_provider("vision knowledge", "x", fake)
  bad = lambda s, i: suite.EvalItem(prompt={}, answer="c", choices=("a", "b"), scorer="exact", source="bad")
  with pytest.raises(ValueError, match="provider 'bad'"):
    suite.build_items("Code", 1, providers={"Code": {"bad": bad}})


def test_format_table():
  r = {"categories": {"OCR": {"score": 0.657, "n": 4}, "Code": {"score": 0.248, "n": 4}}, "overall": 0.4525}
  lines = evals.format_table({"Early": r, "Late": r}).splitlines()
  assert [h.strip() for h in lines[0].strip("|").split("|")] == ["Run", *TABLE_1, "Mean"]
  assert lines[2] == "| Early | - | - | 65.7 | - | - | 24.8 | 45.2 |" and lines[3].startswith("| Late |")
  assert evals.format_table(r).splitlines()[2].startswith("| model | - | - | 65.7 |")
  with pytest.raises(ValueError, match="format_table"):
    evals.format_table({"a": 1})
