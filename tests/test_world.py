"""Tests for the procedural world (k25jax.data.world): determinism, formats, answers re-derived independently."""

import collections
import contextlib
import io
import logging
import re

import numpy as np
import pytest
from scipy import ndimage

from k25jax.data import world
from k25jax.data.world import charts, common, knowledge, mazes, programs, shapes

N = 24  # items per domain in the per-domain checks


def _text_parts(conv):
  return [p["text"] for m in conv["messages"] for p in m["content"] if p["type"] == "text"]


def _images(parts):
  return [p["image"] for p in parts if p["type"] == "image"]


@pytest.mark.parametrize("domain", sorted(world.DOMAINS))
def test_deterministic_and_index_addressable(domain):
  a, b = world.make_example(domain, 3, 5), world.make_example(domain, 3, 5)
  assert _text_parts(a) == _text_parts(b) and a["meta"] == b["meta"]
  ia = _images(a["messages"][0]["content"])
  assert [x.tobytes() for x in ia] == [x.tobytes() for x in _images(b["messages"][0]["content"])]
  others = [world.make_example(domain, 3, i) for i in (6, 7, 8)] + [world.make_example(domain, 4, 5)]
  assert all(_text_parts(o) != _text_parts(a) or [x.tobytes() for x in _images(o["messages"][0]["content"])]
             != [x.tobytes() for x in ia] for o in others)
  da, db = world.make_document(domain, 3, 5), world.make_document(domain, 3, 5)
  assert [p.get("text") for p in da["document"]] == [p.get("text") for p in db["document"]]
  assert [x.tobytes() for x in _images(da["document"])] == [x.tobytes() for x in _images(db["document"])]
  world.make_example(domain, 3, 10**12)  # a far index directly, without generating the earlier ones


@pytest.mark.parametrize("domain", sorted(world.DOMAINS))
def test_format_and_sizes(domain):
  for i in range(N):
    item = world.generate(domain, 0, i)
    conv = world.make_example(domain, 0, i)
    user, assistant = conv["messages"]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    assert assistant["content"] == [{"type": "text", "text": item.response}]
    assert item.answer in item.choices and len(set(item.choices)) == len(item.choices) >= 2
    assert item.scorer in common.SCORERS
    images = _images(user["content"])
    assert len(images) == (world.DOMAINS[domain] == "vision")
    for img in images + _images(world.make_document(domain, 0, i)["document"]):
      assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
      assert 56 <= max(img.shape[:2]) and max(img.shape[:2]) <= 224 and min(img.shape[:2]) >= 56
    assert len((item.question + item.response).encode()) <= 200
    assert len(world.make_document(domain, 0, i)["document"][-1]["text"].encode()) <= 200


def test_seed_split_and_errors():
  with pytest.raises(ValueError, match="reserved for evaluation"):
    world.make_example("ocr", world.EVAL_SEED_BASE, 0)
  with pytest.raises(ValueError, match="reserved for evaluation"):
    world.make_document("ocr", world.EVAL_SEED_BASE + 1, 0)
  with pytest.raises(ValueError, match="held-out seed"):
    world.generate("ocr", 0, 0, held_out=True)
  with pytest.raises(ValueError, match="unknown domain 'ocrr'"):
    world.make_example("ocrr", 0, 0)
  with pytest.raises(ValueError, match="index -1"):
    world.make_example("ocr", 0, -1)
  assert world.generate("ocr", world.EVAL_SEED_BASE, 0, held_out=True).answer


def _components(img, colour):
  mask = np.all(img == np.array(colour, np.uint8), axis=-1)
  labels, n = ndimage.label(mask)
  return [np.argwhere(labels == k) for k in range(1, n + 1)]


def _kind_from_pixels(pix):
  """Fill ratio of the bounding box: square ~1, circle ~0.79, triangle ~0.5."""
  h, w = pix.max(0) - pix.min(0) + 1
  fill = len(pix) / (h * w)
  return "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"


def test_shapes_answers_from_pixels():
  for i in range(60):
    item = world.generate("shapes", 1, i)
    img = item.image
    objs = []  # (colour, kind, centre x, centre y) found in the pixels alone
    for name, rgb in shapes.COLOURS.items():
      for pix in _components(img, rgb):
        objs.append((name, _kind_from_pixels(pix), pix[:, 1].mean(), pix[:, 0].mean()))
    assert len(objs) == len(item.meta["shapes"])
    q = item.question
    if m := re.fullmatch(r"How many (\w+) shapes are there\?", q):
      assert int(item.answer) == sum(o[0] == m[1] for o in objs)
    elif m := re.fullmatch(r"How many (\w+)s are there\?", q):
      assert int(item.answer) == sum(o[1] == m[1] for o in objs)
    elif m := re.fullmatch(r"What colour is the (\w+)\?", q):
      assert [o[0] for o in objs if o[1] == m[1]] == [item.answer]
    else:
      m = re.fullmatch(r"Is the (\w+) (\w+) (left of|above) the (\w+) (\w+)\?", q)
      (a,), (b,) = ([o for o in objs if o[:2] == (m[k], m[k + 1])] for k in (1, 4))
      delta = b[2] - a[2] if m[3] == "left of" else b[3] - a[3]
      assert item.answer == ("yes" if delta > 0 else "no"), q


