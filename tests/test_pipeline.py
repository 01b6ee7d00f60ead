"""The grain pipeline (k25jax/data/pipeline.py): determinism, resumption, sharding, mixture, global batches."""

import dataclasses
import functools
import types

import grain
import numpy as np
import pytest

from k25jax.configs import get_config
from k25jax.configs.data import data_config
from k25jax.data.example import Encoded
from k25jax.data.mixture import TABLE1_ARMS
from k25jax.data.pipeline import DomainSource, make_eval_iterator, make_train_iterator

TOK = types.SimpleNamespace(media_pad_id=3, pad_id=0)
DOMAIN_BASE = {"web": 1_000_000, "code": 2_000_000, "ocr": 3_000_000}


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


def encode_record(domain: str, index: int) -> Encoded:
  """Record `index` of a synthetic domain; its first token is a unique id (domain base + index)."""
  rng = np.random.default_rng(DOMAIN_BASE[domain] + int(index))
  toks = [DOMAIN_BASE[domain] + int(index)] + list(rng.integers(10, 100, rng.integers(3, 12)))
  media = []
  if domain == "ocr":
    media = [FakeItem(np.full((4, 588), index, np.float32), (1, 2, 2))]
    toks += [4, 3, 5] + list(rng.integers(10, 100, 25))   # vision examples ~3x longer than text ones
  return Encoded(np.asarray(toks), np.asarray(toks) != 3, media, "vision" if media else "text", domain)


def synthetic_sources(size: int = 4000) -> dict:
  return {d: DomainSource("vision" if d == "ocr" else "text", grain.MapDataset.range(size),
                          functools.partial(encode_record, d)) for d in DOMAIN_BASE}


def make_config(arm: str = "mid", steps: int = 20):
  config = get_config("tiny")
  config.train.steps = steps
  config.data = data_config("tiny")
  config.data.text_domains = {"web": 2.0, "code": 1.0}
  config.data.vision_domains = {"ocr": 1.0}
  config.data.mixture.inject_at = TABLE1_ARMS[arm].inject_at
  config.data.mixture.vision_ratio = TABLE1_ARMS[arm].vision_ratio
  config.data.patch_budget = 512
  config.data.max_items = 128
  return config


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      if k == "stats":
        assert x[k] == y[k]
      else:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def example_ids(batch) -> set:
  seg = batch["segment_ids"]
  starts = (seg > 0) & (batch["positions"] == 0)
  return set(batch["tokens"][starts].tolist())


def test_same_seed_same_batches_and_resume_from_state():
  config = make_config("early")
  first = take(make_train_iterator(config, tokenizer=TOK, sources=synthetic_sources()), 5)
  it = make_train_iterator(config, tokenizer=TOK, sources=synthetic_sources())
  take(it, 2)
  state = it.get_state()
  fresh = make_train_iterator(config, tokenizer=TOK, sources=synthetic_sources())
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 3), first[2:])
  assert [int(b["step"]) for b in first] == list(range(5))
  config.data.seed = 1
  other = take(make_train_iterator(config, tokenizer=TOK, sources=synthetic_sources()), 1)
  assert example_ids(other[0]) != example_ids(first[0])


def test_batches_are_full_and_consistent():
  batch = next(make_train_iterator(make_config("early"), tokenizer=TOK, sources=synthetic_sources()))
  stats = batch["stats"]
  assert batch["tokens"].shape == (8, 64) and batch["patches"].shape == (512, 588)
  assert (batch["segment_ids"] > 0).mean() > 0.8  # first-fit fills the rows
  assert (batch["tokens"] == 3).sum() == stats["vision_tokens"] == batch["item_valid"].sum()  # 1 token per item
  assert stats["examples"] == len(example_ids(batch)) == stats["text_examples"] + stats["vision_examples"]


def test_two_processes_read_disjoint_examples():
  config = make_config("early")
  ids = []
  for p in range(2):
    it = make_train_iterator(config, tokenizer=TOK, process_index=p, process_count=2, sources=synthetic_sources())
    ids.append(set().union(*(example_ids(b) for b in take(it, 4))))
  assert len(ids[0]) > 50 and len(ids[1]) > 50
  assert not ids[0] & ids[1]
  for d, base in DOMAIN_BASE.items():  # each host reads its own half of every source (contiguous split)
    local = [[i - base for i in s if base <= i < base + 4000] for s in ids]
    assert max(local[0]) < 2000 <= min(local[1]), d


def _shares(batches, key):
  """Per-batch vision share: of placed tokens (key "tokens") or of packed examples (key "examples")."""
  if key == "tokens":
    return np.asarray([b["stats"]["vision_data_tokens"] / (b["stats"]["vision_tokens"] + b["stats"]["text_tokens"])
                       for b in batches])
  return np.asarray([b["stats"]["vision_examples"] / b["stats"]["examples"] for b in batches])


@pytest.mark.parametrize("arm", sorted(TABLE1_ARMS))
@pytest.mark.parametrize("share", ["tokens", "examples"])
def test_vision_share_per_arm(arm, share):
  """The schedule's ratio is met in the unit it names; vision examples here are longer than text ones, so the
  token share and the example share differ and only the configured one may match."""
  sched = TABLE1_ARMS[arm]
  config = make_config(arm)
  config.data.mixture.share = share
  batches = take(make_train_iterator(config, tokenizer=TOK, sources=synthetic_sources()), 20)
  frac, other = _shares(batches, share), _shares(batches, "examples" if share == "tokens" else "tokens")
  inject = int(sched.inject_at * 20)
  assert not frac[:inject].any()
  n = sum(int(b["stats"]["examples"]) for b in batches[inject:])
  tol = 4 * np.sqrt(sched.vision_ratio * (1 - sched.vision_ratio) / n) + 0.02
  assert frac[inject:].mean() == pytest.approx(sched.vision_ratio, abs=tol)
  assert abs(other[inject:].mean() - sched.vision_ratio) > tol
  # The run's share of vision is the Table 1 total of 10%.
  assert frac.mean() == pytest.approx(0.10, abs=tol * np.sqrt(1 - sched.inject_at) + 0.01)


