"""The latent normalisation contract (jova_jax/data/latent_norm.py): measured statistics from
prepare normalise the pipeline's batches, travel with the run's checkpoint and are undone by the
sampler and the preview; codecs that normalise by themselves, old datasets and old runs get the
identity."""
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from data_prep import shards
from jova_jax import codecs, config_lib
from jova_jax.data import features, latent_norm, pipeline
from jova_jax.media import io as media
from jova_jax.sampling import generate, loading, prompts as prompt_lib, sampler as sampler_lib
from jova_jax.training import loop, preview, state as train_state
from tests.conftest import load
from tests.datasets import make_examples

MEASURED = {"video": latent_norm.MEASURED, "audio": latent_norm.MEASURED}


def _config(dataset_dir=""):
  config = load("tiny")
  config.data.update(dir=str(dataset_dir), read_threads=1)
  return config


def _offset_examples(config, n, seed):
  """Random examples whose latents have a different mean and spread in every channel, as raw
  codec latents without published statistics have."""
  examples = make_examples(config, n, seed)
  for ex in examples:
    for key in ("video_latent", "audio_latent"):
      c = ex[key].shape[-1]
      ex[key] = (np.linspace(-4, 6, c) + np.linspace(0.3, 3, c) * ex[key]).astype(np.float32)
  return examples


def _measured_dataset(directory, config, num_train=16, num_eval=4):
  """What prepare writes for codecs without published statistics: the records as they are and
  the train split's statistics (shards.LatentStats, shards.measured_norm) in the metadata."""
  train, held_out = _offset_examples(config, num_train, 0), _offset_examples(config, num_eval, 1)
  stats = shards.LatentStats()
  for ex in train:
    stats.add("video", ex["video_latent"])
    stats.add("audio", ex["audio_latent"])
  metadata = features.default_metadata(config)
  metadata["latent_norm"] = shards.measured_norm(MEASURED, [stats.to_json()], config).to_json()
  features.write_dataset(directory, config, {"train": train, "eval": held_out}, metadata)
  return str(directory)


def _stored(source, index):
  record = source[index]
  return (np.asarray(record["video_latent"], np.float32),
          np.asarray(record["audio_latent"], np.float32))


def test_round_trip_is_exact_to_float32_rounding():
  rng = np.random.default_rng(0)
  mean = rng.normal(0, 5, 16).astype(np.float32)
  std = rng.uniform(0.05, 20, 16).astype(np.float32)
  stream = latent_norm.Stream(latent_norm.MEASURED, mean, std)
  x = rng.normal(0, 30, (4, 7, 16)).astype(np.float32)
  back = stream.denormalize(stream.normalize(x))
  assert back.dtype == np.float32
  # Tolerance: 2e-6 * (|x| + |mean|), a few float32 ulps of the larger operand.
  assert np.all(np.abs(back - x) <= 2e-6 * (np.abs(x) + np.abs(mean)))
  jax_back = stream.denormalize(stream.normalize(jax.numpy.asarray(x)))
  assert np.all(np.abs(np.asarray(jax_back) - x) <= 2e-6 * (np.abs(x) + np.abs(mean)))
  identity = latent_norm.Stream.identity(16)
  assert identity.normalize(x) is x and identity.denormalize(x) is x  # bit-exact


