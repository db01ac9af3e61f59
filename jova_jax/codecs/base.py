"""The codec interfaces (docs/design.md section 5) and helpers shared by every codec.

A video codec maps uint8 frames (B,T,H,W,3) to float latents (B,T',H',W',C) and back; an
audio codec maps a float wave (B,S) to (B,La,C) and back. Latents are "codec space": normalised
by the codec itself when `normalises`, else by data/latent_norm.py. Built-in codecs and the
pretrained ports (Wan2.1 VAE, MMAudio VAE) implement the same classes, so data_prep, faces.py
and the sampler never look at which one they hold.
"""
from __future__ import annotations

import abc

import jax
import numpy as np

from jova_jax import config_lib


def pixel_mask_to_latent(mask, temporal_factor: int, spatial_factor: int) -> np.ndarray:
  """Max-pools a {0,1} pixel mask (B,T,H,W) or (T,H,W) onto the latent grid (…,T',H',W').

  Space: blocks of spatial_factor x spatial_factor. Time: like a causal video VAE, the first
  frame forms latent frame 0 on its own, then each group of temporal_factor frames forms one
  latent frame; trailing frames that do not fill a group are dropped, exactly as
  config_lib.latent_frames(T) counts them.
  """
  mask = np.asarray(mask)
  if mask.ndim not in (3, 4):
    raise ValueError(f"mask must be (T,H,W) or (B,T,H,W), got shape {mask.shape}")
  squeeze = mask.ndim == 3
  if squeeze:
    mask = mask[None]
  b, t, h, w = mask.shape
  if h % spatial_factor or w % spatial_factor:
    raise ValueError(f"mask H x W = {h}x{w} is not divisible by spatial_factor={spatial_factor}")
  t_lat = config_lib.latent_frames(t, temporal_factor)
  if t_lat < 1:
    raise ValueError(f"mask has {t} frames: need at least 1")
  mask = mask.astype(bool)
  first = mask[:, :1]
  rest = mask[:, 1:1 + (t_lat - 1) * temporal_factor]
  rest = rest.reshape(b, t_lat - 1, temporal_factor, h, w).any(axis=2)
  pooled = np.concatenate([first, rest], axis=1)
  hs, ws = h // spatial_factor, w // spatial_factor
  pooled = pooled.reshape(b, t_lat, hs, spatial_factor, ws, spatial_factor).any(axis=(3, 5))
  pooled = pooled.astype(np.uint8)
  return pooled[0] if squeeze else pooled


class VideoCodec(abc.ABC):
  """uint8 frames (B,T,H,W,3) <-> float32 latents (B,T',H',W',C)."""
  name: str
  temporal_factor: int
  spatial_factor: int
  latent_channels: int
  # encode normalises by itself (published constants or a fixed scaling); False: prepare
  # measures per-channel statistics and the pipeline applies them (data/latent_norm.py).
  normalises: bool = True

  @abc.abstractmethod
  def encode(self, frames) -> jax.Array:
    """uint8 (B,T,H,W,3) -> float32 (B,T',H',W',C)."""

  @abc.abstractmethod
  def decode(self, latents) -> np.ndarray:
    """float (B,T',H',W',C) -> uint8 (B,T,H,W,3)."""

  @abc.abstractmethod
  def config(self) -> dict:
    """JSON-able description stored in the dataset metadata."""

  def latent_frames(self, frames: int) -> int:
    return config_lib.latent_frames(frames, self.temporal_factor)

  def check_frames(self, frames) -> None:
    """Refuses anything but uint8 (B,T,H,W,3) with H and W divisible by the spatial factor."""
    if frames.ndim != 5 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
      raise ValueError(f"{self.name} codec: expected uint8 frames (B,T,H,W,3), got "
                       f"{frames.dtype} {frames.shape}")
    h, w = frames.shape[2:4]
    if h % self.spatial_factor or w % self.spatial_factor:
      raise ValueError(f"{self.name} codec: frame H x W = {h}x{w} is not divisible by "
                       f"spatial_factor={self.spatial_factor}")

  def pixel_mask_to_latent(self, mask) -> np.ndarray:
    return pixel_mask_to_latent(mask, self.temporal_factor, self.spatial_factor)


class AudioCodec(abc.ABC):
  """float32 wave (B,S) in [-1,1] <-> float32 latents (B,La,C)."""
  name: str
  sample_rate: int
  latents_per_second: float
  latent_channels: int
  normalises: bool = True  # as VideoCodec.normalises

  @abc.abstractmethod
  def encode(self, wave) -> jax.Array:
    """float32 (B,S) -> float32 (B,La,C) with La = latent_length(S)."""

  @abc.abstractmethod
  def decode(self, latents) -> np.ndarray:
    """float (B,La,C) -> float32 wave (B,S') covering La / latents_per_second seconds."""

  @abc.abstractmethod
  def config(self) -> dict:
    """JSON-able description stored in the dataset metadata."""

  def latent_length(self, num_samples: int) -> int:
    return config_lib.audio_latent_length(num_samples, self.sample_rate, self.latents_per_second)
