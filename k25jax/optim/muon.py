"""MuonClip's optimizer half: optax Muon on every hidden matrix, AdamW on the rest (digest §8, Algorithm 1).

Routing (`muon_dimension_numbers`), by parameter path:
- AdamW (`None`): the token embedding and the LM head (Moonlight/Kimi keep both on AdamW, digest §8), every
  norm gain and bias (vectors), the vision pos-emb table (an embedding), and the vision patch projection
  `patch_embed/proj/kernel`. The last is our call: it is the network's input layer, which the Muon recipe keeps
  on AdamW like the token embedding (Muon is a rule for hidden layers); Kimi-VL reports Muon on "all"
  vision parameters (digest §8), so this is a deliberate, documented deviation for one small matrix.
- Muon: every other matrix, including the MoE router kernel `gate/kernel` [L, D, E]. Moonlight's reference
  sends every >= 2-D parameter except `embed_tokens` and `lm_head` to Muon, which includes the DeepSeek-V3 gate
  weight (MaxText's rules do the same); the router is a hidden linear map like any other.

Each *logical* matrix is orthogonalised on its own: scanned stacks (`dense_layers`, `moe_layers`, vision
`blocks`) add a leading layer batch axis, routed experts `experts_*` [.., E, in, out] add an expert batch axis,
the fused vision `wqkv` [.., D, 3, heads, hd] keeps q, k and v apart (the 3-axis is a batch axis), and the vision
`wo` [.., heads, hd, D] reduces over (heads, hd). Batch axes are never folded into a matrix.

Sharding (`orthogonalize`): Newton-Schulz needs each matrix whole, but a parameter is FSDP-sharded on its matrix
dimensions. optax's Muon vmaps over the sharded layout, so XLA computed X X^T for every stacked matrix at once with
the contraction dimension sharded: for `k25_full` the routed experts alone made [60*384, 2048, 2048] f32 partial
products, ~386 GB per device (launch/README.md). A first fix let XLA move the stack into a matrices-over-devices
layout with sharding constraints; on v5p:4x8x8 XLA then replicated whole stacks on the way back (k25_full's o_proj,
[60, 8192, 7168] f32, 14 GB per device, twice). `orthogonalize` now does the layout change itself, in a
`shard_map` over the parameter's own sharding (`make_optimizer(..., shardings)`): tiled all-to-alls give each device
whole matrices of its own, and every buffer stays the size of the parameter's shard. Without a context mesh
(`jax.set_mesh`) the stack is simply vmapped. The numerics are optax's `scale_by_muon` with Frobenius
preconditioning and its default quintic coefficients.

Weight decay (decoupled, `W <- W - lr * wd * W`) applies to every matrix and embedding table, Muon or AdamW, and
skips norm gains and biases (`weight_decay_mask`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers, MuonState

from k25jax.configs.optim import validate_optim
from k25jax.configs.validate import ConfigError
from k25jax.optim.schedules import wsd_schedule

# Scopes created by `nn.scan` over layers (a leading `layers` axis on every parameter below them).
SCANNED_SCOPES = frozenset({"dense_layers", "moe_layers", "blocks"})
# Vector parameters: norm gains (RMSNorm `weight`, LayerNorm `scale`) and biases.
VECTOR_NAMES = frozenset({"weight", "scale", "bias"})
# Keller Jordan's quintic Newton-Schulz coefficients (optax's default `ns_coeffs`).
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _route(names: tuple[str, ...], shape: tuple[int, ...]) -> MuonDimensionNumbers | None:
  """Dimension numbers of one parameter (None = AdamW); raises for parameters no rule covers."""
  leaf, where = names[-1], "/".join(names)
  if (leaf in VECTOR_NAMES or leaf in ("embedding", "pos_emb") or "lm_head" in names
      or (leaf == "kernel" and "patch_embed" in names)):
    return None
  if leaf != "kernel" and not leaf.startswith("experts_"):
    raise ValueError(f"muon_dimension_numbers: no rule for parameter {where} with shape {shape}; add one to "
                     "k25jax/optim/muon.py (`_route`) sending it to Muon or AdamW")
  nb = sum(n in SCANNED_SCOPES for n in names[:-1]) + leaf.startswith("experts_")
  module = names[-2] if len(names) > 1 else ""
  if module == "wqkv":      # vision fused qkv [.., D, 3, heads, hd]: q, k, v are separate matrices
    rank, dims = nb + 4, MuonDimensionNumbers((nb,), (nb + 2, nb + 3))
  elif module == "wo" and len(shape) == nb + 3:   # vision out-projection [.., heads, hd, D]
    rank, dims = nb + 3, MuonDimensionNumbers((nb, nb + 1), (nb + 2,))
  else:
    rank, dims = nb + 2, MuonDimensionNumbers((nb,), (nb + 1,))
  if len(shape) != rank:
    raise ValueError(f"muon_dimension_numbers: parameter {where} has shape {shape} but its path implies rank "
                     f"{rank} ({nb} stacked layer/expert axes + the matrix axes); fix the rule in "
                     "k25jax/optim/muon.py (`_route`) or the module's parameter layout")
  return dims


def muon_dimension_numbers(params: Any) -> Any:
  """Tree like `params`: `MuonDimensionNumbers` for Muon matrices, `None` for AdamW (digest §8; module doc).

  Works for the text `K2LM` tree, the multimodal tree (`language_model/`, `vision_tower/`, `mm_projector/`) and
  masked subtrees (optax `MaskedNode`s are kept). Leaves may be arrays or `ShapeDtypeStruct`s.
  """
  return jax.tree_util.tree_map_with_path(lambda p, x: _route(_path_names(p), tuple(x.shape)),
                                          nn.meta.unbox(params))


def weight_decay_mask(params: Any) -> Any:
  """Bool tree like `params`: decay matrices and embedding tables, not norm gains or biases (digest §8)."""
  return jax.tree_util.tree_map_with_path(lambda p, x: _path_names(p)[-1] not in VECTOR_NAMES,
                                          nn.meta.unbox(params))


def optimizer_labels(params: Any) -> Any:
  """'muon' / 'adam' per leaf, from `muon_dimension_numbers` (validates every parameter eagerly)."""
  dims = muon_dimension_numbers(params)
  return jax.tree.map(lambda d: "adam" if d is None else "muon", dims,
                      is_leaf=lambda d: d is None or isinstance(d, MuonDimensionNumbers))


def learning_rate_schedule(optim: ml_collections.ConfigDict, peak_lr: float, total_steps: int) -> optax.Schedule:
  """The WSD schedule of `config.optim.schedule` at `peak_lr` over `total_steps` (digest §2.2)."""
  s = optim.schedule
  return wsd_schedule(peak_lr, total_steps, s.warmup_frac, s.decay_frac, s.final_frac, s.decay_shape)


def newton_schulz(x: jax.Array, steps: int, eps: float = 1e-8, dtype: Any = jnp.float32) -> jax.Array:
  """Approximate orthogonalisation U V^T of one matrix (Frobenius-normalised quintic iteration, as optax).

  `dtype` is the matmul operand type; products accumulate in f32 and the iterate stays f32. bfloat16 is the
  Muon/Moonlight reference's choice (digest §8: Newton-Schulz "on the norm-normalised bf16 matrix"), here with f32
  accumulation, and the fast path of CPUs with bf16 dot units and of TPUs.
  """
  a, b, c = NS_COEFFS
  tall = x.shape[0] > x.shape[1]
  x = (x.T if tall else x).astype(jnp.float32)
  x = x / (jnp.linalg.norm(x) + eps)
  mm = lambda p, q: jnp.matmul(p.astype(dtype), q.astype(dtype), preferred_element_type=jnp.float32)
  for _ in range(steps):
    s = mm(x, x.T)
    x = a * x + mm(b * s + c * mm(s, s), x)
  return x.T if tall else x


def _axes(axes: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
  return tuple(a % ndim for a in ((axes,) if isinstance(axes, int) else axes))


def _mesh_axes(spec: Any, ndim: int) -> list[tuple[str, ...]]:
  """Mesh axes of each array axis under a `PartitionSpec` (trailing axes unsharded)."""
  entries = tuple(spec) + (None,) * (ndim - len(spec))
  return [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in entries]


def orthogonalize(x: jax.Array, dims: MuonDimensionNumbers, steps: int, eps: float = 1e-8,
                  spec: Any = None, dtype: Any = jnp.float32) -> jax.Array:
  """Newton-Schulz on every matrix of `x` (`dims`: reduction/output axes, the rest are batch axes), each matrix
  whole on one device (module doc, "Sharding"). `spec`: the `PartitionSpec` `x` is sharded with on the context
  mesh (the parameter's); None takes the stack replicated.

  Under a context mesh the work is one `shard_map` over `x`'s own layout. On each device, the local stack of
  (matrix shards) is padded with zero matrices (they stay zero) to a multiple of the devices that shard the matrix
  dimensions, times the replicas when there are enough matrices to spread over them; each replica keeps its share
  of the stack, and one tiled all-to-all per sharded matrix axis trades stack for whole matrices. Newton-Schulz
  runs on those; the inverse all-to-alls and an all-gather over the replicas restore the layout. Every buffer is
  the size of the parameter's shard up to that padding; batch axes sharded over the mesh (routed experts on
  `expert`) stay local.
  """
  red, out = _axes(dims.reduction_axis, x.ndim), _axes(dims.output_axis, x.ndim)
  batch = tuple(a for a in range(x.ndim) if a not in red + out)
  perm = batch + red + out
  inverse = tuple(sorted(range(x.ndim), key=perm.__getitem__))
  nb, nr = len(batch), len(red)
  # One matrix at a time (`lax.map`, a loop): on the 2-core CPU ~20% faster than the batched (vmapped) matmuls of
  # a stack of 128 x 256 expert matrices, and the iteration's temporaries are one matrix's, not the stack's.
  stack_ns = lambda y: jax.lax.map(lambda m: newton_schulz(m, steps, eps, dtype).astype(x.dtype), y)
  mesh = jax.sharding.get_abstract_mesh()
  sharded = not mesh.empty and mesh.size > 1
  sizes = dict(mesh.shape) if sharded else {}
  axes = _mesh_axes(P() if spec is None or not sharded else spec, x.ndim)
  if any(x.shape[d] % math.prod(sizes[a] for a in axes[d]) for d in range(x.ndim)):
    axes = [()] * x.ndim   # uneven shards: take the stack replicated

  def local(xl):
    xt = xl.transpose(perm)
    y = xt.reshape((-1,) + xt.shape[nb:])                    # [stack, *matrix axes]
    n = y.shape[0]
    mat = [(1 + i, tuple(a for a in axes[perm[nb + i]] if sizes[a] > 1)) for i in range(x.ndim - nb)]
    mat = [(d, ax) for d, ax in mat if ax]                   # matrix axes sharded over the mesh
    used = {a for _, ax in mat for a in ax} | {a for d in batch for a in axes[d]}
    rep = tuple(a for a in sizes if a not in used and sizes[a] > 1)
    k, r = math.prod(sizes[a] for _, ax in mat for a in ax), math.prod(sizes[a] for a in rep)
    if n < k * r:  # too few matrices to give every replica one: replicas repeat the work
      rep, r = (), 1
    y = jnp.pad(y, [(0, -n % (k * r))] + [(0, 0)] * (y.ndim - 1))
    if rep:  # replicas hold the same stack; each keeps its share
      y = y.reshape(r, -1, *y.shape[1:])[jax.lax.axis_index(rep)]
    for d, ax in mat:
      y = jax.lax.all_to_all(y, ax, 0, d, tiled=True)
    rows = math.prod(y.shape[1:1 + nr])
    y = stack_ns(y.reshape(y.shape[0], rows, -1)).reshape(y.shape)
    for d, ax in reversed(mat):
      y = jax.lax.all_to_all(y, ax, d, 0, tiled=True)
    if rep:
      y = jax.lax.all_gather(y, rep, axis=0, tiled=True, to="invarying")
    return y[:n].reshape(xt.shape).transpose(inverse)

  if not sharded:
    return local(x)
  spec = P(*(ax or None for ax in axes))
  return jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec)(x)


def scale_by_muon(steps: int, beta: float, nesterov: bool, consistent_rms: float, eps: float = 1e-8,
                  shardings: Any = None, ns_dtype: Any = jnp.float32) -> optax.GradientTransformation:
  """optax's `contrib.scale_by_muon` + `scale_by_shape(consistent_rms)` (same state, `MuonState`) with the
  sharding-aware `orthogonalize`. Leaves are the Muon subtree of `optax.partition` (others are `MaskedNode`s).
  `shardings`: the parameters' `NamedSharding`s (a tree like the params), the layouts `orthogonalize` works in.
  `ns_dtype`: the Newton-Schulz matmul operand type (`newton_schulz`)."""
  specs = {} if shardings is None else {_path_names(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(
      shardings, is_leaf=lambda s: isinstance(s, jax.sharding.NamedSharding))[0]}

  def init(params):
    return MuonState(count=jnp.zeros([], jnp.int32), mu=optax.tree.zeros_like(params),
                     ns_coeffs=jnp.asarray(NS_COEFFS))

  def update(updates, state, params=None):
    del params
    dims = muon_dimension_numbers(updates)
    mu = optax.tree.update_moment(updates, state.mu, beta, 1)
    count = optax.safe_increment(state.count)
    if nesterov:
      mu_hat = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g,
                            optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
                            optax.tree.bias_correction(updates, beta, count))
    else:
      mu_hat = optax.tree.bias_correction(mu, beta, count)

    def one(path, x, d):
      red, out = _axes(d.reduction_axis, x.ndim), _axes(d.output_axis, x.ndim)
      fan_in, fan_out = math.prod(x.shape[a] for a in red), math.prod(x.shape[a] for a in out)
      names = _path_names(path)
      if shardings is not None and names not in specs:
        raise ValueError(f"scale_by_muon: no sharding for Muon parameter {'/'.join(names)}; pass `shardings` "
                         "shaped like the params (e.g. `k25jax.train.state.abstract_state`'s)")
      y = orthogonalize(x, d, steps, eps, spec=specs.get(names), dtype=ns_dtype)
      return y * (consistent_rms * math.sqrt(max(fan_in, fan_out)))

    new = jax.tree_util.tree_map_with_path(one, mu_hat, dims)
    return new, MuonState(count=count, mu=mu, ns_coeffs=state.ns_coeffs)

  return optax.GradientTransformation(init, update)


def make_optimizer(config: ml_collections.ConfigDict, params: Any, shardings: Any = None
                   ) -> optax.GradientTransformation:
  """MuonClip's update rule (digest §8, Algorithm 1 step 1) from `config.optim`, `config.train`.

  clip_by_global_norm(config.train.grad_clip) (skipped when <= 0), then
  - Muon (`scale_by_muon`: optax's rule with the sharding-aware `orthogonalize`): Nesterov momentum, `ns_steps`
    quintic Newton-Schulz steps (matmul operands in `ns_dtype`), update scaled by `consistent_rms * sqrt(max(fan_in, fan_out))`, decoupled weight
    decay, on the matrices of `muon_dimension_numbers`;
  - AdamW (b1, b2, eps of `config.optim`, decoupled weight decay masked by `weight_decay_mask`) on the rest.
  Both follow the WSD schedule over `config.train.steps`; AdamW uses `adam_learning_rate` when set.
  `optim.name="adamw"` gives AdamW on everything (ablations). QK-Clip (step 2) is `k25jax.optim.qk_clip`,
  applied by the train step after the update.

  The AdamW leaves are routed to `optax.adamw` (weight decay masked) by `optax.partition`; the Muon chain only
  ever sees Muon leaves. `shardings` (the parameters' `NamedSharding`s) let `orthogonalize` work in each
  parameter's own layout; without them it takes the Muon stacks replicated (fine on small meshes only).
  """
  if "optim" not in config:
    raise ConfigError("config.optim is missing; attach one with "
                      "`config.optim = k25jax.configs.optim.optim_config(config.preset)`")
  o = config.optim
  validate_optim(o)
  steps = int(config.train.steps)
  lr = learning_rate_schedule(o, o.learning_rate, steps)
  adam_lr = lr if o.adam_learning_rate is None else learning_rate_schedule(o, o.adam_learning_rate, steps)
  adamw = lambda rate: optax.adamw(rate, b1=o.adam_b1, b2=o.adam_b2, eps=o.adam_eps,
                                   weight_decay=o.weight_decay, mask=weight_decay_mask)
  if o.name == "adamw":
    tx = adamw(lr)
  else:
    muon = optax.chain(scale_by_muon(int(o.ns_steps), o.momentum, bool(o.nesterov), o.consistent_rms,
                                     shardings=shardings, ns_dtype=jnp.dtype(o.ns_dtype)),
                       optax.add_decayed_weights(o.weight_decay), optax.scale_by_learning_rate(lr))
    tx = optax.partition({"muon": muon, "adam": adamw(adam_lr)}, optimizer_labels(params))
  clip = config.train.grad_clip
  return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx

