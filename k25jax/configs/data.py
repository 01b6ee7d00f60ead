"""Data presets: mixture schedule, domain weights, packing budgets, pipeline workers (`config.data`).

Digest §2.1 (Table 1 fusion arms; the default is the "early" arm, inject at 0 with 10:90, the best one), §2.2
"Data" (text and vision domains) and §7 "Data loading". `seq_len` and `batch_size` live in `config.train`;
`patch_budget` and `max_items` are per *host-local* batch. The Table 1 arms are selected with
`--config.data.mixture.inject_at=0.5 --config.data.mixture.vision_ratio=0.2` (or `k25jax.data.mixture.TABLE1_ARMS`).

Domain names are procedural-world domains (`k25jax.data.world`) or real sources (`k25jax.data.sources`:
"shakespeare", "fashion_mnist"); a weight of 0 turns a domain off.
"""

from __future__ import annotations

import ml_collections

_TEXT_DOMAINS = dict(shakespeare=2.0, knowledge=1.0, arithmetic=1.0, programs=1.0)
_VISION_DOMAINS = dict(fashion_mnist=1.0, ocr=1.0, shapes=1.0, charts=1.0, mazes=1.0, knowledge_cards=1.0)


def data_config(name: str) -> ml_collections.ConfigDict:
  """`config.data` for a preset ("tiny", "small", "k25_full")."""
  # k25_full: 4096 patches / 64 items per host is the largest budget whose integrated step fits v5p:8x8x16 per
  # `launch.aot` (71.0 of 95 GiB; launch/README.md); 65536 needs a shard-local projector merge (361 GB temporaries).
  budgets = {"tiny": (1024, 32), "small": (4096, 64), "k25_full": (4096, 64)}
  if name not in budgets:
    raise ValueError(f"unknown data preset {name!r}; choose one of {', '.join(budgets)}")
  patch_budget, max_items = budgets[name]
  # About one row of text per Shakespeare document (byte-level tokens at the CPU presets).
  chunk_chars = {"tiny": 60, "small": 250, "k25_full": 16000}[name]
  return ml_collections.ConfigDict(dict(
      seed=0,
      patch_budget=patch_budget,        # patches per host batch (f32 [P, 588])
      max_items=max_items,              # media items per host batch
      max_misses=4,                     # a batch closes after this many examples found no room
      max_draws=1024,                   # mixture draws per step (upper bound; also strides source slots)
      # vision_ratio: share of tokens from vision examples once injected ("examples": share of examples)
      mixture=dict(inject_at=0.0, vision_ratio=0.1, share="tokens"),
      length_sample=16,                 # examples per domain measured for the token-share conversion
      text_domains=dict(_TEXT_DOMAINS),
      vision_domains=dict(_VISION_DOMAINS),
      shakespeare_chunk_chars=chunk_chars,  # characters per Shakespeare document
      num_workers=0,                    # grain mp_prefetch worker processes (0 = in process)
      worker_buffer_size=2,             # batches buffered per worker
      read_threads=1,                   # grain ReadOptions threads (batches are CPU-bound Python)
      prefetch_buffer_size=2,           # batches read ahead in the main process
      eval_batches=4,                   # held-out batches per eval stream
  ))