def test_eval_streams_are_finite_single_modality_and_held_out():
  config = make_config("early")
  config.data.eval_batches = 2
  text = list(make_eval_iterator(config, tokenizer=TOK, modality="text", sources=synthetic_sources()))
  vision = list(make_eval_iterator(config, tokenizer=TOK, modality="vision", sources=synthetic_sources()))
  assert len(text) == len(vision) == 2
  assert all(b["stats"]["vision_examples"] == 0 for b in text)
  assert all(b["stats"]["text_examples"] == 0 for b in vision)
  train = take(make_train_iterator(config, tokenizer=TOK, sources=synthetic_sources()), 2)
  assert example_ids(text[0]) != example_ids(train[0])


def test_config_errors_name_the_field():
  config = make_config()
  config.data.vision_domains = {"missing": 1.0}
  with pytest.raises(ValueError, match="missing"):
    make_train_iterator(config, tokenizer=TOK, sources=synthetic_sources())
  config = make_config()
  config.data.text_domains = {"web": 1.0, "ocr": 1.0}
  with pytest.raises(ValueError, match="ocr"):
    make_train_iterator(config, tokenizer=TOK, sources=synthetic_sources())


def test_worker_processes_give_the_same_batches():
  config = make_config("late")
  config.train.steps = 4
  ref = take(make_train_iterator(config, tokenizer=TOK, sources=synthetic_sources()), 4)
  it = make_train_iterator(config, tokenizer=TOK, sources=synthetic_sources(), num_workers=2)
  try:
    got = take(it, 2)
    state = it.get_state()
  finally:
    it.close()
  assert_batches_equal(got, ref[:2])
  fresh = make_train_iterator(config, tokenizer=TOK, sources=synthetic_sources(), num_workers=2)
  try:
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 2), ref[2:])
  finally:
    fresh.close()


def test_to_global_batch_on_the_mesh():
  import jax
  from jax.sharding import PartitionSpec

  from k25jax.data.pipeline import to_global_batch
  mesh = jax.make_mesh((2, 2, 2, 1), ("data", "fsdp", "expert", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  batch = next(make_train_iterator(make_config("early"), tokenizer=TOK, sources=synthetic_sources()))
  out = to_global_batch(batch, mesh)
  for k, v in out.items():
    np.testing.assert_array_equal(np.asarray(v), batch[k], err_msg=k)
    assert v.sharding.spec == PartitionSpec(("data", "fsdp", "expert")), k
    assert len(v.addressable_shards) == 8 and v.addressable_shards[0].data.shape[0] == v.shape[0] // 8
  batch["patches"] = batch["patches"][:-4]
  with pytest.raises(ValueError, match="patch_budget"):
    to_global_batch(batch, mesh)


def _real_config(text: dict, vision: dict):
  config = get_config("tiny")
  config.data = data_config("tiny")
  config.data.text_domains = text
  config.data.vision_domains = vision
  config.data.mixture.vision_ratio = 0.5
  return config


def _check_real_batch(batch, tok):
  stats = batch["stats"]
  grids = batch["item_grid"][batch["item_valid"]]
  assert (batch["tokens"] == tok.media_pad_id).sum() == ((grids[:, 1] // 2) * (grids[:, 2] // 2)).sum()
  assert np.prod(grids, axis=1).sum() == (batch["patch_item_ids"] > 0).sum() == stats["patches"]
  assert not batch["loss_mask"][batch["targets"] == tok.media_pad_id].any()
  assert stats["examples"] > 0 and batch["loss_mask"].sum() == stats["target_tokens"] > 0


def test_world_domains_through_the_real_encoder():
  from k25jax.data.tokenizer import ByteTokenizer
  tok = ByteTokenizer()
  config = _real_config({"arithmetic": 1.0, "knowledge": 1.0}, {"shapes": 1.0, "ocr": 1.0})
  batches = take(make_train_iterator(config, tokenizer=tok), 3)
  for b in batches:
    _check_real_batch(b, tok)
  assert sum(int(b["stats"]["vision_examples"]) for b in batches) > 0
  assert_batches_equal(batches[:1], take(make_train_iterator(config, tokenizer=tok), 1))


def test_real_sources_when_present():
  from k25jax.data.sources import data_cache_dir, fashion_mnist
  from k25jax.data.tokenizer import ByteTokenizer
  shakespeare_ready = (data_cache_dir() / "shakespeare" / "works.json").is_file()  # no download in tests
  if fashion_mnist.find_fashion_mnist_dir() is None or not shakespeare_ready:
    pytest.skip("Fashion-MNIST or the Shakespeare corpus is not on this machine (python -m k25jax.data.prepare)")
  tok = ByteTokenizer()
  config = _real_config({"shakespeare": 1.0}, {"fashion_mnist": 1.0})
  batch = next(make_train_iterator(config, tokenizer=tok))
  _check_real_batch(batch, tok)
  assert batch["stats"]["vision_examples"] > 0 and batch["stats"]["text_examples"] > 0
  text = next(make_eval_iterator(config, tokenizer=tok, modality="text"))
  assert text["stats"]["vision_tokens"] == 0 and text["stats"]["examples"] > 0
