"""The Wan2.1 VAE network in plain jax.numpy, channels last, run chunk by chunk.

Architecture (as published): causal 3D convolutions (zero padding only in the past), RMS norms
over channels (scale sqrt(C) * gamma), SiLU, residual blocks, one single-head self-attention per
frame in each middle block, 2x spatial resampling per stage and 2x temporal resampling in the
stages named by `temporal_downsample`. The encoder sees the first frame alone, then chunks of 4
frames; the decoder sees one latent frame at a time. Every causal convolution keeps the last
frames of its input from the previous chunk (the feature cache), so chunked processing equals
processing the whole clip while only one chunk's activations live in memory.

Caches are a flat list of arrays in call order. On the first chunk they start as zeros, which
is what causal zero padding gives; the temporal resamplers treat the first chunk specially (the
first frame is neither time-convolved nor doubled), exactly as the reference does.

Params are the nested dicts built by jova_jax.codecs.wan21.build_params (weights already in
jax layout: convolutions (kT,kH,kW,in,out), 1x1 projections (in,out), gains (C,)).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST  # offline encoding: exact float32 even on TPU/GPU
ENCODER_FIRST, ENCODER_CHUNK = 1, 4  # pixel frames per encoder call: first frame, then 4


@dataclasses.dataclass(frozen=True)
class Arch:
  """Hyper-parameters of the VAE (diffusers AutoencoderKLWan names); defaults are Wan2.1's."""
  base_dim: int = 96
  z_dim: int = 16
  dim_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  temporal_downsample: tuple[bool, ...] = (False, True, True)
  in_channels: int = 3

  @property
  def spatial_factor(self) -> int:
    return 2 ** (len(self.dim_mult) - 1)

  @property
  def temporal_factor(self) -> int:
    return 2 ** sum(self.temporal_downsample)

  def encoder_plan(self) -> list[tuple]:
    """Flat encoder.down_blocks: ('res', in, out) | ('down', dim, temporal)."""
    dims = [self.base_dim * m for m in (1,) + tuple(self.dim_mult)]
    plan = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(self.num_res_blocks):
        plan.append(("res", in_dim, out_dim))
        in_dim = out_dim
      if i != len(self.dim_mult) - 1:
        plan.append(("down", out_dim, bool(self.temporal_downsample[i])))
    return plan

  def decoder_plan(self) -> list[tuple]:
    """decoder.up_blocks: (in_dim, out_dim, upsample: None | (temporal,))."""
    dims = [self.base_dim * m for m in (self.dim_mult[-1],) + tuple(self.dim_mult[::-1])]
    temporal_upsample = tuple(self.temporal_downsample[::-1])
    plan = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
      if i > 0:  # the previous stage's upsampler halves the channels
        in_dim //= 2
      upsample = (bool(temporal_upsample[i]),) if i != len(self.dim_mult) - 1 else None
      plan.append((in_dim, out_dim, upsample))
    return plan

  @property
  def encoder_out_dim(self) -> int:
    return self.base_dim * self.dim_mult[-1]


class _Caches:
  """Feature caches in call order: reads the previous chunk's, records this chunk's."""

  def __init__(self, old):
    self.old, self.new = old, []

  def previous(self, x, frames: int):
    if self.old is None:  # first chunk: the causal zero padding
      return jnp.zeros((x.shape[0], frames) + x.shape[2:], x.dtype)
    return self.old[len(self.new)]

  def push(self, frames):
    self.new.append(frames)


def _conv(x, p, stride=(1, 1, 1), pad_hw=((0, 0), (0, 0))):
  """3D convolution, no padding in time; x (B,T,H,W,C), p['w'] (kT,kH,kW,in,out)."""
  y = jax.lax.conv_general_dilated(x, p["w"], stride, ((0, 0),) + tuple(pad_hw),
                                   dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                   precision=_HIGHEST)
  return y + p["b"]


