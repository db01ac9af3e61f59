"""Weighted flow-matching loss (docs/design.md section 1).

video: mean over valid elements of w * (v_pred - v)^2 with w = 1 + lambda_mouth * mouth_mask
audio: mean over valid elements of (v_pred - v)^2, weighted by lambda_audio in the total.
Means divide by the count of valid elements (not by the weight sum), so lambda_mouth = 0 is
plain MSE. A modality held clean (sigma = 0) is an input, not a target: callers pass
video_on / audio_on (B,) to leave it out.
"""
from __future__ import annotations

import jax.numpy as jnp


def _expand(mask, like):
  return mask.reshape(mask.shape + (1,) * (like.ndim - mask.ndim)).astype(jnp.float32)


def _safe_div(a, b):
  return a / jnp.maximum(b, 1.0)


def flow_matching_loss(pred_video, target_video, pred_audio, target_audio, mouth_mask, *,
                       lambda_mouth: float, lambda_audio: float, video_on=None, audio_on=None,
                       audio_valid=None):
  """pred/target video (B,T,H,W,C), audio (B,La,Ca); mouth_mask (B,T,H,W) in {0,1};
  video_on / audio_on (B,) bool; audio_valid (B,La) bool. Returns (loss, metrics)."""
  b = pred_video.shape[0]
  video_on = jnp.ones((b,), bool) if video_on is None else video_on
  audio_on = jnp.ones((b,), bool) if audio_on is None else audio_on
  err_v = jnp.square(pred_video.astype(jnp.float32) - target_video.astype(jnp.float32))
  err_a = jnp.square(pred_audio.astype(jnp.float32) - target_audio.astype(jnp.float32))

  valid_v = jnp.broadcast_to(_expand(video_on, err_v), err_v.shape)
  valid_a = _expand(audio_on, err_a)
  if audio_valid is not None:
    valid_a = valid_a * _expand(audio_valid, err_a)
  valid_a = jnp.broadcast_to(valid_a, err_a.shape)
  mouth = jnp.broadcast_to(_expand(mouth_mask, err_v), err_v.shape) * valid_v

  weight_v = 1.0 + lambda_mouth * mouth
  loss_video = _safe_div(jnp.sum(weight_v * err_v * valid_v), jnp.sum(valid_v))
  loss_audio = _safe_div(jnp.sum(err_a * valid_a), jnp.sum(valid_a))
  loss = loss_video + lambda_audio * loss_audio
  metrics = {
      "loss": loss,
      "loss_video": loss_video,
      "loss_audio": loss_audio,
      "loss_mouth": _safe_div(jnp.sum(err_v * mouth), jnp.sum(mouth)),
      "loss_video_mse": _safe_div(jnp.sum(err_v * valid_v), jnp.sum(valid_v)),
  }
  return loss, metrics
