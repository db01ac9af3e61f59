"""Tiny model and clip for tests: compiles in seconds on CPU."""
from configs import base


def get_config():
  c = base.get_config()
  c.video.update(frames=5, height=16, width=16, spatial_factor=4, latent_channels=48)
  c.text.update(max_length=8)
  c.model.update(hidden=64, heads=4, mlp_ratio=2.0, dual_blocks=1, single_blocks=1)
  c.train.update(steps=4, batch_size=8, warmup_steps=1, log_every=1)
  c.checkpoint.update(every_steps=2, keep=2, async_save=False)
  c.eval.update(batches=1)
  c.sample.update(steps=4)
  return c
