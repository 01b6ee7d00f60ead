"""The grain input pipeline: sources -> per-step mixture -> encode -> pack -> host batch -> global arrays.

Digest §7 "Data loading" (on-the-fly blending, tokenisation, loss masking and packing; fully deterministic,
resumable order) and §2.1 (vision:text schedule). Layout:

  per domain: grain.MapDataset of records, sharded per host with `ShardOptions` (contiguous even split of its
              index space), shuffled (finite sources) and repeated, then `.map(encode)` -> `Encoded`, lazily.
  per step:   `grain.MapDataset.range(steps).map(StepBatcher)`: the batch of step s is a pure function of
              (config, s, host shard): `Mixture.candidates(s)` names (domain, slot) draws, `pack` fills the rows.
  iterator:   `.to_iter_dataset(ReadOptions)` [`.mp_prefetch(num_workers)`]; batches do not depend on the number
              of workers; `get_state()/set_state()` (grain's, e.g. via `grain.checkpoint.CheckpointSave`) records
              the step position, so a restored iterator with the same `num_workers` continues bit-identically.

`grain.IterDataset.mix` is not used: its weights are fixed, while the fusion schedule changes the vision
fraction with training progress and must stay a function of the step for exact resumption.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grain
import ml_collections
import numpy as np

from k25jax.data.example import Encoded
from k25jax.data.mixture import MODALITIES, FusionSchedule, Mixture
from k25jax.data.packing import PackSpec, pack

BATCH_AXES = ("data", "fsdp", "expert")
_PROCEDURAL_SIZE = 2**40   # index space of a procedural domain (sharded like a finite source)
_EVAL_INDEX_OFFSET = 2**40  # held-out procedural documents come from indices above the training range
_STEPS = 2**62


@dataclasses.dataclass(frozen=True)
class DomainSource:
  """One domain: its modality and a random-access dataset of records; `encode(record) -> Encoded`.

  shuffle: reshuffle per epoch (finite sources); procedural sources are already random per index.
  """
  modality: str
  records: grain.MapDataset
  encode: Callable[[Any], Encoded]
  shuffle: bool = True

  def __post_init__(self):
    if self.modality not in MODALITIES:
      raise ValueError(f"DomainSource.modality={self.modality!r} must be one of {MODALITIES}")


def shard_dataset(ds: grain.MapDataset, shard: grain.sharding.ShardOptions) -> grain.MapDataset:
  """The host's contiguous slice of `ds` (even split); hosts read disjoint records."""
  n, i, k = len(ds), shard.shard_index, shard.shard_count
  if n < k:
    raise ValueError(f"a source of {n} records cannot be sharded over {k} hosts; use a larger source or drop the "
                     "domain (weight 0)")
  return ds[n * i // k:n * (i + 1) // k]


def prepare_domain(name: str, source: DomainSource, shard: grain.sharding.ShardOptions,
                   seed: int) -> grain.MapDataset:
  """Sharded, (shuffled,) repeated and lazily encoded dataset of one domain: index = mixture slot."""
  ds = shard_dataset(source.records, shard)
  if source.shuffle:
    ds = ds.shuffle(seed=(seed * 7919 + zlib.crc32(name.encode())) % 2**31)  # a permutation per domain
  return ds.repeat().map(source.encode)


@dataclasses.dataclass(frozen=True)
class StepBatcher:
  """Builds the host batch of a step (digest §2.1 schedule + §7 packing); picklable for grain workers."""
  mixture: Mixture
  domains: Mapping[str, grain.MapDataset]
  spec: PackSpec

  def _examples(self, step: int) -> Iterator[Encoded]:
    for cand in self.mixture.candidates(step):
      ex = self.domains[cand.domain][cand.slot]
      if not isinstance(ex, Encoded) or ex.modality != cand.modality:
        raise ValueError(f"domain {cand.domain!r} (configured as {cand.modality}) produced "
                         f"{getattr(ex, 'modality', type(ex).__name__)!r} records; move it to "
                         f"{'vision' if cand.modality == 'text' else 'text'}_domains or fix its encoder")
      yield ex

  def __call__(self, step: int) -> dict[str, Any]:
    batch, stats = pack(self._examples(int(step)), self.spec)
    batch["step"] = np.asarray(step, np.int64)
    batch["stats"] = {k: np.asarray(v, np.int64) for k, v in stats.as_dict().items()}
    return batch


def _check_data_config(config: ml_collections.ConfigDict) -> None:
  data = config.data
  for name in ("patch_budget", "max_items", "max_misses", "max_draws"):
    if int(data[name]) <= 0:
      raise ValueError(f"config.data.{name}={data[name]} must be a positive integer")
  for name in ("num_workers", "read_threads", "prefetch_buffer_size"):
    if int(data[name]) < 0:
      raise ValueError(f"config.data.{name}={data[name]} must be >= 0")
  if int(data.worker_buffer_size) <= 0:
    raise ValueError(f"config.data.worker_buffer_size={data.worker_buffer_size} must be positive")


def pack_spec(config: ml_collections.ConfigDict, tokenizer: Any) -> PackSpec:
  """The host-local packing shapes from `config.train` and `config.data`."""
  return PackSpec(batch_size=int(config.train.batch_size), seq_len=int(config.train.seq_len),
                  patch_budget=int(config.data.patch_budget), max_items=int(config.data.max_items),
                  media_pad_id=int(tokenizer.media_pad_id), pad_id=int(tokenizer.pad_id),
                  max_misses=int(config.data.max_misses))


def _encode_document(tokenizer: Any, record: Any) -> Encoded:
  from k25jax.data import chat
  return chat.encode_document(record, tokenizer)


def _world_document(domain: str, seed: int, index: int) -> dict:
  from k25jax.data import world
  return world.make_document(domain, seed, int(index))


def default_sources(config: ml_collections.ConfigDict, tokenizer: Any, split: str) -> dict[str, DomainSource]:
  """Sources of every domain with a positive weight: procedural-world domains and real datasets (lazy imports).

  split "train" or "eval": procedural eval documents come from indices beyond the training range; real sources
  use their held-out split.
  """
  if split not in ("train", "eval"):
    raise ValueError(f"split={split!r}; use 'train' or 'eval'")
  from k25jax.data import world  # imported here: the pipeline's tests run on synthetic sources alone
  encode = functools.partial(_encode_document, tokenizer)
  sources = {}
  for modality in MODALITIES:
    for domain, weight in config.data[f"{modality}_domains"].items():
      if float(weight) <= 0:
        continue
      if domain in world.DOMAINS:
        if world.DOMAINS[domain] != modality:
          raise ValueError(f"config.data.{modality}_domains has {domain!r}, a {world.DOMAINS[domain]} domain; "
                           f"move it to config.data.{world.DOMAINS[domain]}_domains")
        offset = 0 if split == "train" else _EVAL_INDEX_OFFSET
        records = grain.MapDataset.range(offset, offset + _PROCEDURAL_SIZE).map(
            functools.partial(_world_document, domain, int(config.data.seed)))
        sources[domain] = DomainSource(modality, records, encode, shuffle=False)
      else:
        sources[domain] = _real_source(config, domain, modality, split, encode)
  return sources


_REAL_MODALITY = {"shakespeare": "text", "fashion_mnist": "vision"}


def _real_source(config: ml_collections.ConfigDict, domain: str, modality: str, split: str,
                 encode: Callable[[Any], Encoded]) -> DomainSource:
  """Real offline datasets (ENVIRONMENT.md §5): Shakespeare works as documents, Fashion-MNIST caption documents."""
  if domain not in _REAL_MODALITY:
    raise ValueError(f"unknown data domain {domain!r} in config.data.{modality}_domains; use a k25jax.data.world "
                     f"domain or one of {sorted(_REAL_MODALITY)}, or set its weight to 0")
  if _REAL_MODALITY[domain] != modality:
    raise ValueError(f"config.data.{modality}_domains has {domain!r}, a {_REAL_MODALITY[domain]} source; move it "
                     f"to config.data.{_REAL_MODALITY[domain]}_domains")
  if domain == "shakespeare":
    from k25jax.data.sources import shakespeare
    records = shakespeare.shakespeare_documents("train" if split == "train" else "held_out",
                                                chunk_chars=int(config.data.shakespeare_chunk_chars))
  else:
    from k25jax.data.sources import fashion_mnist
    records = fashion_mnist.FashionMnistSource("train" if split == "train" else "test", kind="caption")
  return DomainSource(modality, grain.MapDataset.source(records), encode, shuffle=True)


def mean_example_tokens(domains: Mapping[str, grain.MapDataset], weights: Mapping[str, float], n: int) -> float:
  """Expected token count of one draw of a modality: each domain's mean over its first `n` examples, averaged
  with the domain weights (the mixture's `example_tokens`, digest §2.1 token shares)."""
  names, total = sorted(weights), sum(float(w) for w in weights.values())
  return sum(float(weights[d]) / total * float(np.mean([len(domains[d][i].tokens) for i in range(n)]))
             for d in names)


def make_train_dataset(config: ml_collections.ConfigDict, *, tokenizer: Any, process_index: int = 0,
                       process_count: int = 1, sources: Mapping[str, DomainSource] | None = None,
                       num_workers: int | None = None, schedule: FusionSchedule | None = None,
                       seed_offset: int = 0, num_steps: int = _STEPS) -> grain.IterDataset:
  """The training `IterDataset` of host `process_index` (digest §2.1 schedule, §7 deterministic loading).

  sources: domain -> DomainSource (default: `default_sources(config, tokenizer, "train")`).
  num_workers: grain worker processes (default `config.data.num_workers`); the output does not depend on it.
  schedule: overrides `config.data.mixture` (the eval streams use constant schedules).
  """
  _check_data_config(config)
  shard = grain.sharding.ShardOptions(shard_index=int(process_index), shard_count=int(process_count))
  schedule = schedule or FusionSchedule(float(config.data.mixture.inject_at),
                                        float(config.data.mixture.vision_ratio))
  weights = {m: {d: float(w) for d, w in config.data[f"{m}_domains"].items() if float(w) > 0} for m in MODALITIES}
  seed = int(config.data.seed) + int(seed_offset)
  sources = dict(sources) if sources is not None else default_sources(config, tokenizer, "train")
  for modality, ws in weights.items():
    for domain in ws:
      if domain not in sources:
        raise ValueError(f"config.data.{modality}_domains names {domain!r} but no source provides it; "
                         f"available: {sorted(sources)}")
      if sources[domain].modality != modality:
        raise ValueError(f"domain {domain!r} is a {sources[domain].modality} source but is weighted in "
                         f"config.data.{modality}_domains; move it")
  domains = {d: prepare_domain(d, sources[d], shard, seed) for ws in weights.values() for d in ws}
  share = config.data.mixture.share
  if share not in ("tokens", "examples"):
    raise ValueError(f"config.data.mixture.share={share!r}: choose 'tokens' (vision share of tokens, as Table 1) or "
                     "'examples'")
  lengths = None
  if share == "tokens" and all(weights.values()):
    n = int(config.data.length_sample)
    lengths = tuple(mean_example_tokens(domains, weights[m], n) for m in ("text", "vision"))
  mixture = Mixture(schedule, weights["text"], weights["vision"], seed=seed, total_steps=int(config.train.steps),
                    max_draws=int(config.data.max_draws), example_tokens=lengths)
  batcher = StepBatcher(mixture, domains, pack_spec(config, tokenizer))
  read = grain.ReadOptions(num_threads=int(config.data.read_threads),
                           prefetch_buffer_size=int(config.data.prefetch_buffer_size))
  ds = grain.MapDataset.range(num_steps).map(batcher).to_iter_dataset(read)
  workers = int(config.data.num_workers if num_workers is None else num_workers)
  if workers > 0:
    ds = ds.mp_prefetch(grain.multiprocessing.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=int(config.data.worker_buffer_size)))
  return ds


