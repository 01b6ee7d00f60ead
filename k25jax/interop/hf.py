"""Import/export of Hugging Face checkpoints in the released Kimi-K2.5 / Kimi-K2 / DeepSeek-V3 layout
(digest §1.1-1.3; issue 8).

  python -m k25jax.interop.hf import SRC DST [--dry-run] [--mesh fsdp=8,tensor=1]
  python -m k25jax.interop.hf export SRC DST [--dry-run] [--dtype bfloat16] [--max-shard-size 5GB]

`import` SRC: an HF checkpoint directory (config.json, *.safetensors, model.safetensors.index.json; optionally
the tiktoken tokenizer files). DST, the k25jax checkpoint format:
  DST/k25jax_config.json   the full k25jax config (`ConfigDict.to_json`), `model` mapped from config.json
  DST/hf_config.json       the source config.json, kept so that export writes back the fields k25jax does not model
  DST/checkpoint/          orbax `StandardCheckpointer` of {"params": ..., "moe_state": ...} (sharded arrays; each
                           host writes and restores only its shards)
  DST/tokenizer/           tiktoken.model, tokenizer_config.json, ... when SRC has them
                           (`k25jax.data.tokenizer.TiktokenTokenizer.from_dir(DST/tokenizer)`)
`load_imported(DST, mesh)` restores it into the mesh shardings. `export` SRC is such a directory and DST an HF
directory in the released layout (per-expert tensors, [out, in] linears), loadable by transformers.

Loading streams: every k25jax leaf is built with `jax.make_array_from_callback` on its target sharding; a
device's callback reads only the HF tensors of its slice (one per layer / expert) from memory-mapped safetensors
shards, so the host never holds more than one leaf shard beyond what its devices keep. INT4 pack-quantized
routed experts (digest §1.1) are dequantised on read (`k25jax.interop.int4`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import itertools
import json
import os
import shutil
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from k25jax import sharding as shd
from k25jax.configs import validate
from k25jax.configs.validate import ConfigError
from k25jax.interop import int4
from k25jax.interop.mapping import HOOKS, Entry, build_entries, canonical_name, config_from_hf, config_to_hf
from k25jax.interop.mapping import get_path, text_config_of

CONFIG_FILE, HF_CONFIG_FILE, CKPT_DIR, TOKENIZER_DIR = "k25jax_config.json", "hf_config.json", "checkpoint", "tokenizer"
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenization_kimi.py", "generation_config.json")


# ----------------------------------------------------------------------------------------------- reading


def _quantization(hf: dict) -> tuple[int, int] | None:
  """(group_size, num_bits) of a compressed-tensors pack-quantized config.json, else None."""
  q = hf.get("quantization_config") or text_config_of(hf)[0].get("quantization_config")
  if not q:
    return None
  if q.get("quant_method") != "compressed-tensors" or q.get("format") != "pack-quantized":
    raise ConfigError(f"config.json quantization_config: quant_method={q.get('quant_method')!r}, "
                      f"format={q.get('format')!r}; only compressed-tensors 'pack-quantized' (the released INT4 "
                      "experts) can be dequantised on import")
  groups = list((q.get("config_groups") or {}).values())
  weights = [g.get("weights") or {} for g in groups]
  if len(weights) != 1 or not weights[0].get("symmetric", True) or weights[0].get("strategy", "group") != "group":
    raise ConfigError(f"config.json quantization_config.config_groups: {weights}; expected one symmetric group-wise "
                      "weight scheme (released Kimi-K2.5: int4, group_size 32)")
  return int(weights[0].get("group_size", 32)), int(weights[0].get("num_bits", 4))


class CheckpointReader:
  """Memory-mapped access to the tensors of an HF checkpoint directory by canonical (released-layout) name.

  Quantized linears (`X.weight_packed/_scale/_shape`) appear as `X.weight`, dequantised to f32 on read.
  """

  def __init__(self, path: str):
    self.path = path
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
      raise FileNotFoundError(f"{cfg} not found; an HF checkpoint directory holds config.json and *.safetensors")
    with open(cfg) as f:
      self.hf_config = json.load(f)
    self.quant = _quantization(self.hf_config)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
      with open(index) as f:
        raw_map = json.load(f)["weight_map"]
    else:
      files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
      if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files and no model.safetensors.index.json")
      raw_map = {}
      for file in files:
        with safe_open(file, "np") as f:
          raw_map.update({k: os.path.basename(file) for k in f.keys()})
    self._stack = contextlib.ExitStack()
    self._open: dict[str, Any] = {}
    self._where: dict[str, tuple[str, str]] = {}      # canonical name -> (file, name in file)
    for raw, file in raw_map.items():
      name = canonical_name(raw)
      if name in self._where:
        raise ValueError(f"{path}: tensors {self._where[name][1]!r} and {raw!r} both map to {name!r}; remove one")
      self._where[name] = (file, raw)

  def __enter__(self) -> "CheckpointReader":
    return self

  def __exit__(self, *exc) -> None:
    self._stack.close()

  def _handle(self, file: str):
    if file not in self._open:
      self._open[file] = self._stack.enter_context(safe_open(os.path.join(self.path, file), "np"))
    return self._open[file]

  def _quant_base(self, name: str) -> str | None:
    if self.quant and name.endswith(".weight") and name[:-len("weight")] + int4.PACKED in self._where:
      return name[:-len("weight")]
    return None

  def names(self) -> set[str]:
    """Canonical names, quantized triples folded into their `X.weight`."""
    out = set()
    for name in self._where:
      for part in (int4.PACKED, int4.SCALE, int4.SHAPE):
        if self.quant and name.endswith("." + part):
          name = name[:-len(part)] + "weight"
      out.add(name)
    return out

  def shape(self, name: str) -> tuple[int, ...]:
    base = self._quant_base(name)
    if base is not None:
      return tuple(int(s) for s in self._raw(base + int4.SHAPE).reshape(-1))
    file, raw = self._where[name]
    return tuple(self._handle(file).get_slice(raw).get_shape())

  def _raw(self, name: str) -> np.ndarray:
    file, raw = self._where[name]
    return self._handle(file).get_tensor(raw)

  def read(self, name: str) -> np.ndarray:
    """The tensor `name` (canonical), dequantised to f32 when it is stored pack-quantized."""
    base = self._quant_base(name)
    if base is None:
      if name not in self._where:
        raise KeyError(f"{self.path}: tensor {name!r} is not in the checkpoint (run the import with --dry-run "
                       "for the full list of missing tensors)")
      return self._raw(name)
    group, bits = self.quant
    return int4.dequantize_pack_quantized(self._raw(base + int4.PACKED), self._raw(base + int4.SCALE),
                                          self._raw(base + int4.SHAPE), group_size=group, num_bits=bits, name=name)


# ----------------------------------------------------------------------------------------------- model shapes


def abstract_variables(m: ml_collections.ConfigDict) -> Any:
  """Boxed `jax.eval_shape` of the model's `init` for `config.model` (K25Model when `vision.enabled`)."""
  from k25jax.model import K2LM, text_inputs
  x = text_inputs(1, 8)
  if m.vision.enabled:
    from k25jax.model.k25 import K25Model, media_inputs
    kh, kw = (int(k) for k in m.vision.merge_kernel_size)
    media = media_inputs(m.vision, 4 * kh * kw, 1)
    fn = lambda k: K25Model(m).init(k, **x, **media, media_pad_id=0)
  else:
    fn = lambda k: K2LM(m).init(k, x["tokens"], x["positions"], x["segment_ids"])
  return jax.eval_shape(fn, jax.random.key(0))


