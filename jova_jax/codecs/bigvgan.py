"""BigVGAN vocoder (log-mel -> wave) in plain jax.numpy, and the weight-file reader shared with
the MMAudio VAE port.

Architecture (BigVGAN, github.com/NVIDIA/BigVGAN, and MMAudio's 16 kHz copy of its v1):
conv_pre (k7) -> per upsampling stage: ConvTranspose1d (rate u, kernel k, padding (k-u)/2),
then the mean of AMP blocks (type "1": per dilation d, x += conv_1(act(conv_d(act(x))))) ->
anti-aliased SnakeBeta -> conv_post (k7) -> tanh (or a clip to [-1, 1] in BigVGAN-v2 44 kHz).
Each activation is anti-aliased: 2x upsampling (replicate pad, Kaiser-windowed sinc, 12 taps),
SnakeBeta x + sin^2(alpha x) / beta (alpha, beta stored as logs), 2x low-pass downsampling.

Weights: the published state dicts keep weight norm (`weight_g` / `weight_v`, or torch's
`parametrizations.weight.original0/1`); it is folded here (w = g v / |v|, norm over all but
dim 0). Plain `weight` tensors (weight norm already removed) are accepted too. The anti-alias
filters stored in the files are fixed by the architecture and recomputed, not read.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from jova_jax import weights

_HIGHEST = jax.lax.Precision.HIGHEST  # offline codec: exact float32 even on TPU/GPU
_SNAKE_EPS = 1e-9
_AA_TAPS = 12  # anti-alias filter length, both directions, ratio 2


# ------------------------------------------------------------------ config

@dataclasses.dataclass(frozen=True)
class BigVGANConfig:
  num_mels: int
  upsample_rates: tuple
  upsample_kernel_sizes: tuple
  upsample_initial_channel: int
  resblock_kernel_sizes: tuple
  resblock_dilation_sizes: tuple
  use_tanh_at_final: bool = True
  use_bias_at_final: bool = True

  @property
  def hop(self) -> int:
    return math.prod(self.upsample_rates)

  def channels(self, stage: int) -> int:
    """Channels after upsampling stage `stage` (stage -1: after conv_pre)."""
    return self.upsample_initial_channel // 2 ** (stage + 1)

  @classmethod
  def from_dict(cls, h: dict, origin: str) -> "BigVGANConfig":
    """From a BigVGAN config.json / hparams dict; refuses variants this port does not run."""
    unsupported = {k: h.get(k) for k, want in (("resblock", "1"), ("activation", "snakebeta"),
                                               ("snake_logscale", True)) if h.get(k) != want}
    if unsupported:
      raise ValueError(f"BigVGAN config {origin}: only resblock '1' with log-scale snakebeta is "
                       f"ported, found {unsupported}")
    return cls(num_mels=int(h["num_mels"]), upsample_rates=tuple(h["upsample_rates"]),
               upsample_kernel_sizes=tuple(h["upsample_kernel_sizes"]),
               upsample_initial_channel=int(h["upsample_initial_channel"]),
               resblock_kernel_sizes=tuple(h["resblock_kernel_sizes"]),
               resblock_dilation_sizes=tuple(tuple(d) for d in h["resblock_dilation_sizes"]),
               use_tanh_at_final=bool(h.get("use_tanh_at_final", True)),
               use_bias_at_final=bool(h.get("use_bias_at_final", True)))

  @classmethod
  def from_json(cls, path: str) -> "BigVGANConfig":
    with open(path) as f:
      return cls.from_dict(json.load(f), path)


# MMAudio's 16 kHz vocoder (best_netG.pt, hparams mmaudio/ext/bigvgan/bigvgan_vocoder.yml).
MMAUDIO_16K = BigVGANConfig(
    num_mels=80, upsample_rates=(4, 4, 2, 2, 2, 2), upsample_kernel_sizes=(8, 8, 4, 4, 4, 4),
    upsample_initial_channel=1536, resblock_kernel_sizes=(3, 7, 11),
    resblock_dilation_sizes=((1, 3, 5),) * 3)
# nvidia/bigvgan_v2_44khz_128band_512x (its config.json, used when none sits by the weights).
BIGVGAN_V2_44K = BigVGANConfig(
    num_mels=128, upsample_rates=(8, 4, 2, 2, 2, 2), upsample_kernel_sizes=(16, 8, 4, 4, 4, 4),
    upsample_initial_channel=1536, resblock_kernel_sizes=(3, 7, 11),
    resblock_dilation_sizes=((1, 3, 5),) * 3, use_tanh_at_final=False, use_bias_at_final=False)


# ------------------------------------------------------------------ parameters

def anti_alias_filter() -> np.ndarray:
  """The 12-tap Kaiser-windowed sinc low-pass (cutoff 0.25, half width 0.3) used for 2x up- and
  downsampling around every activation; sums to 1."""
  half = _AA_TAPS // 2
  attenuation = 2.285 * (half - 1) * math.pi * (4 * 0.3) + 7.95
  beta = 0.1102 * (attenuation - 8.7)  # Kaiser's rule for attenuation > 50 dB
  time = np.arange(-half, half) + 0.5
  taps = 2 * 0.25 * np.kaiser(_AA_TAPS, beta) * np.sinc(2 * 0.25 * time)
  return (taps / taps.sum()).astype(np.float32)


def _resblock_names(config: BigVGANConfig):
  """(stage, index in state dict, kernel, dilations) of every AMP block."""
  kernels = len(config.resblock_kernel_sizes)
  for stage in range(len(config.upsample_rates)):
    for j, (k, dilations) in enumerate(zip(config.resblock_kernel_sizes,
                                           config.resblock_dilation_sizes)):
      yield stage, stage * kernels + j, k, dilations


def expected_shapes(config: BigVGANConfig) -> dict[str, tuple]:
  """Folded weight / bias / activation names -> shapes (weights as torch stores them)."""
  c0 = config.upsample_initial_channel
  shapes = {"conv_pre.weight": (c0, config.num_mels, 7), "conv_pre.bias": (c0,)}
  for i, (u, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes)):
    shapes[f"ups.{i}.0.weight"] = (config.channels(i - 1), config.channels(i), k)
    shapes[f"ups.{i}.0.bias"] = (config.channels(i),)
  for stage, index, k, dilations in _resblock_names(config):
    ch, p = config.channels(stage), f"resblocks.{index}."
    for n in range(len(dilations)):
      for convs in ("convs1", "convs2"):
        shapes[f"{p}{convs}.{n}.weight"] = (ch, ch, k)
        shapes[f"{p}{convs}.{n}.bias"] = (ch,)
    for m in range(2 * len(dilations)):
      shapes[f"{p}activations.{m}.act.alpha"] = (ch,)
      shapes[f"{p}activations.{m}.act.beta"] = (ch,)
  last = config.channels(len(config.upsample_rates) - 1)
  shapes["activation_post.act.alpha"] = (last,)
  shapes["activation_post.act.beta"] = (last,)
  shapes["conv_post.weight"] = (1, last, 7)
  if config.use_bias_at_final:
    shapes["conv_post.bias"] = (1,)
  return shapes


def params_from_tensors(tensors: dict, config: BigVGANConfig, path: str, what: str) -> dict:
  """Checks a BigVGAN state dict and returns the flat parameter dict for `vocode`: folded
  weights, and per activation alpha = exp(log alpha), inv_beta = 1 / (exp(log beta) + 1e-9)."""
  checker = weights.TensorChecker(tensors, path, what)
  params = {}
  for name, shape in expected_shapes(config).items():
    if name.endswith(".weight"):
      params[name] = checker.weight_normed(name[:-len(".weight")], shape)
    elif name.endswith(".act.alpha"):
      params[name] = np.exp(checker.get(name, shape))
    elif name.endswith(".act.beta"):
      params[name[:-len("beta")] + "inv_beta"] = (
          1.0 / (np.exp(checker.get(name, shape)) + _SNAKE_EPS)).astype(np.float32)
    else:
      params[name] = checker.get(name, shape)
  checker.check()
  return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def load_params(path: str, config: BigVGANConfig, what: str = "BigVGAN vocoder") -> dict:
  return params_from_tensors(weights.read_tensors(path, what), config, path, what)


# ------------------------------------------------------------------ forward (B, C, T) layout

def _conv(x, w, b=None, dilation=1, padding=0):
  y = jax.lax.conv_general_dilated(x, w, (1,), [(padding, padding)], rhs_dilation=(dilation,),
                                   dimension_numbers=("NCH", "OIH", "NCH"), precision=_HIGHEST)
  return y if b is None else y + b[:, None]


def _conv_transpose(x, w, stride, padding):
  """torch ConvTranspose1d, weight (in, out, k): a stride-dilated correlation with the flipped
  kernel."""
  k = w.shape[-1]
  w = jnp.flip(w, -1).transpose(1, 0, 2)
  return jax.lax.conv_general_dilated(x, w, (1,), [(k - 1 - padding, k - 1 - padding)],
                                      lhs_dilation=(stride,),
                                      dimension_numbers=("NCH", "OIH", "NCH"),
                                      precision=_HIGHEST)


def _fir(x, taps, stride=1):
  """Valid correlation along time with fixed taps, y[n] = sum_k taps[k] x[stride n + k], as
  shifted slices: one fused elementwise loop (a depthwise conv is ~10x slower on XLA CPU)."""
  n_out = (x.shape[-1] - len(taps)) // stride + 1
  return sum(float(t) * x[..., k:k + stride * (n_out - 1) + 1:stride]
             for k, t in enumerate(taps))


def _anti_aliased_snake(x, alpha, inv_beta):
  taps = anti_alias_filter()
  pad = _AA_TAPS // 2 - 1          # replicate padding before the 2x transposed conv
  crop = pad * 2 + (_AA_TAPS - 2) // 2
  length = x.shape[-1]
  # 2x upsampling = torch's conv_transpose1d(stride 2) with 2 * taps: zero-stuff, then a full
  # convolution (correlation with the flipped taps), keeping the centre 2 * length samples.
  padded = jnp.pad(x, ((0, 0), (0, 0), (pad, pad)), mode="edge")
  stuffed = jnp.stack([padded, jnp.zeros_like(padded)], -1).reshape(*x.shape[:2], -1)[..., :-1]
  stuffed = jnp.pad(stuffed, ((0, 0), (0, 0), (_AA_TAPS - 1, _AA_TAPS - 1)))
  up = _fir(stuffed[..., crop:crop + 2 * length + _AA_TAPS - 1], 2.0 * taps[::-1])
  up = up + jnp.square(jnp.sin(up * alpha[:, None])) * inv_beta[:, None]
  down = jnp.pad(up, ((0, 0), (0, 0), (_AA_TAPS // 2 - 1, _AA_TAPS // 2)), mode="edge")
  return _fir(down, taps, stride=2)


def _act(p, prefix, x):
  return _anti_aliased_snake(x, p[prefix + ".act.alpha"], p[prefix + ".act.inv_beta"])


def _amp_block(p, prefix, x, kernel, dilations):
  for n, d in enumerate(dilations):
    h = _act(p, f"{prefix}activations.{2 * n}", x)
    h = _conv(h, p[f"{prefix}convs1.{n}.weight"], p[f"{prefix}convs1.{n}.bias"], dilation=d,
              padding=(kernel * d - d) // 2)
    h = _act(p, f"{prefix}activations.{2 * n + 1}", h)
    h = _conv(h, p[f"{prefix}convs2.{n}.weight"], p[f"{prefix}convs2.{n}.bias"],
              padding=(kernel - 1) // 2)
    x = x + h
  return x


@functools.partial(jax.jit, static_argnums=2)
def vocode(params: dict, mel, config: BigVGANConfig):
  """mel (B, num_mels, F) -> wave (B, F * hop)."""
  x = _conv(mel, params["conv_pre.weight"], params["conv_pre.bias"], padding=3)
  blocks = list(_resblock_names(config))
  for i, (u, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes)):
    x = _conv_transpose(x, params[f"ups.{i}.0.weight"], u, (k - u) // 2)
    x = x + params[f"ups.{i}.0.bias"][:, None]
    outs = [_amp_block(params, f"resblocks.{index}.", x, kernel, dilations)
            for stage, index, kernel, dilations in blocks if stage == i]
    x = sum(outs) / len(outs)
  x = _act(params, "activation_post", x)
  x = _conv(x, params["conv_post.weight"], params.get("conv_post.bias"), padding=3)
  x = jnp.tanh(x) if config.use_tanh_at_final else jnp.clip(x, -1.0, 1.0)
  return x[:, 0]
