"""The batch schema: every key a batch carries, with its per-example shape and dtype, from the
run's shapes (docs/design.md section 4). One table: the trainer's abstract batch, the
pipeline's decode, synthetic data, the benches and the tests derive from it."""
from __future__ import annotations

import jax
import numpy as np

from jova_jax.config_lib import LatentShapes

# The keys the model's step consumes; the pipeline also yields record_index (bookkeeping) and
# eval batches example_valid (real rows vs the last batch's padding).
MODEL_KEYS = ("video", "audio", "mouth_mask", "text", "text_mask", "drop_text", "use_first_frame")
BOOKKEEPING_KEYS = ("record_index",)
EVAL_KEYS = ("example_valid",)


def example_spec(shapes: LatentShapes, text_width: int) -> dict[str, tuple[tuple, np.dtype]]:
  """{key: (shape of one example, dtype)} of every key a batch may carry."""
  t, h, w, _ = shapes.video
  return {
      "video": (tuple(shapes.video), np.dtype(np.float32)),      # model-space latents
      "audio": (tuple(shapes.audio), np.dtype(np.float32)),
      "mouth_mask": ((t, h, w), np.dtype(np.float32)),           # 1 inside the mouth box
      "text": ((shapes.text_tokens, int(text_width)), np.dtype(np.float32)),
      "text_mask": ((shapes.text_tokens,), np.dtype(np.bool_)),
      "drop_text": ((), np.dtype(np.bool_)),                      # classifier-free guidance
      "use_first_frame": ((), np.dtype(np.bool_)),                # image-to-video
      "record_index": ((), np.dtype(np.int32)),
      "example_valid": ((), np.dtype(np.bool_)),
  }


def conform(example: dict, spec: dict) -> dict[str, np.ndarray]:
  """example's arrays in the spec's dtypes, checked against its shapes (a leading batch axis
  allowed when every array has one)."""
  out = {}
  for key, value in example.items():
    shape, dtype = spec[key]
    array = np.asarray(value, dtype)
    if array.shape != shape and array.shape[1:] != shape:
      raise ValueError(f"batch key {key!r}: shape {array.shape}, expected {shape} per example")
    out[key] = array
  return out


def abstract_batch(spec: dict, batch_size: int, sharding, keys=MODEL_KEYS) -> dict:
  """ShapeDtypeStructs of a global batch of `keys`, each with `sharding`."""
  return {k: jax.ShapeDtypeStruct((batch_size,) + spec[k][0], spec[k][1], sharding=sharding)
          for k in keys}
