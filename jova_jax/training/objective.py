"""The training objective of one batch: sigmas and noise, the model's outputs, the loss.

Shared by the train step, the fixed-sigma evaluation, the benchmarks and the tests, so that all
of them measure the same thing. `batch` holds the keys of jova_jax.data.pipeline: video, audio,
mouth_mask, text, text_mask, drop_text, use_first_frame.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jova_jax.model import lora
from jova_jax.model.sharded import apply
from jova_jax.training import losses, noising

_DROPOUT_SALT = 0x10AA


def noisy_inputs(batch, key, sigma_video, sigma_audio):
  """Noise both modalities; returns (x_video, x_audio, eps_video, eps_audio)."""
  k_v, k_a = jax.random.split(key)
  eps_v = jax.random.normal(k_v, batch["video"].shape, jnp.float32)
  eps_a = jax.random.normal(k_a, batch["audio"].shape, jnp.float32)
  x_v = noising.add_noise(batch["video"], eps_v, sigma_video)
  x_a = noising.add_noise(batch["audio"], eps_a, sigma_audio)
  return x_v, x_a, eps_v, eps_a


def loss_at(graphdef, params, batch, key, sigma_video, sigma_audio, config):
  """Loss with given per-example sigmas (B,); a modality at sigma 0 is input only."""
  x_v, x_a, eps_v, eps_a = noisy_inputs(batch, key, sigma_video, sigma_audio)
  out_v, out_a = apply(
      graphdef, params, x_v, x_a, batch["text"], batch["text_mask"], sigma_video, sigma_audio,
      first_frame=batch["video"][:, 0], use_first_frame=batch.get("use_first_frame"),
      drop_text=batch.get("drop_text"))
  v_pred, t_v = noising.loss_pair(out_v, x_v, batch["video"], eps_v, sigma_video, config.flow)
  a_pred, t_a = noising.loss_pair(out_a, x_a, batch["audio"], eps_a, sigma_audio, config.flow)
  return losses.flow_matching_loss(
      v_pred, t_v, a_pred, t_a, batch["mouth_mask"], lambda_mouth=config.loss.lambda_mouth,
      lambda_audio=config.loss.lambda_audio, video_on=sigma_video > 0, audio_on=sigma_audio > 0)


def training_loss(graphdef, params, batch, key, config):
  """Sigmas from the configured density (with clean-modality examples), then loss_at."""
  k_sigma, k_noise = jax.random.split(key)
  sigma_v, sigma_a = noising.sample_modality_sigmas(k_sigma, batch["video"].shape[0], config.flow)
  # LoRA dropout (training only) from a key apart from the split above, which plain runs share.
  lora_cfg = config.model.get("lora")
  drop = lora.enabled(lora_cfg) and float(lora_cfg.dropout) > 0
  with lora.dropout_scope(jax.random.fold_in(key, _DROPOUT_SALT) if drop else None):
    return loss_at(graphdef, params, batch, k_noise, sigma_v, sigma_a, config)
