"""Samples while training (eval.sample_every_steps): a user watches the model learn instead of
reading losses.

The prompts are fixed for the whole run: the first eval.sample_prompts held-out examples, each
sampled twice, image-to-video (its first frame given) and text-only, with their stored text
embeddings (no text encoder in the trainer). Every preview samples them with the EMA weights
and the config's sampler settings and writes <workdir>/samples/<step>/: one mp4 per sample and
contact_sheet.png (frames, mel spectrogram, the held-out clip under each sample); TensorBoard
gets the sheet as an image and each sample's audio. Examples come through the training pipeline
(model-space latents); outputs and references are denormalised with the dataset's statistics
before the codecs decode them (data/latent_norm.py).
"""
from __future__ import annotations

import os
import time

import numpy as np
from absl import logging

from jova_jax import codecs
from jova_jax.data import pipeline
from jova_jax.eval import contact_sheet
from jova_jax.media import io as media
from jova_jax.sampling import sampler as sampler_lib


def _preview_split(config) -> str:
  """The held-out split, or the training split when the dataset keeps none."""
  return config.data.eval_split if config.data.eval_split else config.data.train_split


class TrainingPreview:
  """Fixed prompts, sampled on demand with the params given; process 0 writes the files."""

  def __init__(self, config, program, workdir: str, tensorboard=None):
    """program: the run's training/state.Program (mesh, graphdef, spec, batch sharding)."""
    self.config, self.workdir, self.tensorboard = config, workdir, tensorboard
    self.settings = sampler_lib.Settings.from_config(
        config, steps=config.eval.get("sample_steps") or None)
    self.sampler = sampler_lib.LatentSampler(config, program.mesh, program.graphdef, params=None,
                                             shapes=program.spec.shapes)
    self.video_codec = codecs.get_video_codec(config)
    self.audio_codec = codecs.get_audio_codec(config)
    self.shapes = program.spec.shapes
    source = pipeline.open_source(config, _preview_split(config), self.shapes)
    self.norm = source.latent_norm
    count = min(int(config.eval.sample_prompts), len(source))
    examples = [pipeline.decode(i, source[i], spec=program.batch_spec, norm=self.norm)
                for i in range(count)]
    self.names = [f"i2v_{i}" for i in range(count)] + [f"text_{i}" for i in range(count)]
    self.references = [self.video_codec.decode(self.norm.video.denormalize(e["video"][None]))[0]
                       for e in examples] * 2
    self.cond = self._conditions(examples)
    self.seeds = np.arange(len(self.names), dtype=np.uint32) + int(config.train.seed)

  def _conditions(self, examples) -> dict:
    """I2V rows first, then the same prompts text-only."""
    rows = examples + examples
    cond = sampler_lib.text_conditions(np.stack([e["text"] for e in rows]),
                                       np.stack([e["text_mask"] for e in rows]), self.shapes)
    cond["first_frame"] = np.stack([e["video"][0] for e in rows])
    cond["use_first_frame"] = np.arange(len(rows)) < len(examples)
    return cond

  def _padded(self, array: np.ndarray) -> np.ndarray:
    extra = -len(array) % self.sampler.batch_shards
    return np.concatenate([array, np.repeat(array[-1:], extra, axis=0)]) if extra else array

  def __call__(self, step: int, params) -> str | None:
    """Samples every prompt with params; returns the contact sheet's path (process 0)."""
    import jax
    start = time.perf_counter()
    self.sampler.params = params
    cond = {k: self._padded(v) for k, v in self.cond.items()}
    video, audio, _ = self.sampler.sample(cond, self._padded(self.seeds), self.settings)
    if jax.process_index() != 0:
      return None
    outdir = os.path.join(self.workdir, "samples", str(step))
    os.makedirs(outdir, exist_ok=True)
    frames = self.video_codec.decode(self.norm.video.denormalize(video[:len(self.names)]))
    waves = self.audio_codec.decode(self.norm.audio.denormalize(audio[:len(self.names)]))
    v, a = self.config.video, self.config.audio
    entries = []
    for name, clip, wave, reference in zip(self.names, frames, waves, self.references):
      wave = media.fit_length(np.asarray(wave), self.shapes.num_samples)
      media.write_mp4(os.path.join(outdir, f"{name}.mp4"), clip, v.fps, wave, a.sample_rate)
      entries.append(contact_sheet.SheetEntry(name, clip, wave, a.sample_rate, reference))
      if self.tensorboard is not None:
        self.tensorboard.add_audio(f"samples/{name}", np.clip(wave, -1.0, 1.0), step,
                                   sample_rate=int(a.sample_rate))
    sheet_path = os.path.join(outdir, "contact_sheet.png")
    sheet = contact_sheet.write(sheet_path, entries)
    if self.tensorboard is not None:
      self.tensorboard.add_image("samples/contact_sheet", sheet, step, dataformats="HWC")
    logging.info("samples at step %d: %d videos in %.1f s -> %s", step, len(entries),
                 time.perf_counter() - start, sheet_path)
    return sheet_path
