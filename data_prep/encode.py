"""Latents and text embeddings for batches of prepared clips (main process, JAX).

Batches are padded to a fixed size so each codec compiles once per shape, and placed with their
batch axis split over all of this host's devices: the jitted encoders follow that sharding, so
one prepare process per accelerator host keeps every local chip busy (docs/scaling.md).
"""
from __future__ import annotations

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from jova_jax import codecs, config_lib, text
from jova_jax.data.features import DatasetError

CLIPS_AXIS = "clips"


def batch_sharding(devices) -> NamedSharding:
  """Splits axis 0 (clips) over `devices`, replicating the rest."""
  return NamedSharding(jax.sharding.Mesh(np.array(devices), (CLIPS_AXIS,)), P(CLIPS_AXIS))


def _pad_batch(arrays: list[np.ndarray], size: int) -> np.ndarray:
  """Stacks and repeats the last item up to `size` rows (the padding rows are dropped later)."""
  return np.stack(arrays + [arrays[-1]] * (size - len(arrays)))


class Encoders:
  """The config's codecs and text encoder (their getters refuse one that disagrees with the
  config); every batch's latent shapes are checked against config_lib.latent_shapes."""

  def __init__(self, config, batch_size: int, devices=None):
    self.video = codecs.get_video_codec(config)  # weights from config.weights_dir
    self.audio = codecs.get_audio_codec(config)
    self.text = text.get_text_encoder(config)
    devices = list(devices or jax.local_devices())
    # Every device gets the same number of clips per call: round the batch up.
    self.batch_size = -(-batch_size // len(devices)) * len(devices)
    if self.batch_size != batch_size:
      logging.info("encoder batch %d rounded up to %d: a multiple of the %d local devices",
                   batch_size, self.batch_size, len(devices))
    self.sharding = batch_sharding(devices)
    self.max_length = int(config.text.max_length)
    self.shapes = config_lib.latent_shapes(config)

  def metadata(self) -> dict:
    """The codec and encoder descriptions stored in the dataset metadata."""
    return {"video_codec": {"name": self.video.name, "config": self.video.config()},
            "audio_codec": {"name": self.audio.name, "config": self.audio.config()},
            "text_encoder": {"name": self.text.name, "width": int(self.text.width)}}

  def _check(self, what: str, found: tuple, want: tuple) -> None:
    if tuple(found) != tuple(want):
      raise DatasetError(f"{what} has shape {tuple(found)} but the config implies {tuple(want)} "
                         f"(config_lib.latent_shapes)")

  def media(self, frames: list[np.ndarray], audio: list[np.ndarray], masks: list[np.ndarray]):
    """-> video latents (n,T',H',W',Cv), audio latents (n,La,Ca), latent mouth masks (n,T',H',W')."""
    n = len(frames)
    video = np.asarray(self.encode_video(frames))[:n]
    wave = np.asarray(self.encode_audio(audio))[:n]
    mouth = np.stack([self.video.pixel_mask_to_latent(m) for m in masks])
    self._check("video latent", video.shape[1:], self.shapes.video)
    self._check("audio latent", wave.shape[1:], self.shapes.audio)
    self._check("latent mouth mask", mouth.shape[1:], self.shapes.video[:3])
    return video, wave, mouth.astype(np.uint8)

  def encode_video(self, frames: list[np.ndarray]) -> jax.Array:
    """Latents of a padded batch, sharded over the local devices."""
    return self.video.encode(jax.device_put(_pad_batch(frames, self.batch_size), self.sharding))

  def encode_audio(self, waves: list[np.ndarray]) -> jax.Array:
    return self.audio.encode(jax.device_put(_pad_batch(waves, self.batch_size), self.sharding))

  def prompts(self, prompts: list[str]) -> list[np.ndarray]:
    """Unpadded embeddings: for each prompt only the rows where the encoder's mask is True."""
    n = len(prompts)
    padded = prompts + [prompts[-1]] * (self.batch_size - n)
    emb, mask = self.text.encode(padded, max_length=self.max_length, sharding=self.sharding)
    mask = np.asarray(mask, bool)
    return [emb[i][mask[i]] for i in range(n)]
