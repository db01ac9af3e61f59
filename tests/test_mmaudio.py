"""MMAudio codecs (mmaudio16k, mmaudio44k): parity with the PyTorch reference, weight checks.

tests/fixtures/mmaudio_parity.npz was written by tests/fixtures/make_mmaudio_fixture.py from
MMAudio's mel converter / VAE and BigVGAN (v1 in MMAudio for 16k, NVIDIA's v2 for 44k) with
tiny random weights. The state dicts are written here under the published file names and read
back through the codec's own loader; torch is not needed (only the .pth test uses it).
"""
import json
import os
import sys

import numpy as np
import pytest
import safetensors.numpy

from jova_jax import codecs, weights
from jova_jax.codecs import bigvgan, mmaudio
from tests.conftest import REPO, load

FIXTURE = os.path.join(REPO, "tests", "fixtures", "mmaudio_parity.npz")
MODES = {"mmaudio16k": "16k", "mmaudio44k": "44k"}
ATOL = 1e-4


@pytest.fixture(scope="module")
def ref():
  data = np.load(FIXTURE)
  return {k: data[k] for k in data.files}


def _tensors(ref, mode, part):
  prefix = f"{mode}/{part}/"
  return {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}


def _vocoder_config(ref, mode):
  return bigvgan.BigVGANConfig.from_dict(json.loads(str(ref[f"{mode}/vocoder_config"])), FIXTURE)


def _write_weights(ref, variant, root, vae=None, vocoder=None):
  """The fixture's state dicts as <root>/<variant>/{v1-xx,vocoder}.safetensors."""
  v, mode = mmaudio.VARIANTS[variant], MODES[variant]
  folder = root / variant
  folder.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(vae or _tensors(ref, mode, "vae"),
                              str(folder / f"{v.vae_file}.safetensors"))
  safetensors.numpy.save_file(vocoder or _tensors(ref, mode, "vocoder"),
                              str(folder / f"{v.vocoder_file}.safetensors"))
  return folder


def _codec(ref, variant, root):
  mode = MODES[variant]
  kwargs = dict(vae_hidden=int(ref[f"{mode}/vae_hidden"]))
  if variant == "mmaudio44k":  # BigVGAN-v2 ships a config.json next to its weights
    (root / variant / "config.json").write_text(str(ref[f"{mode}/vocoder_config"]))
  else:
    kwargs["vocoder_config"] = _vocoder_config(ref, mode)
  return mmaudio.MMAudioCodec.from_weights_dir(variant, str(root), **kwargs)


@pytest.mark.parametrize("variant", sorted(MODES))
def test_parity_with_pytorch_reference(ref, variant, tmp_path):
  mode = MODES[variant]
  _write_weights(ref, variant, tmp_path)
  codec = _codec(ref, variant, tmp_path)
  wave = ref[f"{mode}/wave"]

  mel = np.asarray(mmaudio.log_mel(wave, codec.variant))
  np.testing.assert_allclose(mel, ref[f"{mode}/mel"], atol=ATOL, rtol=0)

  latents = np.asarray(codec.encode(wave))  # mel front end + VAE posterior mean
  want = ref[f"{mode}/posterior_mean"].transpose(0, 2, 1)
  assert latents.shape == (2, codec.latent_length(wave.shape[1]), codec.latent_channels)
  np.testing.assert_allclose(latents, want, atol=ATOL, rtol=0)

  ref_latents = ref[f"{mode}/latents"].transpose(0, 2, 1)
  decoded_mel = np.asarray(codec.decode_mel(ref_latents))
  np.testing.assert_allclose(decoded_mel, ref[f"{mode}/decoded_mel"], atol=ATOL, rtol=0)

  vocoded = np.asarray(bigvgan.vocode(codec.vocoder_params, ref[f"{mode}/decoded_mel"],
                                      codec.vocoder_config))
  np.testing.assert_allclose(vocoded, ref[f"{mode}/vocoded"][:, 0], atol=ATOL, rtol=0)
  assert np.abs(vocoded).std() > 0.01  # the reference wave is not flat: the match means something

  wave_out = codec.decode(ref_latents)
  num_latents = ref_latents.shape[1]
  assert wave_out.shape == (2, round(num_latents * codec.sample_rate / codec.latents_per_second))
  np.testing.assert_allclose(wave_out, ref[f"{mode}/vocoded"][:, 0], atol=ATOL, rtol=0)


def test_anti_alias_filter_matches_the_stored_buffers(ref):
  taps = bigvgan.anti_alias_filter()
  assert abs(taps.sum() - 1) < 1e-6
  for mode in MODES.values():
    stored = {k: v for k, v in _tensors(ref, mode, "vocoder").items() if k.endswith(".filter")}
    assert stored
    for value in stored.values():
      np.testing.assert_allclose(value.reshape(-1), taps, atol=1e-7)


