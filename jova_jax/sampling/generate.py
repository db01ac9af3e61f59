"""Prompts -> conditions (text encoder, codecs, given media) -> latents (sampler.py) -> mp4 /
wav / json files, in batches (multi-host: each process writes its own rows)."""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np

from jova_jax import codecs, files
from jova_jax.data import latent_norm
from jova_jax.errors import UserError
from jova_jax.media import io as media
from jova_jax.sampling.loading import text_encoder_for
from jova_jax.sampling.prompts import Prompt, PromptError
from jova_jax.sampling.sampler import LatentSampler, Settings, text_conditions

@dataclasses.dataclass
class Media:
  """What a prompt gives besides text, at the model's size, plus its latents."""
  frames: np.ndarray | None = None       # given video (T,H,W,3) uint8
  wave: np.ndarray | None = None         # given audio (S,) float32
  first_frame: np.ndarray | None = None  # I2V latent (H',W',Cv)
  video_latent: np.ndarray | None = None  # latents in model space (normalised, as in training)
  audio_latent: np.ndarray | None = None


class Pipeline:
  """Prompts -> conditions (text encoder, codecs) -> latents -> mp4 / wav / json files.
  Latents are normalised after encoding and denormalised before decoding with the run's
  statistics (data/latent_norm.py: data.latent_norm of the checkpoint's config)."""

  def __init__(self, sampler: LatentSampler, text_encoder=None):
    self.sampler = sampler
    config = sampler.config
    self.config = config
    self.text_encoder = text_encoder if text_encoder is not None else text_encoder_for(config)
    self.video_codec = codecs.get_video_codec(config)
    self.audio_codec = codecs.get_audio_codec(config)
    self.norm = latent_norm.of_run(config)
    self.shapes = sampler.shapes

  def media(self, prompt: Prompt) -> Media:
    """Reads and encodes the prompt's files; raises PromptError naming its line."""
    v, a = self.config.video, self.config.audio
    out = Media()
    try:
      if prompt.image:
        image = media.read_image(prompt.image, v.height, v.width)
        out.first_frame = self._encode_video(image[None])[0]
      if prompt.video:
        out.frames = media.read_video(prompt.video, v.fps, v.frames, v.height, v.width)
        out.video_latent = self._encode_video(out.frames)
      if prompt.audio:
        out.wave = media.read_audio(prompt.audio, a.sample_rate, self.shapes.num_samples)
        out.audio_latent = np.asarray(
            self.norm.audio.normalize(self.audio_codec.encode(out.wave[None])[0]))
    except media.MediaError as e:
      raise PromptError(f"line {prompt.line}: {e}") from e
    return out

  def _encode_video(self, frames: np.ndarray) -> np.ndarray:
    """(T,H,W,3) uint8 -> model-space latents (T',H',W',Cv)."""
    return np.asarray(self.norm.video.normalize(self.video_codec.encode(frames[None])[0]))

  def conditions(self, prompts: list[Prompt], given: list[Media]) -> dict:
    """Numpy batch of the model's conditions (keys: text, text_mask, first_frame,
    use_first_frame, given_video, given_audio, clean_video, clean_audio)."""
    emb, mask = self.text_encoder.encode([p.text for p in prompts],
                                         max_length=int(self.config.text.max_length))
    emb = np.where(mask[..., None], emb, 0.0).astype(np.float32)  # zero padding, as in training
    cond = text_conditions(emb, mask, self.shapes)
    for i, m in enumerate(given):
      if m.first_frame is not None:
        cond["first_frame"][i], cond["use_first_frame"][i] = m.first_frame, True
      if m.video_latent is not None:
        cond["clean_video"][i], cond["given_video"][i] = m.video_latent, True
      if m.audio_latent is not None:
        cond["clean_audio"][i], cond["given_audio"][i] = m.audio_latent, True
    return cond

  def write(self, outdir: str, prompt: Prompt, given: Media, video_latent, audio_latent,
            settings: Settings, timings: dict) -> dict:
    """Decodes one sample (a given modality is written as it was given) and writes
    <name>.mp4, <name>.wav and <name>.json; returns the json record."""
    start = time.perf_counter()
    v, a = self.config.video, self.config.audio
    frames = given.frames if given.frames is not None else \
        self.video_codec.decode(self.norm.video.denormalize(video_latent[None]))[0]
    wave = given.wave if given.wave is not None else \
        self.audio_codec.decode(self.norm.audio.denormalize(audio_latent[None]))[0]
    wave = media.fit_length(wave, self.shapes.num_samples)
    stem = os.path.join(outdir, prompt.name)
    media.write_wav(stem + ".wav", wave, a.sample_rate)
    media.write_mp4(stem + ".mp4", frames, v.fps, wave, a.sample_rate)
    record = {"line": prompt.line, "name": prompt.name, "prompt": prompt.text, "seed": prompt.seed,
              "image": prompt.image, "audio": prompt.audio, "video": prompt.video,
              "settings": dataclasses.asdict(settings),
              "frames": int(frames.shape[0]), "fps": float(v.fps),
              "height": int(frames.shape[1]), "width": int(frames.shape[2]),
              "sample_rate": int(a.sample_rate), "seconds": wave.size / a.sample_rate,
              "timings": dict(timings, decode_write_s=time.perf_counter() - start)}
    files.write_text(stem + ".json", json.dumps(record, indent=1))
    return record


