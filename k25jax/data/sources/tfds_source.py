"""tfds ArrayRecord datasets as random-access sources of documents/conversations (ENVIRONMENT.md §5).

Works without TensorFlow: datasets are written by a small `GeneratorBasedBuilder` with
`file_format='array_record'` and read with `tfds.data_source`. Images are stored as raw RGB uint8
`tfds.features.Tensor`s (PNG encoding would need TensorFlow). Feature layouts, detected from the keys on read:

  text           {"text": Text}                                   -> {"document": [text]}
  image_caption  {"image": Tensor[H, W, 3] uint8, "caption": Text} -> {"document": [image, text]}
  interleaved    {"document": Text (JSON parts), "pixels": Tensor[P] uint8, "image_shapes": Tensor[K, 3] int32}
                 -> {"document": parts}
  conversation   {"messages": Text (JSON messages), "pixels", "image_shapes"} -> {"messages": messages}
In the JSON layouts an image part is stored as {"type": "image", "index": k}: image k is the k-th
`image_shapes` row, its pixels the matching slice of the flat `pixels` (ragged image sequences cannot be decoded
by tfds without TensorFlow). Video parts are not supported in tfds datasets. Every record also has "meta" (Text,
JSON object). These are the document/conversation dicts of `k25jax/data/example.py`, encoded by
`k25jax.data.chat` (digest §2: image-text and interleaved pre-training data; §3: SFT conversations).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LAYOUTS = ("text", "image_caption", "interleaved", "conversation")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _features(layout: str):
  import tensorflow_datasets as tfds

  f = tfds.features
  rgb = f.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="bytes")
  flat = {"pixels": f.Tensor(shape=(None,), dtype=np.uint8, encoding="bytes"),
          "image_shapes": f.Tensor(shape=(None, 3), dtype=np.int32)}
  by_layout = {"text": {"text": f.Text()}, "image_caption": {"image": rgb, "caption": f.Text()},
               "interleaved": {"document": f.Text(), **flat}, "conversation": {"messages": f.Text(), **flat}}
  return f.FeaturesDict({**by_layout[layout], "meta": f.Text()})


def _rgb(image, where: str) -> np.ndarray:
  from k25jax.data import media

  return media.to_rgb_uint8(image, name=where)


def _pack_images(parts_tree, where: str) -> tuple[Any, np.ndarray, np.ndarray]:
  """Replaces image parts by {"type": "image", "index": k}; returns the JSON-able tree, flat pixels and shapes."""
  images: list[np.ndarray] = []

  def visit(part, path):
    if isinstance(part, Mapping) and part.get("type") == "image":
      images.append(_rgb(part.get("image"), f"{where} {path}"))
      return {"type": "image", "index": len(images) - 1}
    if isinstance(part, Mapping) and part.get("type") == "video":
      raise ValueError(f"{where} {path}: video parts cannot be stored in a tfds dataset; split the video into "
                       "image parts or keep it in a generator source")
    if isinstance(part, Mapping):
      return {k: visit(v, f"{path}.{k}") for k, v in part.items()}
    if isinstance(part, (list, tuple)):
      return [visit(v, f"{path}[{i}]") for i, v in enumerate(part)]
    return part

  tree = visit(parts_tree, "")
  pixels = np.concatenate([im.reshape(-1) for im in images]) if images else np.zeros((0,), np.uint8)
  shapes = np.asarray([im.shape for im in images], np.int32).reshape(-1, 3)
  return tree, pixels, shapes


def _unpack_images(tree, pixels: np.ndarray, shapes: np.ndarray):
  offsets = np.concatenate([[0], np.cumsum(np.prod(shapes, axis=1))]).astype(np.int64)
  if offsets[-1] != pixels.size:
    raise ValueError(f"tfds record: image_shapes cover {offsets[-1]} pixels but 'pixels' holds {pixels.size}; "
                     "the dataset is corrupt: rewrite it with write_arrayrecord_dataset")

  def visit(part):
    if isinstance(part, dict) and part.get("type") == "image" and "index" in part:
      k = part["index"]
      return {"type": "image", "image": pixels[offsets[k]:offsets[k + 1]].reshape(shapes[k])}
    if isinstance(part, dict):
      return {k: visit(v) for k, v in part.items()}
    if isinstance(part, list):
      return [visit(v) for v in part]
    return part

  return visit(tree)


def _to_features(example: Mapping[str, Any], layout: str, where: str) -> dict[str, Any]:
  """A document/conversation dict -> the feature dict of `layout`."""
  meta = json.dumps(example.get("meta", {}))
  if layout == "conversation":
    if "messages" not in example:
      raise ValueError(f"{where}: layout 'conversation' needs a 'messages' list")
    tree, pixels, shapes = _pack_images(list(example["messages"]), where)
    return {"messages": json.dumps(tree), "pixels": pixels, "image_shapes": shapes, "meta": meta}
  if "document" not in example:
    raise ValueError(f"{where}: layout {layout!r} needs a 'document' list of parts")
  parts = list(example["document"])
  if layout == "interleaved":
    tree, pixels, shapes = _pack_images(parts, where)
    return {"document": json.dumps(tree), "pixels": pixels, "image_shapes": shapes, "meta": meta}
  kinds = [p.get("type") if isinstance(p, Mapping) else None for p in parts]
  if layout == "text":
    if kinds != ["text"]:
      raise ValueError(f"{where}: layout 'text' needs exactly one text part, got part types {kinds}")
    return {"text": parts[0]["text"], "meta": meta}
  if kinds != ["image", "text"]:
    raise ValueError(f"{where}: layout 'image_caption' needs [image, text] parts, got {kinds}; use "
                     "layout='interleaved' for other orders")
  return {"image": _rgb(parts[0]["image"], f"{where} image"), "caption": parts[1]["text"], "meta": meta}


def _from_features(record: Mapping[str, Any], layout: str) -> dict[str, Any]:
  """A decoded tfds record -> the document/conversation dict (inverse of `_to_features`)."""
  text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
  meta = json.loads(text(record["meta"]))
  if layout == "text":
    return {"document": [{"type": "text", "text": text(record["text"])}], "meta": meta}
  if layout == "image_caption":
    return {"document": [{"type": "image", "image": np.asarray(record["image"])},
                         {"type": "text", "text": text(record["caption"])}], "meta": meta}
  key = "document" if layout == "interleaved" else "messages"
  tree = _unpack_images(json.loads(text(record[key])), np.asarray(record["pixels"]),
                        np.asarray(record["image_shapes"]))
  return {key: tree, "meta": meta}


def detect_layout(feature_keys) -> str:
  """The layout whose feature keys equal `feature_keys` (see the module docstring)."""
  keys = set(feature_keys)
  for layout in LAYOUTS:
    if keys == set(_features(layout).keys()):
      return layout
  raise ValueError(f"tfds dataset with features {sorted(keys)} matches none of the layouts {LAYOUTS}; write it "
                   "with write_arrayrecord_dataset or convert it to one of the documented layouts")


def write_arrayrecord_dataset(name: str, data_dir: str | os.PathLike,
                              splits: Mapping[str, Sequence[Mapping[str, Any]]], *, layout: str,
                              version: str = "1.0.0") -> str:
  """Writes documents/conversations as a tfds ArrayRecord dataset `<data_dir>/<name>/<version>` (no TensorFlow).

  Idempotent: an existing dataset of that name and version is kept as it is. Returns the dataset folder.
  """
  import tensorflow_datasets as tfds

  if not _NAME_RE.match(name):
    raise ValueError(f"write_arrayrecord_dataset: name {name!r} must be snake_case ([a-z][a-z0-9_]*)")
  if layout not in LAYOUTS:
    raise ValueError(f"write_arrayrecord_dataset: layout {layout!r} is not one of {LAYOUTS}")
  if not splits:
    raise ValueError("write_arrayrecord_dataset: no splits given; pass e.g. {'train': [examples]}")

  class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(version)

    # No code folder with download checksums: without this tfds locates the defining package through the
    # `importlib_resources` backport, which the environment does not ship.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      return None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=_features(layout))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split, examples) for split, examples in splits.items()}

    def _generate_examples(self, split, examples):
      for i, example in enumerate(examples):
        yield i, _to_features(example, layout, f"{name}/{split} example {i}")

  _Builder.name = name
  builder = _Builder(data_dir=os.fspath(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


class TfdsSource(Sequence):
  """Random-access source (usable as a grain `MapDataset.source`) of documents/conversations."""

  def __init__(self, data_source):
    self._source = data_source
    self.layout = detect_layout(data_source.dataset_info.features.keys())

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return _from_features(self._source[int(index)], self.layout)


def tfds_source(name: str, split: str, data_dir: str | os.PathLike) -> TfdsSource:
  """Opens `name` (optionally `name:version`) from `data_dir` with `tfds.data_source` (ArrayRecord files)."""
  import tensorflow_datasets as tfds

  if not os.path.isdir(os.path.join(data_dir, name.split(":")[0])):
    raise FileNotFoundError(f"tfds_source: no dataset {name!r} under {data_dir}; write one with "
                            "write_arrayrecord_dataset or point data_dir at a prepared tfds folder")
  return TfdsSource(tfds.data_source(name, split=split, data_dir=os.fspath(data_dir)))
