"""The batched sampler (jova_jax/sampling/, jova_jax/sample.py) on the tiny config and 8 fake
CPU devices, from a checkpoint of a random-init train state in the trainer's layout."""
import json
import os
import subprocess
import sys

import cv2
import jax
import ml_collections
import numpy as np
import pytest

from jova_jax import cli, config_lib, files
from jova_jax.media import io as media
from jova_jax.model import sharded
from jova_jax.parallel import mesh as mesh_lib
from jova_jax.sampling import generate, loading, prompts as prompt_lib, sampler as sampler_lib
from jova_jax.training import checkpoint
from tests.conftest import REPO, load

CAPTIONS = {"video_caption": "A woman talks to the camera.",
            "audio_caption": "A calm female voice.", "transcript": "Hello there."}


def _tiny():
  config = load("tiny")
  config.mesh.update(dict(data=2, fsdp=2, context=1, tensor=2))
  config.sample.update(steps=3, solver="unipc", shift=3.0, video_guidance=3.0,
                       audio_guidance=2.0)
  return config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A workdir whose checkpoint holds params and a different EMA (params + 0.01)."""
  config = _tiny()
  mesh = mesh_lib.make_mesh(config)
  params = sharded.init_params(config, mesh, seed=0)
  # Zero-initialised output layers would make every velocity 0: give them values.
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda p: jax.device_put(
      np.asarray(p) + 0.02 * rng.standard_normal(p.shape).astype(p.dtype), p.sharding), params)
  ema = jax.tree.map(lambda p: jax.device_put(np.asarray(p) + 0.01, p.sharding), params)
  state = {"params": params, "opt_state": {"count": np.int32(0)}, "ema": ema,
           "step": np.int32(4), "nonfinite": np.int32(0)}
  workdir = tmp_path_factory.mktemp("run")
  with checkpoint.Checkpointer(workdir / "checkpoints", every_steps=1, keep=1,
                               async_save=False) as ckpt:
    ckpt.save(4, state, data_state={}, config=config, force=True)
  return str(workdir), params, ema


@pytest.fixture(scope="module")
def pipeline(run_dir):
  config, mesh, graphdef, params = loading.load_run(run_dir[0])
  return generate.Pipeline(sampler_lib.LatentSampler(config, mesh, graphdef, params))


def _prompts(config, records, tmp_path):
  path = tmp_path / "prompts.jsonl"
  path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
  return prompt_lib.read_prompts(str(path), default_seed=0, config=config)


def _settings(config, **kw):
  return sampler_lib.Settings.from_config(config, **kw)


def test_load_run_reads_ema_onto_the_mesh(run_dir, pipeline):
  _, params, ema = run_dir
  loaded = pipeline.sampler.params
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding == want.sharding
  _, _, _, raw = loading.load_run(run_dir[0], subtree="params")
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(raw)[0]),
                                np.asarray(jax.tree.leaves(params)[0]))


def test_missing_checkpoint_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
    loading.load_run(str(tmp_path / "nope"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    loading.load_run(str(tmp_path / "empty"))


def test_prompt_lines(tmp_path):
  config = _tiny()
  prompts, errors = _prompts(config, [
      CAPTIONS,
      {"prompt": "<Video Caption>: x <Audio Caption>: y <Transcript>: z", "seed": 7},
      "{not json",
      {"video_caption": "only one"},
      dict(CAPTIONS, frames=33),
      dict(CAPTIONS, colour="red"),
      dict(CAPTIONS, audio="a.wav", video="v.mp4"),
  ], tmp_path)
  assert [p.line for p in prompts] == [1, 2]
  assert prompts[0].seed == 0 and prompts[1].seed == 7
  from jova_jax.text.base import structured_prompt
  assert prompts[0].text == structured_prompt(CAPTIONS)
  where = str(tmp_path / "prompts.jsonl")
  assert [e.split(": ")[0] for e in errors] == [f"{where}:{n}" for n in (3, 4, 5, 6, 7)]
  assert "not valid JSON" in errors[0]
  assert "missing ['audio_caption', 'transcript']" in errors[1]
  assert "frames=33" in errors[2] and "5 frames of 16x16" in errors[2]
  assert "unknown keys ['colour']" in errors[3]
  assert "nothing left to generate" in errors[4]


def _cond(pipeline, prompts, given=None):
  return pipeline.conditions(prompts, given or [generate.Media() for _ in prompts])


def test_same_seed_same_latents_in_any_batch_position(pipeline, tmp_path):
  config = pipeline.config
  prompts, _ = _prompts(config, [dict(CAPTIONS, seed=5), dict(CAPTIONS, seed=6)], tmp_path)
  settings = _settings(config)
  batch = [prompts[0], prompts[1], prompts[1], prompts[0]]
  v1, a1, _ = pipeline.sampler.sample(_cond(pipeline, batch), [5, 6, 6, 5], settings)
  v2, a2, _ = pipeline.sampler.sample(_cond(pipeline, batch), [5, 6, 6, 5], settings)
  np.testing.assert_array_equal(v1, v2)
  np.testing.assert_array_equal(a1, a2)
  np.testing.assert_allclose(v1[0], v1[3], atol=1e-5)  # same prompt and seed, another row
  assert np.abs(v1[0] - v1[1]).max() > 0.1  # another seed
  assert np.all(np.isfinite(v1)) and np.all(np.isfinite(a1))


def _reference(pipeline, cond, seeds, settings, drop_uncond_rows, prediction="velocity"):
  """An independent loop: euler written out with two separate model calls per step; an 'x0'
  model's output D gives the velocity (x - D) / sigma."""
  from jova_jax.sampling import solvers
  sampler = pipeline.sampler
  shapes = sampler.shapes
  xs = []
  for seed in seeds:
    kv, ka = jax.random.split(jax.random.key(seed))
    xs.append((jax.random.normal(kv, shapes.video), jax.random.normal(ka, shapes.audio)))
  x_video = np.stack([x[0] for x in xs])
  x_audio = np.stack([x[1] for x in xs])
  x_audio = np.where(cond["given_audio"][:, None, None], cond["clean_audio"], x_audio)
  sigmas = solvers.timesteps(settings.steps, settings.shift)
  b = len(seeds)
  with jax.set_mesh(sampler.mesh):
    def model(xv, xa, s, drop):
      sv = np.where(cond["given_video"], 0.0, s).astype(np.float32)
      sa = np.where(cond["given_audio"], 0.0, s).astype(np.float32)
      out = jax.jit(sharded.apply, static_argnums=0)(
          sampler.graphdef, sampler.params, xv, xa, cond["text"], cond["text_mask"], sv, sa,
          first_frame=cond["first_frame"], use_first_frame=cond["use_first_frame"],
          drop_text=np.full(b, drop))
      if prediction == "x0":
        return tuple((x - out) / s for x, out in zip((xv, xa), out))
      return out
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
      cv, ca = model(x_video, x_audio, s, False)
      uv, ua = model(x_video, x_audio, s, True)
      gv = uv + settings.video_guidance * (cv - uv)
      ga = ua + settings.audio_guidance * (ca - ua)
      x_video = np.asarray(x_video + (s_next - s) * gv)
      x_audio = np.asarray(x_audio + (s_next - s) * ga)
      x_audio = np.where(cond["given_audio"][:, None, None], cond["clean_audio"], x_audio)
  return x_video, x_audio


