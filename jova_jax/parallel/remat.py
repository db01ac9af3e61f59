"""Activation checkpointing policies for the scanned blocks (config model.remat)."""
from __future__ import annotations

import jax

_CP = jax.checkpoint_policies


def policy(name: str):
  """Returns (use_remat, jax policy). 'none' keeps every activation."""
  if name == "none":
    return False, None
  if name == "full":
    return True, _CP.nothing_saveable
  if name == "save_dots":
    # Keep matmul outputs without batch dims (projections, FFN); recompute the rest.
    return True, _CP.dots_with_no_batch_dims_saveable
  if name == "offload_dots":
    # Same, but keep them in host memory (TPU / GPU with pinned host memory).
    return True, _CP.offload_dot_with_no_batch_dims("device", "pinned_host")
  raise ValueError(f"model.remat={name!r}: expected one of 'none', 'full', 'save_dots', "
                   f"'offload_dots'")
