"""Command-line configs: `--config=k25jax/configs/presets.py:small --config.model.num_hidden_layers=2`.

Entry points built on absl use `define_config_flag()` (ml_collections `config_flags`, which loads the file, calls
`get_config(arg)` and applies the per-field overrides). `set_field` applies a dotted override to a config made in
Python, with the same type rules (the field's existing type wins).
"""

from __future__ import annotations

import ast
from typing import Any

import ml_collections
from ml_collections import config_flags

DEFAULT_CONFIG = "k25jax/configs/presets.py:tiny"


def define_config_flag(default: str = DEFAULT_CONFIG, name: str = "config"):
  return config_flags.DEFINE_config_file(name, default, "Config file and preset, e.g. "
                                         "k25jax/configs/presets.py:small; override fields with "
                                         f"--{name}.model.num_hidden_layers=2.", lock_config=True)


def _parse(value: str) -> Any:
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def set_field(config: ml_collections.ConfigDict, dotted: str, value: str) -> None:
  """Sets `config.<dotted>` from a string, converting to the field's type; unknown fields raise KeyError."""
  *parents, leaf = dotted.split(".")
  node = config
  for p in parents:
    if p not in node:
      raise KeyError(f"--config.{dotted}: {p!r} is not a config group; known: {sorted(node.keys())}")
    node = node[p]
  if leaf not in node:
    raise KeyError(f"--config.{dotted}: {leaf!r} is not a field; known: {sorted(node.keys())}")
  old = node[leaf]
  new = _parse(value)
  if isinstance(old, bool):
    new = str(value).lower() in ("1", "true", "yes")
  elif isinstance(old, float) and isinstance(new, int):
    new = float(new)
  elif isinstance(old, str):
    new = value
  node[leaf] = new