def _leaf_paths(tree: Any) -> dict[tuple[str, ...], Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(k.key for k in path): leaf for path, leaf in flat}


def _lm_names(m: ml_collections.ConfigDict) -> tuple[str, str]:
  prefix = "language_model." if m.vision.enabled else ""
  return f"{prefix}model.embed_tokens.weight", f"{prefix}lm_head.weight"


def _source(entry: Entry, name: str, m: ml_collections.ConfigDict) -> str:
  """HF name read for `name`: with tied embeddings the LM head is the embedding (HF `tie_word_embeddings`)."""
  embed, head = _lm_names(m)
  return embed if m.tie_word_embeddings and name == head else name


# ----------------------------------------------------------------------------------------------- dry run


@dataclasses.dataclass
class DryRunReport:
  """Name/shape comparison of a checkpoint with the model its config describes."""
  missing: list[str]
  unexpected: list[str]
  mismatched: list[tuple[str, tuple, tuple]]          # (name, expected HF shape, found)
  unmapped: list[str]                                  # k25jax leaves no entry fills (a mapping gap)
  quantized: int = 0
  tensors: int = 0

  @property
  def ok(self) -> bool:
    return not (self.missing or self.unexpected or self.mismatched or self.unmapped)

  def format(self) -> str:
    lines = [f"{self.tensors} tensors expected ({self.quantized} INT4 pack-quantized): "
             + ("all present with the expected shapes" if self.ok else "PROBLEMS")]
    for title, items in (("missing from the checkpoint", self.missing),
                         ("unexpected in the checkpoint (not used by k25jax)", self.unexpected),
                         ("k25jax parameters no checkpoint tensor fills", self.unmapped)):
      if items:
        lines.append(f"{title} ({len(items)}):")
        lines += [f"  {n}" for n in items]
    if self.mismatched:
      lines.append(f"shape mismatches ({len(self.mismatched)}), name: expected vs found:")
      lines += [f"  {n}: {e} vs {f}" for n, e, f in self.mismatched]
    return "\n".join(lines)