@pytest.mark.parametrize("video_guidance,audio_guidance", [(1.0, 1.0), (3.0, 0.5)])
def test_batched_guidance_matches_separate_forwards(pipeline, tmp_path, video_guidance,
                                                    audio_guidance):
  config = pipeline.config
  prompts, _ = _prompts(config, [CAPTIONS, {"prompt": "A man shouts."}], tmp_path)
  settings = _settings(config, solver="euler", video_guidance=video_guidance,
                       audio_guidance=audio_guidance)
  batch = prompts * 2
  seeds = [1, 2, 3, 4]
  cond = _cond(pipeline, batch)
  video, audio, _ = pipeline.sampler.sample(cond, seeds, settings)
  ref_video, ref_audio = _reference(pipeline, cond, seeds, settings, True)
  np.testing.assert_allclose(video, ref_video, atol=2e-4)
  np.testing.assert_allclose(audio, ref_audio, atol=2e-4)


def test_x0_prediction_sampler_matches_the_velocity_it_implies(pipeline, tmp_path):
  """flow.prediction='x0': the same weights read as clean-latent predictions, guided, against
  the reference loop on the velocities (x - D) / sigma."""
  config = ml_collections.ConfigDict(pipeline.config.to_dict())
  config.flow.prediction = "x0"
  sampler = sampler_lib.LatentSampler(config, pipeline.sampler.mesh, pipeline.sampler.graphdef,
                                      pipeline.sampler.params)
  x0_pipeline = generate.Pipeline(sampler, text_encoder=pipeline.text_encoder)
  prompts, _ = _prompts(config, [CAPTIONS, {"prompt": "A man shouts."}], tmp_path)
  settings = _settings(config, solver="euler", video_guidance=3.0, audio_guidance=0.5)
  seeds = [1, 2, 3, 4]
  cond = _cond(x0_pipeline, prompts * 2)
  video, audio, _ = sampler.sample(cond, seeds, settings)
  ref_video, ref_audio = _reference(x0_pipeline, cond, seeds, settings, True, prediction="x0")
  np.testing.assert_allclose(video, ref_video, atol=2e-4)
  np.testing.assert_allclose(audio, ref_audio, atol=2e-4)


