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


def write_random_dataset(directory, config, num_train, num_eval, make=make_examples):
  features.write_dataset(directory, config, {"train": make(config, num_train, 0),
                                             "eval": make(config, num_eval, 1)})
  return directory