def check_entries(m: ml_collections.ConfigDict, entries: Sequence[Entry]) -> list[str]:
  """k25jax leaves not covered exactly once by `entries`, or covered with the wrong shape."""
  leaves = _leaf_paths(nn.unbox(abstract_variables(m)))
  problems = []
  seen = set()
  for e in entries:
    if e.target not in leaves:
      problems.append(f"{'/'.join(e.target)} (mapped from {e.hf}) is not a model parameter")
    elif tuple(leaves[e.target].shape) != e.shape:
      problems.append(f"{'/'.join(e.target)}: model shape {tuple(leaves[e.target].shape)} vs mapping {e.shape}")
    seen.add(e.target)
  problems += [f"{'/'.join(p)} {tuple(v.shape)}" for p, v in leaves.items() if p not in seen]
  return problems


def dry_run(src: str, config: ml_collections.ConfigDict | None = None) -> DryRunReport:
  """Checks every tensor name and shape of the HF checkpoint `src` against the model of its config."""
  with CheckpointReader(src) as reader:
    config = config or config_from_hf(reader.hf_config, mtp=_has_mtp(reader))
    m = config.model
    entries = build_entries(m)
    found = reader.names()
    expected, copies = {}, set()
    for e in entries:
      copies.update(e.copies)
      for _, name in e.items():
        expected[_source(e, name, m)] = e.hf_shape
    missing = sorted(n for n in expected if n not in found)
    skip = copies | set(_lm_names(m)[1:]) if m.tie_word_embeddings else copies
    unexpected = sorted(n for n in found if n not in expected and n not in skip)
    mismatched = [(n, s, reader.shape(n)) for n, s in sorted(expected.items())
                  if n in found and reader.shape(n) != s]
    quantized = sum(reader._quant_base(n) is not None for n in expected if n in found)
    return DryRunReport(missing, unexpected, mismatched, check_entries(m, entries), quantized, len(expected))


def _has_mtp(reader: CheckpointReader) -> bool:
  text, _ = text_config_of(reader.hf_config)
  n = int(text["num_hidden_layers"])
  return any(f"layers.{n}.eh_proj.weight" in name for name in reader.names())


# ----------------------------------------------------------------------------------------------- import


