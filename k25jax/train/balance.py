"""Load balancing of media items over devices for DEP's vision forward (digest §7 "Balanced Vision Forward").

DEP replicates the vision encoder on every device and spreads the media of the *global* batch by a load metric,
independently of how the text batch is sharded. The metric here is the patch count t*h*w (the tower's cost is
linear in it at fixed per-device budget; packed attention adds a term quadratic in the item size, which LPT on patch
counts also keeps bounded). Shapes are static per program: every device gets the same number of patch slots Pd
and item slots, padded. With a fixed Pd (`fit=False`) every device pays for Pd patches however few it holds (and
the tower's packed attention for Pd^2 pairs); `fit=True` sizes Pd from the plan, the busiest device's load rounded
up to a short ladder of sizes (`fitted_budget`, at most 1.5x the load, so the jitted phases compile once per rung).

Assignment: LPT (longest processing time first): items in decreasing patch count, each to the least-loaded device
that still has room. Without budget pressure LPT gives max load <= mean + largest item and <= (4/3 - 1/(3D)) OPT
(Graham 1969). An item larger than the per-device budget raises (no splitting: an item's patches attend to each
other, so it must stay on one device).

`plan_media` returns a `MediaPlan` of host-computed indices; moving data is then a gather in both directions:
  balanced patches [D, Pd]  = global patches[patch_src]                  (placeholder order -> devices)
  placeholder tokens [N]    = balanced tokens.reshape(D * Nd)[token_src]   (devices -> placeholder order)
  balanced cotangent [D, Nd] = placeholder cotangent[token_dst]            (the inverse, for the backward)
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Any

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class MediaPlan:
  """Host-computed per-device media layout (all numpy; -1 marks padding in index arrays).

  patch_src       int32 [D, Pd]    index of each balanced patch slot in the global patch array
  patch_item_ids  int32 [D, Pd]    local item id 1..Md per slot (the tower's packing contract), 0 = padding
  item_grid       int32 [D, Md, 3] (t, h, w) of each local item, 0 for padding
  item_valid      bool  [D, Md]
  token_src       int32 [N]        for placeholder-order vision token k, its index in the flat [D * Nd] tokens
  token_dst       int32 [D, Nd]    for each balanced token slot, its placeholder-order index
  token_valid     bool  [N]        valid placeholder-order tokens (a prefix)
  device_of_item  int32 [M]        device of each global item, -1 for invalid items
  loads           int64 [D]        patches per device
  """
  patch_src: np.ndarray
  patch_item_ids: np.ndarray
  item_grid: np.ndarray
  item_valid: np.ndarray
  token_src: np.ndarray
  token_dst: np.ndarray
  token_valid: np.ndarray
  device_of_item: np.ndarray
  loads: np.ndarray

  def device_arrays(self) -> dict[str, np.ndarray]:
    """The arrays a device program needs (everything but the diagnostics)."""
    return {k: getattr(self, k) for k in ("patch_src", "patch_item_ids", "item_grid", "item_valid", "token_src",
                                          "token_dst", "token_valid")}

  def stats(self) -> dict[str, float]:
    return load_stats(self.loads)


def load_stats(loads: np.ndarray) -> dict[str, float]:
  """max, mean and max/mean of per-device loads (max/mean = 1 is perfect balance; 0 loads give 1)."""
  loads = np.asarray(loads, np.float64)
  mean = float(loads.mean()) if loads.size else 0.0
  peak = float(loads.max()) if loads.size else 0.0
  return {"max": peak, "mean": mean, "max_over_mean": peak / mean if mean > 0 else 1.0}


def lpt_assign(sizes: np.ndarray, num_devices: int, patch_budget: int, max_items: int) -> np.ndarray:
  """Device of each item by LPT under per-device budgets (module docstring). sizes int [n] -> int32 [n].

  Ties go to the lower device index, items of equal size in index order, so the result is deterministic.
  Raises ValueError naming the item when it exceeds `patch_budget`, or when the budgets cannot hold all items.
  """
  sizes = np.asarray(sizes, np.int64)
  too_big = np.nonzero(sizes > patch_budget)[0]
  if too_big.size:
    i = int(too_big[0])
    raise ValueError(f"media item {i} has {sizes[i]} patches, more than the per-device DEP patch budget "
                     f"{patch_budget}; raise the budget (device_patch_budget) to at least {sizes[i]} or resize "
                     "the item to fewer patches (an item cannot be split: its patches attend to each other)")
  if sizes.size > num_devices * max_items:
    raise ValueError(f"{sizes.size} media items exceed {num_devices} devices x {max_items} item slots; raise "
                     "device_max_items")
  heap = [(0, d) for d in range(num_devices)]  # (load, device): the least-loaded device on top
  count = np.zeros(num_devices, np.int64)
  out = np.full(sizes.shape, -1, np.int32)
  for i in np.argsort(-sizes, kind="stable"):
    skipped = []
    while heap:
      load, d = heapq.heappop(heap)
      if load + sizes[i] <= patch_budget and count[d] < max_items:
        break
      skipped.append((load, d))
    else:
      raise ValueError(f"LPT could not place media item {int(i)} ({sizes[i]} patches): every device is within "
                       f"{sizes[i]} patches of its budget {patch_budget} or holds {max_items} items (total "
                       f"{int(sizes.sum())} patches over {num_devices} devices); raise device_patch_budget / "
                       "device_max_items")
    out[i] = d
    count[d] += 1
    heapq.heappush(heap, (load + int(sizes[i]), d))
    for s in skipped:
      heapq.heappush(heap, s)
  return out


def fitted_budget(max_load: int, merge_kernel: int, cap: int) -> int:
  """Per-device patch slots for a plan whose busiest device holds `max_load` patches: the smallest rung of the
  ladder {2^n, 3 * 2^(n-1)} x merge_kernel that holds it, capped at `cap` (itself a multiple of the kernel)."""
  k, need = int(merge_kernel), max(-(-int(max_load) // int(merge_kernel)), 1)   # in merge-kernel units
  pow2 = 1 << (need - 1).bit_length()                          # smallest power of two >= need
  rung = pow2 * 3 // 4 if pow2 >= 4 and pow2 * 3 // 4 >= need else pow2
  return min(rung * k, int(cap))


def in_order_assign(sizes: np.ndarray, num_devices: int) -> np.ndarray:
  """The unbalanced baseline: items in placeholder order split into `num_devices` runs of equal item count
  (balancing on image counts, as a text-sharded layout gives when every row holds the same number of images)."""
  n = np.asarray(sizes).size
  return (np.arange(n) * num_devices // max(n, 1)).astype(np.int32)


def item_layout(patch_item_ids: np.ndarray, item_grid: np.ndarray, item_valid: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
  """(start, size) of each item's patches in the global patch array, from `patch_item_ids` (ids 1..M).

  Starts come from the ids rather than a cumulative sum of grids, so the per-host padding of a multi-host global
  batch (`k25jax.data.pipeline.to_global_batch`) is handled. Invalid items get size 0. Raises ValueError when an
  item's patches are not one contiguous run of t*h*w slots.
  """
  ids, grid = np.asarray(patch_item_ids), np.asarray(item_grid, np.int64)
  valid = np.asarray(item_valid, bool)
  sizes = np.where(valid, grid.prod(axis=1), 0)
  m = grid.shape[0]
  counts = np.bincount(ids, minlength=m + 1)[1:m + 1]
  first = np.full(m + 1, -1, np.int64)
  nz = np.nonzero(ids > 0)[0]
  first[ids[nz][::-1]] = nz[::-1]
  starts = first[1:]
  bad = np.nonzero(valid & ((counts != sizes) | (starts < 0)))[0]
  if bad.size:
    i = int(bad[0])
    raise ValueError(f"media item {i} (id {i + 1}) has {counts[i]} patches in patch_item_ids but its grid "
                     f"{tuple(grid[i])} needs {sizes[i]}; the packer must emit t*h*w contiguous patches per item")
  return np.where(valid, starts, 0), sizes


def plan_media(patch_item_ids: np.ndarray, item_grid: np.ndarray, item_valid: np.ndarray, *, num_devices: int,
               patch_budget: int, max_items: int, merge_kernel: tuple[int, int], num_vision_slots: int,
               balance: bool = True, fit: bool = False) -> MediaPlan:
  """Assigns the global batch's media items to `num_devices` devices and builds the index maps (module doc).

  Inputs are the global (all hosts) `patch_item_ids` [P], `item_grid` [M, 3], `item_valid` [M]; items are in
  placeholder order. `patch_budget`/`max_items` are per device; `num_vision_slots` = N is the placeholder-order
  token count of the integrated model (P // (kh * kw)). `balance=False` uses `in_order_assign` (for comparison).
  `fit=True` lays the plan out with `fitted_budget(max load)` patch slots and min(max_items, those / (kh*kw)) item
  slots per device instead of `patch_budget` / `max_items`, which then only bound the assignment.
  """
  kh, kw = merge_kernel
  starts, sizes = item_layout(patch_item_ids, item_grid, item_valid)
  grid = np.asarray(item_grid, np.int64)
  valid_items = np.nonzero(sizes > 0)[0]
  ntok = np.where(sizes > 0, (grid[:, 1] // kh) * (grid[:, 2] // kw), 0)
  n_tokens = int(ntok.sum())
  if n_tokens > num_vision_slots:
    raise ValueError(f"media items give {n_tokens} vision tokens but there are {num_vision_slots} slots; raise "
                     "the patch budget")
  v_sizes = sizes[valid_items]
  if balance:
    dev = lpt_assign(v_sizes, num_devices, patch_budget, max_items)
  else:
    dev = in_order_assign(v_sizes, num_devices)
    over = np.bincount(dev, weights=v_sizes, minlength=num_devices).max(initial=0)
    if over > patch_budget or np.bincount(dev, minlength=num_devices).max(initial=0) > max_items:
      raise ValueError(f"in-order assignment puts {int(over)} patches on one device, over the budget "
                       f"{patch_budget}; raise device_patch_budget or use balance=True")
  if fit:
    loads = np.bincount(dev, weights=v_sizes, minlength=num_devices)
    patch_budget = fitted_budget(int(loads.max(initial=0)), kh * kw, patch_budget)
    max_items = min(max_items, patch_budget // (kh * kw))
  nd = patch_budget // (kh * kw)
  tok_start = np.cumsum(ntok) - ntok
  patch_src = np.full((num_devices, patch_budget), -1, np.int32)
  local_ids = np.zeros((num_devices, patch_budget), np.int32)
  local_grid = np.zeros((num_devices, max_items, 3), np.int32)
  local_valid = np.zeros((num_devices, max_items), bool)
  token_src = np.full((num_vision_slots,), -1, np.int32)
  token_dst = np.full((num_devices, nd), -1, np.int32)
  device_of_item = np.full(grid.shape[0], -1, np.int32)
  loads = np.zeros(num_devices, np.int64)
  for d in range(num_devices):
    p_off = t_off = 0
    for j, i in enumerate(valid_items[dev == d]):  # placeholder order within a device
      s, n, k = int(starts[i]), int(sizes[i]), int(ntok[i])
      patch_src[d, p_off:p_off + n] = np.arange(s, s + n)
      local_ids[d, p_off:p_off + n] = j + 1
      local_grid[d, j], local_valid[d, j] = grid[i], True
      dst = np.arange(tok_start[i], tok_start[i] + k)
      token_dst[d, t_off:t_off + k] = dst
      token_src[dst] = d * nd + t_off + np.arange(k)
      device_of_item[i] = d
      p_off, t_off = p_off + n, t_off + k
    loads[d] = p_off
  return MediaPlan(patch_src=patch_src, patch_item_ids=local_ids, item_grid=local_grid, item_valid=local_valid,
                   token_src=token_src, token_dst=token_dst, token_valid=np.arange(num_vision_slots) < n_tokens,
                   device_of_item=device_of_item, loads=loads)


def take_rows(x: Any, index: Any) -> Any:
  """x[index] along axis 0 with index -1 giving zeros (numpy or jax arrays; under jit, a gather)."""
  xp = np if isinstance(x, np.ndarray) and isinstance(index, np.ndarray) else jnp
  index = xp.asarray(index)
  rows = xp.take(x, xp.clip(index, 0, x.shape[0] - 1), axis=0)
  mask = (index >= 0).reshape(index.shape + (1,) * (x.ndim - 1))
  return xp.where(mask, rows, xp.zeros((), x.dtype))
