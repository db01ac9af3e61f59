"""`wan21`: the Wan2.1 video VAE (16 latent channels, 4x time, 8x8 space) with published weights.

Weights are read from `<weights_dir>/wan21/`, the first of:
  vae/diffusion_pytorch_model.safetensors   (diffusers layout, with vae/config.json)
  diffusion_pytorch_model.safetensors       (diffusers layout, with config.json)
  Wan2.1_VAE.pth                            (the original release; needs torch)
Both key layouts (diffusers' and the original Wan repository's) are recognised by their names
and mapped onto one parameter tree; a missing or misshapen tensor is refused with its name and
both shapes. A config.json beside the weights (diffusers' format) may change the architecture
(base_dim, z_dim, dim_mult, num_res_blocks, temperal_downsample) and the latent mean/std;
without one, Wan2.1's.

Latents are the posterior mean normalised per channel, (mean - latents_mean) / latents_std,
channels last. Frames are uint8 (B,T,H,W,3) scaled to [-1,1]; T = 1 + 4k (trailing frames that
do not fill a group of 4 are dropped, as config_lib.latent_frames counts them).
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jova_jax import weights
from jova_jax.codecs import base
from jova_jax.codecs.wan21_layers import Arch, decode_pixels, encode_mean

# Published with Wan2.1 (diffusers AutoencoderKLWan config latents_mean / latents_std).
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
SUBDIR = "wan21"
CANDIDATES = ("vae/diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors",
              "Wan2.1_VAE.pth")
ORIGINAL_LAYOUT_KEY = "decoder.middle.0.residual.0.gamma"  # only the original release has it


# ------------------------------------------------------------------ key names and the param tree

def original_name(name: str, arch: Arch) -> str:
  """diffusers AutoencoderKLWan tensor name -> the name in the original Wan2.1_VAE.pth."""
  parts = name.split(".")
  res_suffix = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3",
                "conv2": "residual.6", "conv_shortcut": "shortcut"}
  top = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
  if parts[0] in top:
    return ".".join([top[parts[0]]] + parts[1:])
  side, block, rest = parts[0], parts[1], parts[2:]
  if block == "conv_in":
    return ".".join([side, "conv1"] + rest)
  if block == "norm_out":
    return ".".join([side, "head.0"] + rest)
  if block == "conv_out":
    return ".".join([side, "head.2"] + rest)
  if block == "mid_block":  # resnets.0, attentions.0, resnets.1 -> middle.0, .1, .2
    kind, index, rest = rest[0], int(rest[1]), rest[2:]
    slot = 1 if kind == "attentions" else 2 * index
    if kind == "resnets":
      rest = res_suffix[rest[0]].split(".") + rest[1:]
    return ".".join([side, "middle", str(slot)] + rest)
  if block == "down_blocks":  # the same flat list, resblock sub-names differ
    index, rest = rest[0], rest[1:]
    if rest[0] in res_suffix:
      rest = res_suffix[rest[0]].split(".") + rest[1:]
    return ".".join([side, "downsamples", index] + rest)
  if block == "up_blocks":  # per stage (num_res_blocks+1) resblocks then an upsampler, flat
    stage, kind, index, rest = int(rest[0]), rest[1], int(rest[2]), rest[3:]
    per_stage = arch.num_res_blocks + 2
    if kind == "resnets":
      flat = stage * per_stage + index
      rest = res_suffix[rest[0]].split(".") + rest[1:]
    else:  # upsamplers.0
      flat = stage * per_stage + arch.num_res_blocks + 1
    return ".".join([side, "upsamples", str(flat)] + rest)
  raise KeyError(name)


class _ParamReader:
  """Torch-layout tensors (get(diffusers_name, torch_shape) -> float32 numpy) as the JAX
  network's parameters."""

  def __init__(self, get):
    self.get = get

  def conv3d(self, name, cin, cout, kernel):  # torch (out,in,kT,kH,kW) -> (kT,kH,kW,in,out)
    w = self.get(f"{name}.weight", (cout, cin) + kernel)
    return dict(w=jnp.asarray(np.transpose(w, (2, 3, 4, 1, 0))),
                b=jnp.asarray(self.get(f"{name}.bias", (cout,))))

  def conv2d(self, name, cin, cout):  # torch (out,in,kH,kW) -> (1,kH,kW,in,out)
    w = self.get(f"{name}.weight", (cout, cin, 3, 3))
    return dict(w=jnp.asarray(np.transpose(w, (2, 3, 1, 0))[None]),
                b=jnp.asarray(self.get(f"{name}.bias", (cout,))))

  def linear(self, name, cin, cout):  # 1x1 Conv2d (out,in,1,1) -> (in,out)
    w = self.get(f"{name}.weight", (cout, cin, 1, 1))
    return dict(w=jnp.asarray(w[:, :, 0, 0].T), b=jnp.asarray(self.get(f"{name}.bias", (cout,))))

  def gain(self, name, dim, image=False):
    shape = (dim, 1, 1) if image else (dim, 1, 1, 1)
    return jnp.asarray(self.get(f"{name}.gamma", shape).reshape(dim))

  def residual(self, name, cin, cout):
    p = dict(norm1=self.gain(f"{name}.norm1", cin),
             conv1=self.conv3d(f"{name}.conv1", cin, cout, (3, 3, 3)),
             norm2=self.gain(f"{name}.norm2", cout),
             conv2=self.conv3d(f"{name}.conv2", cout, cout, (3, 3, 3)))
    if cin != cout:
      p["shortcut"] = self.conv3d(f"{name}.conv_shortcut", cin, cout, (1, 1, 1))
    return p

  def middle(self, name, dim):
    return dict(res0=self.residual(f"{name}.resnets.0", dim, dim),
                attn=dict(norm=self.gain(f"{name}.attentions.0.norm", dim, image=True),
                          qkv=self.linear(f"{name}.attentions.0.to_qkv", dim, 3 * dim),
                          proj=self.linear(f"{name}.attentions.0.proj", dim, dim)),
                res1=self.residual(f"{name}.resnets.1", dim, dim))


