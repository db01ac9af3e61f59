"""End to end: the trainer learns and the sampler finds what it learned.

A small model is overfit on two real clips that share one prompt (the astronaut face and its
mirror image, each with its own speech-like audio), then sampled from that prompt. Since the
prompt cannot say which clip, only the noise can: the ODE must carry each seed from noise to
one of the two clips, which it does only when the sampler walks the sigmas the model was
trained on to sigma 0 and reads the model's output as what it is. A sample left short of a clip
(a schedule that stops early) or off both (a wrong output conversion) fails the PSNR bound; the
test also breaks the sampler on purpose, both ways, and checks that the bound then fails.
"""
import dataclasses

import numpy as np
import pytest
import skimage.data

from jova_jax import codecs, config_lib, flow
from jova_jax.data import features
from jova_jax.sampling import loading, sampler as sampler_lib, solvers
from jova_jax.training import loop
from tests.conftest import load

# Measured on 2 CPU cores: 26-29 dB for the trained model, 6-18 dB for the broken samplers.
MIN_PSNR_DB = 22.0
SEEDS = np.arange(8, dtype=np.uint32)  # one per fake device


def _clip_frames(config, mirrored: bool) -> np.ndarray:
  """(T, H, W, 3) uint8: the astronaut's face, drifting one pixel per frame."""
  import cv2
  face = skimage.data.astronaut()[20:220, 140:340]
  if mirrored:
    face = face[:, ::-1]
  v = config.video
  big = cv2.resize(np.ascontiguousarray(face), (v.width + v.frames, v.height + v.frames),
                   interpolation=cv2.INTER_AREA)
  return np.stack([big[t:t + v.height, t:t + v.width] for t in range(v.frames)])


def _clip_wave(config, pitch_hz: float) -> np.ndarray:
  """Speech-like audio: a tone in syllable-rate bursts."""
  n = config_lib.audio_num_samples(config)
  t = np.arange(n) / config.audio.sample_rate
  return (0.3 * np.sin(2 * np.pi * pitch_hz * t) * (np.sin(2 * np.pi * 4.0 * t) > 0)
          ).astype(np.float32)


def _examples(config):
  video_codec, audio_codec = codecs.get_video_codec(config), codecs.get_audio_codec(config)
  shapes = config_lib.latent_shapes(config)
  text = np.random.default_rng(0).normal(size=(4, config.text.width)).astype(np.float32)
  out = []
  for i, (mirrored, pitch) in enumerate(((False, 220.0), (True, 520.0))):
    out.append(dict(
        video_latent=np.asarray(video_codec.encode(_clip_frames(config, mirrored)[None]))[0],
        audio_latent=np.asarray(audio_codec.encode(_clip_wave(config, pitch)[None]))[0],
        mouth_mask=np.zeros(shapes.video[:3], np.uint8), text_emb=text,
        caption="<Video Caption>: the astronaut", clip_id=f"clip{i}", face_frac=np.float32(1)))
  return out


def _psnr(a, b) -> float:
  mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
  return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
  config = load("tiny")
  config.flow.update(prediction="x0", shift=3.0, p_clean_audio=0.0, p_clean_video=0.0)
  config.data.update(p_uncond=0.0, p_i2v=0.0, read_threads=1)
  config.train.update(steps=500, lr=2e-3, warmup_steps=20, ema_decay=0.98, log_every=100)
  config.checkpoint.update(every_steps=500)
  config.sample.update(steps=8, video_guidance=1.0, audio_guidance=1.0)
  examples = _examples(config)
  directory = tmp_path_factory.mktemp("two_clips")
  features.write_dataset(str(directory / "ds"), config, {"train": examples, "eval": examples})
  config.data.dir = str(directory / "ds")
  workdir = str(directory / "run")
  loop.train(config, workdir)
  return workdir, examples


def _sample(workdir, examples, **settings_overrides):
  """Decoded frames (S, T, H, W, 3) for SEEDS from the shared prompt, and the two clips'."""
  config, mesh, graphdef, params = loading.load_run(workdir)
  shapes = config_lib.latent_shapes(config)
  text = np.zeros((len(SEEDS), shapes.text_tokens, config.text.width), np.float32)
  emb = examples[0]["text_emb"]
  text[:, :len(emb)] = emb
  mask = np.repeat((np.arange(shapes.text_tokens) < len(emb))[None], len(SEEDS), axis=0)
  cond = sampler_lib.text_conditions(text, mask, shapes)
  settings = dataclasses.replace(sampler_lib.Settings.from_config(config), **settings_overrides)
  video, _, _ = sampler_lib.LatentSampler(config, mesh, graphdef, params).sample(cond, SEEDS, settings)
  codec = codecs.get_video_codec(config)
  clips = codec.decode(np.stack([e["video_latent"] for e in examples]))
  return codec.decode(video), clips


def _nearest_psnr(samples, clips) -> list[float]:
  return [max(_psnr(s, c) for c in clips) for s in samples]


@pytest.mark.slow
@pytest.mark.xdist_group("overfit_run")  # one worker trains the shared fixture once
def test_overfit_model_samples_its_clips(overfit_run):
  workdir, examples = overfit_run
  samples, clips = _sample(workdir, examples)
  psnr = _nearest_psnr(samples, clips)
  print("overfit samples, PSNR to the nearest training clip (dB):", np.round(psnr, 1))
  assert min(psnr) >= MIN_PSNR_DB, psnr


@pytest.mark.slow
@pytest.mark.xdist_group("overfit_run")
def test_a_broken_sampler_fails_the_same_bound(overfit_run, monkeypatch):
  """The bound above is not loose: a sampler that reads the x0 output as a velocity, or whose
  ODE stops one step short of sigma 0, misses the clips by far. (A model fed other sigmas than
  the solver's still lands on a clip: one that memorised two clips barely needs to be told
  the noise level, so that mistake is left to tests/test_sample.py's reference loop.)"""
  workdir, examples = overfit_run
  with monkeypatch.context() as m:
    m.setattr(flow, "data_prediction", lambda out, x, s, cfg: flow.denoised(x, out, s))
    wrong_output = _nearest_psnr(*_sample(workdir, examples))
  real_plan = solvers.solver_plan
  with monkeypatch.context() as m:
    m.setattr(solvers, "solver_plan", lambda *a: _without_last_step(real_plan(*a)))
    short_schedule = _nearest_psnr(*_sample(workdir, examples))
  print("broken samplers, PSNR (dB): output read as velocity", np.round(wrong_output, 1),
        "| one step short of sigma 0", np.round(short_schedule, 1))
  assert max(wrong_output) < MIN_PSNR_DB
  assert max(short_schedule) < MIN_PSNR_DB


def _without_last_step(plan):
  return dataclasses.replace(plan, sigmas=plan.sigmas[:-1], predictor=plan.predictor[:-1],
                             corrector=plan.corrector[:-1])
