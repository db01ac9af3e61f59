"""Patchify, sigma embeddings and rotary positions for the joint sequence."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jova_jax.config_lib import rope_split
from jova_jax.model.layers import Dense


# ---------------------------------------------------------------------------- patches
def patchify_video(x, patch):
  """(B,T,H,W,C) -> (B, T/pt * H/ph * W/pw, pt*ph*pw*C), tokens in (t, h, w) raster order."""
  b, t, h, w, c = x.shape
  pt, ph, pw = patch
  x = x.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, (t // pt) * (h // ph) * (w // pw), pt * ph * pw * c)


def unpatchify_video(tokens, patch, grid):
  """Inverse of patchify_video; grid = (T, H, W) of the latent."""
  b = tokens.shape[0]
  pt, ph, pw = patch
  t, h, w = grid
  c = tokens.shape[-1] // (pt * ph * pw)
  x = tokens.reshape(b, t // pt, h // ph, w // pw, pt, ph, pw, c)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, t, h, w, c)


def patchify_audio(x, patch: int):
  b, l, c = x.shape
  return x.reshape(b, l // patch, patch * c)


def unpatchify_audio(tokens, patch: int):
  b, n, pc = tokens.shape
  return tokens.reshape(b, n * patch, pc // patch)


# ---------------------------------------------------------------------------- sigma
def sinusoidal(t, dim: int, max_period: float = 10000.0):
  """(B,) -> (B, dim) cos/sin features."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class SigmaEmbedding(nnx.Module):
  """sigma in [0, 1] -> conditioning vector (B, hidden) for adaLN."""

  def __init__(self, freq_dim: int, hidden: int, *, rngs: nnx.Rngs):
    self.freq_dim = freq_dim
    self.fc1 = Dense(freq_dim, hidden, ("patch", "embed"), rngs=rngs)
    self.fc2 = Dense(hidden, hidden, ("embed", "mlp"), rngs=rngs)

  def __call__(self, sigma):
    h = self.fc1(sinusoidal(sigma * 1000.0, self.freq_dim))
    return self.fc2(jax.nn.silu(h))


# ---------------------------------------------------------------------------- rotary
def _band_angles(pos, dim: int, theta: float):
  """pos (L,) float -> (L, dim//2) angles for one band of `dim` channels."""
  freqs = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
  return pos[:, None].astype(jnp.float32) * jnp.asarray(freqs, jnp.float32)[None, :]


def rope_angles(pos_t, pos_h, pos_w, head_dim: int, theta: float):
  """3D rotary angles (L, head_dim//2): bands time / height / width split like Wan.

  A token with (t, 0, 0) is rotated only on the time band, so audio (time only) and text
  (all zeros = identity) share the same function.
  """
  dt, dh, dw = rope_split(head_dim)
  return jnp.concatenate([_band_angles(pos_t, dt, theta), _band_angles(pos_h, dh, theta),
                          _band_angles(pos_w, dw, theta)], axis=-1)


def video_positions(grid_tokens, patch):
  """(t, h, w) positions of video tokens in raster order, in latent-frame / latent-pixel units."""
  nt, nh, nw = grid_tokens
  t, h, w = np.meshgrid(np.arange(nt), np.arange(nh), np.arange(nw), indexing="ij")
  return (t.reshape(-1) * patch[0]).astype(np.float32), h.reshape(-1).astype(np.float32), \
      w.reshape(-1).astype(np.float32)


def audio_time_positions(num_tokens: int, audio_patch: int, per_video_frame: float):
  """Audio token j starts at latent j*patch, which is the instant of video latent frame
  j*patch / per_video_frame: the same time axis as the video tokens."""
  return (np.arange(num_tokens) * audio_patch / per_video_frame).astype(np.float32)


def joint_rope_angles(*, audio_tokens, text_tokens, video_grid, video_patch, audio_patch,
                      per_video_frame, head_dim, theta):
  """Angles for the joint sequence [audio ; text_a ; text_v ; video] (L, head_dim//2)."""
  vt, vh, vw = video_positions(video_grid, video_patch)
  at = audio_time_positions(audio_tokens, audio_patch, per_video_frame)
  zeros_a = np.zeros_like(at)
  zeros_t = np.zeros((2 * text_tokens,), np.float32)
  pos_t = np.concatenate([at, zeros_t, vt])
  pos_h = np.concatenate([zeros_a, zeros_t, vh])
  pos_w = np.concatenate([zeros_a, zeros_t, vw])
  return rope_angles(jnp.asarray(pos_t), jnp.asarray(pos_h), jnp.asarray(pos_w), head_dim, theta)


def apply_rope(x, angles):
  """x (B, L, H, D), angles (L, D//2): rotates channel pairs (2i, 2i+1)."""
  dtype = x.dtype
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x0, x1 = xf[..., 0], xf[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x.shape).astype(dtype)
