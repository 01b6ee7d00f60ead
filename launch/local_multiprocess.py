"""N JAX processes on this machine over loopback, each with its own fake CPU devices (issue 9 item 4).

    python -m launch.local_multiprocess --num_processes=2 --devices_per_process=4 -- \
        --config=tiny --steps=4 --save_at=2 --ckpt_dir=/tmp/k25ckpt --out=/tmp/result.json

Starts `python -m launch.train ARGS --coordinator=127.0.0.1:PORT --num_processes=N --process_id=I` for I in 0..N-1
(`jax.distributed.initialize` over loopback, gloo CPU collectives), so the multi-host paths (process-local batch
rows, cross-process collectives, every process writing its checkpoint shards) run for real on one CPU. If one
process fails, the others are terminated and its output is shown.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(devices: int) -> dict[str, str]:
  """This environment with JAX on CPU, `devices` fake devices (any other count removed) and the repo importable."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  return env


def launch(train_args: Sequence[str], num_processes: int = 2, devices_per_process: int = 4,
           timeout_s: float = 600.0, module: str = "launch.train") -> list[str]:
  """Runs `python -m module` in `num_processes` processes; returns their outputs (raises if any fails)."""
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"num_processes={num_processes} and devices_per_process={devices_per_process} must be >= 1")
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", module, *train_args, f"--coordinator=127.0.0.1:{port}",
       f"--num_processes={num_processes}", f"--process_id={i}"],
      cwd=REPO, env=process_env(devices_per_process), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(num_processes)]
  deadline = time.monotonic() + timeout_s
  try:
    while any(p.poll() is None for p in procs):
      failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    outputs = [p.communicate()[0] for p in procs]
  bad = [i for i, p in enumerate(procs) if p.returncode != 0]
  if bad:
    i = bad[0]
    reason = "timed out" if time.monotonic() > deadline else f"exited with {procs[i].returncode}"
    raise RuntimeError(f"process {i} of {num_processes} {reason}; its output ends with:\n{outputs[i][-4000:]}")
  return outputs


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument("--timeout_s", type=float, default=600.0)
  parser.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments of launch.train, after --")
  args = parser.parse_args(argv)
  train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
  outputs = launch(train_args, args.num_processes, args.devices_per_process, args.timeout_s)
  print(outputs[0], end="")


if __name__ == "__main__":
  main(sys.argv[1:])
