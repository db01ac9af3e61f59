"""Wan2.1 VAE port (`wan21`) against diffusers' AutoencoderKLWan, from a committed fixture.

tests/fixtures/make_wan21_fixture.py ran diffusers on a tiny VAE of the same architecture and
saved its weights in the published diffusers layout (tests/fixtures/wan21/vae/) plus a clip,
the posterior mean and the decoded clip (tests/fixtures/wan21_parity.npz). No torch needed here.
"""
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from jova_jax import codecs
from jova_jax.codecs import wan21
from tests.conftest import load

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
WEIGHTS = os.path.join(FIXTURES, "wan21", "vae", "diffusion_pytorch_model.safetensors")
CONFIG_JSON = os.path.join(FIXTURES, "wan21", "vae", "config.json")
TOL = 1e-4


@pytest.fixture(scope="module")
def reference():
  return dict(np.load(os.path.join(FIXTURES, "wan21_parity.npz")))


@pytest.fixture(scope="module")
def codec():
  config = load("tiny")
  config.video.update(codec="wan21", temporal_factor=4, spatial_factor=8, latent_channels=16)
  return codecs.get_video_codec(config, weights_dir=FIXTURES)


def _published_stats():
  with open(CONFIG_JSON) as f:
    cfg = json.load(f)
  return np.array(cfg["latents_mean"], np.float32), np.array(cfg["latents_std"], np.float32)


def test_encode_matches_diffusers(codec, reference):
  frames = reference["frames"]
  # Batch of two; two trailing frames that do not fill a group of 4 are dropped.
  extra = np.random.default_rng(1).integers(0, 256, (1, 2) + frames.shape[2:], dtype=np.uint8)
  batch = np.concatenate([np.concatenate([frames, extra], axis=1)] * 2, axis=0)
  latents = np.asarray(codec.encode(batch))
  mean, std = _published_stats()
  want = (reference["mean"] - mean) / std
  assert latents.shape == (2, 3, 4, 4, 16) == (2,) + want.shape[1:]
  np.testing.assert_allclose(latents[0], want[0], atol=TOL, rtol=0)
  np.testing.assert_allclose(latents[1], want[0], atol=TOL, rtol=0)


def test_decode_matches_diffusers(codec, reference):
  mean, std = _published_stats()
  latents = (reference["mean"] - mean) / std
  pixels = codec.decode_float(latents)
  assert pixels.shape == reference["decoded"].shape == (1, 9, 32, 32, 3)
  np.testing.assert_allclose(pixels, reference["decoded"], atol=TOL, rtol=0)
  frames = codec.decode(latents)
  want = np.clip(np.rint((reference["decoded"] + 1.0) * 127.5), 0, 255)
  assert frames.dtype == np.uint8
  assert np.abs(frames.astype(int) - want).max() <= 1


def test_original_layout_names(tmp_path, reference):
  """The same weights under the original Wan2.1_VAE.pth names (checked against diffusers'
  converter when the fixture was made) load to the same network."""
  tensors = safetensors.numpy.load_file(WEIGHTS)
  renamed = {o: tensors[d] for d, o in zip(reference["diffusers_names"],
                                            reference["original_names"])}
  folder = tmp_path / "wan21"
  folder.mkdir()
  safetensors.numpy.save_file(renamed, str(folder / "diffusion_pytorch_model.safetensors"))
  shutil.copy(CONFIG_JSON, folder / "config.json")
  original = wan21.Wan21Codec.from_weights_dir(str(tmp_path))
  diffusers_layout = wan21.Wan21Codec.from_file(WEIGHTS)
  jax.tree_util.tree_map(np.testing.assert_array_equal, original.params, diffusers_layout.params)
  mean, std = _published_stats()
  pixels = original.decode_float((reference["mean"][:, :2] - mean) / std)
  np.testing.assert_allclose(pixels, reference["decoded"][:, :5], atol=TOL, rtol=0)


def test_bad_tensors_are_named_with_both_shapes(tmp_path):
  tensors = safetensors.numpy.load_file(WEIGHTS)
  del tensors["decoder.conv_in.bias"]
  tensors["encoder.conv_out.weight"] = tensors["encoder.conv_out.weight"][:8]
  path = str(tmp_path / "diffusion_pytorch_model.safetensors")
  safetensors.numpy.save_file(tensors, path)
  arch = wan21.read_config(CONFIG_JSON)[0]
  with pytest.raises(ValueError) as err:
    wan21.load_params(path, arch)
  message = str(err.value)
  assert path in message
  assert "'decoder.conv_in.bias' is missing (expected shape (16,))" in message
  assert ("'encoder.conv_out.weight' has shape (8, 16, 3, 3, 3), expected (32, 16, 3, 3, 3)"
          in message)


def test_full_size_shapes_refuse_tiny_weights():
  """Without config.json the published Wan2.1 sizes are expected: the tiny file is refused."""
  with pytest.raises(ValueError, match=r"'encoder.conv_in.weight' has shape \(4, 3, 3, 3, 3\), "
                                       r"expected \(96, 3, 3, 3, 3\)"):
    wan21.load_params(WEIGHTS)


def test_unknown_format_and_missing_files(tmp_path, monkeypatch):
  odd = tmp_path / "vae.bin"
  odd.write_bytes(b"x")
  with pytest.raises(ValueError, match=f"unknown weights format {odd}"):
    wan21.load_params(str(odd))
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "wan21")):
    wan21.find_weights(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="weights_dir"):
    wan21.find_weights("")
  pth = tmp_path / "Wan2.1_VAE.pth"
  pth.write_bytes(b"x")
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(ImportError, match=f"{pth} needs torch"):
    wan21.load_params(str(pth))


def test_unsupported_variant_is_refused(tmp_path):
  with open(CONFIG_JSON) as f:
    cfg = json.load(f)
  cfg["is_residual"] = True
  path = tmp_path / "config.json"
  path.write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="is_residual=true"):
    wan21.read_config(str(path))


def test_published_constants_and_shapes():
  with open(CONFIG_JSON) as f:  # the tiny fixture kept diffusers' published defaults
    cfg = json.load(f)
  assert wan21.LATENTS_MEAN == tuple(cfg["latents_mean"])
  assert wan21.LATENTS_STD == tuple(cfg["latents_std"])
  shapes = wan21.expected_shapes(wan21.Arch())
  assert sum(int(np.prod(s)) for s in shapes.values()) == 126892531  # AutoencoderKLWan()
  assert shapes["decoder.up_blocks.1.upsamplers.0.time_conv.weight"] == (768, 384, 3, 1, 1)
