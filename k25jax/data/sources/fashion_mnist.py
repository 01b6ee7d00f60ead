"""Fashion-MNIST (real 28x28 grayscale clothing images, 10 classes; ENVIRONMENT.md §5) as conversations/documents.

Files come from Debian's `dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist`, or wherever `dpkg -L`
puts them), else from the canonical URLs into `data_cache_dir()/fashion_mnist`, verified by the SHA-256 of the
*decompressed* IDX payload (the Debian .gz files differ in compression from the upstream ones; the data does not).
Images stay 28x28 uint8: the consumer upscales (e.g. to 56x56) where its media budget needs more than one token.
Used for the vision side of the early-fusion experiment (digest §2.1) and the image-classification evals.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pathlib
import shutil
import subprocess
import urllib.request
from collections.abc import Sequence
from typing import Any

import numpy as np

from k25jax.data.sources import data_cache_dir

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
BASE_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SPLITS = ("train", "test")
# (split, part) -> (file name, SHA-256 of the decompressed IDX bytes, item count).
FILES = {
    ("train", "images"): ("train-images-idx3-ubyte.gz",
                          "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 60000),
    ("train", "labels"): ("train-labels-idx1-ubyte.gz",
                          "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60000),
    ("test", "images"): ("t10k-images-idx3-ubyte.gz",
                         "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 10000),
    ("test", "labels"): ("t10k-labels-idx1-ubyte.gz",
                         "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10000),
}
CLASS_NAMES: tuple[str, ...] = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                "Sneaker", "Bag", "Ankle boot")
QUESTIONS: tuple[str, ...] = (
    "What clothing item is shown in this image? Answer with one of: {options}.",
    "Which category does this article belong to? Choose from: {options}.",
    "Classify the image. Options: {options}.",
)
CAPTIONS: tuple[str, ...] = ("A photo of {article} {name}.", "This picture shows {article} {name}.",
                             "{Article} {name} on a black background.")
_IDX_MAGIC = {"images": 2051, "labels": 2049}


def _has_all(directory: pathlib.Path) -> bool:
  return all((directory / name).is_file() for name, _, _ in FILES.values())


def find_fashion_mnist_dir() -> pathlib.Path | None:
  """The folder holding the four IDX .gz files: Debian's, the one `dpkg -L` reports, or the cache; else None."""
  for directory in (DEBIAN_DIR, data_cache_dir() / "fashion_mnist"):
    if _has_all(directory):
      return directory
  if shutil.which("dpkg"):  # the package installed under another prefix
    listing = subprocess.run(["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, check=False).stdout
    for line in listing.splitlines():
      if line.endswith(FILES[("train", "images")][0]) and _has_all(pathlib.Path(line).parent):
        return pathlib.Path(line).parent
  return None


def _sha256_gz(path: pathlib.Path) -> str:
  with gzip.open(path, "rb") as fh:
    return hashlib.sha256(fh.read()).hexdigest()


def ensure_fashion_mnist() -> pathlib.Path:
  """Returns the data folder, downloading into `data_cache_dir()/fashion_mnist` (SHA-256 checked) if needed."""
  found = find_fashion_mnist_dir()
  if found is not None:
    return found
  target = data_cache_dir() / "fashion_mnist"
  target.mkdir(parents=True, exist_ok=True)
  for name, sha, _ in FILES.values():
    dest = target / name
    if dest.is_file():
      continue
    tmp = dest.with_suffix(".part")
    try:
      with urllib.request.urlopen(BASE_URL + name, timeout=60) as response, open(tmp, "wb") as out:
        shutil.copyfileobj(response, out)
    except OSError as e:
      raise RuntimeError(f"Fashion-MNIST: download of {BASE_URL + name} failed ({e}); install Debian's "
                         f"package instead (`apt-get install -y {DEBIAN_PACKAGE}`) or put the four IDX .gz files "
                         f"in {target}") from None
    got = _sha256_gz(tmp)
    if got != sha:
      tmp.unlink()
      raise RuntimeError(f"Fashion-MNIST: {name} from {BASE_URL} has payload SHA-256 {got}, expected {sha}; "
                         "the download is corrupt or the mirror changed; retry or use the Debian package")
    os.replace(tmp, dest)
  return target


def _read_idx(path: pathlib.Path, part: str, count: int) -> np.ndarray:
  with gzip.open(path, "rb") as fh:
    raw = fh.read()
  ndim = 3 if part == "images" else 1
  header = np.frombuffer(raw, ">i4", count=1 + ndim)
  expected = (count, 28, 28) if part == "images" else (count,)
  if header[0] != _IDX_MAGIC[part] or tuple(header[1:]) != expected:
    raise ValueError(f"Fashion-MNIST: {path} has IDX header {header.tolist()}, expected magic {_IDX_MAGIC[part]} "
                     f"and shape {expected}; the file is corrupt: delete it and run `python -m "
                     "k25jax.data.prepare`")
  data = np.frombuffer(raw, np.uint8, offset=4 * (1 + ndim))
  if data.size != int(np.prod(expected)):
    raise ValueError(f"Fashion-MNIST: {path} holds {data.size} bytes of data, expected {np.prod(expected)} "
                     "(truncated file); delete it and run `python -m k25jax.data.prepare`")
  return data.reshape(expected)


@functools.lru_cache(maxsize=2)
def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28], labels int64 [N]) of `split` ("train": 60000, "test": 10000); read-only arrays."""
  if split not in SPLITS:
    raise ValueError(f"load_fashion_mnist: split {split!r} is not one of {SPLITS}")
  directory = ensure_fashion_mnist()
  images = _read_idx(directory / FILES[(split, "images")][0], "images", FILES[(split, "images")][2])
  labels = _read_idx(directory / FILES[(split, "labels")][0], "labels", FILES[(split, "labels")][2])
  if labels.max() >= len(CLASS_NAMES):
    raise ValueError(f"Fashion-MNIST {split}: label {labels.max()} out of range 0..9; the label file is corrupt")
  labels = labels.astype(np.int64)
  labels.flags.writeable = False
  return images, labels


def _check_label(label: int) -> str:
  if not 0 <= int(label) < len(CLASS_NAMES):
    raise ValueError(f"Fashion-MNIST: label {label} out of range 0..{len(CLASS_NAMES) - 1}")
  return CLASS_NAMES[int(label)]


def classification_conversation(image: np.ndarray, label: int, *, variant: int = 0) -> dict[str, Any]:
  """User: image + multiple-choice question (template `variant % 3`); assistant: the class name."""
  name = _check_label(label)
  question = QUESTIONS[variant % len(QUESTIONS)].format(options=", ".join(CLASS_NAMES))
  return {"messages": [
      {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
      {"role": "assistant", "content": [{"type": "text", "text": name}]}],
      "meta": {"domain": "fashion_mnist", "answer": name, "label": int(label)}}


def caption_document(image: np.ndarray, label: int, *, variant: int = 0) -> dict[str, Any]:
  """An image-caption pre-training document: the image, then a caption naming the class (template `variant % 3`)."""
  name = _check_label(label).lower()
  article = "an" if name[0] in "aeiou" else "a"
  caption = CAPTIONS[variant % len(CAPTIONS)].format(article=article, Article=article.capitalize(), name=name)
  return {"document": [{"type": "image", "image": image}, {"type": "text", "text": caption}],
          "meta": {"domain": "fashion_mnist", "answer": CLASS_NAMES[int(label)], "label": int(label)}}


class FashionMnistSource(Sequence):
  """Random-access source (grain `MapDataset.source`) of classification conversations or caption documents."""

  def __init__(self, split: str = "train", kind: str = "classification"):
    if kind not in ("classification", "caption"):
      raise ValueError(f"FashionMnistSource: kind {kind!r}; use 'classification' or 'caption'")
    self.images, self.labels = load_fashion_mnist(split)
    self.kind = kind

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    make = classification_conversation if self.kind == "classification" else caption_document
    example = make(self.images[index], self.labels[index], variant=index)
    example["meta"]["index"] = index
    return example
