"""CPU demo: 32x32 talking clips at 8 fps, 17 frames (2.1 s), learns visibly in ~10 minutes.

The pixel codec with spatial factor 4 gives 48 channels, and a (1,2,2) patch 192 values per
token: the width (192) must be at least that, or the model cannot even pass its input through
(a 128-wide model on 768-value patches stalls at the noise floor).
"""
from configs import base


def get_config():
  c = base.get_config()
  c.video.update(frames=17, fps=8.0, height=32, width=32, spatial_factor=4, latent_channels=48)
  c.text.update(max_length=32)
  c.model.update(hidden=192, heads=4, mlp_ratio=4.0, dual_blocks=2, single_blocks=2)
  c.data.update(dir="demo/dataset")
  c.train.update(steps=600, batch_size=8, lr=1e-3, warmup_steps=50, log_every=10)
  c.eval.update(every_steps=200, batches=1)
  c.checkpoint.update(every_steps=200, keep=2)
  c.sample.update(steps=20, shift=3.0)
  return c
