"""`mel`: the built-in audio codec, the log-mel front end of MMAudio's 16 kHz variant.

Encode (JAX, jit, batched):
  wave (B,S) at 16 kHz -> reflect-pad n_fft/2 on both sides (librosa center=True) ->
  Hann-windowed frames (n_fft 1024, hop 256) -> |rfft| -> 80 mel bands ->
  log10(max(mel, 1e-5)) -> mean of each pair of frames (31.25 latents/s) ->
  per-bin (x - MEAN) / STD.
  Mel filters: librosa.filters.mel(sr=16000, n_fft=1024, n_mels=80, fmin=0, fmax=8000), i.e.
  librosa's Slaney-normalised bank, which MMAudio's mel converter also builds with librosa; we
  chose fmin 0 and fmax 8000 (the Nyquist frequency) so the whole band is covered.
  Exactly latent_length(S) = floor(S / 512) latents come out: frame i is centred on sample
  256 i, frames 0 .. 2 La - 1 are kept (the trailing partial pair is cropped).
Decode (numpy/librosa, CPU): undo the normalisation, 10**x, repeat each latent for 2 frames,
  the mel bank's pseudo-inverse clipped at 0 to a magnitude (as good as librosa's NNLS
  mel_to_stft here, to 1e-5 in round-trip error, and ~1000x faster), then librosa.griffinlim
  (32 iterations, fixed seed) to a wave of La * 512 samples (La / 31.25 s), clipped to [-1, 1].
  Lossy: the phase is estimated, and the 2x time average smooths fast transients.

MEAN / STD: per-bin mean and standard deviation of the un-normalised log-mel (after the 2x
time average), measured once on 126 s of espeak-ng English speech (8 sentences x 4 voices and
rates, 16 kHz, each utterance peak-normalised to 0.8, pauses included) and rounded to 2
decimals. Speech latents come out roughly zero-mean, unit-variance per bin; digital silence
(the log floor, -5) lands between -3 and -5.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import librosa
import numpy as np

from jova_jax.codecs import base

SAMPLE_RATE = 16000
N_FFT = 1024
HOP = 256
N_MELS = 80
FMIN, FMAX = 0.0, 8000.0
LOG_FLOOR = 1e-5
TIME_POOL = 2  # STFT frames averaged per latent: 16000 / 256 / 2 = 31.25 latents/s
GRIFFIN_LIM_ITERS = 32

# Per-bin statistics of the log10 mel (see the module docstring for how they were measured).
MEAN = np.array([
    -2.01, -1.45, -1.26, -1.49, -1.09, -1.01, -1.14, -1.12, -1.22, -1.19,
    -1.11, -1.13, -1.15, -1.30, -1.40, -1.49, -1.59, -1.61, -1.74, -1.82,
    -1.84, -1.91, -1.94, -1.98, -2.00, -1.99, -2.02, -1.98, -2.03, -2.03,
    -2.03, -2.03, -2.02, -2.01, -2.03, -2.05, -2.09, -2.11, -2.12, -2.14,
    -2.15, -2.17, -2.19, -2.22, -2.23, -2.19, -2.11, -2.01, -1.89, -1.82,
    -1.81, -1.85, -1.93, -1.97, -1.94, -1.86, -1.76, -1.71, -1.75, -1.79,
    -1.85, -1.94, -2.16, -2.32, -2.41, -2.46, -2.48, -2.50, -2.55, -2.64,
    -2.74, -2.80, -2.78, -2.75, -2.71, -2.56, -2.39, -2.40, -2.56, -2.98,
], np.float32)
STD = np.array([
    0.57, 0.75, 0.78, 0.64, 0.79, 0.81, 0.79, 0.81, 0.78, 0.77,
    0.78, 0.81, 0.82, 0.85, 0.86, 0.88, 0.93, 0.96, 0.97, 0.95,
    0.93, 0.92, 0.91, 0.91, 0.91, 0.90, 0.91, 0.90, 0.91, 0.91,
    0.91, 0.92, 0.92, 0.93, 0.93, 0.92, 0.90, 0.89, 0.86, 0.84,
    0.84, 0.85, 0.83, 0.80, 0.77, 0.76, 0.76, 0.75, 0.74, 0.77,
    0.79, 0.78, 0.75, 0.71, 0.69, 0.69, 0.71, 0.72, 0.69, 0.65,
    0.64, 0.66, 0.71, 0.80, 0.90, 0.91, 0.93, 0.94, 0.91, 0.86,
    0.84, 0.80, 0.79, 0.80, 0.80, 0.73, 0.66, 0.64, 0.67, 0.69,
], np.float32)


def mel_filters() -> np.ndarray:
  """(N_MELS, N_FFT//2 + 1) float32 mel filter bank."""
  return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN,
                             fmax=FMAX).astype(np.float32)