def _leaf_from_hf(entry: Entry, reader: CheckpointReader, m, sharding, dtype) -> jax.Array:
  """One k25jax leaf on its sharding; each device's callback reads only the HF tensors of its slice."""
  n = entry.n_stacked
  names = dict(entry.items())
  to_ours = HOOKS[entry.hook][0]
  last: dict[tuple, np.ndarray] = {}            # replicated shards ask for the same index in a row

  def slab(lead: tuple[int, ...]) -> np.ndarray:
    name = _source(entry, names[lead], m)
    x = reader.read(name)
    if tuple(x.shape) != entry.hf_shape:
      raise ValueError(f"{reader.path}: {name} has shape {tuple(x.shape)} but config.json implies "
                       f"{entry.hf_shape}; the config and the weights disagree (run with --dry-run)")
    return to_ours(np.asarray(x), entry.shape[n:])

  def callback(index: tuple[slice, ...]) -> np.ndarray:
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in last:
      ranges = [range(entry.shape[a])[index[a]] for a in range(n)]
      rest = index[n:]
      parts = [slab(lead)[rest].astype(dtype) for lead in itertools.product(*ranges)]
      out = parts[0] if n == 0 else np.stack(parts).reshape(tuple(len(r) for r in ranges) + parts[0].shape)
      last.clear()
      last[key] = out
    return last[key]

  return jax.make_array_from_callback(entry.shape, sharding, callback)


def load_hf(src: str, config: ml_collections.ConfigDict | None = None, mesh: jax.sharding.Mesh | None = None
            ) -> tuple[ml_collections.ConfigDict, dict]:
  """Streams the HF checkpoint `src` into {"params", "moe_state"} on `mesh` (default: `make_mesh(config)`).

  `config` defaults to `config_from_hf(config.json)`; returns (config, variables) with plain (unboxed) arrays in
  the shardings of `k25jax.sharding.get_rules(config)`.
  """
  with CheckpointReader(src) as reader:
    config = config or config_from_hf(reader.hf_config, mtp=_has_mtp(reader))
    validate(config)
    m = config.model
    entries = build_entries(m)
    gaps = check_entries(m, entries)
    if gaps:
      raise ValueError("k25jax.interop mapping does not cover the model: " + "; ".join(gaps))
    mesh = mesh or shd.make_mesh(config)
    abstract = abstract_variables(m)
    shardings = _leaf_paths(shd.unbox(shd.tree_shardings(abstract, mesh, shd.get_rules(config))))
    leaves = _leaf_paths(nn.unbox(abstract))
    flat = {e.target: _leaf_from_hf(e, reader, m, shardings[e.target], np.dtype(leaves[e.target].dtype))
            for e in entries}
  return config, _unflatten(flat)


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def copy_tokenizer(src: str, dst: str) -> str | None:
  """Copies the released tokenizer files of `src` into `dst` and checks they load (`TiktokenTokenizer`)."""
  present = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
  if "tiktoken.model" not in present:
    return None
  os.makedirs(dst, exist_ok=True)
  for f in present:
    shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
  from k25jax.data.tokenizer import TiktokenTokenizer
  TiktokenTokenizer.from_dir(dst)
  return dst


def save_imported(dst: str, config: ml_collections.ConfigDict, variables: dict, hf_config: dict | None = None,
                  tokenizer_src: str | None = None) -> None:
  """Writes the k25jax checkpoint format of the module docstring."""
  import orbax.checkpoint as ocp
  os.makedirs(dst, exist_ok=True)
  with open(os.path.join(dst, CONFIG_FILE), "w") as f:
    f.write(config.to_json(indent=1))
  if hf_config is not None:
    with open(os.path.join(dst, HF_CONFIG_FILE), "w") as f:
      json.dump(hf_config, f, indent=1)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.abspath(os.path.join(dst, CKPT_DIR)), variables, force=True)
  ckpt.wait_until_finished()
  if tokenizer_src is not None:
    copy_tokenizer(tokenizer_src, os.path.join(dst, TOKENIZER_DIR))


