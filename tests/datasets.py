"""Small real TFDS datasets of random latents for tests."""
import numpy as np

from jova_jax.config_lib import latent_shapes
from jova_jax.data import features


def make_examples(config, n, seed):
  """Random examples with text lengths 1..12 around the config's max_length (padding and cutting)."""
  shapes = latent_shapes(config)
  rng = np.random.default_rng(seed)
  return [dict(
      video_latent=rng.normal(size=shapes.video).astype(np.float32),
      audio_latent=rng.normal(size=shapes.audio).astype(np.float32),
      mouth_mask=(rng.random(shapes.video[:3]) < 0.3).astype(np.uint8),
      text_emb=rng.normal(size=(1 + i % 12, config.text.width)).astype(np.float32),
      caption=f"<Video Caption>: clip {i}", clip_id=f"clip{seed}_{i}", face_frac=np.float32(0.75))
      for i in range(n)]


def make_learnable_examples(config, n, seed):
  """Examples sharing one fixed pattern plus a little noise: a model that learns the pattern
  cuts the flow-matching loss from about 1 + 2.25 to about 1."""
  examples = make_examples(config, n, seed)
  rng = np.random.default_rng(1234)
  patterns = {k: 1.5 * np.sign(rng.normal(size=examples[0][k].shape)).astype(np.float32)
              for k in ("video_latent", "audio_latent")}
  for ex in examples:
    for k, pattern in patterns.items():
      ex[k] = pattern + 0.1 * ex[k]
  return examples


def write_random_dataset(directory, config, num_train, num_eval, make=make_examples):
  features.write_dataset(directory, config, {"train": make(config, num_train, 0),
                                             "eval": make(config, num_eval, 1)})
  return directory