def test_measured_statistics_give_normalised_training_batches(tmp_path):
  config = _config(_measured_dataset(tmp_path / "ds", _config()))
  source = pipeline.open_source(config, "train")
  norm = source.latent_norm
  assert norm.video.source == norm.audio.source == latent_norm.MEASURED
  # One ordered pass over the whole train split: per channel mean 0 and std 1 (to float16
  # storage of the records).
  batches = list(pipeline.eval_dataset(config, source, process_index=0, process_count=1))
  for key in ("video", "audio"):
    rows = np.concatenate([b[key][b["example_valid"]] for b in batches])
    assert len(rows) == len(source) == 16
    flat = rows.reshape(-1, rows.shape[-1]).astype(np.float64)
    np.testing.assert_allclose(flat.mean(0), 0.0, atol=2e-3)
    np.testing.assert_allclose(flat.std(0), 1.0, atol=2e-3)
  # Training batches: each row is its stored record, normalised.
  batch = next(iter(pipeline.train_dataset(config, source, seed=3, process_index=0,
                                           process_count=1)))
  for row, index in enumerate(batch["record_index"]):
    video, audio = _stored(source, int(index))
    np.testing.assert_allclose(batch["video"][row], (video - norm.video.mean) / norm.video.std,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(batch["audio"][row], (audio - norm.audio.mean) / norm.audio.std,
                               rtol=1e-6, atol=1e-6)


def test_codecs_with_published_constants_and_old_datasets_get_the_identity(tmp_path):
  config = _config()
  assert latent_norm.source_for(codecs.get_video_codec(config)) == latent_norm.CODEC  # pixels
  assert latent_norm.source_for(codecs.get_audio_codec(config)) == latent_norm.CODEC  # mel
  stats = shards.LatentStats()
  stats.add("audio", np.full((3, config.audio.latent_channels), 5.0, np.float32))
  # prepare measures only where the codec has no statistics; shard reports from before the
  # contract (no sources) give the identity.
  mixed = shards.measured_norm({"video": latent_norm.CODEC, "audio": latent_norm.MEASURED},
                               [stats.to_json()], config)
  assert mixed.video.is_identity and mixed.video.source == latent_norm.CODEC
  assert mixed.audio.source == latent_norm.MEASURED and float(mixed.audio.mean[0]) == 5.0
  assert shards.measured_norm({}, [stats.to_json()], config).audio.is_identity
  # A dataset written before the contract: its flat, never-applied statistics are ignored, and
  # one with no latent_norm at all (features.default_metadata) reads the same.
  old = features.default_metadata(config)
  channels = config.video.latent_channels
  old["latent_norm"] = {"video_mean": [3.0] * channels, "video_std": [2.0] * channels}
  for name, metadata in (("old", old), ("none", features.default_metadata(config))):
    directory = str(tmp_path / name)
    features.write_dataset(directory, config, {"train": _offset_examples(config, 2, 0)}, metadata)
    source = pipeline.open_source(_config(directory), "train")
    assert source.latent_norm.video.is_identity and source.latent_norm.audio.is_identity
    example = pipeline.decode(0, source[0], spec=pipeline.batch_spec_of(config),
                              norm=source.latent_norm)
    video, audio = _stored(source, 0)
    np.testing.assert_array_equal(example["video"], video)
    np.testing.assert_array_equal(example["audio"], audio)
  # Malformed statistics are refused in one line naming the file.
  bad = features.default_metadata(config)
  bad["latent_norm"] = {"video": {"source": "measured", "mean": [0.0], "std": [1.0]},
                        "audio": {"source": "codec", "mean": [], "std": []}}
  with pytest.raises(features.DatasetError, match=r"metadata.json\): latent_norm.video needs .* "
                                                  r"48 finite floats"):
    latent_norm.LatentNorm.from_json(bad["latent_norm"], config, "dataset /x (metadata.json)")
  with pytest.raises(features.DatasetError, match=r"latent_norm.audio needs .* found source None"):
    latent_norm.LatentNorm.from_json({"video": latent_norm.Stream.identity(channels).to_json()},
                                     config, "dataset /x")


def test_an_old_run_without_statistics_samples_with_the_identity():
  config = ml_collections.ConfigDict(_config().to_dict())
  del config.data.latent_norm  # a checkpoint's config from before the contract
  norm = latent_norm.of_run(config)
  assert norm.video.is_identity and norm.audio.is_identity


@pytest.fixture(scope="module")
def measured_run(tmp_path_factory):
  """Two training steps on a dataset with measured statistics; the dataset is then moved away."""
  tmp = tmp_path_factory.mktemp("run")
  directory = _measured_dataset(tmp / "ds", _config())
  config = _config(directory)
  config.train.update(steps=2, log_every=1)
  config.checkpoint.update(every_steps=2)
  config.eval.update(every_steps=0)
  workdir = str(tmp / "work")
  loop.train(config, workdir)
  want = pipeline.open_source(config, "train").latent_norm
  source = pipeline.open_source(config, "eval")
  stored = [_stored(source, i) for i in range(2)]
  moved = str(tmp / "moved")
  shutil.move(directory, moved)
  return workdir, want, stored, config, moved


class _Spy:
  """Wraps a codec's decode to record the latents it is given."""

  def __init__(self, codec):
    self.codec, self.seen = codec, []

  def __getattr__(self, name):
    return getattr(self.codec, name)

  def decode(self, latents):
    self.seen.append(np.asarray(latents))
    return self.codec.decode(latents)


def test_the_checkpoint_carries_the_statistics_for_the_sampler(measured_run, tmp_path):
  workdir, want, stored, _, _ = measured_run
  config, mesh, graphdef, params = loading.load_run(workdir)  # no dataset folder
  assert not os.path.exists(config.data.dir)
  norm = latent_norm.of_run(config)
  for name in latent_norm.MODALITIES:
    got, expected = getattr(norm, name), getattr(want, name)
    assert got.source == latent_norm.MEASURED and not got.is_identity
    np.testing.assert_array_equal(got.mean, expected.mean)
    np.testing.assert_array_equal(got.std, expected.std)
  pipe = generate.Pipeline(sampler_lib.LatentSampler(config, mesh, graphdef, params),
                           text_encoder=object())
  pipe.video_codec, pipe.audio_codec = _Spy(pipe.video_codec), _Spy(pipe.audio_codec)
  # The model's outputs are model space; the codecs get them back in codec space.
  video, audio = stored[0]
  prompt = prompt_lib.Prompt(line=1, name="s", text="t", seed=0)
  settings = sampler_lib.Settings.from_config(config)
  pipe.write(str(tmp_path), prompt, generate.Media(), norm.video.normalize(video),
             norm.audio.normalize(audio), settings, {})
  tol = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pipe.video_codec.seen[0][0], video, **tol)
  np.testing.assert_allclose(pipe.audio_codec.seen[0][0], audio, **tol)
  # Given media are normalised like the training data.
  wave = np.sin(np.linspace(0, 400, pipe.shapes.num_samples)).astype(np.float32) * 0.5
  media.write_wav(str(tmp_path / "speech.wav"), wave, config.audio.sample_rate)
  given = pipe.media(prompt_lib.Prompt(line=1, name="g", text="t", seed=0,
                                       audio=str(tmp_path / "speech.wav")))
  raw = np.asarray(pipe.audio_codec.encode(media.read_audio(
      str(tmp_path / "speech.wav"), config.audio.sample_rate, pipe.shapes.num_samples)[None]))[0]
  np.testing.assert_allclose(given.audio_latent, norm.audio.normalize(raw), **tol)


