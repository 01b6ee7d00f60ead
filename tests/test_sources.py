"""Real data sources (ENVIRONMENT.md §5): Fashion-MNIST, Shakespeare, tfds ArrayRecord round trip."""

import gzip
import random

import numpy as np
import pytest

from k25jax.data import chat
from k25jax.data.sources import fashion_mnist as fm
from k25jax.data.sources import shakespeare as shk
from k25jax.data.sources import tfds_source as ts
from k25jax.data.tokenizer import ByteTokenizer


def test_fashion_mnist_shapes_and_balance():
  images, labels = fm.load_fashion_mnist("train")
  assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 6000))
  test_images, test_labels = fm.load_fashion_mnist("test")
  assert test_images.shape == (10000, 28, 28) and test_labels.shape == (10000,)
  np.testing.assert_array_equal(np.bincount(test_labels, minlength=10), np.full(10, 1000))
  # The parsed pixels are the bytes after the 16-byte IDX header, computed here another way.
  with gzip.open(fm.ensure_fashion_mnist() / fm.FILES[("test", "images")][0]) as fh:
    raw = fh.read()
  assert raw[16:16 + 784] == test_images[0].tobytes() and raw[-784:] == test_images[-1].tobytes()
  assert len(fm.CLASS_NAMES) == 10 and images.std() > 50  # real images, not blanks


def test_fashion_mnist_conversations():
  source = fm.FashionMnistSource("test", kind="classification")
  conv = source[3]
  label = int(fm.load_fashion_mnist("test")[1][3])
  assert conv["meta"]["answer"] == fm.CLASS_NAMES[label]
  enc = chat.encode_conversation(conv, ByteTokenizer())
  assert ByteTokenizer().decode(enc.tokens[enc.loss_mask]) == fm.CLASS_NAMES[label] + "<|im_end|>"
  assert len(enc.media) == 1 and enc.modality == "vision"
  doc = fm.FashionMnistSource("test", kind="caption")[0]
  assert fm.CLASS_NAMES[int(fm.load_fashion_mnist("test")[1][0])].lower() in doc["document"][1]["text"]
  with pytest.raises(ValueError, match="split 'val'"):
    fm.load_fashion_mnist("val")


def test_shakespeare_corpus_and_split():
  works = shk.load_works()
  assert len(works) == 42 and len({w.name for w in works}) == 42
  assert 5_000_000 < sum(len(w.text) for w in works) < 5_150_000
  assert {w.title for w in works} >= {"King Lear", "The Tempest", "Sonnets"}
  train, held = shk.split_works(works)
  shuffled = list(works)
  random.Random(1).shuffle(shuffled)
  train2, held2 = shk.split_works(shuffled)
  assert [w.name for w in held] == [w.name for w in held2] and len(held) == 4
  assert {w.name for w in train} | {w.name for w in held} == {w.name for w in works}
  assert not {w.name for w in train} & {w.name for w in held}
  assert [w.name for w in shk.split_works(works, seed=1)[1]] != [w.name for w in held]


def test_shakespeare_documents_are_lossless_chunks():
  docs = shk.shakespeare_documents("held_out", chunk_chars=1000)
  _, held = shk.split_works(shk.load_works())
  for work in held:
    chunks = [d["document"][0]["text"] for d in docs if d["meta"]["work"] == work.name]
    assert "".join(chunks) == work.text
    assert max(len(c) for c in chunks) <= 1000 and min(len(c) for c in chunks) > 0
  assert shk.chunk_text("ab\n\ncd\n\nef", 5) == ["ab\n\n", "cd\n\n", "ef"]


def _examples():
  rng = np.random.default_rng(0)
  img = lambda h, w: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # noqa: E731
  return {
      "text": [{"document": [{"type": "text", "text": "Thou art é 你"}], "meta": {"id": 0}},
               {"document": [{"type": "text", "text": "second"}], "meta": {}}],
      "image_caption": [{"document": [{"type": "image", "image": img(5, 7)}, {"type": "text", "text": "cap"}],
                         "meta": {"k": "v"}}],
      "interleaved": [{"document": [{"type": "text", "text": "a"}, {"type": "image", "image": img(3, 4)},
                                    {"type": "text", "text": "b"}, {"type": "image", "image": img(6, 2)}],
                       "meta": {}},
                      {"document": [{"type": "text", "text": "no images"}], "meta": {}}],
      "conversation": [{"messages": [
          {"role": "user", "content": [{"type": "image", "image": img(4, 4)}, {"type": "text", "text": "q"}]},
          {"role": "assistant", "content": [{"type": "text", "text": "a"}],
           "tool_calls": [{"name": "f", "arguments": "{}"}]}], "meta": {"answer": "a"}}],
  }


def _assert_same(a, b):
  if isinstance(a, dict):
    assert set(a) == set(b)
    for k in a:
      _assert_same(a[k], b[k])
  elif isinstance(a, (list, tuple)):
    assert len(a) == len(b)
    for x, y in zip(a, b):
      _assert_same(x, y)
  elif isinstance(a, np.ndarray):
    np.testing.assert_array_equal(a, b)
  else:
    assert a == b


def test_tfds_arrayrecord_round_trip(tmp_path):
  import grain

  for layout, examples in _examples().items():
    name = f"toy_{layout}"
    ts.write_arrayrecord_dataset(name, tmp_path, {"train": examples}, layout=layout)
    source = ts.tfds_source(name, "train", tmp_path)
    assert source.layout == layout and len(source) == len(examples)
    for i, example in enumerate(examples):
      _assert_same(example, source[i])
  ds = grain.MapDataset.source(ts.tfds_source("toy_interleaved", "train", tmp_path))
  assert ds[0]["document"][1]["image"].shape == (3, 4, 3)
  with pytest.raises(ValueError, match="image_caption' needs \\[image, text\\]"):
    ts.write_arrayrecord_dataset("bad_caption", tmp_path, {"train": _examples()["text"]}, layout="image_caption")
  with pytest.raises(FileNotFoundError, match="no dataset 'missing'"):
    ts.tfds_source("missing", "train", tmp_path)
