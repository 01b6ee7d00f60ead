"""Run metrics: JSONL and TensorBoard writers, console progress with ETA (DESIGN "training": loop, metrics).

Every record is one JSON line `{"kind": "train"|"eval"|"suite"|..., "step": int, ...scalars}` in
`<workdir>/metrics.jsonl`, mirrored as TensorBoard scalars `<kind>/<name>` (tensorboardX). A resumed run appends;
`read_metrics` keeps the last record of each (kind, step), i.e. the resumed values for re-run steps.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import numpy as np


def to_scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Host floats of a metrics dict (device arrays are fetched; non-scalars are skipped)."""
  out = {}
  for k, v in metrics.items():
    a = np.asarray(v)
    if a.size == 1:
      out[k] = float(a.reshape(()))
  return out


class MetricsWriter:
  """Appends metric records to `<workdir>/metrics.jsonl` and TensorBoard event files under `<workdir>/tb`."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, kind: str, step: int, scalars: Mapping[str, float]) -> None:
    record = {"kind": kind, "step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        if math.isfinite(float(v)):
          self._tb.add_scalar(f"{kind}/{k}", float(v), int(step))

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str, kind: str = "train") -> list[dict]:
  """Records of one kind sorted by step; for a step logged more than once (a resumed run), the last one."""
  by_step: dict[int, dict] = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:  # a line cut by a kill mid-write
        continue
      if rec.get("kind") == kind:
        by_step[int(rec["step"])] = rec
  return [by_step[s] for s in sorted(by_step)]


def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
  """Console progress: step/total, key metrics, tokens/s and the ETA from the mean time of the steps so far
  (the first step, which compiles, is excluded once a second one exists)."""

  KEYS = ("loss", "grad_norm", "max_logit", "qk_clip_frac", "expert_load_max_over_mean")

  def __init__(self, total_steps: int, start_step: int = 0, prefix: str = ""):
    self.total, self.start, self.prefix = int(total_steps), int(start_step), prefix
    self._times: list[float] = []
    self._last = time.perf_counter()

  def tick(self) -> float:
    now = time.perf_counter()
    dt, self._last = now - self._last, now
    self._times.append(dt)
    return dt

  def eta(self, step: int) -> float:
    times = self._times[1:] if len(self._times) > 1 else self._times
    return float(np.mean(times)) * max(self.total - step, 0) if times else float("nan")

  def line(self, step: int, scalars: Mapping[str, float], tokens: float) -> str:
    parts = [f"{self.prefix}step {step}/{self.total}"]
    parts += [f"{k} {scalars[k]:.4g}" for k in self.KEYS if k in scalars]
    if self._times:
      parts.append(f"{tokens / max(self._times[-1], 1e-9):.0f} tok/s")
      parts.append(f"ETA {format_duration(self.eta(step))}")
    return "  ".join(parts)