def _write_speech(path, config, seconds=None):
  sr = config.audio.sample_rate
  n = int(sr * (seconds or config.video.frames / config.video.fps))
  t = np.arange(n) / sr
  wave = 0.5 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 2 * t))
  media.write_wav(str(path), wave.astype(np.float32), sr)
  return wave


def test_given_modalities_come_back_unchanged(pipeline, tmp_path):
  config = pipeline.config
  v = config.video
  _write_speech(tmp_path / "speech.wav", config)
  frames = np.random.default_rng(0).integers(0, 255, (v.frames + 2, 24, 20, 3), np.uint8)
  media.write_mp4(str(tmp_path / "clip.mp4"), frames, v.fps, None, 16000)
  prompts, errors = _prompts(config, [dict(CAPTIONS, audio="speech.wav"), CAPTIONS,
                                      dict(CAPTIONS, video="clip.mp4")], tmp_path)
  assert not errors
  given = [pipeline.media(p) for p in prompts]
  assert given[0].audio_latent is not None and given[1].audio_latent is None
  assert given[2].frames.shape == (v.frames, v.height, v.width, 3)
  batch, given = prompts + prompts[:1], given + given[:1]
  cond = pipeline.conditions(batch, given)
  video, audio, _ = pipeline.sampler.sample(cond, [3, 4, 5, 3], _settings(config))
  np.testing.assert_array_equal(audio[0], given[0].audio_latent)  # audio-to-video
  np.testing.assert_array_equal(audio[3], given[0].audio_latent)
  np.testing.assert_array_equal(video[2], given[2].video_latent)  # video-to-audio
  assert np.abs(audio[1] - given[0].audio_latent).max() > 0.1  # generated, not given
  assert np.abs(video[0] - given[2].video_latent).max() > 0.1
  assert np.all(np.isfinite(video)) and np.all(np.isfinite(audio))


