"""Train-step benchmark: matmul peak, tokens/s and MFU of the `small` LM, and the MoE dispatch paths side by side.

python -m benchmarks.train_step --out out/train_step.json [--preset small] [--steps 8] [--batches 32,8]
                                 [--cpu_devices N]

Everything is measured in this one process: first the machine's matmul peak (jitted square `jax.lax.dot`, median
of repeats, for the model's compute dtype; measured again after the steps, and the larger of the two is used),
then, for each global batch of `--batches` (sequences of
`train.seq_len`), the trainer's jitted, donated step (forward, backward, MuonClip update, QK-Clip, MoE bias update)
of the text-only LM and of the multimodal K25Model (FLOPs from `k25jax.train.flops`), then each expert dispatch's
forward + backward at (E=64, k=8) and (E=8, k=2). MFU = model FLOPs per second / measured peak.

On a CPU host the steps run data-parallel over one XLA device per core (`k25jax.runtime.cpu_device_per_core`;
`--cpu_devices` overrides the count): XLA:CPU runs most of a step's ops on one thread, so one program per core is
how the step uses the whole machine, as it would use every chip of a slice. The peak is one matmul on one device
(its Eigen kernel already uses every core), so MFU still compares against the whole machine. The headline text
step is timed on a single device as well (`single_device`) for comparison.

The headline is the first batch (32 x 256 = 8192 tokens per step). Muon's Newton-Schulz costs a fixed ~15 GFLOP
per step on `small` whatever the batch (MFU counts model FLOPs only), as much as a forward + backward of 2048
tokens; pre-training amortises it over large batches (K2: 67M tokens per step, digest §2.2). The smaller batch
(2048 tokens, the preset's default) is reported beside it in `by_batch`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from k25jax import sharding as shd
from k25jax.configs import get_config, validate
from k25jax.model import moe as moe_lib
from k25jax.runtime import cpu_device_per_core
from k25jax.train import flops


def _median_time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_peak(dtype: str, n: int = 2048, repeats: int = 10) -> float:
  """FLOP/s of an n x n x n matmul in `dtype` (bf16 inputs accumulate in f32, as the model's matmuls do)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
  f = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32))
  return 2 * n ** 3 / _median_time(f, a, b, repeats=repeats)


