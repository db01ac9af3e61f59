"""Synthetic batches with the real shapes and dtypes (benchmarks, smoke runs, tests).

Every example is drawn from its own RNG seeded by (seed, step, global row), so a batch depends
only on (seed, step): not on the process count, nor on what was read before (exact resume).
"""
from __future__ import annotations

import numpy as np

from jova_jax.config_lib import LatentShapes, latent_shapes
from jova_jax.data import batch_spec


class SyntheticIterator:
  """Yields this process's rows of global batch `step`, step = 0, 1, ...; state is the step."""

  def __init__(self, config, *, seed: int, process_index: int = 0, process_count: int = 1,
               shapes: LatentShapes | None = None):
    self.config = config
    self.shapes = shapes or latent_shapes(config)
    self.spec = batch_spec.example_spec(self.shapes, int(config.text.width))
    self.seed = int(seed)
    self.global_batch = int(config.train.batch_size)
    if self.global_batch % process_count:
      raise ValueError(f"train.batch_size={self.global_batch} is not divisible by the process "
                       f"count {process_count}")
    self.local_batch = self.global_batch // process_count
    self.first_row = process_index * self.local_batch
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.batch(self.step)
    self.step += 1
    return batch

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step`."""
    rows = [self.example(step, self.first_row + i) for i in range(self.local_batch)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

  def example(self, step: int, row: int) -> dict[str, np.ndarray]:
    c = self.config
    shapes = self.shapes
    t, h, w, _ = shapes.video
    max_len, width = self.spec["text"][0]
    rng = np.random.default_rng([self.seed, step, row])
    # A mouth box on the latent grid, the same in every frame, like faces.py's boxes.
    bh, bw = max(1, h // 4), max(1, w // 4)
    y, x = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
    mouth = np.zeros((t, h, w), np.float32)
    mouth[:, y:y + bh, x:x + bw] = 1.0
    length = int(rng.integers(1, max_len + 1))
    text = np.zeros((max_len, width), np.float32)
    text[:length] = rng.standard_normal((length, width), np.float32)
    return batch_spec.conform({
        "video": rng.standard_normal(shapes.video, np.float32),
        "audio": rng.standard_normal(shapes.audio, np.float32),
        "mouth_mask": mouth,
        "text": text,
        "text_mask": np.arange(max_len) < length,
        "drop_text": np.bool_(rng.random() < c.data.p_uncond),
        "use_first_frame": np.bool_(bool(c.model.i2v) and rng.random() < c.data.p_i2v),
        "record_index": step * self.global_batch + row,
    }, self.spec)