def test_preview_decodes_outputs_and_references_in_codec_space(measured_run):
  workdir, want, stored, config, moved = measured_run
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.dir = moved
  config.eval.update(sample_prompts=2, sample_steps=1)
  _, mesh, _, params = loading.load_run(workdir)
  shown = preview.TrainingPreview(config, train_state.build_program(config, mesh), workdir)
  tol = dict(rtol=1e-5, atol=1e-5)
  codec = codecs.get_video_codec(config)
  for i, (video, _) in enumerate(stored):
    # (a pixel may round the other way after the float32 round trip)
    diff = shown.references[i].astype(int) - codec.decode(video[None])[0]
    assert np.abs(diff).max() <= 1 and np.mean(diff != 0) < 1e-2
    np.testing.assert_allclose(shown.cond["first_frame"][i],
                               (video[0] - want.video.mean) / want.video.std, **tol)
  shown.video_codec, shown.audio_codec = _Spy(shown.video_codec), _Spy(shown.audio_codec)
  outputs = {}
  real_sample = shown.sampler.sample

  def sample(*args, **kwargs):
    outputs["video"], outputs["audio"], times = real_sample(*args, **kwargs)
    return outputs["video"], outputs["audio"], times

  shown.sampler.sample = sample
  shown(2, params)
  n = len(shown.names)
  np.testing.assert_allclose(shown.video_codec.seen[0], want.video.denormalize(outputs["video"][:n]),
                             **tol)
  np.testing.assert_allclose(shown.audio_codec.seen[0], want.audio.denormalize(outputs["audio"][:n]),
                             **tol)