def test_run_writes_real_files_and_skips_bad_prompts(pipeline, tmp_path):
  config = pipeline.config
  v, a = config.video, config.audio
  _write_speech(tmp_path / "short.wav", config, seconds=0.2)
  image = np.zeros((40, 30, 3), np.uint8)
  image[:, :, 2] = 200
  cv2.imwrite(str(tmp_path / "face.png"), image)
  prompts, errors = _prompts(config, [
      dict(CAPTIONS, name="first"), dict(CAPTIONS, image="face.png"),
      dict(CAPTIONS, audio="short.wav"), dict(CAPTIONS, image="missing.png"),
      dict(CAPTIONS, name="blocked")], tmp_path)
  assert not errors
  out = tmp_path / "out"
  (out / "blocked.wav").mkdir(parents=True)  # a write that fails: the other prompts go on
  records, errors = generate.run(pipeline, prompts, str(out), _settings(config, steps=2),
                                 batch_size=4, log=lambda msg: None)
  assert len(records) == 2 and len(errors) == 3
  assert "line 3" in errors[0] and "short.wav" in errors[0] and "0.20 s of audio" in errors[0]
  assert "line 4" in errors[1] and "missing.png" in errors[1]
  assert "line 5: writing blocked" in errors[2]
  assert not [f for f in os.listdir(out) if f.startswith(".partial-")]  # temp names are gone
  for name in ("first", "sample_00002"):
    capture = cv2.VideoCapture(str(out / f"{name}.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == v.frames
    assert (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))) == (v.width, v.height)
    count = 0
    while capture.read()[0]:
      count += 1
    assert count == v.frames
    wave, rate = media.read_wav(str(out / f"{name}.wav"))
    assert rate == a.sample_rate
    assert wave.size == config_lib.latent_shapes(config).num_samples
    assert abs(wave.size / rate - v.frames / v.fps) < 0.05
    streams = media.probe_streams(str(out / f"{name}.mp4"))
    assert any(s.startswith("Video: h264") for s in streams), streams
    assert any(s.startswith("Audio: aac") for s in streams), streams
    record = json.loads((out / f"{name}.json").read_text())
    assert record["settings"]["steps"] == 2 and record["seed"] == prompts[0 if name == "first" else 1].seed
    assert len(record["timings"]["ode_step_s"]) == 2


def test_a_failed_write_leaves_no_file_under_its_name(tmp_path):
  path = str(tmp_path / "sample.mp4")
  with pytest.raises(OSError, match="disk full"):
    with files.finished_file(path) as partial:
      with open(partial, "wb") as f:
        f.write(b"half a video")
      raise OSError("disk full")
  assert os.listdir(tmp_path) == []  # neither sample.mp4 nor its temporary name
  files.write_text(path, "whole")
  assert os.listdir(tmp_path) == ["sample.mp4"]


def test_cli(run_dir, tmp_path):
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps(dict(CAPTIONS, seed=3)) + "\n" + "{bad\n")
  out = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "jova_jax.sample", f"--workdir={run_dir[0]}",
       f"--prompts={prompts}", f"--outdir={out}", "--steps=2", "--solver=euler",
       "--batch_size=4", "--contact_sheet"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert f"{prompts}:2: not valid JSON" in result.stderr
  assert sorted(os.listdir(out)) == ["contact_sheet.png", "sample_00001.json", "sample_00001.mp4",
                                     "sample_00001.wav"]
  assert cv2.imread(str(out / "contact_sheet.png")).shape[1] == 64 * load("tiny").video.frames
  record = json.loads((out / "sample_00001.json").read_text())
  assert record["seed"] == 3 and record["settings"]["solver"] == "euler"
  assert record["settings"]["video_guidance"] == 3.0  # from the run's config.sample

  missing = subprocess.run(
      [sys.executable, "-m", "jova_jax.sample", f"--checkpoint={tmp_path / 'none'}",
       f"--prompts={prompts}", f"--outdir={out}"], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=300)
  assert missing.returncode != 0 and f"checkpoint {tmp_path / 'none'} does not exist" in \
      missing.stderr


def test_cli_config_overrides_and_the_deprecated_set(run_dir, tmp_path):
  """--config.KEY=VALUE overrides the run's config as train's flags do; --set still works,
  with a one-line deprecation warning."""
  assert cli.config_overrides(["x", "--config.mesh.tensor=1", "--steps=2"]) == (
      ["x", "--steps=2"], ["mesh.tensor=1"])
  prompts = tmp_path / "p.jsonl"
  prompts.write_text(json.dumps(dict(CAPTIONS, seed=3)) + "\n")
  out = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, "-m", "jova_jax.sample", f"--workdir={run_dir[0]}",
       f"--prompts={prompts}", f"--outdir={out}", "--steps=1", "--batch_size=4",
       "--config.sample.video_guidance=2.5", "--set=sample.audio_guidance=1.5"],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stderr.count("--set is deprecated") == 1
  settings = json.loads((out / "sample_00001.json").read_text())["settings"]
  assert settings["video_guidance"] == 2.5 and settings["audio_guidance"] == 1.5
