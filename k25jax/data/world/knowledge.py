"""Knowledge domain: a fixed knowledge base of fictional organisations, stated as prose facts (text) and shown
as image cards (vision); questions ask one attribute (digest §2.1 "Text Knowledge" / "Vision Knowledge").

The base is the same for every seed (facts must be learnable in pre-training and asked at evaluation).
Question-answer pairs are split by entity: training QA uses entities with `id % HELD_OUT_EVERY != 0`, the
held-out suite asks only about the others, whose facts appear in pre-training documents alone, so evaluation
measures recall of facts learned from prose, not memorised QA pairs.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw

from k25jax.data.world import common, shapes

NUM_ENTITIES = 48
HELD_OUT_EVERY = 4
KB_SEED = 20260202
COUNTRIES = ("Arvenia", "Borland", "Calduria", "Drevia", "Eskaran", "Fenmark", "Galtria", "Hollen")
MASCOTS = ("otter", "heron", "lynx", "bison", "crane", "viper", "moose", "gecko")
COLOURS = tuple(shapes.COLOURS)
_SYLLABLES = ("ka", "lo", "mi", "ra", "ven", "dor", "zu", "tel", "bri", "sha", "nor", "qui", "fen", "mar",
              "lys", "tor")
QUESTIONS = {"country": "In which country is {name} based?", "founded": "In what year was {name} founded?",
             "colour": "What is the colour of {name}?", "mascot": "What is the mascot of {name}?"}
_CARD_QUESTIONS = {"country": "In which country is the organisation on this card based?",
                   "founded": "In what year was the organisation on this card founded?",
                   "mascot": "What is the mascot of the organisation on this card?"}
CARD_SIZE = (112, 56)


@functools.lru_cache(maxsize=None)
def knowledge_base() -> tuple[dict, ...]:
  """The fixed base: NUM_ENTITIES entities with unique names, drawn once from KB_SEED."""
  rng = np.random.default_rng(KB_SEED)
  names: list[str] = []
  while len(names) < NUM_ENTITIES:
    name = "".join(_SYLLABLES[i] for i in rng.integers(len(_SYLLABLES), size=int(rng.integers(2, 4))))
    if name.capitalize() not in names:
      names.append(name.capitalize())
  return tuple({"id": i, "name": n, "country": COUNTRIES[rng.integers(len(COUNTRIES))],
                "founded": str(int(rng.integers(1700, 2000))), "colour": COLOURS[rng.integers(len(COLOURS))],
                "mascot": MASCOTS[rng.integers(len(MASCOTS))]} for i, n in enumerate(names))


def qa_entities(*, held_out: bool) -> tuple[dict, ...]:
  """The entities asked about in training QA (held_out=False) or in the held-out suite (held_out=True)."""
  return tuple(e for e in knowledge_base() if (e["id"] % HELD_OUT_EVERY == 0) == held_out)


def facts(rng: np.random.Generator, e: dict) -> str:
  """The entity's facts as prose, in one of two phrasings with the sentences in random order."""
  if rng.random() < 0.5:
    s = [f"{e['name']} is based in {e['country']}.", f"{e['name']} was founded in {e['founded']}.",
         f"The colour of {e['name']} is {e['colour']}.", f"The mascot of {e['name']} is the {e['mascot']}."]
  else:
    s = [f"{e['name']}, founded in {e['founded']}, is based in {e['country']}.",
         f"Its colour is {e['colour']} and its mascot is the {e['mascot']}."]
    return " ".join(s)
  return " ".join(s[i] for i in rng.permutation(len(s)))


def card(e: dict) -> np.ndarray:
  """The entity's card: its name in bold on its colour."""
  img = Image.new("RGB", CARD_SIZE, shapes.COLOURS[e["colour"]])
  d = ImageDraw.Draw(img)
  size = 22
  while common.font(size, "DejaVuSans-Bold.ttf").getlength(e["name"]) > CARD_SIZE[0] - 8:
    size -= 1
  d.text((CARD_SIZE[0] // 2, CARD_SIZE[1] // 2), e["name"], font=common.font(size, "DejaVuSans-Bold.ttf"),
         fill=(255, 255, 255), anchor="mm", stroke_width=1, stroke_fill=(0, 0, 0))
  return np.asarray(img)


def _pick(rng: np.random.Generator, held_out: bool, attributes) -> tuple[dict, str, str, tuple[str, ...]]:
  pool = qa_entities(held_out=held_out)
  e = pool[rng.integers(len(pool))]
  attr = attributes[rng.integers(len(attributes))]
  distractors = sorted({x[attr] for x in knowledge_base()})
  return e, attr, e[attr], tuple(distractors)


def sample(rng: np.random.Generator, *, held_out: bool = False) -> common.WorldItem:
  """Text knowledge: a question about one attribute of a QA-split entity (caption: that entity's facts)."""
  e, attr, answer, distractors = _pick(rng, held_out, tuple(QUESTIONS))
  return common.WorldItem(
      domain="knowledge", question=QUESTIONS[attr].format(name=e["name"]), answer=answer, response=answer,
      image=None, choices=common.shuffled_choices(rng, answer, distractors),
      scorer="numeric" if attr == "founded" else "exact", caption=facts(rng, e),
      meta={"entity": e["id"], "attribute": attr})


def sample_card(rng: np.random.Generator, *, held_out: bool = False) -> common.WorldItem:
  """Vision knowledge: a card shows only the name; the question asks an attribute not on the card."""
  e, attr, answer, distractors = _pick(rng, held_out, tuple(_CARD_QUESTIONS))
  return common.WorldItem(
      domain="knowledge_cards", question=_CARD_QUESTIONS[attr], answer=answer, response=answer, image=card(e),
      choices=common.shuffled_choices(rng, answer, distractors),
      scorer="numeric" if attr == "founded" else "exact", caption=facts(rng, e),
      meta={"entity": e["id"], "attribute": attr, "name": e["name"]})


def document(rng: np.random.Generator) -> dict:
  """Pre-training text: the facts of any entity (all entities, held-out QA ones included)."""
  e = knowledge_base()[rng.integers(NUM_ENTITIES)]
  return {"document": [{"type": "text", "text": facts(rng, e)}], "meta": {"domain": "knowledge", "entity": e["id"]}}


def document_card(rng: np.random.Generator) -> dict:
  """Pre-training interleaved image-text: any entity's card followed by its facts."""
  e = knowledge_base()[rng.integers(NUM_ENTITIES)]
  return {"document": [{"type": "image", "image": card(e)}, {"type": "text", "text": facts(rng, e)}],
          "meta": {"domain": "knowledge_cards", "entity": e["id"]}}
