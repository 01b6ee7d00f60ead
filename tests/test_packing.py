"""Packing invariants (k25jax/data/packing.py): segments, targets, loss mask, media order and budgets."""

import dataclasses

import numpy as np
import pytest

from k25jax.data.example import Encoded
from k25jax.data.packing import PackSpec, pack, split_example

PAD, MEDIA_PAD, BEGIN, END = 0, 3, 4, 5
ID_BASE = 1000  # first token of example i is ID_BASE + i (identifies segments independently of the packer)


@dataclasses.dataclass(frozen=True, eq=False)
class FakeItem:
  patches: np.ndarray
  grid: tuple

  @property
  def num_tokens(self):
    return (self.grid[1] // 2) * (self.grid[2] // 2)

  @property
  def num_patches(self):
    return int(np.prod(self.grid))


def make_item(tag: float, h: int, w: int) -> FakeItem:
  grid = (1, 2 * h, 2 * w)
  return FakeItem(np.full((int(np.prod(grid)), 588), tag, np.float32), grid)


def make_example(i: int, rng: np.random.Generator, n_items: int, text_len: int = 0) -> Encoded:
  """[id] text ([BEGIN] pads [END] text)*; loss on random text positions."""
  toks, media = [ID_BASE + i], []
  toks += list(rng.integers(10, 100, text_len or rng.integers(1, 8)))
  for k in range(n_items):
    item = make_item(i + k / 10, int(rng.integers(1, 3)), int(rng.integers(1, 3)))
    media.append(item)
    toks += [BEGIN] + [MEDIA_PAD] * item.num_tokens + [END] + list(rng.integers(10, 100, rng.integers(1, 5)))
  toks = np.asarray(toks)
  loss = (rng.random(len(toks)) < 0.7) & (toks != MEDIA_PAD)
  return Encoded(toks, loss, media, "vision" if media else "text", "synthetic")


def examples(n: int, seed: int = 0) -> list[Encoded]:
  rng = np.random.default_rng(seed)
  return [make_example(i, rng, int(rng.integers(0, 3)) if rng.random() < 0.5 else 0) for i in range(n)]


SPEC = PackSpec(batch_size=4, seq_len=48, patch_budget=96, max_items=8, media_pad_id=MEDIA_PAD, pad_id=PAD,
                max_misses=6)


def segments_of(batch):
  """(row, start, end) of every segment, read from segment_ids; also checks they are contiguous 1..k then 0."""
  out = []
  for r, seg in enumerate(batch["segment_ids"]):
    used = seg[seg > 0]
    n_used = len(used)
    assert np.all(seg[n_used:] == 0), "padding must only follow the segments"
    assert np.all(np.diff(used) >= 0) and np.all(np.diff(used) <= 1) and (n_used == 0 or used[0] == 1)
    for s in np.unique(used):
      idx = np.flatnonzero(seg == s)
      assert np.all(np.diff(idx) == 1), f"segment {s} of row {r} is not contiguous"
      out.append((r, int(idx[0]), int(idx[-1]) + 1))
  return out


def test_pack_invariants():
  exs = examples(60)
  batch, stats = pack(iter(exs), SPEC)
  segs = segments_of(batch)
  assert stats.examples == len(segs) > 8 and stats.split == 0 and stats.dropped == 0
  placed = []
  for r, a, b in segs:
    i = int(batch["tokens"][r, a]) - ID_BASE
    ex = exs[i]
    placed.append(i)
    np.testing.assert_array_equal(batch["tokens"][r, a:b], ex.tokens)
    np.testing.assert_array_equal(batch["positions"][r, a:b], np.arange(b - a))
    np.testing.assert_array_equal(batch["targets"][r, a:b - 1], ex.tokens[1:])
    np.testing.assert_array_equal(batch["loss_mask"][r, a:b], np.append(ex.loss_mask[1:], False))
  assert len(set(placed)) == len(placed)
  # Loss count = per-example targets of the placed examples.
  assert batch["loss_mask"].sum() == sum(exs[i].loss_mask[1:].sum() for i in placed) == stats.target_tokens
  # Block-diagonal causal attention from segment ids equals "same example and not in the future".
  seg, pos = batch["segment_ids"], batch["positions"]
  owner = np.full(seg.shape, -1)
  for (r, a, b), i in zip(segs, placed):
    owner[r, a:b] = i
  allowed = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
  allowed &= pos[:, :, None] >= pos[:, None, :]
  causal = np.tril(np.ones((SPEC.seq_len, SPEC.seq_len), bool))
  expected = (owner[:, :, None] == owner[:, None, :]) & (owner[:, :, None] >= 0) & causal
  np.testing.assert_array_equal(allowed, expected)
  # Media: placeholders row-major == item order; pads == sum(num_tokens); patches follow item ids.
  media = [item for i in placed for item in exs[i].media]
  n_items = int(batch["item_valid"].sum())
  assert n_items == len(media) == stats.items and stats.vision_examples > 0
  assert not batch["item_valid"][n_items:].any()
  n_pads = int((batch["tokens"] == MEDIA_PAD).sum())
  assert n_pads == sum(m.num_tokens for m in media) == stats.vision_tokens
  assert n_pads == sum((g[1] // 2) * (g[2] // 2) for g in batch["item_grid"][batch["item_valid"]])
  np.testing.assert_array_equal(batch["item_grid"][:n_items], [m.grid for m in media])
  n_patch = sum(m.num_patches for m in media)
  np.testing.assert_array_equal(batch["patches"][:n_patch], np.concatenate([m.patches for m in media]))
  np.testing.assert_array_equal(batch["patch_item_ids"][:n_patch],
                                np.repeat(np.arange(1, n_items + 1), [m.num_patches for m in media]))
  assert not batch["patch_item_ids"][n_patch:].any() and not batch["patches"][n_patch:].any()
  assert stats.text_tokens == int((seg > 0).sum()) - n_pads


def test_static_shapes_and_dtypes():
  batch, _ = pack(iter(examples(5)), SPEC)
  assert batch["tokens"].shape == (4, 48) and batch["tokens"].dtype == np.int32
  assert batch["patches"].shape == (96, 588) and batch["patches"].dtype == np.float32
  assert batch["item_grid"].shape == (8, 3) and batch["item_valid"].dtype == bool
  assert batch["loss_mask"].dtype == bool and batch["patch_item_ids"].shape == (96,)


def test_long_example_split_at_media_boundaries():
  rng = np.random.default_rng(1)
  ex = make_example(0, rng, n_items=6, text_len=30)
  spec = dataclasses.replace(SPEC, seq_len=24, patch_budget=40, max_items=3)
  chunks = split_example(ex, spec)
  assert len(chunks) > 1
  np.testing.assert_array_equal(np.concatenate([c.tokens for c in chunks]), ex.tokens)
  assert [m for c in chunks for m in c.media] == ex.media
  for c in chunks:
    assert len(c.tokens) <= 24 and len(c.media) <= 3 and sum(m.num_patches for m in c.media) <= 40
    assert (c.tokens == MEDIA_PAD).sum() == sum(m.num_tokens for m in c.media)  # no item cut
  batch, stats = pack(iter([ex]), dataclasses.replace(spec, batch_size=len(chunks)))
  n_segs = len(segments_of(batch))
  assert stats.split == 1 and stats.examples == 1 and 1 <= n_segs < len(chunks)  # the item budget binds
  assert stats.split_chunks_dropped == len(chunks) - n_segs and stats.items <= 3
  placed = [m for c in chunks[:n_segs] for m in c.media]
  assert (batch["tokens"] == MEDIA_PAD).sum() == sum(m.num_tokens for m in placed) == stats.vision_tokens


def test_oversized_item_is_dropped_and_counted():
  big = Encoded(np.r_[ID_BASE, BEGIN, [MEDIA_PAD] * 25, END], np.ones(28, bool), [make_item(0, 5, 5)], "vision")
  assert split_example(big, SPEC) is None  # 100 patches > budget 96
  long_item = Encoded(np.r_[ID_BASE, [MEDIA_PAD] * 49], np.ones(50, bool), [make_item(0, 7, 7)], "vision")
  assert split_example(long_item, dataclasses.replace(SPEC, patch_budget=500)) is None  # 49 pads > row of 48
  rest = examples(3)
  batch, stats = pack(iter([big] + rest), SPEC)
  assert stats.dropped == 1 and stats.examples == 3
  assert stats.items == sum(len(e.media) for e in rest) and int(batch["tokens"][0, 0]) == ID_BASE + 0


def test_budget_full_closes_batch_after_misses():
  spec = dataclasses.replace(SPEC, batch_size=1, seq_len=16, max_misses=2)
  rng = np.random.default_rng(2)
  exs = [make_example(i, rng, 0, text_len=9) for i in range(5)]  # 10 tokens each: one fits per row
  batch, stats = pack(iter(exs), spec)
  assert stats.examples == 1 and stats.skipped == 2  # two misses, then closed; examples 3, 4 never read


def test_placeholder_mismatch_is_an_error():
  ex = Encoded(np.r_[ID_BASE, BEGIN, MEDIA_PAD, END], np.ones(4, bool), [make_item(0, 1, 2)], "vision")
  with pytest.raises(ValueError, match="media_pad tokens"):
    pack(iter([ex]), SPEC)


def test_spec_errors():
  with pytest.raises(ValueError, match="seq_len"):
    PackSpec(batch_size=1, seq_len=0, patch_budget=1, max_items=1, media_pad_id=3)
  with pytest.raises(ValueError, match="media_pad_id"):
    PackSpec(batch_size=1, seq_len=8, patch_budget=1, max_items=1, media_pad_id=0, pad_id=0)
