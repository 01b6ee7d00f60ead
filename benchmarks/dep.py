"""DEP benchmark (digest §7; K2.5 §4.5 reports DEP at 90% of text-only training throughput).

python -m benchmarks.dep --out out/dep.json [--preset small] [--steps 5] [--devices 8]

One process, `--devices` fake CPU devices, mesh from the preset (data = all devices). Three train steps at the
same tokens per step (train.batch_size x train.seq_len), each a jitted, donated forward + backward + update:
  text        K2LM on a text-only batch (`k25jax.train.step.make_train_step`)
  integrated  K25Model on a multimodal batch, vision inside the one program (same step function)
  dep         the same multimodal batch through `k25jax.train.dep.make_dep_train_step` (host plan + 4 programs)
The multimodal batch (`dep.synthetic_batch`) fills `data.patch_budget` patches with a skewed image-size
distribution. efficiency_X = tokens/s of X / tokens/s of text (median step time over `--steps` after a compile
step). peak_bytes are per device from XLA's memory analysis (for DEP, the largest of its programs; each program is
listed too). imbalance = max/mean patch load over the devices for LPT and for the in-order (image-count) split,
averaged over `--plans` skewed batches, at this device count and at 64 devices.

On fake CPU devices all "devices" share the host's cores, so times measure total work, not parallel speed-up.
"""

from __future__ import annotations

import argparse
import os
import sys

if "jax" not in sys.modules:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count="
                             + next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "8")).strip()

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from k25jax import sharding as shd  # noqa: E402
from k25jax.configs import get_config  # noqa: E402
from k25jax.data.pipeline import to_global_batch  # noqa: E402
from k25jax.data.tokenizer import ByteTokenizer  # noqa: E402
from k25jax.train import balance, dep  # noqa: E402
from k25jax.train.simple import synthetic_batch as text_batch  # noqa: E402
from k25jax.train.state import build_model, init_state  # noqa: E402
from k25jax.train.step import make_train_step  # noqa: E402


def _time_steps(step, state, batch, steps: int) -> tuple[float, float, list[float], object]:
  """(compile+first step seconds, median step seconds, losses, state)."""
  t0 = time.perf_counter()
  state, m = step(state, batch)
  jax.block_until_ready(m["loss"])
  first = time.perf_counter() - t0
  times, losses = [], [float(m["loss"])]
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready((state, m["loss"]))
    times.append(time.perf_counter() - t0)
    losses.append(float(m["loss"]))
  return first, statistics.median(times), losses, state


def imbalance(config: ml_collections.ConfigDict, num_devices: int, plans: int) -> dict:
  """Mean max/mean patch load over `plans` skewed batches: LPT (DEP) vs in-order split (no balancing)."""
  kh, kw = config.model.vision.merge_kernel_size
  p, m = int(config.data.patch_budget), int(config.data.max_items)
  out = {"lpt": [], "none": []}
  for seed in range(plans):
    b = dep.synthetic_batch(np.random.default_rng(seed), batch_size=int(config.train.batch_size),
                            seq_len=int(config.train.seq_len), num_patches=p, max_items=m,
                            vocab_size=int(config.model.vocab_size), media_pad_id=ByteTokenizer().media_pad_id,
                            patch_dim=int(config.model.vision.in_channels * config.model.vision.patch_size ** 2),
                            max_side=int(config.model.vision.pos_emb_height))
    for name, balanced in (("lpt", True), ("none", False)):
      plan = balance.plan_media(b["patch_item_ids"], b["item_grid"], b["item_valid"], num_devices=num_devices,
                                patch_budget=p, max_items=m, merge_kernel=(kh, kw), num_vision_slots=p // (kh * kw),
                                balance=balanced)
      out[name].append(plan.stats()["max_over_mean"])
  return {k: float(np.mean(v)) for k, v in out.items()}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--preset", default="small")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--plans", type=int, default=20)
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--optimizer", default="adamw", choices=("adamw", "muonclip"))
  args = ap.parse_args()

  config = get_config(args.preset)
  config.trainer.optimizer = args.optimizer
  pad = ByteTokenizer().media_pad_id
  mesh = shd.make_mesh(config)
  vcfg = config.model.vision
  b, length = int(config.train.batch_size), int(config.train.seq_len)
  mm = dep.synthetic_batch(np.random.default_rng(0), batch_size=b, seq_len=length,
                           num_patches=int(config.data.patch_budget), max_items=int(config.data.max_items),
                           vocab_size=int(config.model.vocab_size), media_pad_id=pad,
                           patch_dim=int(vcfg.in_channels * vcfg.patch_size ** 2), max_side=int(vcfg.pos_emb_height))
  text = dict(text_batch(np.random.default_rng(0), b, length, int(config.model.vocab_size)),
              **{k: np.zeros_like(mm[k]) for k in ("patches", "patch_item_ids", "item_grid", "item_valid")})
  tokens_per_step = b * length
  result = dict(preset=args.preset, devices=mesh.size, mesh=dict(mesh.shape), tokens_per_step=tokens_per_step,
                vision_tokens=int((mm["tokens"] == pad).sum()), patches=int(mm["item_grid"].prod(1).sum()),
                media_items=int(mm["item_valid"].sum()), optimizer=args.optimizer, steps=args.steps,
                load_average=os.getloadavg()[0], cpu_count=os.cpu_count(),
                note="fake CPU devices share the host cores; the host was shared with other jobs")
  seconds, peak, first, losses = {}, {}, {}, {}

  text_cfg = ml_collections.ConfigDict(config.to_dict())
  text_cfg.model.vision.enabled = False
  for name, cfg, batch in (("text", text_cfg, text), ("integrated", config, mm), ("dep", config, mm)):
    state, shardings, tx = init_state(cfg, mesh)
    model = build_model(cfg)
    gb = to_global_batch(batch, mesh)
    if name == "dep":
      step = dep.make_dep_train_step(cfg, mesh, model, tx, shardings, media_pad_id=pad)
      programs = step.memory(state, gb)
      peak[name] = max(p["peak"] for p in programs.values())
      result["dep_programs"] = programs
      result["dep_budgets"] = dict(zip(("device_patch_budget", "device_max_items"), step.budgets))
    else:
      step = make_train_step(cfg, mesh, model, tx, shardings, media_pad_id=pad)
      with jax.set_mesh(mesh):
        peak[name] = dep.memory_stats(step.jitted.lower(state, gb).compile())["peak"]
    first[name], seconds[name], losses[name], state = _time_steps(step, state, gb, args.steps)
    print(f"{name:>10}: {seconds[name]:.3f} s/step (first {first[name]:.1f} s), peak {peak[name] / 2**20:.1f} MiB",
          flush=True)
    del state

  result.update(
      seconds_per_step=seconds, first_step_seconds=first, losses=losses,
      tokens_per_second={k: tokens_per_step / v for k, v in seconds.items()},
      efficiency_dep=seconds["text"] / seconds["dep"], efficiency_integrated=seconds["text"] / seconds["integrated"],
      peak_bytes=peak,
      imbalance={f"{n}_devices": imbalance(config, n, args.plans) for n in (mesh.size, 64)},
  )
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(f"efficiency dep {result['efficiency_dep']:.3f}  integrated {result['efficiency_integrated']:.3f}  "
        f"(paper DEP: 0.90)")
  for k, v in result["imbalance"].items():
    print(f"imbalance max/mean at {k}: LPT {v['lpt']:.3f}  in-order {v['none']:.3f}")


if __name__ == "__main__":
  main()