def make_train_iterator(config: ml_collections.ConfigDict, *, tokenizer: Any, process_index: int = 0,
                        process_count: int = 1, sources: Mapping[str, DomainSource] | None = None,
                        num_workers: int | None = None) -> grain.DatasetIterator:
  """Checkpointable iterator of host batches (`get_state()` / `set_state()`; see `make_train_dataset`).

  Each element: the packed arrays of `k25jax.data.packing`, `step` and `stats` (`PackStats` counts).
  Close it (`it.close()`) when using worker processes.
  """
  return iter(make_train_dataset(config, tokenizer=tokenizer, process_index=process_index,
                                 process_count=process_count, sources=sources, num_workers=num_workers))


def make_eval_iterator(config: ml_collections.ConfigDict, *, tokenizer: Any, modality: str,
                       process_index: int = 0, process_count: int = 1,
                       sources: Mapping[str, DomainSource] | None = None) -> grain.DatasetIterator:
  """A finite held-out stream of `config.data.eval_batches` batches of one modality (text or vision).

  Separate text and vision streams expose the text "dip-and-recover" of mid/late fusion (digest §2.1). Draws use
  a different seed than training and, by default, held-out records (`default_sources(..., "eval")`).
  """
  if modality not in MODALITIES:
    raise ValueError(f"make_eval_iterator: modality={modality!r}; use one of {MODALITIES}")
  weights = config.data[f"{modality}_domains"]
  if not any(float(w) > 0 for w in weights.values()):
    raise ValueError(f"make_eval_iterator: config.data.{modality}_domains has no positive weight")
  eval_config = ml_collections.ConfigDict(config.to_dict())
  other = "text" if modality == "vision" else "vision"
  eval_config.data[f"{other}_domains"] = {}
  sources = dict(sources) if sources is not None else default_sources(eval_config, tokenizer, "eval")
  schedule = FusionSchedule(inject_at=0.0, vision_ratio=1.0 if modality == "vision" else 0.0)
  return iter(make_train_dataset(eval_config, tokenizer=tokenizer, process_index=process_index,
                                 process_count=process_count, sources=sources, num_workers=0,
                                 schedule=schedule, seed_offset=1, num_steps=int(config.data.eval_batches)))