def load_config(path: str) -> ml_collections.ConfigDict:
  with open(os.path.join(path, CONFIG_FILE)) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_imported(path: str, mesh: jax.sharding.Mesh | None = None) -> tuple[ml_collections.ConfigDict, dict]:
  """Restores a `save_imported` directory into the mesh shardings; returns (config, variables)."""
  import orbax.checkpoint as ocp
  config = validate(load_config(path))
  mesh = mesh or shd.make_mesh(config)
  abstract = abstract_variables(config.model)
  shardings = shd.unbox(shd.tree_shardings(abstract, mesh, shd.get_rules(config)))
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(abstract),
                        shardings)
  return config, ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(path, CKPT_DIR)), target)


def import_checkpoint(src: str, dst: str, mesh: jax.sharding.Mesh | None = None) -> DryRunReport:
  """`import` of the CLI: dry run (raises on any problem), streaming load, `save_imported`."""
  report = dry_run(src)
  if not report.ok:
    raise ValueError(f"{src} does not match its config.json:\n{report.format()}")
  config, variables = load_hf(src, mesh=mesh)
  with open(os.path.join(src, "config.json")) as f:
    hf_config = json.load(f)
  save_imported(dst, config, variables, hf_config, tokenizer_src=src)
  return report


# ----------------------------------------------------------------------------------------------- export


def _host_leaf(x: jax.Array, lead: tuple[int, ...]) -> np.ndarray:
  return np.asarray(jax.device_get(x[lead] if lead else x))


def hf_tensors(config: ml_collections.ConfigDict, variables: dict, dtype: str | None = None):
  """Yields (HF name, numpy tensor) in the released layout; floating tensors cast to `dtype` when given (the
  router correction bias stays f32, as released)."""
  m = config.model
  embed, head = _lm_names(m)
  for e in build_entries(m):
    leaf = get_path(variables, e.target)
    to_hf = HOOKS[e.hook][1]
    for lead, name in e.items():
      if m.tie_word_embeddings and name == head:
        if not np.array_equal(_host_leaf(leaf, ()).T, _host_leaf(get_path(variables, e.target[:-2] + (
            "embed_tokens", "embedding")), ())):
          raise ValueError("config.model.tie_word_embeddings=True but lm_head differs from embed_tokens; set "
                           "tie_word_embeddings=False to export both")
        continue
      x = to_hf(_host_leaf(leaf, lead), e.hf_shape)
      if dtype is not None and np.issubdtype(x.dtype, np.floating) and "e_score_correction_bias" not in name:
        x = x.astype(jnp.dtype(dtype))
      yield name, np.ascontiguousarray(x)
      for copy in e.copies:
        yield copy, np.ascontiguousarray(x)


def export_hf(dst: str, config: ml_collections.ConfigDict, variables: dict, hf_config: dict | None = None,
              dtype: str | None = None, max_shard_bytes: int = 5 * 2 ** 30, tokenizer_src: str | None = None
              ) -> list[str]:
  """Writes an HF checkpoint directory (config.json, safetensors shards, index) in the released layout.

  Tensors stream leaf by leaf into shards of at most `max_shard_bytes`. A `quantization_config` of `hf_config`
  is dropped: weights are written dequantised. Returns the tensor names written.
  """
  os.makedirs(dst, exist_ok=True)
  out_cfg = config_to_hf(config.model, hf_config)
  out_cfg.pop("quantization_config", None)
  if isinstance(out_cfg.get("text_config"), dict):
    out_cfg["text_config"].pop("quantization_config", None)
  if dtype is not None:
    out_cfg["dtype"] = dtype
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(out_cfg, f, indent=2)
  shard: dict[str, np.ndarray] = {}
  files: list[tuple[str, list[str]]] = []
  weight_map, total, size = {}, 0, 0

  def flush():
    nonlocal shard, size
    tmp = os.path.join(dst, f".shard-{len(files):05d}.safetensors")
    save_file(shard, tmp, metadata={"format": "pt"})
    files.append((tmp, list(shard)))
    shard, size = {}, 0

  for name, x in hf_tensors(config, variables, dtype):
    if shard and size + x.nbytes > max_shard_bytes:
      flush()
    shard[name] = x
    size += x.nbytes
    total += x.nbytes
  if shard:
    flush()
  for i, (tmp, names) in enumerate(files):
    final = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
    os.replace(tmp, os.path.join(dst, final))
    weight_map.update({n: final for n in names})
  if len(files) > 1:
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
  if tokenizer_src is not None:
    for f in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(tokenizer_src, f)):
        shutil.copy2(os.path.join(tokenizer_src, f), os.path.join(dst, f))
  return list(weight_map)