def test_latent_stats_normalise_and_restore(ref, tmp_path):
  folder = _write_weights(ref, "mmaudio16k", tmp_path)
  plain = _codec(ref, "mmaudio16k", tmp_path)
  mean, std = np.linspace(-1, 1, 20), np.linspace(0.5, 2, 20)
  (folder / "latent_stats.json").write_text(json.dumps(dict(mean=mean.tolist(),
                                                            std=std.tolist())))
  scaled = _codec(ref, "mmaudio16k", tmp_path)
  wave = ref["16k/wave"]
  np.testing.assert_allclose(np.asarray(scaled.encode(wave)),
                             (np.asarray(plain.encode(wave)) - mean) / std, atol=1e-5)
  latents = ref["16k/latents"].transpose(0, 2, 1)
  np.testing.assert_allclose(np.asarray(scaled.decode_mel((latents - mean) / std)),
                             np.asarray(plain.decode_mel(latents)), atol=1e-4)
  assert scaled.config()["latent_std"] == pytest.approx(std.tolist())
  # Without latent_stats.json the latents stay raw and prepare measures them (data/latent_norm.py).
  assert scaled.normalises and not plain.normalises
  (folder / "latent_stats.json").write_text(json.dumps(dict(mean=[0.0] * 3, std=[1.0] * 3)))
  with pytest.raises(ValueError, match="latent_stats.json.*20"):
    _codec(ref, "mmaudio16k", tmp_path)


def test_misshapen_or_missing_tensor_is_refused(ref, tmp_path):
  vae = _tensors(ref, "16k", "vae")
  name = "decoder.mid.attn_1.qkv.weight"
  vae[name] = vae[name][:-3].copy()
  del vae["encoder.conv_out.weight"]
  vocoder = _tensors(ref, "16k", "vocoder")
  del vocoder["ups.1.0.weight_g"]
  vocoder["conv_pre.bias"] = vocoder["conv_pre.bias"][:4].copy()
  _write_weights(ref, "mmaudio16k", tmp_path, vae=vae)
  with pytest.raises(ValueError) as error:
    _codec(ref, "mmaudio16k", tmp_path)
  message = str(error.value)
  assert "v1-16.safetensors" in message
  assert f"'{name}' has shape (69, 24, 1), expected (72, 24, 1)" in message
  assert "'encoder.conv_out.weight' is missing (expected shape (40, 24, 3))" in message

  _write_weights(ref, "mmaudio16k", tmp_path, vocoder=vocoder)
  with pytest.raises(ValueError) as error:
    _codec(ref, "mmaudio16k", tmp_path)
  message = str(error.value)
  assert "best_netG.safetensors" in message
  assert "'ups.1.0.weight_g' is missing (expected shape (8, 1, 1))" in message
  assert "'conv_pre.bias' has shape (4,), expected (16,)" in message


def test_missing_files_and_unknown_format_are_refused(ref, tmp_path):
  with pytest.raises(FileNotFoundError, match="weights_dir"):
    mmaudio.MMAudioCodec.from_weights_dir("mmaudio16k", "")
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "mmaudio44k" / "v1-44.pth")):
    mmaudio.MMAudioCodec.from_weights_dir("mmaudio44k", str(tmp_path))
  bad = tmp_path / "weights.npz"
  bad.write_bytes(b"not a weights file")
  with pytest.raises(ValueError, match=f"unknown weights format {bad}"):
    weights.read_tensors(str(bad), "test")


def test_registry_reads_weights_dir_and_configs_agree(tmp_path):
  config = load("tiny")
  config.audio.update(codec="mmaudio44k", sample_rate=44100, latent_channels=40,
                      latents_per_second=44100 / 1024)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "mmaudio44k" / "v1-44")):
    codecs.get_audio_codec(config, weights_dir=str(tmp_path))
  audio, v = load("jova_24b").audio, mmaudio.VARIANTS["mmaudio16k"]
  assert audio.codec == v.name
  assert (audio.sample_rate, audio.latent_channels, audio.latents_per_second) == (
      v.sample_rate, v.latent_channels, v.latents_per_second)


def test_reads_the_published_pth_layout(ref, tmp_path):
  torch = pytest.importorskip("torch")
  folder = _write_weights(ref, "mmaudio16k", tmp_path)
  # best_netG.pt wraps the state dict as {'generator': ...}; v1-16.pth is the bare state dict.
  for stem, part, wrap in (("v1-16", "vae", False), ("best_netG", "vocoder", True)):
    state = {k: torch.from_numpy(v) for k, v in _tensors(ref, "16k", part).items()}
    os.remove(folder / f"{stem}.safetensors")
    torch.save({"generator": state} if wrap else state,
               folder / (f"{stem}.pt" if wrap else f"{stem}.pth"))
  codec = _codec(ref, "mmaudio16k", tmp_path)
  np.testing.assert_allclose(np.asarray(codec.encode(ref["16k/wave"])),
                             ref["16k/posterior_mean"].transpose(0, 2, 1), atol=ATOL, rtol=0)


def test_pth_without_torch_is_refused_with_a_hint(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
  path = tmp_path / "v1-16.pth"
  path.write_bytes(b"")
  with pytest.raises(ImportError, match=f"reading {path} needs torch.*safetensors"):
    weights.read_tensors(str(path), "audio codec 'mmaudio16k' VAE")
