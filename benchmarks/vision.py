"""MoonViT-3D throughput and the compute wasted by padding images to a fixed size versus packing them.

Digest §1.3 / paper K2.5 §4.2 (NaViT-style "patch n' pack"). Two measurements:
  patches_per_s   forward patches/s of the `small` tower + projector (jit, f32, this CPU) on packed sequences of
                  `--num_patches` patches drawn from the size distribution below (median of `--repeats`), for each
                  packed-attention implementation (`by_attention`; the top-level figures are the preset's own);
                  gflops_per_s counts useful FLOPs (per-item attention), so implementations compare directly.
  padding_waste   fraction of tower FLOPs spent on padding when every image is zero-padded to one fixed canvas
                  (the largest h and w in the sample), attention over the whole canvas;
  packing_waste   the same fraction when images are packed first-fit-decreasing into `--num_patches` budgets
                  with per-item (varlen) attention: only unused slots are waste.
  packing_waste_dense_mask  packing with attention logits materialised over the whole packed sequence and
                  masked to same-item pairs (`attention_impl=dense`), so cross-item pairs are waste too;
  packing_waste_blocks      packing with block-sparse attention (`attention_impl=blocks`, the CPU presets'):
                  the (query, key) pairs of the attention_chunk-sized blocks that share an item.
Image sizes: height lognormal around 480 px (sigma 0.5), aspect ratio lognormal (sigma 0.4), resized with the
released "navit_resize" rule at a CPU-scale patch limit (`--patch_limit`, default 1024 = 448x448) and padded to
multiples of 28 px (digest §1.3 "Media preprocessing").

  python -m benchmarks.vision --out /tmp/vision_bench.json [--num_patches 2048] [--images 512]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import jax
import numpy as np

from k25jax.configs.vision import vision_config
from k25jax.model.block_attention import block_pairs
from k25jax.model.projector import PatchMergerProjector
from k25jax.model.vision import MoonViT3D, pack_media


def image_grids(n: int, patch_limit: int, seed: int = 0, patch: int = 14) -> list[tuple[int, int, int]]:
  """(1, h, w) patch grids of `n` images after navit_resize + padding to multiples of 2 patches."""
  rng = np.random.default_rng(seed)
  grids = []
  for _ in range(n):
    hh = float(np.exp(rng.normal(math.log(480), 0.5)))
    ww = hh * float(np.exp(rng.normal(0.0, 0.4)))
    scale = min(1.0, math.sqrt(patch_limit / (max(1, ww // patch) * max(1, hh // patch))),
                512 * patch / ww, 512 * patch / hh)
    w2, h2 = max(1, int(ww * scale)), max(1, int(hh * scale))
    grids.append((1, 2 * math.ceil(h2 / (2 * patch)), 2 * math.ceil(w2 / (2 * patch))))
  return grids


def tower_flops(n_patches: int, attn_pairs: int, cfg) -> float:
  """Forward FLOPs of the tower: matmuls per patch plus QK^T and PV per attended (query, key) pair."""
  d, i = cfg.hidden_size, cfg.intermediate_size
  per_patch = 2 * (3 * d * d + d * d + 2 * d * i)
  return cfg.num_hidden_layers * (per_patch * n_patches + 4 * d * attn_pairs)


def pack_ffd(sizes: list[int], budget: int) -> list[list[int]]:
  """First-fit-decreasing bins of item indices with total size <= budget."""
  bins, room = [], []
  for j in sorted(range(len(sizes)), key=lambda k: -sizes[k]):
    for b, r in enumerate(room):
      if sizes[j] <= r:
        bins[b].append(j)
        room[b] -= sizes[j]
        break
    else:
      bins.append([j])
      room.append(budget - sizes[j])
  return bins


def block_pairs_of(sizes: list[int], budget: int, block: int) -> int:
  """Attended (query, key) pairs of block-sparse attention on one pack: block^2 per block pair sharing an item."""
  ids = np.zeros((budget + -budget % block,), np.int32)
  ids[:sum(sizes)] = np.repeat(np.arange(1, len(sizes) + 1), sizes)
  _, _, count = block_pairs(jax.numpy.asarray(ids), block)
  return int(count) * block * block


def waste(grids, budget: int, cfg) -> dict[str, float]:
  n = [t * h * w for t, h, w in grids]
  useful = sum(tower_flops(k, k * k, cfg) for k in n)
  ch, cw = max(h for _, h, _ in grids), max(w for _, _, w in grids)
  canvas = ch * cw
  padded = len(grids) * tower_flops(canvas, canvas * canvas, cfg)
  bins = pack_ffd(n, budget)
  packed_varlen = sum(tower_flops(budget, sum(n[j] ** 2 for j in b), cfg) for b in bins)
  packed_dense = len(bins) * tower_flops(budget, budget * budget, cfg)
  packed_blocks = sum(tower_flops(budget, block_pairs_of([n[j] for j in b], budget, cfg.attention_chunk), cfg)
                      for b in bins)
  return dict(padding_waste=1 - useful / padded, packing_waste=1 - useful / packed_varlen,
              packing_waste_dense_mask=1 - useful / packed_dense, packing_waste_blocks=1 - useful / packed_blocks,
              canvas_hw=[ch, cw], num_bins=len(bins), mean_patches_per_image=float(np.mean(n)))


def throughput(cfg, grids, budget: int, repeats: int, seed: int = 0) -> dict[str, float]:
  rng = np.random.default_rng(seed)
  sizes = [t * h * w for t, h, w in grids]
  bins = [b for b in pack_ffd(sizes, budget)][:repeats + 1]
  batches = []
  for b in bins:
    items = [(rng.normal(size=(sizes[j], 588)).astype(np.float32), grids[j]) for j in b]
    batches.append(pack_media(items, budget, max(len(bn) for bn in bins)))
  tower, proj = MoonViT3D(cfg), PatchMergerProjector(cfg, 256)
  x0 = batches[0]
  tv = tower.init(jax.random.key(0), x0["patches"], x0["patch_item_ids"], x0["item_grid"])
  h0 = tower.apply(tv, x0["patches"], x0["patch_item_ids"], x0["item_grid"])
  pv = proj.init(jax.random.key(1), h0, x0["item_grid"], x0["item_valid"])

  @jax.jit
  def fwd(tv, pv, b):
    h = tower.apply(tv, b["patches"], b["patch_item_ids"], b["item_grid"])
    return proj.apply(pv, h, b["item_grid"], b["item_valid"])[0]

  fwd(tv, pv, batches[0]).block_until_ready()
  times, real = [], []
  for b in batches[1:]:
    t0 = time.perf_counter()
    fwd(tv, pv, b).block_until_ready()
    times.append(time.perf_counter() - t0)
    real.append(int((b["patch_item_ids"] > 0).sum()))
  med = float(np.median(times))
  useful = np.mean([sum(tower_flops(s, s * s, cfg) for s in (sizes[j] for j in b)) for b in bins[1:]])
  return dict(patches_per_s=budget / med, real_patches_per_s=float(np.mean(real)) / med, step_s=med,
              gflops_per_s=float(useful) / med / 1e9)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--preset", default="small")
  ap.add_argument("--num_patches", type=int, default=2048)
  ap.add_argument("--patch_limit", type=int, default=1024)
  ap.add_argument("--images", type=int, default=512)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()
  cfg = vision_config(args.preset)
  grids = image_grids(args.images, args.patch_limit)
  if max(t * h * w for t, h, w in grids) > args.num_patches:
    raise SystemExit(f"--num_patches={args.num_patches} is smaller than the largest image; raise it to at least "
                     f"{max(t * h * w for t, h, w in grids)}")
  result = dict(preset=args.preset, num_patches=args.num_patches, patch_limit=args.patch_limit,
                images=args.images, device=str(jax.devices()[0].platform), machine=platform.processor() or
                platform.machine(), dtype=cfg.dtype)
  result.update(waste(grids, args.num_patches, cfg))
  result["by_attention"] = {}
  for impl in ("dense", "chunked", "blocks"):
    c = vision_config(args.preset)
    c.update(attention_impl=impl, max_item_patches=max(args.patch_limit, args.num_patches // 2))
    result["by_attention"][impl] = throughput(c, grids, args.num_patches, args.repeats)
    print(f"{impl:<8} {result['by_attention'][impl]['patches_per_s']:10.0f} patches/s", flush=True)
  result.update(result["by_attention"][cfg.attention_impl])
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"{'metric':<26}{'value':>14}")
  for k in ("patches_per_s", "real_patches_per_s", "gflops_per_s", "padding_waste", "packing_waste",
            "packing_waste_dense_mask", "packing_waste_blocks"):
    print(f"{k:<26}{result[k]:>14.3f}")


if __name__ == "__main__":
  from k25jax.runtime import use_caching_allocator
  use_caching_allocator()
  main()