def bench_step(preset: str, steps: int, *, multimodal: bool, optimizer: str, num_patches: int, max_items: int,
               overrides: dict, devices: list | None = None) -> dict:
  """The trainer's jitted, donated step (`k25jax.train.step`: forward, backward, optimizer update, QK-Clip, MoE
  bias update) on packed synthetic batches. Text-only: the K2LM with no media. Multimodal: K25Model (MoonViT-3D +
  projector + LM) with `max_items` media items packed in `num_patches` patches; FLOPs = LM FLOPs per token x
  tokens + the vision path's FLOPs (`k25jax.train.flops`). `devices`: the mesh's devices (default: as many
  as divide the batch)."""
  from k25jax.data.pipeline import to_global_batch  # noqa: PLC0415
  from k25jax.data.tokenizer import ByteTokenizer  # noqa: PLC0415
  from k25jax.train import dep, state as state_lib, step as step_lib  # noqa: PLC0415
  config = get_config(preset)
  config.model.vision.enabled = multimodal
  config.trainer.optimizer = optimizer
  for key, value in overrides.items():
    group, name = key.split(".")
    config[group][name] = type(config[group][name])(value)
  validate(config)
  mesh = shd.make_mesh(config, devices or jax.devices()[:math.gcd(config.train.batch_size, jax.device_count())])
  pad = ByteTokenizer().media_pad_id
  state, shardings, tx = state_lib.init_state(config, mesh)
  step = step_lib.make_train_step(config, mesh, state_lib.build_model(config), tx, shardings, media_pad_id=pad)
  m, v = config.model, config.model.vision
  b, l = config.train.batch_size, config.train.seq_len
  rng = np.random.default_rng(0)
  host = [dep.synthetic_batch(rng, batch_size=b, seq_len=l, num_patches=num_patches,
                              max_items=max_items if multimodal else 0, vocab_size=m.vocab_size, media_pad_id=pad,
                              patch_dim=v.in_channels * v.patch_size ** 2) for _ in range(steps + 2)]
  batches = [to_global_batch(h, mesh) for h in host]
  t0 = time.perf_counter()
  state, metrics = step(state, batches[0])
  jax.block_until_ready(metrics["loss"])
  compile_s = time.perf_counter() - t0
  times = []
  for batch in batches[1:]:
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times[1:])
  step_flops = flops.train_flops_per_token(m, l) * b * l
  out = dict(model="K25Model" if multimodal else "K2LM", optimizer=optimizer, dtype=m.dtype,
             mesh={k: int(v) for k, v in mesh.shape.items() if v > 1} or {"data": 1},
             moe_dispatch=moe_lib.resolve_dispatch(m.moe_dispatch), batch=b, seq_len=l, step_s=step_s,
             compile_s=compile_s, tokens_per_s=b * l / step_s, final_loss=float(metrics["loss"]))
  if multimodal:
    grids = host[0]["item_grid"][host[0]["item_valid"].astype(bool)]
    item_patches, item_tokens = grids.prod(-1), (grids[:, 1] // 2) * (grids[:, 2] // 2)
    step_flops += flops.vision_train_flops(v, m.hidden_size, item_patches, item_tokens)
    out.update(items=int(len(grids)), patches=int(item_patches.sum()), vision_tokens=int(item_tokens.sum()))
  out.update(model_flops_per_step=step_flops, model_flops_per_s=step_flops / step_s)
  return out


def bench_dispatch(e: int, k: int, tokens: int, d: int, f: int, repeats: int) -> dict[str, float]:
  """Seconds per forward + backward call of each dispatch path on the same routed batch."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((tokens, d)), jnp.float32)
  scores = jax.nn.sigmoid(jnp.asarray(rng.standard_normal((tokens, e)), jnp.float32))
  idx = jax.lax.top_k(scores, k)[1].astype(jnp.int32)
  w = jnp.take_along_axis(scores, idx, -1)
  ws = [jnp.asarray(rng.standard_normal(s) * 0.05, jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]
  out = {}
  mesh_cfg = get_config("tiny")
  mesh_cfg.mesh.update(data=1, fsdp=1, expert=jax.device_count(), tensor=1)
  for name in moe_lib.DISPATCHES:
    fn = moe_lib.get_dispatch(name, 64)
    grad = jax.jit(jax.grad(lambda x, w, wg, wu, wd, idx: jnp.sum(fn(x, idx, w, wg, wu, wd) ** 2),
                            argnums=(0, 1, 2, 3, 4)))
    if name == "ep":
      with jax.set_mesh(shd.make_mesh(mesh_cfg)):
        out[name] = _median_time(grad, x, w, *ws, idx, repeats=repeats)
    else:
      out[name] = _median_time(grad, x, w, *ws, idx, repeats=repeats)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--preset", default="small")
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--batches", default="32,8", help="global batch sizes to time; the first is the headline")
  parser.add_argument("--optimizer", default="muonclip", choices=("muonclip", "adamw"))
  parser.add_argument("--dispatch_tokens", type=int, default=2048)
  parser.add_argument("--patches", type=int, default=512, help="patch budget of the multimodal batch")
  parser.add_argument("--items", type=int, default=16, help="media item slots of the multimodal batch")
  parser.add_argument("--set", action="append", default=[], help="group.field=value override, e.g. model.remat_policy=dots")
  parser.add_argument("--cpu_devices", type=int, default=0,
                      help="XLA CPU devices for the steps' mesh (default 0: one per core)")
  args = parser.parse_args()
  cpu_device_per_core(args.cpu_devices or None)
  overrides = {}
  for item in args.set:
    key, value = item.split("=", 1)
    overrides[key] = type(get_config(args.preset)[key.split(".")[0]][key.split(".")[1]])(value)
  dtype = get_config(args.preset).model.dtype
  peak_before = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
  kw = dict(optimizer=args.optimizer, num_patches=args.patches, max_items=args.items)
  by_batch = {}
  for batch in (int(b) for b in args.batches.split(",")):
    runs = {}
    for name, multimodal in (("text", False), ("multimodal", True)):
      run = bench_step(args.preset, args.steps, multimodal=multimodal,
                       overrides={**overrides, "train.batch_size": batch}, **kw)
      runs[name] = run
    by_batch[str(batch)] = runs
  headline_batch = int(args.batches.split(",")[0])
  single = None
  if jax.device_count() > 1:
    single = bench_step(args.preset, args.steps, multimodal=False, devices=jax.devices()[:1],
                        overrides={**overrides, "train.batch_size": headline_batch}, **kw)
  # The peak again after the steps; MFU uses the larger of the two (a load spike during either measurement can
  # only lower a peak, so the larger one is the conservative denominator).
  peak_after = {d: matmul_peak(d) for d in ("float32", "bfloat16")}
  peak = {d: max(peak_before[d], peak_after[d]) for d in peak_before}
  for batch, runs in by_batch.items():
    for run in runs.values():
      run["mfu"] = run["model_flops_per_s"] / peak[dtype]
    print(f"batch {batch}x{runs['text']['seq_len']} on {runs['text']['mesh']}: text "
          f"{runs['text']['tokens_per_s']:.0f} tok/s, step {runs['text']['step_s'] * 1e3:.0f} ms, MFU "
          f"{runs['text']['mfu']:.3f}; multimodal {runs['multimodal']['tokens_per_s']:.0f} tok/s, MFU "
          f"{runs['multimodal']['mfu']:.3f} ({runs['multimodal']['items']} items, {runs['multimodal']['patches']} "
          "patches)")
  if single is not None:
    single["mfu"] = single["model_flops_per_s"] / peak[dtype]
    print(f"batch {headline_batch} text on 1 device: {single['tokens_per_s']:.0f} tok/s, MFU {single['mfu']:.3f}")
  dispatch = {
      "E64_k8": bench_dispatch(64, 8, args.dispatch_tokens, 256, 128, repeats=3),
      "E8_k2": bench_dispatch(8, 2, args.dispatch_tokens, 256, 128, repeats=3),
  }
  default = moe_lib.resolve_dispatch("auto")
  e64 = {k: v for k, v in dispatch["E64_k8"].items() if k != "ep"}
  headline = by_batch[args.batches.split(",")[0]]
  result = dict(
      device=jax.devices()[0].device_kind, device_count=jax.device_count(), cpu_count=os.cpu_count(),
      peak_flops=peak[dtype], peak_flops_by_dtype=peak, peak_flops_before=peak_before,
      peak_flops_after=peak_after, **headline["text"],
      multimodal=headline["multimodal"], single_device=single, by_batch=by_batch, dispatch=dispatch, default_cpu_dispatch=default,
      default_speedup_vs_slowest_E64=max(e64.values()) / e64[default],
      notes="headline = the first of --batches; dispatch: seconds per forward+backward call; 'ep' runs on a mesh "
            f"whose expert axis spans the {jax.device_count()} local device(s)")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as fh:
    json.dump(result, fh, indent=2)
  print(f"peak {peak[dtype] / 1e9:.0f} GFLOP/s ({dtype}); headline batch {result['batch']}: "
        f"{result['tokens_per_s']:.0f} tok/s  MFU {result['mfu']:.3f} (multimodal {result['multimodal']['mfu']:.3f})")
  for setting, times in dispatch.items():
    print(setting, "  ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()))


if __name__ == "__main__":
  from k25jax.runtime import use_caching_allocator
  use_caching_allocator()
  main()
