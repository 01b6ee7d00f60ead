"""Packing of `Encoded` examples into fixed-shape batches: token rows plus a per-batch patch budget.

Digest §7 "Data loading" (sequence packing on the fly) and §1.2-1.3 (one `<|media_pad|>` per visual token, items
in placeholder order). Shapes are static (DESIGN.md "Shapes are static under jit"):

  tokens, targets, segment_ids, positions  int32 [B, L]   (targets: next token inside the segment)
  loss_mask                                bool  [B, L]   (on targets; never on a media pad or across segments)
  patches                                  f32   [P, D]   (D = 588 = 14*14*3)
  patch_item_ids                           int32 [P]      (0 = padding; items numbered 1..M)
  item_grid                                int32 [M, 3]   ((t, h, w) per item, zeros when invalid)
  item_valid                               bool  [M]

Items are numbered in the order their placeholders appear in the rows, row-major over the batch, so scattering the
merged vision tokens in order into the media-pad positions of `tokens` is correct.

Placement is first-fit over rows in draw order. An example that cannot fit an empty row (too long, too many
patches or items) is split at cuts that never fall inside a media item's pads; if one item alone exceeds the row
or the budget the example is dropped. When no row has room, the example is skipped; the batch closes after
`max_misses` skips. `PackStats` counts all of these plus tokens by modality.

`grain.experimental.FirstFitPackIterDataset` is not used: it packs flat token features only and cannot keep a
variable list of media items whole under a joint token + patch budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from k25jax.data.example import Encoded

PATCH_DIM = 588  # 14 * 14 * 3, digest §1.3


@dataclasses.dataclass(frozen=True)
class PackSpec:
  """Static shapes and ids of a packed host-local batch."""
  batch_size: int
  seq_len: int
  patch_budget: int
  max_items: int
  media_pad_id: int
  pad_id: int = 0
  patch_dim: int = PATCH_DIM
  max_misses: int = 4

  def __post_init__(self):
    for name in ("batch_size", "seq_len", "patch_budget", "max_items", "patch_dim", "max_misses"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"PackSpec.{name}={getattr(self, name)} must be a positive integer")
    if self.media_pad_id == self.pad_id:
      raise ValueError(f"PackSpec.media_pad_id={self.media_pad_id} equals pad_id; use the tokenizer's distinct ids")


@dataclasses.dataclass
class PackStats:
  """Per-batch counts (digest §2.1 "tokens seen by modality"; drops and splits of the packer)."""
  examples: int = 0          # examples with at least one chunk placed
  text_examples: int = 0
  vision_examples: int = 0
  text_tokens: int = 0       # placed non-media tokens
  vision_tokens: int = 0     # placed media-pad tokens (= visual tokens after the 2x2 merge)
  vision_data_tokens: int = 0  # placed tokens of vision examples (their media pads and their text)
  target_tokens: int = 0     # loss-mask count
  patches: int = 0
  items: int = 0
  split: int = 0             # examples cut into several chunks
  split_chunks_dropped: int = 0  # chunks of split examples that found no room
  dropped: int = 0           # examples with a media item larger than a row or the patch budget
  skipped: int = 0           # examples that found no room in this batch

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def _item_spans(ex: Encoded, spec: PackSpec) -> tuple[np.ndarray, np.ndarray]:
  """First and last pad position of each media item, after checking the placeholder rule (digest §1.2)."""
  pads = np.flatnonzero(ex.tokens == spec.media_pad_id)
  sizes = np.asarray([int(item.num_tokens) for item in ex.media], np.int64)
  if pads.size != sizes.sum():
    raise ValueError(f"example (domain {ex.domain!r}, meta {ex.meta}) has {pads.size} media_pad tokens but its "
                     f"{len(ex.media)} media items need {int(sizes.sum())}; expand each placeholder to "
                     "item.num_tokens pads (k25jax.data.chat)")
  for k, item in enumerate(ex.media):
    t, h, w = (int(g) for g in item.grid)
    if sizes[k] <= 0 or np.shape(item.patches) != (t * h * w, spec.patch_dim):
      raise ValueError(f"media item {k} of example (domain {ex.domain!r}) has patches {np.shape(item.patches)}, "
                       f"grid {tuple(item.grid)}, num_tokens {sizes[k]}; expected patches ({t * h * w}, "
                       f"{spec.patch_dim}) and num_tokens > 0 (k25jax.data.media.preprocess_image)")
  ends = np.cumsum(sizes)
  return pads[ends - sizes], pads[ends - 1]


def split_example(ex: Encoded, spec: PackSpec) -> list[Encoded] | None:
  """Chunks of `ex` that each fit an empty row, the patch budget and `max_items` (digest §7 packing).

  Cuts never fall inside an item's pads. Returns `[ex]` when it fits whole and None when a single media item is
  longer than a row or has more patches than the budget (the example must be dropped).
  """
  starts, ends = _item_spans(ex, spec)
  num_patches = [int(item.num_patches) for item in ex.media]
  if any(e - s + 1 > spec.seq_len for s, e in zip(starts, ends)) or any(n > spec.patch_budget for n in num_patches):
    return None
  if len(ex.tokens) <= spec.seq_len and sum(num_patches) <= spec.patch_budget and len(ex.media) <= spec.max_items:
    return [ex]
  n, a, k, chunks = len(ex.tokens), 0, 0, []
  while a < n:
    c, first, used = min(a + spec.seq_len, n), k, 0
    while k < len(ex.media) and starts[k] < c:
      if ends[k] >= c or used + num_patches[k] > spec.patch_budget or k - first + 1 > spec.max_items:
        c = int(starts[k])
        break
      used += num_patches[k]
      k += 1
    chunks.append(Encoded(ex.tokens[a:c], ex.loss_mask[a:c], list(ex.media[first:k]), ex.modality, ex.domain,
                          ex.meta))
    a = c
  return chunks


def _empty_batch(spec: PackSpec) -> dict[str, np.ndarray]:
  b, l, p, m = spec.batch_size, spec.seq_len, spec.patch_budget, spec.max_items
  return dict(
      tokens=np.full((b, l), spec.pad_id, np.int32), targets=np.full((b, l), spec.pad_id, np.int32),
      loss_mask=np.zeros((b, l), bool), segment_ids=np.zeros((b, l), np.int32),
      positions=np.zeros((b, l), np.int32), patches=np.zeros((p, spec.patch_dim), np.float32),
      patch_item_ids=np.zeros((p,), np.int32), item_grid=np.zeros((m, 3), np.int32),
      item_valid=np.zeros((m,), bool))


def pack(examples: Iterable[Encoded], spec: PackSpec) -> tuple[dict[str, np.ndarray], PackStats]:
  """Packs examples, pulled lazily in order, into one fixed-shape batch (module docstring has the layout)."""
  stats = PackStats()
  rows: list[list[Encoded]] = [[] for _ in range(spec.batch_size)]
  free = [spec.seq_len] * spec.batch_size
  patches_used = items_used = misses = 0
  for ex in examples:
    if max(free) == 0:
      break
    chunks = split_example(ex, spec)
    if chunks is None:
      stats.dropped += 1
      continue
    placed = 0
    for ch in chunks:
      n_patch = sum(int(item.num_patches) for item in ch.media)
      if patches_used + n_patch > spec.patch_budget or items_used + len(ch.media) > spec.max_items:
        break
      row = next((r for r in range(spec.batch_size) if free[r] >= len(ch.tokens)), None)
      if row is None:
        break
      rows[row].append(ch)
      free[row] -= len(ch.tokens)
      stats.vision_data_tokens += len(ch.tokens) if ex.modality == "vision" else 0
      patches_used += n_patch
      items_used += len(ch.media)
      placed += 1
    if len(chunks) > 1:
      stats.split += 1
      stats.split_chunks_dropped += len(chunks) - placed
    if placed:
      stats.examples += 1
      stats.vision_examples += ex.modality == "vision"
      stats.text_examples += ex.modality != "vision"
    else:
      stats.skipped += 1
    if placed < len(chunks):
      misses += 1
      if misses >= spec.max_misses:
        break
  return _assemble(rows, spec, stats), stats


def _assemble(rows: list[list[Encoded]], spec: PackSpec, stats: PackStats) -> dict[str, np.ndarray]:
  """Writes placed chunks row-major; media follow their placeholders in the same order."""
  batch = _empty_batch(spec)
  p = item_id = 0
  for r, segments in enumerate(rows):
    off = 0
    for seg, ch in enumerate(segments, start=1):
      n, toks = len(ch.tokens), ch.tokens
      sl = slice(off, off + n)
      batch["tokens"][r, sl] = toks
      batch["segment_ids"][r, sl] = seg
      batch["positions"][r, sl] = np.arange(n)
      batch["targets"][r, off:off + n - 1] = toks[1:]
      batch["loss_mask"][r, off:off + n - 1] = ch.loss_mask[1:] & (toks[1:] != spec.media_pad_id)
      for item in ch.media:
        item_id += 1
        n_patch = int(item.num_patches)
        batch["patches"][p:p + n_patch] = item.patches
        batch["patch_item_ids"][p:p + n_patch] = item_id
        batch["item_grid"][item_id - 1] = tuple(int(g) for g in item.grid)
        batch["item_valid"][item_id - 1] = True
        p += n_patch
      off += n
  is_media = batch["tokens"] == spec.media_pad_id
  stats.vision_tokens = int(is_media.sum())
  stats.text_tokens = int(((batch["segment_ids"] > 0) & ~is_media).sum())
  stats.target_tokens = int(batch["loss_mask"].sum())
  stats.patches, stats.items = p, item_id
  return batch
