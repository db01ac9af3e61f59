"""Training's side of flow matching (jova_jax/flow.py): sigmas from the configured density
(with clean-modality examples), noising, and the (predicted, target) velocities of the loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jova_jax.flow import data_prediction, per_example, prediction_of, shift_sigma


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


def add_noise(x0, eps, sigma):
  """x_s = (1 - s) x0 + s eps, sigma (B,) broadcast over the rest."""
  s = per_example(sigma, x0).astype(x0.dtype)
  return (1.0 - s) * x0 + s * eps


def velocity_target(x0, eps):
  return eps - x0


def loss_pair(output, x_s, x0, eps, sigma, flow_cfg):
  """(predicted, target) velocities for the loss from the network's output (module doc)."""
  if prediction_of(flow_cfg) == "velocity":
    return output, velocity_target(x0, eps)
  d = data_prediction(output, x_s, sigma, flow_cfg)
  s = jnp.maximum(per_example(sigma, x_s), float(flow_cfg.x0_min_sigma)).astype(x_s.dtype)
  return (x_s - d) / s, (x_s - x0) / s
