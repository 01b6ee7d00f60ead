"""Input-pipeline throughput: packed examples/s and tokens/s with 0 and 2 grain worker processes.

Digest §7 "Data loading" (on-the-fly encoding and packing must keep up with the trainer). Runs the real mixture
(procedural world + Shakespeare + Fashion-MNIST, `k25jax.configs.data`) when those modules and files are present,
else synthetic records (the JSON says which in "data").

  python -m benchmarks.data --out /tmp/data_bench.json [--preset tiny] [--batches 40] [--vision_ratio 0.5]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import grain
import numpy as np
from absl import flags

from k25jax.configs import get_config
from k25jax.configs.data import data_config
from k25jax.data.example import Encoded
from k25jax.data.pipeline import DomainSource, make_train_iterator


def _synthetic_record(modality: str, index: int) -> Encoded:
  rng = np.random.default_rng(index)
  toks = list(rng.integers(10, 250, rng.integers(20, 120)))
  media = []
  if modality == "vision":
    from k25jax.data.media import MediaItem
    media = [MediaItem(rng.random((16, 588), dtype=np.float32), (1, 4, 4), "image")]
    toks = [1] + [3] * 4 + toks
  return Encoded(np.asarray(toks), np.ones(len(toks), bool), media, modality, "synthetic")


def _setup(preset: str, vision_ratio: float):
  """(config, tokenizer, sources or None, description of the data)."""
  config = get_config(preset)
  config.data = data_config(preset)
  config.data.mixture.inject_at = 0.0
  config.data.mixture.vision_ratio = vision_ratio
  try:
    from k25jax.data.pipeline import default_sources
    from k25jax.data.tokenizer import ByteTokenizer
    tokenizer = ByteTokenizer()
    sources = default_sources(config, tokenizer, "train")
    return config, tokenizer, sources, "real mixture (world + shakespeare + fashion_mnist)"
  except (ImportError, FileNotFoundError, OSError, RuntimeError) as err:
    import types
    tokenizer = types.SimpleNamespace(media_pad_id=3, pad_id=0)
    config.data.text_domains = {"synthetic_text": 1.0}
    config.data.vision_domains = {"synthetic_vision": 1.0}
    sources = {f"synthetic_{m}": DomainSource(m, grain.MapDataset.range(100_000),
                                               functools.partial(_synthetic_record, m)) for m in ("text", "vision")}
    return config, tokenizer, sources, f"synthetic records (real sources unavailable: {err})"


def measure(config, tokenizer, sources, workers: int, batches: int, warmup: int) -> dict[str, float]:
  it = make_train_iterator(config, tokenizer=tokenizer, sources=sources, num_workers=workers)
  try:
    for _ in range(warmup):
      next(it)
    examples = tokens = 0
    start = time.perf_counter()
    for _ in range(batches):
      stats = next(it)["stats"]
      examples += int(stats["examples"])
      tokens += int(stats["text_tokens"]) + int(stats["vision_tokens"])
    elapsed = time.perf_counter() - start
  finally:
    it.close()
  return dict(examples_per_s=examples / elapsed, tokens_per_s=tokens / elapsed, seconds=elapsed)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="JSON file to write")
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--vision_ratio", type=float, default=0.5)
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  config, tokenizer, sources, data = _setup(args.preset, args.vision_ratio)
  runs = {w: measure(config, tokenizer, sources, w, args.batches, args.warmup) for w in (0, 2)}
  result = dict(
      data=data, preset=args.preset, batch_size=int(config.train.batch_size), seq_len=int(config.train.seq_len),
      vision_ratio=args.vision_ratio, batches=args.batches, host=platform.processor() or platform.machine(),
      examples_per_s={str(w): r["examples_per_s"] for w, r in runs.items()},
      tokens_per_s={str(w): r["tokens_per_s"] for w, r in runs.items()},
      seconds={str(w): r["seconds"] for w, r in runs.items()})
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"data: {data}")
  print(f"{'workers':>8} {'examples/s':>12} {'tokens/s':>12}")
  for w, r in runs.items():
    print(f"{w:>8} {r['examples_per_s']:>12.1f} {r['tokens_per_s']:>12.1f}")


if __name__ == "__main__":
  from k25jax.runtime import use_caching_allocator
  use_caching_allocator()
  main()
