"""`pixels`: the built-in lossless video codec.

Latents are the frames scaled to [-1, 1] and folded space-to-depth: each spatial_factor x
spatial_factor block of RGB pixels becomes one latent vector of 3 * spatial_factor**2
channels, ordered (row in block, column in block, RGB). No compression in time
(temporal_factor 1), so every frame is its own latent frame. decode(encode(x)) == x exactly for
uint8 x: x / 127.5 - 1 is off by at most a few float32 ulps, far below the 0.5 rounding margin.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jova_jax.codecs import base


@functools.partial(jax.jit, static_argnums=1)
def _space_to_depth(frames, factor: int):
  b, t, h, w, c = frames.shape
  x = frames.astype(jnp.float32) / 127.5 - 1.0
  x = x.reshape(b, t, h // factor, factor, w // factor, factor, c)
  x = x.transpose(0, 1, 2, 4, 3, 5, 6)
  return x.reshape(b, t, h // factor, w // factor, factor * factor * c)


class PixelsCodec(base.VideoCodec):
  name = "pixels"
  temporal_factor = 1

  def __init__(self, spatial_factor: int):
    if spatial_factor < 1:
      raise ValueError(f"pixels codec: spatial_factor must be >= 1, got {spatial_factor}")
    self.spatial_factor = int(spatial_factor)
    self.latent_channels = 3 * self.spatial_factor ** 2

  def encode(self, frames) -> jax.Array:
    frames = jnp.asarray(frames)
    self.check_frames(frames)
    return _space_to_depth(frames, self.spatial_factor)

  def decode(self, latents) -> np.ndarray:
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 5 or latents.shape[-1] != self.latent_channels:
      raise ValueError(f"pixels codec: expected latents (B,T,H',W',{self.latent_channels}), got "
                       f"{latents.shape}")
    b, t, hs, ws, _ = latents.shape
    f = self.spatial_factor
    x = latents.reshape(b, t, hs, ws, f, f, 3).transpose(0, 1, 2, 4, 3, 5, 6)
    x = x.reshape(b, t, hs * f, ws * f, 3)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)

  def config(self) -> dict:
    return dict(name=self.name, temporal_factor=self.temporal_factor,
                spatial_factor=self.spatial_factor, latent_channels=self.latent_channels,
                scaling="x/127.5-1", layout="space_to_depth(row,col,rgb)")
