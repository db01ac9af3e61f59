"""Flow matching (DESIGN 1): sigma in [0, 1], sigma = 1 is pure noise.

x_s = (1 - s) * x0 + s * eps, and the model predicts the velocity v = eps - x0, so
dx/ds = v and integrating from s = 1 to 0 takes noise to data.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def shift_sigma(s, shift: float):
  """s' = shift*s / (1 + (shift-1)*s): shift > 1 spends more time at high noise."""
  return shift * s / (1.0 + (shift - 1.0) * s)


def sample_sigma(key, shape, flow_cfg):
  """Training sigmas from the configured density, then shifted."""
  density = flow_cfg.density
  if density == "logit_normal":
    s = jax.nn.sigmoid(flow_cfg.logit_mean + flow_cfg.logit_std * jax.random.normal(key, shape))
  elif density == "uniform":
    s = jax.random.uniform(key, shape)
  elif density == "mode":
    # SD3's mode sampling: density peaked at 0.5 (mode_scale > 0) with heavier tails than uniform.
    u = jax.random.uniform(key, shape)
    s = 1.0 - u - flow_cfg.mode_scale * (jnp.cos(jnp.pi / 2 * u) ** 2 - 1.0 + u)
  else:
    raise ValueError(f"flow.density={density!r}: expected 'logit_normal', 'uniform' or 'mode'")
  return shift_sigma(jnp.clip(s, 0.0, 1.0), flow_cfg.shift)


def sample_modality_sigmas(key, batch: int, flow_cfg):
  """(sigma_video, sigma_audio), (B,) each: one shared sigma per example; with probability
  p_clean_audio the audio is kept clean (sigma 0, an audio-to-video example), with
  p_clean_video the video is (video-to-audio). The two never both happen."""
  k_sigma, k_mode = jax.random.split(key)
  sigma = sample_sigma(k_sigma, (batch,), flow_cfg)
  u = jax.random.uniform(k_mode, (batch,))
  clean_audio = u < flow_cfg.p_clean_audio
  clean_video = (u >= flow_cfg.p_clean_audio) & (u < flow_cfg.p_clean_audio + flow_cfg.p_clean_video)
  return jnp.where(clean_video, 0.0, sigma), jnp.where(clean_audio, 0.0, sigma)


def _bcast(sigma, x):
  return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def add_noise(x0, eps, sigma):
  """x_s = (1 - s) x0 + s eps, sigma (B,) broadcast over the rest."""
  s = _bcast(sigma, x0).astype(x0.dtype)
  return (1.0 - s) * x0 + s * eps


def velocity_target(x0, eps):
  return eps - x0


def denoised(x_s, v, sigma):
  """x0 estimate from a velocity: x0 = x_s - s * v."""
  return x_s - _bcast(sigma, x_s) * v