def _causal_conv(x, p, caches: _Caches):
  """Causal in time (the previous chunk's last kT-1 frames in front), same size in space."""
  kt, kh, kw = p["w"].shape[:3]
  full = jnp.concatenate([caches.previous(x, kt - 1), x], axis=1)
  caches.push(full[:, full.shape[1] - (kt - 1):])
  return _conv(full, p, pad_hw=((kh // 2, kh // 2), (kw // 2, kw // 2)))


def _rms_norm(x, gamma):
  # F.normalize: x / max(||x||, 1e-12), then * sqrt(C) * gamma
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, 1e-12) * np.sqrt(x.shape[-1]) * gamma


def _residual(x, p, caches):
  shortcut = _conv(x, p["shortcut"]) if "shortcut" in p else x
  x = _causal_conv(jax.nn.silu(_rms_norm(x, p["norm1"])), p["conv1"], caches)
  x = _causal_conv(jax.nn.silu(_rms_norm(x, p["norm2"])), p["conv2"], caches)
  return x + shortcut


def _attention(x, p):
  """Single-head self-attention over the pixels of each frame on its own."""
  b, t, h, w, c = x.shape
  y = _rms_norm(x, p["norm"]).reshape(b * t, h * w, c)
  qkv = jnp.matmul(y, p["qkv"]["w"], precision=_HIGHEST) + p["qkv"]["b"]
  q, k, v = jnp.split(qkv, 3, axis=-1)
  logits = jnp.einsum("nqc,nkc->nqk", q, k, precision=_HIGHEST) / np.sqrt(c)
  y = jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(logits, axis=-1), v, precision=_HIGHEST)
  y = jnp.matmul(y, p["proj"]["w"], precision=_HIGHEST) + p["proj"]["b"]
  return x + y.reshape(b, t, h, w, c)


def _middle(x, p, caches):
  x = _residual(x, p["res0"], caches)
  x = _attention(x, p["attn"])
  return _residual(x, p["res1"], caches)


def _downsample(x, p, caches, temporal: bool, first: bool):
  # Pad right/bottom by one, then a stride-2 3x3 convolution (per frame).
  x = _conv(x, p["resample"], stride=(1, 2, 2), pad_hw=((0, 1), (0, 1)))
  if not temporal:
    return x
  previous = caches.previous(x, 1)
  caches.push(x[:, -1:])
  if first:  # the first frame passes on unchanged
    return x
  return _conv(jnp.concatenate([previous, x], axis=1), p["time_conv"], stride=(2, 1, 1))


def _upsample(x, p, caches, temporal: bool, first: bool):
  if temporal:
    if first:  # the first frame is not doubled; the next chunk's context stays zeros
      caches.push(jnp.zeros((x.shape[0], 2) + x.shape[2:], x.dtype))
    else:
      b, t, h, w, c = x.shape
      y = _causal_conv(x, p["time_conv"], caches)  # (B,T,H,W,2C): two frames per frame
      x = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
  x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest, 2x in space
  return _conv(x, p["resample"], pad_hw=((1, 1), (1, 1)))


@functools.partial(jax.jit, static_argnames=("arch", "first"))
def encode_chunk(params, x, caches, *, arch: Arch, first: bool):
  """x (B,1 or 4,H,W,3) in [-1,1] -> (posterior mean (B,1,H/8,W/8,z_dim), new caches)."""
  enc, stream = params["encoder"], _Caches(caches)
  x = _causal_conv(x, enc["conv_in"], stream)
  for (kind, _, arg), p in zip(arch.encoder_plan(), enc["down"]):
    x = _residual(x, p, stream) if kind == "res" else _downsample(x, p, stream, arg, first)
  x = _middle(x, enc["mid"], stream)
  x = _causal_conv(jax.nn.silu(_rms_norm(x, enc["norm_out"])), enc["conv_out"], stream)
  moments = _conv(x, params["quant_conv"])
  return moments[..., :arch.z_dim], stream.new


@functools.partial(jax.jit, static_argnames=("arch", "first"))
def decode_chunk(params, z, caches, *, arch: Arch, first: bool):
  """z (B,1,h,w,z_dim) raw latents -> (pixels (B,1 or 4,8h,8w,3) in [-1,1], new caches)."""
  dec, stream = params["decoder"], _Caches(caches)
  x = _conv(z, params["post_quant_conv"])
  x = _causal_conv(x, dec["conv_in"], stream)
  x = _middle(x, dec["mid"], stream)
  for (_, _, upsample), stage in zip(arch.decoder_plan(), dec["up"]):
    for p in stage["res"]:
      x = _residual(x, p, stream)
    if upsample is not None:
      x = _upsample(x, stage["upsample"], stream, upsample[0], first)
  x = _causal_conv(jax.nn.silu(_rms_norm(x, dec["norm_out"])), dec["conv_out"], stream)
  return jnp.clip(x, -1.0, 1.0), stream.new


def encode_mean(params, arch: Arch, video) -> jax.Array:
  """video (B,1+4k,H,W,3) float in [-1,1] -> posterior mean (B,1+k,H/8,W/8,z_dim)."""
  t = video.shape[1]
  starts = [0] + list(range(ENCODER_FIRST, t, ENCODER_CHUNK))
  caches, outputs = None, []
  for i, start in enumerate(starts):
    size = ENCODER_FIRST if i == 0 else ENCODER_CHUNK
    chunk = jnp.asarray(video[:, start:start + size], jnp.float32)
    mean, caches = encode_chunk(params, chunk, caches, arch=arch, first=i == 0)
    outputs.append(mean)
  return jnp.concatenate(outputs, axis=1)


def decode_pixels(params, arch: Arch, latents) -> np.ndarray:
  """Raw latents (B,T',h,w,z_dim) -> float32 pixels (B,1+4(T'-1),8h,8w,3) in [-1,1] (host)."""
  caches, outputs = None, []
  for i in range(latents.shape[1]):
    z = jnp.asarray(latents[:, i:i + 1], jnp.float32)
    pixels, caches = decode_chunk(params, z, caches, arch=arch, first=i == 0)
    outputs.append(np.asarray(pixels))  # frames go to host memory as they come
  return np.concatenate(outputs, axis=1)
