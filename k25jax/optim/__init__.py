"""MuonClip (digest §8): optax Muon + AdamW with per-matrix dimension numbers, per-head QK-Clip, WSD schedule."""

from k25jax.optim.muon import make_optimizer, muon_dimension_numbers, optimizer_labels, weight_decay_mask
from k25jax.optim.qk_clip import qk_clip
from k25jax.optim.schedules import wsd_schedule

__all__ = ["make_optimizer", "muon_dimension_numbers", "optimizer_labels", "qk_clip", "weight_decay_mask",
           "wsd_schedule"]
