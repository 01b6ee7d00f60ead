"""A few sharded MuonClip train steps of the `tiny` K2 model on a toy stream, printing the losses.

python -m k25jax.train.demo [--config=k25jax/configs/presets.py:tiny] [--config.train.steps=20]
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app

from k25jax import sharding as shd
from k25jax.configs import cli, validate
from k25jax.optim import make_optimizer
from k25jax.runtime import cpu_devices_for_training
from k25jax.train import simple

_CONFIG = cli.define_config_flag()


def main(argv):
  del argv
  config = validate(_CONFIG.value)
  cpu_devices_for_training(config)
  mesh = shd.make_mesh(config)
  tx = make_optimizer(config, simple.abstract_params(config))
  state, shardings = simple.init_state(config, mesh, tx, config.seed)
  step = simple.make_train_step(config, mesh, tx, shardings)
  rng = np.random.default_rng(config.seed)
  print(f"mesh {dict(mesh.shape)}  devices {jax.device_count()}  preset {config.preset}")
  for i in range(config.train.steps):
    host = simple.synthetic_batch(rng, config.train.batch_size, config.train.seq_len, config.model.vocab_size)
    t0 = time.time()
    state, metrics = step(state, shd.global_batch(host, mesh))
    print(f"step {i + 1:3d}  loss {float(metrics['loss']):.4f}  grad_norm {float(metrics['grad_norm']):.3f}  "
          f"{time.time() - t0:.2f}s", flush=True)


if __name__ == "__main__":
  from k25jax.runtime import use_caching_allocator
  use_caching_allocator()
  app.run(main)