def _hann_window() -> np.ndarray:
  # Periodic Hann, as librosa / scipy get_window('hann', fftbins=True) build it.
  n = np.arange(N_FFT)
  return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / N_FFT)).astype(np.float32)


@functools.partial(jax.jit, static_argnums=1)
def stft_magnitude(wave, num_frames: int):
  """|STFT| of (B,S) float waves -> (B, num_frames, N_FFT//2 + 1), librosa center=True with
  reflect padding; frame i is centred on sample i * HOP."""
  padded = jnp.pad(wave, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
  index = np.arange(num_frames)[:, None] * HOP + np.arange(N_FFT)[None, :]
  frames = padded[:, index] * _hann_window()
  return jnp.abs(jnp.fft.rfft(frames, axis=-1))


@functools.partial(jax.jit, static_argnums=1)
def log_mel(wave, num_latents: int):
  """Un-normalised log10 mel averaged 2x in time: (B,S) -> (B, num_latents, N_MELS)."""
  magnitude = stft_magnitude(wave, num_latents * TIME_POOL)
  mel = jnp.einsum("bfk,mk->bfm", magnitude, mel_filters())
  logmel = jnp.log10(jnp.maximum(mel, LOG_FLOOR))
  b = logmel.shape[0]
  return logmel.reshape(b, num_latents, TIME_POOL, N_MELS).mean(axis=2)


@functools.partial(jax.jit, static_argnums=1)
def _encode(wave, num_latents: int):
  return (log_mel(wave, num_latents) - MEAN) / STD


class MelCodec(base.AudioCodec):
  name = "mel"
  sample_rate = SAMPLE_RATE
  latents_per_second = SAMPLE_RATE / HOP / TIME_POOL
  latent_channels = N_MELS

  def __init__(self, griffin_lim_iters: int = GRIFFIN_LIM_ITERS):
    self.griffin_lim_iters = griffin_lim_iters
    self._mel_pinv = np.linalg.pinv(mel_filters())  # (N_FFT//2 + 1, N_MELS)

  def encode(self, wave) -> jax.Array:
    wave = jnp.asarray(wave, jnp.float32)
    if wave.ndim != 2:
      raise ValueError(f"mel codec: expected a float wave (B,S), got shape {wave.shape}")
    num_latents = self.latent_length(wave.shape[1])
    if num_latents < 1:
      raise ValueError(f"mel codec: {wave.shape[1]} samples is shorter than one latent "
                       f"({HOP * TIME_POOL} samples at {SAMPLE_RATE} Hz)")
    return _encode(wave, num_latents)

  def decode(self, latents) -> np.ndarray:
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 3 or latents.shape[-1] != N_MELS:
      raise ValueError(f"mel codec: expected latents (B,La,{N_MELS}), got {latents.shape}")
    b, num_latents, _ = latents.shape
    mel = 10.0 ** (latents * STD + MEAN)                      # (B, La, N_MELS)
    mel = np.repeat(mel, TIME_POOL, axis=1)
    # A centred STFT of La*512 samples has 2*La + 1 frames: the last one repeats its neighbour.
    mel = np.concatenate([mel, mel[:, -1:]], axis=1).transpose(0, 2, 1)  # (B, N_MELS, frames)
    magnitude = np.maximum(np.einsum("km,bmf->bkf", self._mel_pinv, mel), 0.0)
    wave = librosa.griffinlim(
        magnitude, n_iter=self.griffin_lim_iters, hop_length=HOP, win_length=N_FFT,
        n_fft=N_FFT, window="hann", center=True, pad_mode="reflect",
        length=num_latents * TIME_POOL * HOP, random_state=0)
    return np.clip(wave.reshape(b, -1), -1.0, 1.0).astype(np.float32)

  def config(self) -> dict:
    return dict(name=self.name, sample_rate=self.sample_rate, n_fft=N_FFT, hop=HOP,
                n_mels=N_MELS, fmin=FMIN, fmax=FMAX, log_floor=LOG_FLOOR, time_pool=TIME_POOL,
                latents_per_second=self.latents_per_second,
                latent_channels=self.latent_channels, mean=MEAN.tolist(), std=STD.tolist())
