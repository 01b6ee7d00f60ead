"""Golden sharding snapshots: {variable path: PartitionSpec} for every preset and rule table (ANCHORS §1.7,
MaxText `tests/utils/sharding_info`; §8.4 item 5).

`k25jax/golden/<preset>_<rules>.json` maps each variable of the trainer's model (`k25jax.train.state.build_model`:
the LM, plus the vision tower and projector when the preset enables them), `params/...` and `moe_state/...`, to the
partition spec its logical names resolve to. `tests/test_golden_sharding.py` regenerates them and fails on any
change; after a deliberate change to a module's logical names or to `k25jax.sharding.RULES`, regenerate with

    python -m k25jax.golden

and review the diff. Computed from `jax.eval_shape` on a fixed mesh of 8 fake CPU devices (nothing is allocated).
"""

from __future__ import annotations

import json
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parent
GOLDEN_MESH = dict(data=1, fsdp=2, expert=2, tensor=2)
REGENERATE = "python -m k25jax.golden"


def golden_path(preset: str, rules: str) -> Path:
  return GOLDEN_DIR / f"{preset}_{rules}.json"


def sharding_snapshot(preset: str, rules: str) -> dict[str, str]:
  """{'params/embed_tokens/embedding': "PartitionSpec('tensor', 'fsdp')", ...} for one preset and rule table."""
  import jax  # noqa: PLC0415 (importing the package must not start JAX)

  from k25jax import sharding as shd  # noqa: PLC0415
  from k25jax.configs import get_config, validate  # noqa: PLC0415
  from k25jax.train import state as state_lib  # noqa: PLC0415

  config = get_config(preset)
  config.mesh.update(GOLDEN_MESH, rules=rules)
  validate(config)
  devices = jax.devices("cpu")
  if len(devices) < 8:
    raise RuntimeError(f"golden shardings use 8 fake CPU devices, found {len(devices)}; run with "
                       "XLA_FLAGS=--xla_force_host_platform_device_count=8 (`python -m k25jax.golden` sets it)")
  mesh = shd.make_mesh(config, devices[:8])
  boxed = state_lib.abstract_variables(config, state_lib.build_model(config))
  shardings = shd.tree_shardings(boxed, mesh, shd.get_rules(rules))
  flat = jax.tree_util.tree_flatten_with_path(shd.unbox(shardings))[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): str(s.spec) for path, s in flat}


def write_all() -> list[Path]:
  """Regenerates every `<preset>_<rules>.json`."""
  from k25jax.configs import PRESETS  # noqa: PLC0415
  from k25jax.sharding import RULES  # noqa: PLC0415
  written = []
  for preset in PRESETS:
    for rules in RULES:
      path = golden_path(preset, rules)
      path.write_text(json.dumps(sharding_snapshot(preset, rules), indent=1, sort_keys=True) + "\n")
      written.append(path)
  return written

