"""Golden sharding snapshots (issue 9 item 3): every preset x rule table regenerates to the committed JSON."""

import json

import pytest

from k25jax import golden
from k25jax.configs import PRESETS
from k25jax.sharding import RULES


def _diff(old: dict, new: dict) -> str:
  lines = [f"  - {k}: {old[k]}" for k in sorted(old.keys() - new.keys())]
  lines += [f"  + {k}: {new[k]}" for k in sorted(new.keys() - old.keys())]
  lines += [f"  ~ {k}: {old[k]} -> {new[k]}" for k in sorted(old.keys() & new.keys()) if old[k] != new[k]]
  return "\n".join(lines[:40])


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("rules", sorted(RULES))
def test_golden_sharding_unchanged(preset, rules):
  path = golden.golden_path(preset, rules)
  assert path.exists(), f"{path} is missing; create it with `{golden.REGENERATE}`"
  old = json.loads(path.read_text())
  new = golden.sharding_snapshot(preset, rules)
  assert new == old, (f"shardings of {preset}/{rules} changed (- removed, + added, ~ changed):\n{_diff(old, new)}\n"
                      f"If intended, regenerate with `{golden.REGENERATE}` and review the diff.")


def test_golden_rules_are_what_the_tables_say():
  """Independent check of two rows: experts are expert-parallel only under `default`, never tensor under `fsdp`."""
  default = json.loads(golden.golden_path("tiny", "default").read_text())
  fsdp = json.loads(golden.golden_path("tiny", "fsdp").read_text())
  experts = [k for k in default if k.endswith("experts_gate_proj")]
  assert experts, "no routed-expert weights in the tiny snapshot"
  for k in experts:
    assert default[k] == "P(None, 'expert', 'fsdp', 'tensor')", default[k]
    assert fsdp[k] == "P(None, None, 'fsdp', None)", fsdp[k]
  assert not any("tensor" in v or "expert" in v for v in fsdp.values())
