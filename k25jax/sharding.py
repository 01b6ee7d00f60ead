"""Device meshes and the logical-axis rules: the one place where logical names meet mesh axes.

Modules name every parameter and large activation with logical axes (`CONTRIBUTING.md`); `RULES[name]` maps
them onto the four mesh axes `data`, `fsdp`, `expert`, `tensor`. Variables are created already sharded:
`jax.eval_shape(init)` gives the abstract tree, its logical specs become `NamedSharding`s, and
`jax.jit(init, out_shardings=...)` materialises each shard on its own device.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from k25jax.configs.validate import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# Each logical name has exactly one row. Activations' batch is split over every non-tensor axis (the expert axis
# doubles as data parallelism outside the MoE block, as in DeepSeek-V3 / MaxText EP); weights are FSDP-sharded on
# their model dimension, tensor-parallel on heads / MLP width / vocab, and expert-parallel on the expert axis.
_DEFAULT = (
    # weights
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("q_lora", "fsdp"),      # q_b/kv_b are [lora, heads]: FSDP on the lora dim (a repeated axis is dropped, so
    ("kv_lora", "fsdp"),     # q_a/kv_a [embed, lora] stay sharded on embed only)
    ("mlp", "tensor"),
    ("moe_mlp", "tensor"),
    ("exp", "expert"),
    ("layers", None),
    ("norm", None),
    ("vit_embed", "fsdp"),
    ("vit_mlp", "tensor"),
    ("vit_heads", "tensor"),
    ("patch_in", None),
    ("pos_h", None),
    ("pos_w", None),
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_kv_lora", None),   # the decode cache's latent (k25jax/sample/cache.py)
    ("act_exp", "expert"),
    ("patch", BATCH_AXES),
    ("act_vit_embed", None),
)

# Pure FSDP: everything that is not batch is sharded on `fsdp` only (no tensor or expert parallelism).
_FSDP = tuple((name, (None if axis in ("tensor", "expert") else axis)) for name, axis in _DEFAULT)

RULES: dict[str, tuple[tuple[str, Any], ...]] = {"default": _DEFAULT, "fsdp": _FSDP}


def get_rules(name_or_config: str | ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  name = name_or_config if isinstance(name_or_config, str) else name_or_config.mesh.rules
  if name not in RULES:
    raise ConfigError(f"mesh.rules={name!r} is unknown; choose one of {sorted(RULES)}")
  return RULES[name]


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves the -1 entry of the mesh config so that the product equals `num_devices`."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({fixed} devices) do not divide the "
                        f"{num_devices} available devices; change the fixed sizes")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                      f"{num_devices} are available; set one axis to -1 to fill the rest")
  return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the (data, fsdp, expert, tensor) mesh from `config.mesh` with Auto axis types.

  Works for one device, fake CPU devices and multi-host runs (`jax.devices()` spans every process after
  `jax.distributed.initialize()`); `devices` can be an AOT topology's device list.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config.mesh, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_sharding(mesh: Mesh, rules, names: Sequence[str | None]) -> NamedSharding:
  """`NamedSharding` of one array from its logical axis names."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(names), rules))


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """Shardings for a tree whose leaves may be `nn.LogicallyPartitioned` (others are replicated)."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def unbox(tree: Any) -> Any:
  """Strips the logical-partitioning boxes, leaving plain arrays."""
  return nn.meta.unbox(tree)


def init_sharded(init_fn: Callable[..., Any], mesh: Mesh, rules, *args) -> tuple[Any, Any]:
  """Initialises variables directly into their shardings; returns (variables, shardings), unboxed.

  `init_fn(*args)` is typically `model.init`; it is traced once by `jax.eval_shape`, then jitted with
  `out_shardings` so no device ever holds the whole tree.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = tree_shardings(abstract, mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    variables = jax.jit(lambda *a: unbox(init_fn(*a)), out_shardings=unbox(shardings))(*args)
  return variables, unbox(shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a batch-major array: the batch over (data, fsdp, expert), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh,
                 shardings: dict[str, NamedSharding] | None = None) -> dict[str, jax.Array]:
  """Turns this host's slice of the batch into global arrays (`jax.make_array_from_process_local_data`).

  On one host this is a device_put; on a pod every process passes its own rows and the global batch is their
  concatenation in process order. Leaves without an explicit sharding are batch-sharded on axis 0.
  """
  out = {}
  for key, value in host_batch.items():
    value = np.asarray(value)
    sharding = (shardings or {}).get(key) or batch_sharding(mesh, value.ndim)
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