def export_checkpoint(src: str, dst: str, dtype: str | None = None, max_shard_bytes: int = 5 * 2 ** 30,
                      mesh: jax.sharding.Mesh | None = None) -> list[str]:
  """`export` of the CLI: a `save_imported` directory -> an HF directory (+ its tokenizer files)."""
  config, variables = load_imported(src, mesh)
  hf_config = None
  if os.path.isfile(os.path.join(src, HF_CONFIG_FILE)):
    with open(os.path.join(src, HF_CONFIG_FILE)) as f:
      hf_config = json.load(f)
  tok = os.path.join(src, TOKENIZER_DIR)
  return export_hf(dst, config, variables, hf_config, dtype, max_shard_bytes,
                   tokenizer_src=tok if os.path.isdir(tok) else None)


# ----------------------------------------------------------------------------------------------- CLI


def _parse_size(text: str) -> int:
  units = {"KB": 2 ** 10, "MB": 2 ** 20, "GB": 2 ** 30, "B": 1}
  for unit, mult in units.items():
    if text.upper().endswith(unit):
      return int(float(text[:-len(unit)]) * mult)
  return int(text)


def _mesh_from_flag(config: ml_collections.ConfigDict, text: str | None) -> None:
  for item in filter(None, (text or "").split(",")):
    axis, _, size = item.partition("=")
    if axis not in shd.MESH_AXES or not size.lstrip("-").isdigit():
      raise ConfigError(f"--mesh item {item!r}: expected AXIS=SIZE with AXIS in {shd.MESH_AXES}, e.g. fsdp=8")
    config.mesh[axis] = int(size)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m k25jax.interop.hf", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="HF checkpoint directory -> k25jax checkpoint directory")
  exp = sub.add_parser("export", help="k25jax checkpoint directory -> HF checkpoint directory")
  for p in (imp, exp):
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dry-run", action="store_true", help="check names and shapes only; write nothing")
    p.add_argument("--mesh", default=None, help="mesh axis sizes, e.g. fsdp=8,tensor=1 (default: config.mesh)")
  exp.add_argument("--dtype", default=None, help="cast floating tensors, e.g. bfloat16 (default: as stored)")
  exp.add_argument("--max-shard-size", default="5GB")
  args = parser.parse_args(argv)
  if args.command == "import":
    report = dry_run(args.src)
    print(report.format())
    if args.dry_run or not report.ok:
      return 0 if report.ok else 1
    with CheckpointReader(args.src) as reader:
      config = config_from_hf(reader.hf_config, mtp=_has_mtp(reader))
      hf_config = reader.hf_config
    _mesh_from_flag(config, args.mesh)
    config, variables = load_hf(args.src, config)
    save_imported(args.dst, config, variables, hf_config, tokenizer_src=args.src)
    print(f"wrote {args.dst} ({CONFIG_FILE}, {HF_CONFIG_FILE}, {CKPT_DIR}/"
          + (f", {TOKENIZER_DIR}/)" if os.path.isdir(os.path.join(args.dst, TOKENIZER_DIR)) else ")"))
    return 0
  config = load_config(args.src)
  _mesh_from_flag(config, args.mesh)
  if args.dry_run:
    problems = check_entries(config.model, build_entries(config.model))
    n = sum(len(e.items()) + len(e.copies) for e in build_entries(config.model))
    print(f"would write {n} tensors" + ("" if not problems else "; mapping problems:\n  " + "\n  ".join(problems)))
    return 1 if problems else 0
  names = export_checkpoint(args.src, args.dst, args.dtype, _parse_size(args.max_shard_size),
                            mesh=shd.make_mesh(config))
  print(f"wrote {len(names)} tensors to {args.dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
