"""Real offline data sources (ENVIRONMENT.md §5): Fashion-MNIST, Shakespeare, and tfds ArrayRecord datasets.

Each source yields conversation/document dicts (`k25jax/data/example.py`); `k25jax.data.chat` encodes them.
Downloaded or extracted files live under `data_cache_dir()`. `python -m k25jax.data.prepare` fetches everything.
"""

from __future__ import annotations

import os
import pathlib

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[3]


def data_cache_dir() -> pathlib.Path:
  """The data cache: `$K25JAX_DATA` if set, else `<repo>/data_cache` (git-ignored)."""
  return pathlib.Path(os.environ.get("K25JAX_DATA") or _REPO_ROOT / "data_cache")
