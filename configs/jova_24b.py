"""Paper scale: two Waver-12B-shaped towers (M=16, N=40, hidden 3072, 24 heads x 128).

Wan2.1 VAE video latents at 480x832 x 121 frames (24 fps), MMAudio 16 kHz audio latents,
T5 text features. Pretrained codecs and the text encoder load from `weights_dir`.
"""
from configs import base


def get_config():
  c = base.get_config()
  c.video.update(codec="wan21", fps=24.0, frames=121, height=480, width=832, temporal_factor=4,
                 spatial_factor=8, latent_channels=16)
  c.audio.update(codec="mmaudio16k", sample_rate=16000, latent_channels=20,
                 latents_per_second=31.25)
  c.text.update(encoder="t5", width=4096, max_length=512)
  c.model.update(hidden=3072, heads=24, mlp_ratio=4.0, dual_blocks=16, single_blocks=40,
                 compute_dtype="bfloat16", remat="save_dots")
  c.flow.update(shift=3.0)
  c.train.update(steps=200_000, batch_size=256, lr=1e-4, warmup_steps=2000, log_every=50)
  c.checkpoint.update(every_steps=1000, keep=5)
  c.mesh.update(data=1, fsdp=-1, context=4, tensor=1)
  c.parallel.update(context_strategy="ulysses", attention_kernel="auto")
  return c
