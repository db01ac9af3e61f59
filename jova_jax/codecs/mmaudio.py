"""`mmaudio16k` / `mmaudio44k`: MMAudio's mel VAE + BigVGAN vocoder, ported to jax.numpy.

Encode (jit): wave (B,S) clipped to [-1,1] -> reflect pad (n_fft - hop)/2 -> periodic-Hann
STFT, no centring, magnitude sqrt(re^2 + im^2 + 1e-9) -> librosa Slaney mel bank (fmin 0) ->
log(max(mel, 1e-5)) (log10 at 16k, natural log at 44.1k) -> per-bin (x - data_mean)/data_std
-> the VAE encoder -> posterior mean -> per-channel (z - latent_mean) / latent_std.
Decode: the inverse normalisation -> the VAE decoder -> mel * data_std + data_mean -> BigVGAN.
floor(S / hop) mel frames give floor(S / (2 hop)) latents: 31.25 /s at 16 kHz (hop 256),
44100/1024 /s at 44.1 kHz (hop 512); a decoded wave has 2 hop samples per latent.

The VAE (MMAudio mmaudio/ext/autoencoder, EDM2-style magnitude-preserving 1D convs): widths
hidden x (1, 2, 4), two resnet blocks per level (three in the decoder), one 2x time
downsampling after level 0, one self-attention block in the middle, activations clamped to
+-256. Weight files hold the raw weights; MMAudio's remove_weight_norm (unit-norm rows divided
by sqrt(fan-in)) is applied at load time, as are the output convs' learnable gains.

Weights under <weights_dir>/<name>/ (each .safetensors conversion with the same tensor names is
preferred when present):
  mmaudio16k: v1-16.pth (VAE), best_netG.pt (MMAudio's BigVGAN)
  mmaudio44k: v1-44.pth (VAE), bigvgan_generator.pt (+ its config.json) from
              nvidia/bigvgan_v2_44khz_128band_512x
  config.json (optional, either): the vocoder's BigVGAN hparams (absent = the published ones)
  latent_stats.json (optional, either): {"mean": [C floats], "std": [C floats]}, e.g. the
              latent_mean / latent_std MMAudio's flow networks hold. Absent, encode returns the
              raw posterior mean (normalises False) and prepare measures the dataset's
              per-channel statistics instead (data/latent_norm.py).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import librosa
import numpy as np

from jova_jax import weights
from jova_jax.codecs import base, bigvgan

_HIGHEST = jax.lax.Precision.HIGHEST
_CLIP_ACT = 256.0
_MP_SILU_GAIN = 0.596
_RESIDUAL_T = 0.3  # mp_sum blend of the skip and the residual branch
_NORM_EPS = 1e-4
CH_MULT = (1, 2, 4)
ENCODER_BLOCKS, DECODER_BLOCKS = 2, 3
DOWN_LEVEL = 0  # the one level followed by 2x downsampling (and preceded by 2x upsampling)


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  sample_rate: int
  n_fft: int
  hop: int
  n_mels: int
  fmax: float
  log_base: float
  latent_channels: int
  vae_hidden: int
  vae_file: str
  vocoder_file: str
  vocoder: bigvgan.BigVGANConfig

  @property
  def latents_per_second(self) -> float:
    return self.sample_rate / (2 * self.hop)


VARIANTS = {
    "mmaudio16k": Variant("mmaudio16k", 16000, 1024, 256, 80, 8000.0, 10.0, 20, 384, "v1-16",
                          "best_netG", bigvgan.MMAUDIO_16K),
    "mmaudio44k": Variant("mmaudio44k", 44100, 2048, 512, 128, 22050.0, float(np.e), 40, 512,
                          "v1-44", "bigvgan_generator", bigvgan.BIGVGAN_V2_44K),
}


# ------------------------------------------------------------------ mel front end

def mel_filters(v: Variant) -> np.ndarray:
  return librosa.filters.mel(sr=v.sample_rate, n_fft=v.n_fft, n_mels=v.n_mels, fmin=0.0,
                             fmax=v.fmax).astype(np.float32)


@functools.partial(jax.jit, static_argnums=1)
def log_mel(wave, v: Variant):
  """(B,S) wave -> (B, n_mels, floor(S / hop)) log mel, as MMAudio's MelConverter computes it."""
  pad = (v.n_fft - v.hop) // 2
  wave = jnp.pad(jnp.clip(wave, -1.0, 1.0), ((0, 0), (pad, pad)), mode="reflect")
  frames = (wave.shape[1] - v.n_fft) // v.hop + 1
  index = np.arange(frames)[:, None] * v.hop + np.arange(v.n_fft)[None, :]
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(v.n_fft) / v.n_fft)
  spec = jnp.fft.rfft(wave[:, index] * window.astype(np.float32), axis=-1)
  magnitude = jnp.sqrt(jnp.square(spec.real) + jnp.square(spec.imag) + 1e-9)
  mel = jnp.einsum("mk,bfk->bmf", mel_filters(v), magnitude, precision=_HIGHEST)
  return jnp.log(jnp.maximum(mel, 1e-5)) / np.log(v.log_base)


