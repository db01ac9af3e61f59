"""CPU demo: 64x64 talking clips at 8 fps, 17 frames (2.1 s), learns visibly in ~10 minutes."""
from configs import base


def get_config():
  c = base.get_config()
  c.video.update(frames=17, fps=8.0, height=64, width=64, spatial_factor=8, latent_channels=192)
  c.text.update(max_length=32)
  c.model.update(hidden=128, heads=4, mlp_ratio=4.0, dual_blocks=2, single_blocks=2)
  c.data.update(dir="demo/dataset")
  c.train.update(steps=600, batch_size=8, lr=1e-3, warmup_steps=50, log_every=10)
  c.eval.update(every_steps=200, batches=1)
  c.checkpoint.update(every_steps=200, keep=2)
  c.sample.update(steps=20, shift=3.0)
  return c
