"""OCR domain: short words, numbers and codes rendered in DejaVu fonts (digest §2.2 vision data: OCR)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from k25jax.data.world import common

WORDS = ("apple", "river", "stone", "cloud", "tiger", "green", "north", "paper", "light", "music", "ocean",
         "table", "mango", "pilot", "quiet", "robot", "sugar", "train", "value", "water", "zebra", "amber",
         "bread", "candle", "dragon", "forest", "garden", "harbor", "island", "jungle", "kernel", "lemon",
         "market", "number", "orange", "planet", "rocket", "silver", "temple", "violet", "window", "yellow",
         "copper", "falcon", "meadow", "pepper", "tunnel", "winter", "cactus", "marble")
SIZES = ((112, 56), (168, 56), (224, 56))
_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"


def _text(rng: np.random.Generator) -> str:
  kind = rng.integers(3)
  if kind == 0:
    w = WORDS[rng.integers(len(WORDS))]
    return (w.capitalize(), w, w.upper())[rng.integers(3)]
  if kind == 1:
    return str(int(rng.integers(0, 10 ** int(rng.integers(1, 6)))))
  return "".join(rng.choice(list(_LETTERS), 2)) + "-" + str(int(rng.integers(10, 100)))


def _distractors(rng: np.random.Generator, text: str) -> list[str]:
  """Near-miss strings: one character replaced, two swapped, one dropped."""
  alphabet = "0123456789" if text.isdigit() else "abcdefghijklmnopqrstuvwxyz"
  out = []
  for _ in range(6):
    i = int(rng.integers(len(text)))
    c = alphabet[rng.integers(len(alphabet))]
    out.append(text[:i] + (c.upper() if text[i].isupper() else c) + text[i + 1:])
  if len(text) > 1:
    out.append(text[1:] + text[0])
    out.append(text[:-1])
  return out


def sample(rng: np.random.Generator, *, held_out: bool = False) -> common.WorldItem:
  """Renders one string at a random size, position, font and colour pair, with light noise."""
  del held_out
  text = _text(rng)
  w, h = SIZES[rng.integers(len(SIZES))]
  name = common.FONT_FILES[rng.integers(len(common.FONT_FILES))]
  size = int(rng.integers(16, 31))
  while True:  # shrink until the text fits with a 4 px margin
    f = common.font(size, name)
    x0, y0, x1, y1 = f.getbbox(text)
    if (x1 - x0 <= w - 8 and y1 - y0 <= h - 8) or size <= 10:
      break
    size -= 2
  dark = rng.random() < 0.5  # dark text on light background, or the reverse
  bg = rng.integers(190, 256, 3) if dark else rng.integers(0, 70, 3)
  fg = rng.integers(0, 70, 3) if dark else rng.integers(190, 256, 3)
  img = Image.new("RGB", (w, h), tuple(int(v) for v in bg))
  x = int(rng.integers(4, max(5, w - 4 - (x1 - x0)))) - x0
  y = int(rng.integers(4, max(5, h - 4 - (y1 - y0)))) - y0
  ImageDraw.Draw(img).text((x, y), text, font=f, fill=tuple(int(v) for v in fg))
  pixels = common.add_noise(rng, np.asarray(img), sigma=6.0)
  return common.WorldItem(
      domain="ocr", question="What text is written in the image?", answer=text, response=text, image=pixels,
      choices=common.shuffled_choices(rng, text, _distractors(rng, text)), scorer="ned",
      caption=f'The image shows the text "{text}".', meta={"font": name, "size": size})