def check_outdir(outdir: str) -> None:
  """Creates the output folder, or refuses one that is a file or not writable."""
  if os.path.exists(outdir) and not os.path.isdir(outdir):
    raise UserError(f"--outdir={outdir}: expected a folder, found a file")
  os.makedirs(outdir, exist_ok=True)
  if not os.access(outdir, os.W_OK):
    raise UserError(f"--outdir={outdir}: expected a writable folder, found no write permission")


def run(pipeline: Pipeline, prompts: list[Prompt], outdir: str, settings: Settings,
        batch_size: int, log=print) -> tuple[list[dict], list[str]]:
  """Samples every prompt in batches of batch_size (the last padded by repeating a prompt);
  a prompt whose files cannot be read or written is reported and skipped. Returns
  (records, errors). In a multi-host job every process reads every prompt and runs the same
  global batches, and writes (and returns) only the prompts of its own batch rows
  (LatentSampler.own_rows): each prompt once in the job; read errors come from process 0."""
  import tqdm
  check_outdir(outdir)
  ready, errors = [], []
  for prompt in prompts:
    start = time.perf_counter()
    try:
      ready.append((prompt, pipeline.media(prompt), time.perf_counter() - start))
    except PromptError as e:
      errors.append(str(e))
  if jax.process_index():
    errors = []  # the same on every process: process 0 reports them
  own = set(pipeline.sampler.own_rows(batch_size))
  records = []
  bar = tqdm.tqdm(total=len(ready) * settings.steps, unit="step", desc="sampling")
  for first in range(0, len(ready), batch_size):
    chunk = ready[first:first + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    start = time.perf_counter()
    cond = pipeline.conditions([p for p, _, _ in padded], [m for _, m, _ in padded])
    encode_s = time.perf_counter() - start
    video, audio, step_times = pipeline.sampler.sample(
        cond, [p.seed for p, _, _ in padded], settings,
        progress=lambda done, total, n=len(chunk): bar.update(n))
    for i, (prompt, given, media_s) in enumerate(chunk):
      if i not in own:
        continue
      timings = {"read_media_s": media_s, "encode_text_s": encode_s, "ode_s": sum(step_times),
                 "ode_step_s": step_times, "batch_size": batch_size, "batch_prompts": len(chunk)}
      try:
        records.append(pipeline.write(outdir, prompt, given, video[i], audio[i], settings,
                                      timings))
      except (media.MediaError, OSError) as e:  # a full disk, a bad name: the others go on
        errors.append(f"line {prompt.line}: writing {prompt.name}: {e}")
  bar.close()
  for e in errors:
    log(f"skipped: {e}")
  return records, errors