def batch_shardings(mesh: Any) -> dict[str, Any]:
  """`NamedSharding` per batch key: every array is split on its first dim over the batch axes.

  Token arrays [B, L] shard their batch dim. Patches [P, 588], patch ids [P] and item arrays [M, ...] are sharded
  on their first dim too (not replicated): each host contributes its own patch budget, memory per device stays
  constant as hosts are added, and the DEP vision forward (digest §7) starts balanced over the batch devices.
  Item ids are made globally unique by `to_global_batch`, so packed-ViT attention on the global array is correct.
  """
  from jax.sharding import NamedSharding, PartitionSpec
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  return {k: NamedSharding(mesh, PartitionSpec(axes)) for k in _GLOBAL_KEYS}


_GLOBAL_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions", "patches", "patch_item_ids",
                "item_grid", "item_valid")


def to_global_batch(batch: Mapping[str, np.ndarray], mesh: Any) -> dict[str, Any]:
  """Host-local numpy batch -> global `jax.Array`s (`jax.make_array_from_process_local_data`).

  Global arrays concatenate the hosts' batches in process order. `patch_item_ids` are offset by
  process_index * max_items so items stay distinct and numbered in placeholder order (row-major over the
  global batch). `step` and `stats` stay on the host.
  """
  import jax
  shardings = batch_shardings(mesh)
  n_proc, p_idx = jax.process_count(), jax.process_index()
  shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names]))
  out = {}
  for key in _GLOBAL_KEYS:
    if key not in batch:
      raise ValueError(f"to_global_batch: batch has no {key!r}; pass an element of make_train_iterator")
    value = np.asarray(batch[key])
    if key == "patch_item_ids":
      value = np.where(value > 0, value + p_idx * len(batch["item_valid"]), 0).astype(np.int32)
    global_shape = (value.shape[0] * n_proc,) + value.shape[1:]
    if global_shape[0] % shards:
      raise ValueError(f"to_global_batch: {key} has global first dim {global_shape[0]}, not divisible by the "
                       f"{shards} devices of mesh axes {BATCH_AXES}; choose train.batch_size, data.patch_budget "
                       f"and data.max_items as multiples of {shards // n_proc if shards % n_proc == 0 else shards}")
    out[key] = jax.make_array_from_process_local_data(shardings[key], value, global_shape)
  return out