# ------------------------------------------------------------------ VAE weights

def _resnet_shapes(prefix, cin, cout):
  shapes = {f"{prefix}.conv1.weight": (cout, cin, 3), f"{prefix}.conv2.weight": (cout, cout, 3)}
  if cin != cout:
    shapes[f"{prefix}.nin_shortcut.weight"] = (cout, cin, 1)
  return shapes


def _middle_shapes(prefix, ch):
  shapes = {**_resnet_shapes(f"{prefix}.mid.block_1", ch, ch),
            **_resnet_shapes(f"{prefix}.mid.block_2", ch, ch)}
  shapes[f"{prefix}.mid.attn_1.qkv.weight"] = (3 * ch, ch, 1)
  shapes[f"{prefix}.mid.attn_1.proj_out.weight"] = (ch, ch, 1)
  return shapes


def vae_shapes(data_dim: int, embed_dim: int, hidden: int) -> dict[str, tuple]:
  """MMAudio VAE state-dict names -> shapes (torch (out, in, k) conv weights)."""
  shapes = {"data_mean": (1, data_dim, 1), "data_std": (1, data_dim, 1),
            "encoder.learnable_gain": (), "decoder.learnable_gain": (),
            "encoder.conv_in.weight": (hidden, data_dim, 3)}
  ch = hidden
  for level, mult in enumerate(CH_MULT):
    for block in range(ENCODER_BLOCKS):
      shapes.update(_resnet_shapes(f"encoder.down.{level}.block.{block}", ch, hidden * mult))
      ch = hidden * mult
    if level == DOWN_LEVEL:
      shapes[f"encoder.down.{level}.downsample.conv1.weight"] = (ch, ch, 1)
      shapes[f"encoder.down.{level}.downsample.conv2.weight"] = (ch, ch, 1)
  shapes.update(_middle_shapes("encoder", ch))
  shapes["encoder.conv_out.weight"] = (2 * embed_dim, ch, 3)
  shapes["decoder.conv_in.weight"] = (ch, embed_dim, 3)
  shapes.update(_middle_shapes("decoder", ch))
  for level in reversed(range(len(CH_MULT))):
    for block in range(DECODER_BLOCKS):
      shapes.update(_resnet_shapes(f"decoder.up.{level}.block.{block}", ch,
                                   hidden * CH_MULT[level]))
      ch = hidden * CH_MULT[level]
    if level == DOWN_LEVEL + 1:
      shapes[f"decoder.up.{level}.upsample.conv.weight"] = (ch, ch, 3)
  shapes["decoder.conv_out.weight"] = (data_dim, ch, 3)
  return shapes


