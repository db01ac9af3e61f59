"""Pretrained audio codecs with random weights of the published sizes, for
`python -m jova_jax.bench codecs` when no weights are given (speed does not depend on values)."""
from __future__ import annotations

import numpy as np

from jova_jax.codecs import bigvgan, mmaudio


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
      v.vae_hidden)
