"""Every notebook's code cells run top to bottom (so the notebooks cannot rot)."""

import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
  namespace: dict = {}
  cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
  assert cells, f"{path.name} has no code cells"
  for i, cell in enumerate(cells):
    exec(compile("".join(cell["source"]), f"{path.name}[cell {i}]", "exec"), namespace)
  assert namespace["losses"][-1] < namespace["losses"][0]
  assert namespace["out"]["tokens"].shape[0] == 2
