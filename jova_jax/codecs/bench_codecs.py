"""Codec throughput figures for `python -m jova_jax.bench codecs` (printed, never asserted).

Each function times encode and decode of one codec after a warm-up call (compilation excluded)
and prints the rates. Without weights they run the published architecture with random
weights, which times the same computation.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from jova_jax.codecs import bigvgan, mmaudio


def _timed(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile + warm up
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn())
  return (time.perf_counter() - start) / repeats


def random_mmaudio_codec(variant: str, seed: int = 0) -> mmaudio.MMAudioCodec:
  """The published mmaudio16k / mmaudio44k architecture with random weights, built through
  the same parameter conversion as the weight files."""
  v = mmaudio.VARIANTS[variant]
  rng = np.random.default_rng(seed)
  vae = {name: rng.standard_normal(shape, np.float32)
         for name, shape in mmaudio.vae_shapes(v.n_mels, v.latent_channels, v.vae_hidden).items()}
  vae["data_std"] = np.ones_like(vae["data_std"])
  vocoder = {name: 0.01 * rng.standard_normal(shape, np.float32)
             for name, shape in bigvgan.expected_shapes(v.vocoder).items()}
  return mmaudio.MMAudioCodec(
      variant, mmaudio.vae_params_from_tensors(vae, v, v.vae_hidden, "random"),
      bigvgan.params_from_tensors(vocoder, v.vocoder, "random", "BigVGAN"), v.vocoder,
      v.vae_hidden, np.zeros(v.latent_channels, np.float32), np.ones(v.latent_channels,
                                                                     np.float32))


def bench_mmaudio(variant: str = "mmaudio16k", seconds: float = 121 / 24, batch: int = 1,
                  weights_dir: str = "", repeats: int = 1) -> dict:
  """Encode (wave -> latents) and decode (latents -> wave, VAE + BigVGAN) rates in audio
  seconds per second, for `batch` clips of `seconds` (default: one 121-frame 24 fps clip)."""
  codec = (mmaudio.MMAudioCodec.from_weights_dir(variant, weights_dir) if weights_dir
           else random_mmaudio_codec(variant))
  samples = int(seconds * codec.sample_rate)
  wave = np.random.default_rng(1).uniform(-0.5, 0.5, (batch, samples)).astype(np.float32)
  latents = codec.encode(wave)
  encode_s = _timed(lambda: codec.encode(wave), repeats)
  decode_s = _timed(lambda: codec.decode(latents), repeats)
  audio = batch * samples / codec.sample_rate
  figures = dict(codec=variant, device=jax.devices()[0].device_kind, batch=batch,
                 seconds=seconds, encode_audio_s_per_s=audio / encode_s,
                 decode_audio_s_per_s=audio / decode_s)
  print(f"{variant} ({'weights' if weights_dir else 'random weights'}, "
        f"{figures['device']}): {batch} x {seconds:.2f} s audio; "
        f"encode {figures['encode_audio_s_per_s']:.2f} audio s/s, "
        f"decode (VAE + BigVGAN) {figures['decode_audio_s_per_s']:.2f} audio s/s")
  return figures
