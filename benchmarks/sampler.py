"""Generation throughput: k25jax's latent-cache sampler vs transformers' DeepseekV3ForCausalLM.generate.

Issue 7 / digest §1.1. Both run on this CPU in one process, on the same `small` config and the same random
weights (our params converted to HF's in-memory layout: transposed kernels, experts fused into
`experts.gate_up_proj` (E, 2I, H) and `experts.down_proj` (E, H, I)). Before timing, both decode the same short
prompts greedily and the JSON records whether the tokens agree and the largest logit gap of one forward.
Timed: greedy decoding of `--new` tokens after a `--prompt`-token prompt at each batch size (no stop tokens, so
every row generates exactly `--new` tokens); generated tokens/s = batch * new / wall time (prefill included),
median of `--reps` runs after one warm-up (our warm-up compiles). The split: `prefill_s` is the median wall time
of the same call with one new token (prefill + the first token), `decode_step_ms` = (full - prefill) / (new - 1).
Ours and transformers' runs are interleaved rep by rep, and the 1-minute load average is recorded per batch size
(the measurement is only meaningful on an otherwise idle machine).

The JSON's `decode_bound` puts each decode step against the machine: the f32 matmul peak measured in this
process (`benchmarks.train_step.matmul_peak`), the model FLOPs of one step (2 x active matmul parameters per row,
`k25jax.train.flops`, plus QK and AV over the mean context) and the FLOPs the step executes (with the `dense`
decode dispatch every routed expert runs on every row), the step time each would take at that peak, the decode
MFU, and the decode step that `--target` x transformers' tokens/s would need after our measured prefill.
`decode_ablation` times, at the largest batch and in the same interleaved rounds, our generation without the
CPU kernels (`xla_ops`: `sample.cpu_kernels=False`, XLA's own ops for the absorbed attention and the
`dense`/`blocked` MoE dispatch `decode_moe_config` then picks) and without prepared decode weights (`unprepared`:
each call slices and packs them in its program, one copy per device) next to the default (`ours`: the attention
kernel and the `cpu_kernel` dispatch on weights from `prepare_decode`, made once per batch size before timing;
`prepare_decode_s` records how long that took).

Ours runs data-parallel over one XLA CPU device per core (`k25jax.runtime.cpu_device_per_core`, `--cpu_devices`
overrides), each batch on as many devices as divide it (batch 1: one device); transformers uses torch's default
intra-op threads (one per core), so both use the whole machine.

  python -m benchmarks.sampler --out /tmp/sampler_bench.json [--preset small] [--batches 1,8,32] [--cpu_devices N]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from k25jax.configs import get_config, validate  # noqa: E402
from k25jax.model import K2LM, text_inputs  # noqa: E402
from k25jax.model.lm import freeze  # noqa: E402
from k25jax.runtime import cpu_device_per_core  # noqa: E402
from k25jax.sample import generate  # noqa: E402
from k25jax.sample.engine import cpu_kernels, decode_moe_config, prepare_decode  # noqa: E402
from k25jax.sharding import get_rules, init_sharded, make_mesh  # noqa: E402
from k25jax.train import flops  # noqa: E402

from benchmarks.train_step import matmul_peak  # noqa: E402


def hf_config(m) -> DeepseekV3Config:
  """A DeepseekV3Config equal to our model config: plain rope (YaRN off), interleaved pairs, sigmoid noaux_tc
  routing without groups, our norm eps, untied head."""
  if m.rope_scaling.type != "none":
    raise ValueError(f"model.rope_scaling.type={m.rope_scaling.type!r}: this benchmark maps only plain rope; "
                     "use a preset without YaRN (tiny/small)")
  return DeepseekV3Config(
      vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
      moe_intermediate_size=m.moe_intermediate_size, num_hidden_layers=m.num_hidden_layers,
      num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_attention_heads,
      n_shared_experts=m.n_shared_experts, n_routed_experts=m.n_routed_experts,
      routed_scaling_factor=m.routed_scaling_factor, kv_lora_rank=m.kv_lora_rank, q_lora_rank=m.q_lora_rank,
      qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, qk_nope_head_dim=m.qk_nope_head_dim,
      n_group=m.n_group, topk_group=m.topk_group, num_experts_per_tok=m.num_experts_per_tok,
      first_k_dense_replace=m.first_k_dense_replace, norm_topk_prob=m.norm_topk_prob, hidden_act="silu",
      max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.rms_norm_eps, pad_token_id=0,
      bos_token_id=None, eos_token_id=None, tie_word_embeddings=False, attention_bias=False,
      rope_parameters={"rope_type": "default", "rope_theta": float(m.rope_theta)}, rope_interleave=True,
      num_mtp_layers=0)


def to_hf_state_dict(params, moe_state, m) -> dict[str, torch.Tensor]:
  """Our (scanned, [in, out]) parameter tree -> HF DeepseekV3ForCausalLM in-memory state dict."""
  t = lambda a: torch.from_numpy(np.array(a, np.float32))
  sd = {"model.embed_tokens.weight": t(params["embed_tokens"]["embedding"]),
        "model.norm.weight": t(params["norm"]["weight"]),
        "lm_head.weight": t(np.asarray(params["lm_head"]["kernel"]).T)}
  n_dense = m.first_k_dense_replace
  for i in range(m.num_hidden_layers):
    stack, j = ("dense_layers", i) if i < n_dense else ("moe_layers", i - n_dense)
    lp = jax.tree.map(lambda a: np.asarray(a)[j], params[stack])
    pre = f"model.layers.{i}."
    for norm in ("input_layernorm", "post_attention_layernorm"):
      sd[pre + norm + ".weight"] = t(lp[norm]["weight"])
    for name, sub in lp["self_attn"].items():
      sd[pre + f"self_attn.{name}.weight"] = t(sub["kernel"].T if "kernel" in sub else sub["weight"])
    mlp = lp["mlp"]
    if i < n_dense:
      for name in ("gate_proj", "up_proj", "down_proj"):
        sd[pre + f"mlp.{name}.weight"] = t(mlp[name]["kernel"].T)
      continue
    sd[pre + "mlp.gate.weight"] = t(mlp["gate"]["kernel"].T)
    bias = moe_state["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"]
    sd[pre + "mlp.gate.e_score_correction_bias"] = t(np.asarray(bias)[j])
    gate_up = np.concatenate([mlp["experts_gate_proj"], mlp["experts_up_proj"]], axis=-1)   # [E, D, 2I]
    sd[pre + "mlp.experts.gate_up_proj"] = t(gate_up.transpose(0, 2, 1))
    sd[pre + "mlp.experts.down_proj"] = t(np.asarray(mlp["experts_down_proj"]).transpose(0, 2, 1))
    for name in ("gate_proj", "up_proj", "down_proj"):
      sd[pre + f"mlp.shared_experts.{name}.weight"] = t(mlp["shared_experts"][name]["kernel"].T)
  return sd


def build_hf(params, moe_state, m) -> DeepseekV3ForCausalLM:
  model = DeepseekV3ForCausalLM(hf_config(m)).eval()
  missing, unexpected = model.load_state_dict(to_hf_state_dict(params, moe_state, m), strict=False)
  if missing or unexpected:
    raise RuntimeError(f"HF state dict mismatch: missing {missing}, unexpected {unexpected}")
  # HF builds q_a_layernorm / kv_a_layernorm with eps 1e-6 regardless of rms_norm_eps; ours use rms_norm_eps.
  for layer in model.model.layers:
    layer.self_attn.q_a_layernorm.variance_epsilon = m.rms_norm_eps
    layer.self_attn.kv_a_layernorm.variance_epsilon = m.rms_norm_eps
  return model


def hf_generate(model, prompts: np.ndarray, new: int) -> np.ndarray:
  """Greedy, KV-cached HF generation of exactly `new` tokens for equal-length prompts."""
  ids = torch.from_numpy(prompts.astype(np.int64))
  with torch.inference_mode():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, use_cache=True, pad_token_id=0)
  return out[:, prompts.shape[1]:].numpy()


def decode_bound(m, mesh, batch: int, prompt: int, new: int, step_s: float, prefill_s: float, hf_tps: float,
                 peak: float, target: float) -> dict:
  """One decode step of `batch` rows against the f32 peak (module docstring). Context: prompt + new / 2."""
  # attention_flops_per_token counts a causal row's mean context, seq_len / 2: here prompt + new / 2.
  attention = flops.attention_flops_per_token(m, 2 * prompt + new)
  model = batch * (2 * flops.matmul_params_per_token(m) + attention)
  with jax.set_mesh(mesh):
    dispatch = decode_moe_config(freeze(m), batch).moe_dispatch
  idle_experts = m.n_routed_experts - m.num_experts_per_tok if dispatch == "dense" else 0
  extra = (m.num_hidden_layers - m.first_k_dense_replace) * 3 * m.hidden_size * m.moe_intermediate_size
  executed = model + batch * 2 * idle_experts * extra
  needed = (batch * new / (target * hf_tps) - prefill_s) / (new - 1)
  return dict(dispatch=dispatch, model_flops=model, executed_flops=executed, peak_flops=peak,
              model_flops_at_peak_ms=1e3 * model / peak, executed_flops_at_peak_ms=1e3 * executed / peak,
              decode_mfu=model / step_s / peak, step_ms=1e3 * step_s,
              **{f"step_ms_for_{target:g}x": 1e3 * needed})


def timed(fns: dict, reps: int) -> dict:
  """Median wall seconds of each zero-argument callable: one warm-up each (compiles ours), then `reps` rounds
  that run every callable once, interleaved so that load changes hit all of them alike."""
  for fn in fns.values():
    fn()
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)
  return {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--preset", default="small")
  parser.add_argument("--batches", default="1,8,32")
  parser.add_argument("--prompt", type=int, default=64)
  parser.add_argument("--new", type=int, default=64)
  parser.add_argument("--reps", type=int, default=25,
                      help="interleaved rounds (medians over minutes of this machine's drifting speed)")
  parser.add_argument("--init_std", type=float, default=0.1,
                      help="weight init std: larger than the 0.02 default so greedy argmax is not a near-tie")
  parser.add_argument("--target", type=float, default=5.0, help="speedup whose decode step `decode_bound` reports")
  parser.add_argument("--cpu_devices", type=int, default=0, help="XLA CPU devices (default 0: one per core)")
  args = parser.parse_args()
  cpu_device_per_core(args.cpu_devices or None)

  config = get_config(args.preset)
  config.model.initializer_range = args.init_std
  validate(config)
  m = config.model
  rules = get_rules(config)
  mesh_for = lambda rows: make_mesh(config, jax.devices()[:math.gcd(rows, jax.device_count())])
  mesh = mesh_for(2)
  x = text_inputs(1, 8)
  variables, _ = init_sharded(K2LM(m).init, mesh, rules, jax.random.key(config.seed), x["tokens"], x["positions"],
                              x["segment_ids"])
  params, moe_state = variables["params"], variables["moe_state"]
  bias = moe_state["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"]
  moe_state["moe_layers"]["mlp"]["gate"]["e_score_correction_bias"] = (
      0.05 * jax.random.normal(jax.random.key(1), bias.shape))
  host_params, host_state = jax.device_get((params, moe_state))
  hf = build_hf(host_params, host_state, m)
  torch.set_grad_enabled(False)

  # Agreement: greedy tokens on short prompts, and the logits of one forward.
  rng = np.random.default_rng(0)
  check = rng.integers(1, m.vocab_size, (2, 8))
  ours_check = generate(params, moe_state, config, [list(r) for r in check], max_new_tokens=16,
                        rng=jax.random.key(0), greedy=True, mesh=mesh)["tokens"]
  hf_check = hf_generate(hf, check, 16)
  pos = np.broadcast_to(np.arange(8), check.shape)
  with jax.set_mesh(mesh):
    ours_logits, _ = K2LM(m).apply({"params": params, "moe_state": moe_state}, check, pos, np.ones_like(check))
  hf_logits = hf(torch.from_numpy(check)).logits.numpy()
  agreement = dict(prompt_tokens=8, new_tokens=16, rows=2,
                   tokens_equal=bool(np.array_equal(ours_check, hf_check)),
                   token_match_fraction=float(np.mean(ours_check == hf_check)),
                   max_abs_logit_diff=float(np.max(np.abs(np.asarray(ours_logits) - hf_logits))))
  print(f"agreement: {agreement}")

  if args.new < 2:
    raise ValueError(f"--new={args.new}: need >= 2 new tokens to separate prefill from decode steps")
  peak = matmul_peak("float32")
  ours_tps, hf_tps, speedup, split, load, bound, ablation = {}, {}, {}, {}, {}, {}, {}
  ablate = max(int(s) for s in args.batches.split(",")) if cpu_kernels(freeze(m)) else None
  xla_ops = config.copy_and_resolve_references()
  xla_ops.sample = ml_collections.ConfigDict(dict(cpu_kernels=False))
  ablation_configs = {"xla_ops": (xla_ops, True), "unprepared": (config, False)}
  prepare_s = {}
  for b in [int(s) for s in args.batches.split(",")]:
    prompts = rng.integers(1, m.vocab_size, (b, args.prompt))
    rows = [list(r) for r in prompts]
    mesh_b = mesh_for(b)
    t0 = time.perf_counter()
    prepared = {id(config): prepare_decode(params, moe_state, config, mesh_b)}
    prepare_s[b] = time.perf_counter() - t0
    if b == ablate:
      prepared[id(xla_ops)] = prepare_decode(params, moe_state, xla_ops, mesh_b)

    def run(new, cfg=config, prepare=True):
      return generate(params, moe_state, cfg, rows, max_new_tokens=new, rng=jax.random.key(0), greedy=True,
                      mesh=mesh_b, decode_weights=prepared[id(cfg)] if prepare else None)

    fns = {"ours": run, "hf": lambda new: hf_generate(hf, prompts, new)}
    if b == ablate:  # the CPU kernels' and prepared weights' shares: decode variants timed in the same rounds
      fns.update({name: functools.partial(run, cfg=cfg, prepare=prep)
                  for name, (cfg, prep) in ablation_configs.items()})
    t = timed({(who, new): functools.partial(fn, new) for who, fn in fns.items() for new in (args.new, 1)},
              args.reps)
    load[b] = os.getloadavg()[0]
    ours_tps[b], hf_tps[b] = b * args.new / t[("ours", args.new)], b * args.new / t[("hf", args.new)]
    speedup[b] = ours_tps[b] / hf_tps[b]
    split[b] = {who: dict(total_s=t[(who, args.new)], prefill_s=t[(who, 1)],
                          decode_step_ms=1e3 * (t[(who, args.new)] - t[(who, 1)]) / (args.new - 1))
                for who in ("ours", "hf")}
    if b == ablate:
      ablation = {who: dict(tokens_per_s=b * args.new / t[(who, args.new)], total_s=t[(who, args.new)],
                            prefill_s=t[(who, 1)],
                            decode_step_ms=1e3 * (t[(who, args.new)] - t[(who, 1)]) / (args.new - 1))
                  for who in ("ours", *ablation_configs)}
      print("           decode step by variant: " + ", ".join(f"{k} {v['decode_step_ms']:.2f} ms"
                                                            for k, v in ablation.items()))
    bound[b] = decode_bound(m, mesh_b, b, args.prompt, args.new, split[b]["ours"]["decode_step_ms"] / 1e3,
                            t[("ours", 1)], hf_tps[b], peak, args.target)
    print(f"batch {b:3d}: ours {ours_tps[b]:9.1f} tok/s   transformers {hf_tps[b]:9.1f} tok/s   "
          f"speedup {speedup[b]:6.2f}x   prefill ours/hf {t[('ours', 1)] * 1e3:.0f}/{t[('hf', 1)] * 1e3:.0f} ms   "
          f"decode step ours/hf {split[b]['ours']['decode_step_ms']:.2f}/{split[b]['hf']['decode_step_ms']:.2f} ms"
          f"   load {load[b]:.2f}\n           decode step {bound[b]['step_ms']:.2f} ms ({bound[b]['dispatch']}): "
          f"model FLOPs at peak {bound[b]['model_flops_at_peak_ms']:.2f} ms, executed at peak "
          f"{bound[b]['executed_flops_at_peak_ms']:.2f} ms, decode MFU {bound[b]['decode_mfu']:.3f}; "
          f"{args.target:g}x needs {bound[b][f'step_ms_for_{args.target:g}x']:.2f} ms")

  result = dict(
      benchmark="sampler", preset=args.preset, prompt_len=args.prompt, new_tokens=args.new, reps=args.reps,
      init_std=args.init_std, moe_dispatch=m.moe_dispatch, dtype=m.dtype,
      devices={str(b): math.gcd(b, jax.device_count()) for b in ours_tps},
      ours_tokens_per_s={str(k): v for k, v in ours_tps.items()},
      hf_tokens_per_s={str(k): v for k, v in hf_tps.items()},
      speedup={str(k): v for k, v in speedup.items()}, split={str(k): v for k, v in split.items()},
      prepare_decode_s={str(k): v for k, v in prepare_s.items()},
      loadavg_1min={str(k): v for k, v in load.items()}, agreement=agreement,
      decode_bound={str(k): v for k, v in bound.items()},
      decode_ablation=dict(batch=ablate, variants=ablation),
      versions=dict(jax=jax.__version__, torch=torch.__version__, transformers=transformers.__version__),
      torch_threads=torch.get_num_threads(), machine=platform.machine(), cpus=os.cpu_count())
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  from k25jax.runtime import use_caching_allocator
  use_caching_allocator()
  main()