def vae_params_from_tensors(tensors: dict, v: Variant, hidden: int, path: str) -> dict:
  """Checks a VAE state dict; returns conv weights with MMAudio's forced weight normalisation
  (and the output gains) applied, plus data_mean / data_std as (n_mels, 1)."""
  checker = weights.TensorChecker(tensors, path, f"audio codec {v.name!r} VAE")
  params = {}
  for name, shape in vae_shapes(v.n_mels, v.latent_channels, hidden).items():
    w = checker.get(name, shape).astype(np.float64)
    if name.endswith(".weight"):
      fan_in = w[0].size
      norm = np.sqrt(np.square(w).sum(axis=(1, 2), keepdims=True))
      w = w / (_NORM_EPS + norm / np.sqrt(fan_in)) / np.sqrt(fan_in)
    params[name] = w.astype(np.float32)
  checker.check()
  for part in ("encoder", "decoder"):
    params[f"{part}.conv_out.weight"] *= 1.0 + params.pop(f"{part}.learnable_gain")
  params["data_mean"] = params["data_mean"][0]
  params["data_std"] = params["data_std"][0]
  return {k: jnp.asarray(w, jnp.float32) for k, w in params.items()}


# ------------------------------------------------------------------ VAE forward (B, C, T)

def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1,), [(w.shape[-1] // 2,) * 2],
                                      dimension_numbers=("NCH", "OIH", "NCH"),
                                      precision=_HIGHEST)


def _unit_norm(x, axis):
  """EDM2 normalize(): x / (eps + |x| / sqrt(n)) along `axis`."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / (_NORM_EPS + norm / np.sqrt(x.shape[axis]))


def _silu(x):
  return jax.nn.silu(x) / _MP_SILU_GAIN


def _mp_sum(a, b):
  t = _RESIDUAL_T
  return (a + t * (b - a)) / np.sqrt((1 - t) ** 2 + t ** 2)


def _resnet(p, prefix, x):
  x = _unit_norm(x, 1)
  h = _conv(_silu(x), p[prefix + ".conv1.weight"])
  h = _conv(_silu(h), p[prefix + ".conv2.weight"])
  if prefix + ".nin_shortcut.weight" in p:
    x = _conv(x, p[prefix + ".nin_shortcut.weight"])
  return _mp_sum(x, h)


def _attention(p, prefix, x):
  b, c, length = x.shape
  qkv = _unit_norm(_conv(x, p[prefix + ".qkv.weight"]).reshape(b, c, 3, length), 1)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
  logits = jnp.einsum("bcq,bck->bqk", q, k, precision=_HIGHEST) / np.sqrt(c)
  h = jnp.einsum("bqk,bck->bcq", jax.nn.softmax(logits, axis=-1), v, precision=_HIGHEST)
  return _mp_sum(x, _conv(h, p[prefix + ".proj_out.weight"]))


def _middle(p, prefix, h):
  h = _resnet(p, prefix + ".mid.block_1", h)
  h = _attention(p, prefix + ".mid.attn_1", h)
  h = _resnet(p, prefix + ".mid.block_2", h)
  return jnp.clip(h, -_CLIP_ACT, _CLIP_ACT)


@jax.jit
def vae_encode(p: dict, mel):
  """Un-normalised log mel (B, n_mels, F) -> posterior mean (B, C, F // 2)."""
  h = _conv((mel - p["data_mean"]) / p["data_std"], p["encoder.conv_in.weight"])
  for level in range(len(CH_MULT)):
    for block in range(ENCODER_BLOCKS):
      h = jnp.clip(_resnet(p, f"encoder.down.{level}.block.{block}", h), -_CLIP_ACT, _CLIP_ACT)
    if level == DOWN_LEVEL:
      h = _conv(h, p[f"encoder.down.{level}.downsample.conv1.weight"])
      b, c, length = h.shape
      h = h[..., :length // 2 * 2].reshape(b, c, length // 2, 2).mean(-1)
      h = _conv(h, p[f"encoder.down.{level}.downsample.conv2.weight"])
  h = _conv(_silu(_middle(p, "encoder", h)), p["encoder.conv_out.weight"])
  return h[:, :h.shape[1] // 2]


@jax.jit
def vae_decode(p: dict, z):
  """Latents (B, C, La) -> un-normalised log mel (B, n_mels, 2 La)."""
  h = _middle(p, "decoder", _conv(z, p["decoder.conv_in.weight"]))
  for level in reversed(range(len(CH_MULT))):
    for block in range(DECODER_BLOCKS):
      h = jnp.clip(_resnet(p, f"decoder.up.{level}.block.{block}", h), -_CLIP_ACT, _CLIP_ACT)
    if level == DOWN_LEVEL + 1:
      h = _conv(jnp.repeat(h, 2, axis=-1), p[f"decoder.up.{level}.upsample.conv.weight"])
  h = _conv(_silu(h), p["decoder.conv_out.weight"])
  return h * p["data_std"] + p["data_mean"]


# ------------------------------------------------------------------ the codec

def _find(folder: str, stem: str, suffixes: tuple, what: str) -> str:
  tried = [os.path.join(folder, stem + s) for s in suffixes]
  for path in tried:
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"{what}: weights not found; tried {', '.join(tried)}")


def _latent_stats(folder: str, channels: int, name: str):
  path = os.path.join(folder, "latent_stats.json")
  if not os.path.isfile(path):
    return None, None
  with open(path) as f:
    stats = json.load(f)
  mean = np.asarray(stats.get("mean", []), np.float32).reshape(-1)
  std = np.asarray(stats.get("std", []), np.float32).reshape(-1)
  if mean.shape != (channels,) or std.shape != (channels,) or not (std > 0).all():
    raise ValueError(f"audio codec {name!r}: {path} needs 'mean' and 'std' lists of {channels} "
                     f"floats (std > 0), found shapes {mean.shape} and {std.shape}")
  return mean, std


def _vae_hidden(tensors: dict, v: Variant) -> int:
  """The VAE's base width, read off its input conv (hidden, n_mels, 3); the published one when
  that tensor is absent (the shape check then names it)."""
  conv_in = tensors.get("encoder.conv_in.weight")
  return int(conv_in.shape[0]) if conv_in is not None and conv_in.ndim == 3 else v.vae_hidden


class MMAudioCodec(base.AudioCodec):
  """`variant` is 'mmaudio16k' or 'mmaudio44k'. Built from loaded parameters; users go through
  from_weights_dir (the registry does)."""

  def __init__(self, variant: str, vae_params: dict, vocoder_params: dict,
               vocoder_config: bigvgan.BigVGANConfig, vae_hidden: int,
               latent_mean: np.ndarray | None = None, latent_std: np.ndarray | None = None):
    v = VARIANTS[variant]
    if vocoder_config.num_mels != v.n_mels or vocoder_config.hop != v.hop:
      raise ValueError(f"audio codec {v.name!r}: the vocoder must take {v.n_mels} mels at hop "
                       f"{v.hop}, its config has {vocoder_config.num_mels} mels and hop "
                       f"{vocoder_config.hop}")
    self.variant = v
    self.name, self.sample_rate, self.latent_channels = v.name, v.sample_rate, v.latent_channels
    self.latents_per_second = v.latents_per_second
    self.vae_params, self.vocoder_params = vae_params, vocoder_params
    self.vocoder_config, self.vae_hidden = vocoder_config, vae_hidden
    # Without published statistics (None) the latents stay raw: mean 0, std 1 here.
    self.normalises = latent_mean is not None
    self.latent_mean = np.zeros(v.latent_channels, np.float32) if latent_mean is None else latent_mean
    self.latent_std = np.ones(v.latent_channels, np.float32) if latent_std is None else latent_std

  @classmethod
  def from_weights_dir(cls, variant: str, weights_dir: str, *, vae_hidden: int | None = None,
                       vocoder_config: bigvgan.BigVGANConfig | None = None) -> "MMAudioCodec":
    """Reads <weights_dir>/<variant>/. The VAE width comes from its weights; the vocoder's
    architecture from a BigVGAN config.json beside them if there is one, else the published
    one. vae_hidden / vocoder_config override both."""
    v = VARIANTS[variant]
    if not weights_dir:
      raise FileNotFoundError(
          f"audio codec {v.name!r} needs its weights: set config.weights_dir (or --weights_dir) "
          f"to a folder holding {v.name}/{v.vae_file}.pth and {v.name}/{v.vocoder_file}.pt")
    folder = os.path.join(weights_dir, v.name)
    vae_path = _find(folder, v.vae_file, (".safetensors", ".pth"), f"audio codec {v.name!r} VAE")
    vocoder_path = _find(folder, v.vocoder_file, (".safetensors", ".pt", ".pth"),
                         f"audio codec {v.name!r} vocoder")
    if vocoder_config is None:
      config_json = os.path.join(folder, "config.json")
      vocoder_config = (bigvgan.BigVGANConfig.from_json(config_json)
                        if os.path.isfile(config_json) else v.vocoder)
    vae_tensors = weights.read_tensors(vae_path, f"audio codec {v.name!r} VAE")
    vae_hidden = vae_hidden or _vae_hidden(vae_tensors, v)
    vae_params = vae_params_from_tensors(vae_tensors, v, vae_hidden, vae_path)
    vocoder_params = bigvgan.load_params(vocoder_path, vocoder_config,
                                         f"audio codec {v.name!r} vocoder")
    return cls(variant, vae_params, vocoder_params, vocoder_config, vae_hidden,
               *_latent_stats(folder, v.latent_channels, v.name))

  def encode(self, wave) -> jax.Array:
    wave = jnp.asarray(wave, jnp.float32)
    if wave.ndim != 2:
      raise ValueError(f"{self.name} codec: expected a float wave (B,S), got shape {wave.shape}")
    if self.latent_length(wave.shape[1]) < 1:
      raise ValueError(f"{self.name} codec: {wave.shape[1]} samples is shorter than one latent "
                       f"({2 * self.variant.hop} samples at {self.sample_rate} Hz)")
    z = vae_encode(self.vae_params, log_mel(wave, self.variant)).transpose(0, 2, 1)
    return (z - self.latent_mean) / self.latent_std

  def decode_mel(self, latents) -> jax.Array:
    """Normalised latents (B,La,C) -> log mel (B, n_mels, 2 La), the vocoder's input."""
    latents = jnp.asarray(latents, jnp.float32)
    if latents.ndim != 3 or latents.shape[-1] != self.latent_channels:
      raise ValueError(f"{self.name} codec: expected latents (B,La,{self.latent_channels}), got "
                       f"{latents.shape}")
    z = latents * self.latent_std + self.latent_mean
    return vae_decode(self.vae_params, z.transpose(0, 2, 1))

  def decode(self, latents) -> np.ndarray:
    wave = bigvgan.vocode(self.vocoder_params, self.decode_mel(latents), self.vocoder_config)
    return np.asarray(wave, np.float32)

  def config(self) -> dict:
    v = self.variant
    return dict(name=v.name, sample_rate=v.sample_rate, n_fft=v.n_fft, hop=v.hop,
                n_mels=v.n_mels, fmin=0.0, fmax=v.fmax, log_base=v.log_base,
                latent_channels=v.latent_channels, latents_per_second=v.latents_per_second,
                vae_hidden=self.vae_hidden, vocoder=dataclasses.asdict(self.vocoder_config),
                latent_mean=self.latent_mean.tolist(), latent_std=self.latent_std.tolist())
