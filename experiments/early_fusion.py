"""Table 1 of Kimi K2.5 at small scale: early vs mid vs late vision fusion at a fixed vision budget (digest §2.1).

Three arms share one total token budget (`train.steps` x batch x seq_len) and spend the same ~10% of it on vision:
  Early  vision from 0% of training at 10:90     Mid  from 50% at 20:80     Late  from 80% at 50:50
Each arm is pre-trained from scratch (K2.5 = MoonViT-3D + projector + K2 MoE LM, `small` shapes), evaluated on
the six-category held-out suite by likelihood, and its held-out text loss is tracked through training (the
"dip-and-recover" of Figure 9 / Appendix B.1).

  python -m experiments.early_fusion --workdir DIR                          # default: 3 seeds, ~6 min on 2 cores
  python -m experiments.early_fusion --workdir DIR --config.train.steps=300 --config.experiment.seeds="(0,)"
  python -m experiments.early_fusion --workdir DIR --config=experiments/early_fusion.py:pod   # TPU pod shapes

Writes DIR/results.json (per arm, per category: mean score, n, per-seed scores, spread), DIR/results.md (Table 1
layout, ours beside the paper's) and DIR/text_curves.png. Rerunning with the same DIR resumes: finished arms
(DIR/arms/<arm>_seed<k>/final.json) are not retrained, an interrupted arm continues from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np

from k25jax.configs import get_config as preset_config
from k25jax.data.mixture import TABLE1_ARMS
from k25jax.evals import CATEGORIES
from k25jax.runtime import cpu_devices_for_training

ARMS = ("early", "mid", "late")
# Digest §2.1, Table 1 (scores in %).
PAPER = {
    "early": (25.8, 43.8, 65.7, 45.5, 58.5, 24.8),
    "mid": (25.0, 40.7, 64.1, 43.9, 58.6, 24.0),
    "late": (24.2, 39.0, 61.5, 43.1, 57.8, 24.0),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """"default" (`small` at CPU size), "tiny" (a seconds-long smoke run) or "pod" (K2.5 shapes on a TPU pod)."""
  name = (arg or "default").strip()
  if name == "default":
    config = preset_config("small")
    config.train.update(batch_size=8, seq_len=128, steps=60, learning_rate=3e-3, log_every=10)
    config.data.update(patch_budget=512, max_items=16, eval_batches=4)
    config.trainer.checkpoint.every = 15
    config.trainer.eval.update(every=10, suite_n=16)
  elif name == "tiny":
    config = preset_config("tiny")
    config.train.update(batch_size=8, seq_len=128, steps=4, log_every=1)
    config.data.update(patch_budget=256, max_items=8, eval_batches=1)
    config.trainer.checkpoint.every = 2
    config.trainer.eval.update(every=2, suite_n=2)
  elif name == "pod":
    config = preset_config("k25_full")
    config.train.update(seq_len=4096, steps=20000, log_every=10)
    config.mesh.update(data=-1, fsdp=16, expert=8, tensor=1)
    config.trainer.eval.update(every=1000, suite_n=256)
  else:
    raise ValueError(f"early_fusion: unknown config {name!r}; choose default, tiny or pod")
  config.experiment = ml_collections.ConfigDict(dict(arms=ARMS, seeds=(0, 1, 2) if name == "default" else (0,)))
  return config


def arm_config(config: ml_collections.ConfigDict, arm: str, seed: int) -> ml_collections.ConfigDict:
  """The run config of one arm and seed: the Table 1 schedule, model init and data order seeded by `seed`."""
  if arm not in TABLE1_ARMS:
    raise ValueError(f"experiment.arms has {arm!r}; choose from {sorted(TABLE1_ARMS)}")
  c = ml_collections.ConfigDict(config.to_dict())
  schedule = TABLE1_ARMS[arm]
  c.data.mixture.update(inject_at=schedule.inject_at, vision_ratio=schedule.vision_ratio)
  c.seed = int(seed)
  c.data.seed = int(seed)
  return c


def summarise(config: ml_collections.ConfigDict, runs: dict[str, list[dict]], workdir: str, wall_s: float) -> dict:
  """results.json content: per arm and category the mean score over seeds, n, per-seed scores and spread."""
  from k25jax.train.metrics import read_metrics
  arms = {}
  for arm, results in runs.items():
    seeds = [int(s) for s in config.experiment.seeds]
    cats = {}
    for c in CATEGORIES:
      scores = [r["suite"]["categories"][c]["score"] for r in results]
      cats[c] = {"score": float(np.mean(scores)), "n": int(results[0]["suite"]["categories"][c]["n"]),
                 "seeds": seeds, "per_seed": scores, "std": float(np.std(scores)),
                 "chance": results[0]["suite"]["categories"][c].get("chance")}
    shares, data_shares, example_shares = [], [], []
    for s in seeds:
      train = read_metrics(os.path.join(workdir, "arms", f"{arm}_seed{s}", "metrics.jsonl"), "train")
      vis = sum(r["vision_tokens"] for r in train)
      total = max(vis + sum(r["text_tokens"] for r in train), 1)
      shares.append(vis / total)
      data_shares.append(sum(r["vision_data_tokens"] for r in train) / total)
      example_shares.append(sum(r["vision_examples"] for r in train) / max(sum(r["examples"] for r in train), 1))
    schedule = TABLE1_ARMS[arm]
    arms[arm] = {"inject_at": schedule.inject_at, "vision_ratio": schedule.vision_ratio,
                 "vision_data_share": float(np.mean(data_shares)), "vision_token_share": float(np.mean(shares)),
                 "vision_example_share": float(np.mean(example_shares)), "categories": cats,
                 "heldout": {k: float(np.mean([r["heldout"][k] for r in results])) for k in results[0]["heldout"]},
                 "skipped_steps": int(sum(r["skipped"] for r in results))}
  return {"table": "Kimi K2.5 Table 1 (digest §2.1)", "arms": arms,
          "paper": {a: dict(zip(CATEGORIES, v)) for a, v in PAPER.items()},
          "steps": int(config.train.steps),
          "tokens_per_arm": int(config.train.steps) * int(config.train.batch_size) * int(config.train.seq_len),
          "preset": config.get("preset"), "wall_s": wall_s}


def results_markdown(results: dict) -> str:
  """Table 1 layout: rows Early/Mid/Late, the six categories as "ours (paper)" in %, plus the spread."""
  head = "| Run | Injection | Vision:Text | " + " | ".join(CATEGORIES) + " | Mean |"
  lines = [head, "|---" * (len(CATEGORIES) + 4) + "|"]
  for arm, r in results["arms"].items():
    cells = []
    for c in CATEGORIES:
      v = r["categories"][c]
      spread = f" ±{100 * v['std']:.1f}" if len(v["per_seed"]) > 1 else ""
      cells.append(f"{100 * v['score']:.1f}{spread} ({results['paper'][arm][c]:.1f})")
    mean = 100 * np.mean([r["categories"][c]["score"] for c in CATEGORIES])
    ratio = f"{round(100 * r['vision_ratio'])}:{round(100 * (1 - r['vision_ratio']))}"
    lines.append(f"| {arm.capitalize()} | {round(100 * r['inject_at'])}% | {ratio} | " + " | ".join(cells)
                 + f" | {mean:.1f} |")
  n = next(iter(results["arms"].values()))["categories"][CATEGORIES[0]]
  order = sorted(results["arms"], key=lambda a: -np.mean([results["arms"][a]["categories"][c]["score"]
                                                           for c in CATEGORIES]))
  notes = [
      "",
      f"Ours (paper) in %, likelihood scoring, n={n['n']} items per category, seeds {n['seeds']}; chance is "
      "about 25-50% per item. " + f"{results['steps']} steps ({results['tokens_per_arm']} tokens) per arm.",
      "",
      "Vision share over the whole run (Table 1 holds it at 10% of tokens in every arm): tokens of vision examples"
      " (visual tokens + their text), of which visual (media-pad) tokens, and vision examples among packed ones.",
      "",
      "| Run | vision-data tokens | visual tokens | vision examples | held-out text loss | held-out vision loss |",
      "|---|---|---|---|---|---|",
  ]
  for arm, r in results["arms"].items():
    h = r["heldout"]
    notes.append(f"| {arm.capitalize()} | {100 * r['vision_data_share']:.1f}% | {100 * r['vision_token_share']:.1f}% | "
                 f"{100 * r['vision_example_share']:.1f}% | {h.get('text_loss', float('nan')):.3f} | "
                 f"{h.get('vision_loss', float('nan')):.3f} |")
  paper_order = ["early", "mid", "late"]
  notes += ["", f"Ordering by mean score: ours {' > '.join(order)}; paper {' > '.join(paper_order)}"
            f" ({'same' if order == [a for a in paper_order if a in order] else 'different'} at this scale)."]
  return "\n".join(lines + notes) + "\n"


def plot_text_curves(config: ml_collections.ConfigDict, workdir: str, path: str) -> None:
  """Held-out text loss (and training loss) through training per arm, injection points marked (Figure 9)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from k25jax.train.metrics import read_metrics
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
  for i, arm in enumerate(config.experiment.arms):
    color = f"C{i}"
    for s in config.experiment.seeds:
      d = os.path.join(workdir, "arms", f"{arm}_seed{s}", "metrics.jsonl")
      ev = [r for r in read_metrics(d, "eval") if "text_loss" in r]
      tr = read_metrics(d, "train")
      label = arm if s == config.experiment.seeds[0] else None
      ax0.plot([r["step"] for r in ev], [r["text_loss"] for r in ev], "-o", ms=3, color=color, label=label)
      ax1.plot([r["step"] for r in tr], [r["loss"] for r in tr], color=color, alpha=0.7, label=label)
    inject = TABLE1_ARMS[arm].inject_at * int(config.train.steps)
    for ax in (ax0, ax1):
      ax.axvline(inject, color=color, ls=":", lw=1)
  ax0.set(title="held-out text loss (dip-and-recover, Fig. 9)", xlabel="step", ylabel="CE / token")
  ax1.set(title="training loss", xlabel="step")
  ax0.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: str, log=print, devices=None) -> dict:
  """Trains/resumes every arm and seed with one compiled trainer, then writes results.json/.md and the plot."""
  from k25jax.train.loop import Trainer
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(config, devices)  # validates the whole config before anything compiles
  runs = {}
  for arm in config.experiment.arms:
    runs[arm] = []
    for seed in config.experiment.seeds:
      c = arm_config(config, arm, seed)
      runs[arm].append(trainer.run(c, os.path.join(workdir, "arms", f"{arm}_seed{seed}"), log=log,
                                   name=f"[{arm} s{seed}] "))
      if runs[arm][-1]["status"] != "done":
        log(f"{arm} seed {seed}: {runs[arm][-1]['status']} at step {runs[arm][-1]['step']}; rerun to resume")
        return runs[arm][-1]
  results = summarise(config, runs, workdir, time.time() - t0)
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
    f.write(results_markdown(results))
  plot_text_curves(config, workdir, os.path.join(workdir, "text_curves.png"))
  log(results_markdown(results))
  log(f"wrote {workdir}/results.json, results.md, text_curves.png in {time.time() - t0:.0f}s")
  return results


def main(argv) -> None:
  del argv
  from absl import flags, logging
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  cpu_devices_for_training(flags.FLAGS.config)
  run(flags.FLAGS.config, flags.FLAGS.workdir, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
  from k25jax.runtime import use_caching_allocator
  use_caching_allocator()
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", os.path.abspath(__file__), "Experiment config (get_config in this "
                                  "file: default, tiny or pod); override fields with --config.train.steps=...",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Output directory (results, per-arm checkpoints and metrics).",
                      required=True)
  app.run(main)