def _encoder_params(r: _ParamReader, arch: Arch) -> dict:
  z, top = arch.z_dim, arch.encoder_out_dim
  down = []
  for j, (kind, a, b) in enumerate(arch.encoder_plan()):
    name = f"encoder.down_blocks.{j}"
    if kind == "res":
      down.append(r.residual(name, a, b))
    else:
      p = dict(resample=r.conv2d(f"{name}.resample.1", a, a))
      if b:
        p["time_conv"] = r.conv3d(f"{name}.time_conv", a, a, (3, 1, 1))
      down.append(p)
  return dict(conv_in=r.conv3d("encoder.conv_in", arch.in_channels, arch.base_dim, (3, 3, 3)),
              down=down, mid=r.middle("encoder.mid_block", top),
              norm_out=r.gain("encoder.norm_out", top),
              conv_out=r.conv3d("encoder.conv_out", top, 2 * z, (3, 3, 3)))


def _decoder_params(r: _ParamReader, arch: Arch) -> dict:
  up = []
  for i, (cin, cout, upsample) in enumerate(arch.decoder_plan()):
    stage = dict(res=[])
    for k in range(arch.num_res_blocks + 1):
      stage["res"].append(r.residual(f"decoder.up_blocks.{i}.resnets.{k}",
                                     cin if k == 0 else cout, cout))
    if upsample is not None:
      name = f"decoder.up_blocks.{i}.upsamplers.0"
      stage["upsample"] = dict(resample=r.conv2d(f"{name}.resample.1", cout, cout // 2))
      if upsample[0]:
        stage["upsample"]["time_conv"] = r.conv3d(f"{name}.time_conv", cout, 2 * cout, (3, 1, 1))
    up.append(stage)
  first_dim, last_dim = arch.decoder_plan()[0][0], arch.decoder_plan()[-1][1]
  return dict(conv_in=r.conv3d("decoder.conv_in", arch.z_dim, first_dim, (3, 3, 3)),
              mid=r.middle("decoder.mid_block", first_dim), up=up,
              norm_out=r.gain("decoder.norm_out", last_dim),
              conv_out=r.conv3d("decoder.conv_out", last_dim, arch.in_channels, (3, 3, 3)))


def build_params(arch: Arch, get) -> dict:
  """The parameter tree; get(diffusers_name, torch_shape) returns a float32 numpy array."""
  r, z = _ParamReader(get), arch.z_dim
  return dict(encoder=_encoder_params(r, arch), decoder=_decoder_params(r, arch),
              quant_conv=r.conv3d("quant_conv", 2 * z, 2 * z, (1, 1, 1)),
              post_quant_conv=r.conv3d("post_quant_conv", z, z, (1, 1, 1)))


def expected_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
  """diffusers tensor name -> torch shape, for every tensor the network reads."""
  shapes = {}

  def record(name, shape):
    shapes[name] = shape
    return np.zeros(shape, np.float32)

  build_params(arch, record)
  return shapes


def random_params(arch: Arch, seed: int = 0) -> dict:
  """Random weights of the right shapes (fan-in scaled): for benchmarks and memory checks."""
  rng = np.random.default_rng(seed)

  def draw(name, shape):
    if name.endswith(".gamma"):
      return np.ones(shape, np.float32)
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

  return build_params(arch, draw)


# ---------------------------------------------------------------------------------- reading files

def load_params(path: str, arch: Arch = Arch()) -> dict:
  """Reads, checks and converts a diffusers- or original-layout weights file."""
  tensors = weights.read_tensors(path, "video codec 'wan21'")
  original = ORIGINAL_LAYOUT_KEY in tensors
  errors = []

  def get(name, shape):
    key = original_name(name, arch) if original else name
    if key not in tensors:
      errors.append(f"tensor {key!r} is missing (expected shape {shape})")
      return np.zeros(shape, np.float32)
    if tuple(tensors[key].shape) != shape:
      errors.append(f"tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {shape}")
      return np.zeros(shape, np.float32)
    return np.asarray(tensors[key], np.float32)

  params = build_params(arch, get)
  if errors:
    raise ValueError(f"video codec 'wan21': bad weights in {path}:\n  - " + "\n  - ".join(errors))
  return params


def read_config(path: str) -> tuple[Arch, tuple, tuple]:
  """(arch, latents_mean, latents_std) from a diffusers config.json; Wan2.1's for missing keys."""
  with open(path) as f:
    cfg = json.load(f)
  # Variants this port does not implement (Wan2.2's residual VAE, patchified input, ...).
  base_dim = cfg.get("base_dim", Arch().base_dim)
  unsupported = []
  if cfg.get("is_residual"):
    unsupported.append("is_residual=true")
  if cfg.get("patch_size") not in (None, 1):
    unsupported.append(f"patch_size={cfg['patch_size']}")
  if cfg.get("attn_scales"):
    unsupported.append(f"attn_scales={cfg['attn_scales']}")
  if cfg.get("decoder_base_dim") not in (None, base_dim):
    unsupported.append(f"decoder_base_dim={cfg['decoder_base_dim']} != base_dim={base_dim}")
  if unsupported:
    raise ValueError(f"video codec 'wan21': {path} describes a VAE variant this port does not "
                     f"implement: {', '.join(unsupported)}")
  default = Arch()
  arch = Arch(base_dim=int(cfg.get("base_dim", default.base_dim)),
              z_dim=int(cfg.get("z_dim", default.z_dim)),
              dim_mult=tuple(cfg.get("dim_mult", default.dim_mult)),
              num_res_blocks=int(cfg.get("num_res_blocks", default.num_res_blocks)),
              temporal_downsample=tuple(bool(v) for v in cfg.get("temperal_downsample",
                                                                  default.temporal_downsample)),
              in_channels=int(cfg.get("in_channels", default.in_channels)))
  mean = tuple(cfg.get("latents_mean", LATENTS_MEAN))
  std = tuple(cfg.get("latents_std", LATENTS_STD))
  for key, values in (("latents_mean", mean), ("latents_std", std)):
    if len(values) != arch.z_dim:
      raise ValueError(f"video codec 'wan21': {path}: {key} has {len(values)} values, "
                       f"expected z_dim={arch.z_dim}")
  return arch, mean, std


def find_weights(weights_dir: str) -> str:
  if not weights_dir:
    raise FileNotFoundError("video codec 'wan21' needs the Wan2.1 VAE weights: set "
                            "config.weights_dir (or --weights_dir) to a folder holding "
                            f"{SUBDIR}/{CANDIDATES[0]} or {SUBDIR}/{CANDIDATES[2]}")
  folder = os.path.join(weights_dir, SUBDIR)
  for candidate in CANDIDATES:
    path = os.path.join(folder, candidate)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"video codec 'wan21': none of {', '.join(CANDIDATES)} found in {folder}")


# ------------------------------------------------------------------------------------ the codec

class Wan21Codec(base.VideoCodec):
  name = "wan21"

  def __init__(self, params: dict, arch: Arch = Arch(), latents_mean=LATENTS_MEAN,
               latents_std=LATENTS_STD, source: str = ""):
    self.params, self.arch, self.source = params, arch, source
    self.temporal_factor = arch.temporal_factor
    self.spatial_factor = arch.spatial_factor
    self.latent_channels = arch.z_dim
    self.latents_mean = np.asarray(latents_mean, np.float32)
    self.latents_std = np.asarray(latents_std, np.float32)

  @classmethod
  def from_file(cls, path: str) -> "Wan21Codec":
    """Weights file, with the architecture from a config.json beside it if there is one."""
    arch, mean, std = Arch(), LATENTS_MEAN, LATENTS_STD
    config_path = os.path.join(os.path.dirname(path), "config.json")
    if os.path.isfile(config_path):
      arch, mean, std = read_config(config_path)
    return cls(load_params(path, arch), arch, mean, std, source=path)

  @classmethod
  def from_weights_dir(cls, weights_dir: str) -> "Wan21Codec":
    return cls.from_file(find_weights(weights_dir))

  def encode(self, frames):
    if not isinstance(frames, jax.Array):  # a device array keeps its sharding (data_prep.encode)
      frames = np.asarray(frames)
    self.check_frames(frames)
    used = 1 + (self.latent_frames(frames.shape[1]) - 1) * self.temporal_factor
    video = frames[:, :used].astype(np.float32) / 127.5 - 1.0
    mean = encode_mean(self.params, self.arch, video)
    return (mean - self.latents_mean) / self.latents_std

  def decode_float(self, latents) -> np.ndarray:
    """Normalised latents (B,T',h,w,C) -> float32 frames in [-1,1] (B,1+4(T'-1),8h,8w,3)."""
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 5 or latents.shape[-1] != self.latent_channels:
      raise ValueError(f"wan21 codec: expected latents (B,T',h,w,{self.latent_channels}), got "
                       f"{latents.shape}")
    return decode_pixels(self.params, self.arch, latents * self.latents_std + self.latents_mean)

  def decode(self, latents) -> np.ndarray:
    pixels = self.decode_float(latents)
    return np.clip(np.rint((pixels + 1.0) * 127.5), 0, 255).astype(np.uint8)

  def config(self) -> dict:
    a = self.arch
    return dict(name=self.name, temporal_factor=self.temporal_factor,
                spatial_factor=self.spatial_factor, latent_channels=self.latent_channels,
                base_dim=a.base_dim, dim_mult=list(a.dim_mult), num_res_blocks=a.num_res_blocks,
                temporal_downsample=list(a.temporal_downsample), latent="posterior mean",
                latents_mean=self.latents_mean.tolist(), latents_std=self.latents_std.tolist(),
                scaling="x/127.5-1", weights=os.path.basename(self.source))