def test_charts_values_from_pixels():
  for i in range(40):
    item = world.generate("charts", 2, i)
    labels, img = item.meta["labels"], item.image
    areas = np.array([np.all(img == np.array(c, np.uint8), -1).sum() for c in charts.PALETTE[:len(labels)]])
    if item.meta["kind"] == "bar":  # each bar is 18 px wide and BAR_UNIT px per unit tall
      values = areas / (18 * charts.BAR_UNIT)
      np.testing.assert_allclose(values, item.meta["values"])
    else:  # slice area share ~ percentage (minus the legend swatch of 64 px)
      values = 100 * (areas - 64) / (areas - 64).sum()
      np.testing.assert_allclose(values, item.meta["values"], atol=2.0)
    if m := re.fullmatch(r"What is the value of (\w+)\?", item.question):
      assert abs(float(item.answer) - values[labels.index(m[1])]) < 2.0
    elif m := re.fullmatch(r"Which is larger, (\w+) or (\w+)\?", item.question):
      assert item.answer == max((m[1], m[2]), key=lambda lab: values[labels.index(lab)])
    else:
      assert item.answer == labels[int(np.argmax(values))]


def _bfs_len(grid, start, goal):
  dist, queue = {start: 0}, collections.deque([start])
  while queue:
    r, c = queue.popleft()
    for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
      if grid[nr][nc] != "#" and (nr, nc) not in dist:
        dist[(nr, nc)] = dist[(r, c)] + 1
        queue.append((nr, nc))
  return dist[goal]


def test_mazes_solvable_and_path_valid():
  for i in range(40):
    item = world.generate("mazes", 3, i)
    grid, path = item.meta["grid"], item.meta["path"]
    assert item.meta["text"].splitlines() == grid
    assert grid[path[0][0]][path[0][1]] == "S" and grid[path[-1][0]][path[-1][1]] == "G"
    assert all(grid[r][c] != "#" for r, c in path)
    assert all(abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1 for a, b in zip(path, path[1:]))
    assert len(path) - 1 == _bfs_len(grid, path[0], path[-1])  # shortest
    pos = path[0]  # replaying the cell moves (2 squares each) through open squares reaches G
    for mv in item.meta["moves"]:
      dr, dc = mazes.MOVES[mv]
      assert grid[pos[0] + dr][pos[1] + dc] != "#"
      pos = (pos[0] + 2 * dr, pos[1] + 2 * dc)
    assert pos == path[-1]
    assert item.answer in (item.meta["moves"], str(len(item.meta["moves"])))
    k = item.image.shape[0] // len(grid)  # S and G are drawn where the grid puts them
    for (r, c), rgb in ((path[0], mazes.COLOURS["S"]), (path[-1], mazes.COLOURS["G"])):
      assert tuple(item.image[r * k + k // 2, c * k + k // 2]) == rgb


def test_arithmetic_steps_recomputed():
  ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
  for i in range(60):
    item = world.generate("arithmetic", 4, i)
    question_numbers = {int(x) for x in re.findall(r"\d+", item.question)}
    steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", item.response)
    assert steps and item.response.endswith(f"Answer: {item.answer}")
    results = set()
    for a, op, b, z in steps:
      a, b, z = int(a), int(b), int(z)
      assert ops[op](a, b) == z, item.response
      assert {a, b} <= question_numbers | results  # operands are stated numbers or earlier results
      results.add(z)
    assert int(steps[-1][3]) == int(item.answer) >= 0


def test_programs_output_rerun():
  for i in range(40):
    item = world.generate("programs", 5, i)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      exec(item.meta["source"], {})  # noqa: S102 - an independent run with full builtins
    assert buf.getvalue().rstrip("\n") == item.answer
  for bad, why in (("while True:\n    pass", "While"), ("import os", "Import"),
                   ("for i in range(10**9):\n    pass", "loop on line 1"), ("x = ().__class__", "attribute")):
    with pytest.raises(ValueError, match=why):
      programs.run_program(bad)


def test_knowledge_split_and_facts():
  kb = knowledge.knowledge_base()
  assert len({e["name"] for e in kb}) == knowledge.NUM_ENTITIES
  train_ids = {e["id"] for e in knowledge.qa_entities(held_out=False)}
  held_ids = {e["id"] for e in knowledge.qa_entities(held_out=True)}
  assert train_ids.isdisjoint(held_ids) and train_ids | held_ids == set(range(knowledge.NUM_ENTITIES))
  doc_ids = set()
  for i in range(200):
    doc = world.make_document("knowledge", 0, i)
    e = kb[doc["meta"]["entity"]]
    doc_ids.add(e["id"])
    assert all(e[a] in doc["document"][0]["text"] for a in ("name", "country", "founded", "colour", "mascot"))
  assert doc_ids & held_ids  # held-out entities' facts are in the pre-training documents
  for domain, seed, held_out, pool in (("knowledge", 0, False, train_ids),
                                       ("knowledge_cards", 0, False, train_ids),
                                       ("knowledge", world.EVAL_SEED_BASE, True, held_ids)):
    for i in range(30):
      item = world.generate(domain, seed, i, held_out=held_out)
      e = kb[item.meta["entity"]]
      assert e["id"] in pool and item.answer == e[item.meta["attribute"]]
      if domain == "knowledge":
        assert e["name"] in item.question
      else:  # the card's background is the entity's colour, the question does not name it
        assert tuple(item.image[2, 2]) == shapes.COLOURS[e["colour"]] and e["name"] not in item.question


def test_ocr_render_contrast():
  for i in range(20):
    item = world.generate("ocr", 6, i)
    lum = item.image.astype(float).mean(-1)
    background = np.median(lum)
    ink = lum[np.abs(lum - background) > 60]
    assert ink.size > 20, "text is visible"
    assert np.abs(np.median(ink) - background) > 100, "text contrasts with the background"
    assert item.caption == f'The image shows the text "{item.answer}".'


def test_font_fallback_is_logged(caplog):
  common.font.cache_clear()
  with caplog.at_level(logging.WARNING):
    f = common.font(17, "NoSuchFont.ttf")
  assert f.size == 17 and "NoSuchFont.ttf" in caplog.text
  assert common.font(17).path.endswith("DejaVuSans.ttf")
