"""`python -m k25jax.golden`: regenerates every golden sharding snapshot (see `k25jax/golden/__init__.py`)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

from k25jax.golden import write_all  # noqa: E402

for path in write_all():
  print(path)
