"""Throughput accounting: device peak FLOP/s (published or measured) and MFU."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets.
PUBLISHED_PEAK = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def published_peak(device=None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in PUBLISHED_PEAK.items():
    if kind.startswith(name):
      return peak
  return None


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """FLOP/s of one device on a square matmul: the ceiling this device really reaches."""
  device = jax.local_devices()[0]
  a = jax.device_put(jnp.ones((n, n), dtype), device)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def mfu(flops_per_step: float, step_time: float, peak_per_device: float | None,
        num_devices: int) -> float | None:
  if not peak_per_device or step_time <= 0:
    return None
  return flops_per_step / step_time / (peak_per_device * num_devices)
