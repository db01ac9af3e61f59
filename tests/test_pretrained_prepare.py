"""Issue 7 acceptance: data_prep with wan21 + mmaudio16k + t5 configured and a small random-weight
checkpoint in the published layout writes a dataset the trainer accepts.

The weights are the committed parity fixtures (tiny random weights, checked against the
PyTorch references in test_wan21 / test_mmaudio / test_t5), laid out as a user's weights_dir:
  wan21/vae/{config.json, diffusion_pytorch_model.safetensors}   (diffusers layout)
  mmaudio16k/{v1-16, best_netG}.safetensors + config.json         (BigVGAN hparams)
  t5/{config.json, model.safetensors, tokenizer.json}             (HF layout)
The registries get no test-only arguments: sizes come from the files.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from jova_jax import codecs, config_lib, text
from jova_jax.codecs import mmaudio
from jova_jax.data import features
from jova_jax.text import t5
from jova_jax.training import loop
from tests.conftest import REPO, load

FIXTURES = os.path.join(REPO, "tests", "fixtures")
NUM_CLIPS = 4
T5_WIDTH = 32  # d_model of tests/fixtures/t5/flan


def _weights_dir(root) -> str:
  shutil.copytree(os.path.join(FIXTURES, "wan21"), root / "wan21")
  shutil.copytree(os.path.join(FIXTURES, "t5", "flan", "t5"), root / "t5")
  ref = np.load(os.path.join(FIXTURES, "mmaudio_parity.npz"))
  v = mmaudio.VARIANTS["mmaudio16k"]
  folder = root / v.name
  folder.mkdir()
  for part, stem in (("vae", v.vae_file), ("vocoder", v.vocoder_file)):
    prefix = f"16k/{part}/"
    tensors = {k[len(prefix):]: ref[k] for k in ref.files if k.startswith(prefix)}
    safetensors.numpy.save_file(tensors, str(folder / f"{stem}.safetensors"))
  (folder / "config.json").write_text(str(ref["16k/vocoder_config"]))
  return str(root)


def _config(weights_dir: str, dataset_dir: str = ""):
  config = load("tiny")
  config.video.update(codec="wan21", temporal_factor=4, spatial_factor=8, latent_channels=16,
                      frames=9, fps=8.0, height=64, width=64)
  config.audio.update(codec="mmaudio16k", sample_rate=16000, latent_channels=20,
                      latents_per_second=31.25)
  config.text.update(encoder="t5", width=T5_WIDTH)
  config.weights_dir = weights_dir
  config.data.update(source="tfds", dir=dataset_dir, read_threads=1)
  config.train.update(steps=2, log_every=1)
  config.checkpoint.update(every_steps=2, async_save=False)
  return config


def _overrides(config) -> list[str]:
  """The same settings as command-line flags for data_prep.prepare."""
  flags = [f"--config.weights_dir={config.weights_dir}"]
  for section, keys in (("video", ("codec", "temporal_factor", "spatial_factor",
                                   "latent_channels", "frames", "fps", "height", "width")),
                        ("audio", ("codec", "sample_rate", "latent_channels",
                                   "latents_per_second")),
                        ("text", ("encoder", "width"))):
    flags += [f"--config.{section}.{key}={config[section][key]}" for key in keys]
  return flags


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  return _weights_dir(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def prepared(weights, tmp_path_factory):
  corpus = tmp_path_factory.mktemp("corpus")
  subprocess.run([sys.executable, "-m", "data_prep.make_demo_corpus", f"--out={corpus}",
                  f"--num_clips={NUM_CLIPS}", "--size=160"], cwd=REPO, check=True)
  out = str(tmp_path_factory.mktemp("prepared") / "dataset")
  result = subprocess.run(
      [sys.executable, "-m", "data_prep.prepare", f"--input={corpus}", f"--output={out}",
       f"--config={REPO}/configs/tiny.py", *_overrides(_config(weights)), "--batch_size=2"],
      cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  return out


def test_registries_size_the_ports_from_the_weight_files(weights):
  config = _config(weights)
  ref = np.load(os.path.join(FIXTURES, "mmaudio_parity.npz"))
  audio = codecs.get_audio_codec(config)
  assert audio.vae_hidden == int(ref["16k/vae_hidden"])
  assert audio.vocoder_config.upsample_rates == (16, 16)
  np.testing.assert_allclose(np.asarray(audio.encode(ref["16k/wave"])),
                             ref["16k/posterior_mean"].transpose(0, 2, 1), atol=1e-4, rtol=0)
  video = codecs.get_video_codec(config)
  assert (video.arch.base_dim, video.latent_channels) == (4, 16)
  encoder = text.get_text_encoder(config)
  assert encoder.width == T5_WIDTH
  config.text.width = 4096
  with pytest.raises(ValueError, match=r"config.json has d_model=32, expected width 4096"):
    text.get_text_encoder(config)


def test_prepared_dataset_holds_the_pretrained_latents(prepared, weights):
  config = _config(weights, prepared)
  metadata = features.read_metadata(prepared)
  features.check_metadata(metadata, config, prepared)
  assert metadata["video_codec"]["name"] == "wan21"
  assert metadata["audio_codec"]["name"] == "mmaudio16k"
  assert metadata["text_encoder"] == {**metadata["text_encoder"], "name": "t5", "width": T5_WIDTH}
  assert sum(metadata["counts"].values()) == NUM_CLIPS

  import tensorflow_datasets as tfds
  source = tfds.builder_from_directory(prepared).as_data_source("train")
  shapes = config_lib.latent_shapes(config)
  assert shapes.video == (3, 8, 8, 16) and shapes.audio == (35, 20)
  record = source[0]
  assert record["video_latent"].shape == shapes.video
  assert record["audio_latent"].shape == shapes.audio
  assert np.isfinite(record["video_latent"]).all() and record["video_latent"].std() > 0
  assert np.isfinite(record["audio_latent"]).all() and record["audio_latent"].std() > 0
  # The stored text embedding is the T5 port's output for the stored caption, unpadded.
  reference = t5.T5Encoder(weights, width=None)
  emb, mask = reference.encode([record["caption"].decode()], config.text.max_length)
  want = emb[0, :int(mask[0].sum())]
  np.testing.assert_allclose(record["text_emb"].astype(np.float32), want, atol=2e-3, rtol=2e-3)


def test_mmaudio_without_published_statistics_is_normalised_by_the_pipeline(prepared, weights):
  """mmaudio16k without latent_stats.json: prepare measures its statistics and the pipeline's
  batches come out zero-mean, unit-std per channel; Wan2.1's published constants: identity."""
  from jova_jax.data import latent_norm, pipeline
  config = _config(weights, prepared)
  norm = features.read_metadata(prepared)["latent_norm"]
  assert norm["video"] == {"source": "codec", "mean": [0.0] * 16, "std": [1.0] * 16}
  assert norm["audio"]["source"] == "measured"
  source = pipeline.open_source(config, "train")
  batches = list(pipeline.eval_dataset(config, source, process_index=0, process_count=1))
  audio = np.concatenate([b["audio"][b["example_valid"]] for b in batches]).reshape(-1, 20)
  np.testing.assert_allclose(audio.mean(0), 0.0, atol=1e-2)
  np.testing.assert_allclose(audio.std(0), 1.0, atol=1e-2)
  video = np.concatenate([b["video"][b["example_valid"]] for b in batches])
  stored = np.stack([np.asarray(source[i]["video_latent"], np.float32) for i in range(len(source))])
  np.testing.assert_array_equal(video, stored)
  assert latent_norm.source_for(codecs.get_audio_codec(config)) == latent_norm.MEASURED


def test_trainer_runs_two_steps_on_it(prepared, weights, tmp_path):
  config = _config(weights, prepared)
  workdir = str(tmp_path / "work")
  loop.train(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
  assert len(losses) == 2 and np.isfinite(losses).all()
