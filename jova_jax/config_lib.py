"""Config loading, derived shapes and validation (one place for every derived number)."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os

import ml_collections

from jova_jax.errors import UserError


class ConfigError(UserError):
  """A configuration that cannot work; the message names the keys and values."""


def load_config(path: str) -> ml_collections.ConfigDict:
  """Loads `configs/x.py` or `configs/x.py:variant` (get_config(variant))."""
  path, _, arg = path.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(f"_jova_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


@dataclasses.dataclass(frozen=True)
class LatentShapes:
  video: tuple[int, int, int, int]  # (T', H', W', Cv)
  audio: tuple[int, int]            # (La, Ca)
  num_samples: int                  # audio samples per clip
  video_tokens: int
  audio_tokens: int
  text_tokens: int

  @property
  def joint_tokens(self) -> int:
    # Joint sequence: [audio ; text_a ; text_v ; video].
    return self.audio_tokens + 2 * self.text_tokens + self.video_tokens


def latent_frames(frames: int, temporal_factor: int) -> int:
  """Causal video VAE: the first frame alone, then one latent per temporal_factor frames."""
  return 1 + (frames - 1) // temporal_factor


def audio_num_samples(config) -> int:
  return int(round(config.video.frames / config.video.fps * config.audio.sample_rate))


def audio_latent_length(num_samples: int, sample_rate: int, latents_per_second: float) -> int:
  return int(math.floor(num_samples * latents_per_second / sample_rate))


def latent_shapes(config) -> LatentShapes:
  v, a, m = config.video, config.audio, config.model
  t = latent_frames(v.frames, v.temporal_factor)
  h, w = v.height // v.spatial_factor, v.width // v.spatial_factor
  samples = audio_num_samples(config)
  la = audio_latent_length(samples, a.sample_rate, a.latents_per_second)
  pt, ph, pw = m.video_patch
  return LatentShapes(
      video=(t, h, w, v.latent_channels), audio=(la, a.latent_channels), num_samples=samples,
      video_tokens=(t // pt) * (h // ph) * (w // pw), audio_tokens=la // m.audio_patch,
      text_tokens=config.text.max_length)


def audio_positions_per_video_frame(config) -> float:
  """Audio latents per video latent frame: maps audio positions onto the video time axis.

  Video latent frame i (i >= 1) ends at pixel frame i * temporal_factor, i.e. at time
  i * temporal_factor / fps; audio latent j sits at j / latents_per_second.
  """
  v, a = config.video, config.audio
  return a.latents_per_second * v.temporal_factor / v.fps


def rope_split(head_dim: int) -> tuple[int, int, int]:
  """Wan's 3D RoPE split of head_dim into (time, height, width) bands."""
  s = head_dim // 6
  return head_dim - 4 * s, 2 * s, 2 * s


# ------------------------------------------------------------------ the run's spec
@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What JoVA(...) is built from: config.model plus the few video/audio/text/parallel facts
  the model needs (built once per run by run_spec, or model_spec for the model alone)."""
  shapes: LatentShapes
  text_width: int
  per_video_frame: float  # audio_positions_per_video_frame
  hidden: int
  heads: int
  mlp_ratio: float
  dual_blocks: int
  single_blocks: int
  video_patch: tuple[int, int, int]
  audio_patch: int
  i2v: bool
  i2v_mask_channels: int
  freq_dim: int
  rope_theta: float
  norm_eps: float
  compute_dtype: str
  param_dtype: str
  remat: str
  scan_unroll: int
  context_strategy: str
  attention_kernel: str
  attention_chunk: int
  lora: object = None  # FrozenConfigDict of model.lora (model/lora.py), or None

  @property
  def head_dim(self) -> int:
    return self.hidden // self.heads

  @property
  def mlp_dim(self) -> int:
    return int(self.hidden * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Everything a run derives from its config, derived once (run_spec) and passed down."""
  shapes: LatentShapes
  model: ModelSpec
  batch_size: int
  grad_accum: int

  def check_mesh(self, mesh_shape: dict, *, batch: bool = True) -> None:
    """The checks of validate that need the mesh, from the spec alone (batch=False: not the
    train batch's, for a model that only samples)."""
    m = self.model
    errors = _mesh_errors(m.heads, m.mlp_dim, m.context_strategy,
                          self.batch_size if batch else None, mesh_shape)
    if errors:
      raise ConfigError("invalid config: " + "; ".join(errors))


def _model_spec(config, shapes: LatentShapes) -> ModelSpec:
  m, p = config.model, config.parallel
  lora = m.get("lora")
  return ModelSpec(
      shapes=shapes, text_width=int(config.text.width),
      per_video_frame=audio_positions_per_video_frame(config), hidden=int(m.hidden),
      heads=int(m.heads), mlp_ratio=float(m.mlp_ratio), dual_blocks=int(m.dual_blocks),
      single_blocks=int(m.single_blocks), video_patch=tuple(int(x) for x in m.video_patch),
      audio_patch=int(m.audio_patch), i2v=bool(m.i2v), i2v_mask_channels=int(m.i2v_mask_channels),
      freq_dim=int(m.freq_dim), rope_theta=float(m.rope_theta), norm_eps=float(m.norm_eps),
      compute_dtype=str(m.compute_dtype), param_dtype=str(m.param_dtype), remat=str(m.remat),
      scan_unroll=int(m.scan_unroll), context_strategy=str(p.context_strategy),
      attention_kernel=str(p.attention_kernel), attention_chunk=int(p.attention_chunk),
      lora=ml_collections.FrozenConfigDict(lora) if lora is not None else None)


def run_spec(config, mesh_shape: dict | None = None) -> RunSpec:
  """Validates config (with the mesh's checks when mesh_shape is given) and derives the run's
  shapes and model spec: the one entry into this module a run makes."""
  validate(config, mesh_shape)
  shapes = latent_shapes(config)
  return RunSpec(shapes=shapes, model=_model_spec(config, shapes),
                 batch_size=int(config.train.batch_size), grad_accum=int(config.train.grad_accum))


def model_spec(config) -> ModelSpec:
  """The model's spec alone (validated): for a model built outside a run (tests, tools)."""
  return run_spec(config).model


# ------------------------------------------------------------------ ranges and enums
# (check(value) -> bool, what is expected) per key of configs/base.py; a key a config lacks is
# skipped. The enums are those of the modules that read them (a test keeps them in step).

def _at_least(low):
  return (lambda v: v >= low), f"a number >= {low}"


def _above(low):
  return (lambda v: v > low), f"a number > {low}"


def _fraction(upper_open: bool = False):
  if upper_open:
    return (lambda v: 0 <= v < 1), "a number in [0, 1)"
  return (lambda v: 0 <= v <= 1), "a number in [0, 1]"


def _one_of(*names):
  return (lambda v: v in names), f"one of {', '.join(names)}"


_MESH_SIZE = (lambda v: v == -1 or v >= 1), "a size >= 1, or -1 (fills the rest)"

# Every enum-valued key, declared once: its allowed values (validate refuses any other with
# "key=value: expected one of ..."). The modules that read them keep the same names
# (tests/test_config.py checks).
_DTYPE_NAMES = ("float32", "bfloat16", "float16")
ENUMS: dict[str, tuple[str, ...]] = {
    "video.codec": ("pixels", "wan21"),
    "audio.codec": ("mel", "mmaudio16k", "mmaudio44k"),
    "text.encoder": ("minilm", "t5"),
    "model.remat": ("none", "full", "save_dots", "offload_dots"),
    "model.lora.targets": ("qkv", "out", "mlp", "embedders"),
    "model.lora.towers": ("video", "audio"),
    "flow.density": ("logit_normal", "uniform", "mode"),
    "flow.prediction": ("velocity", "x0"),
    "data.source": ("tfds", "synthetic"),
    "train.schedule": ("cosine", "constant"),
    "train.mu_dtype": ("params", *_DTYPE_NAMES),
    "parallel.context_strategy": ("none", "all_gather", "ulysses", "ring"),
    "parallel.attention_kernel": ("auto", "xla", "chunked", "cudnn", "splash", "cpu"),
    "sample.solver": ("euler", "unipc"),
    "model.param_dtype": _DTYPE_NAMES,
    "model.compute_dtype": _DTYPE_NAMES,
    "train.frozen_dtype": _DTYPE_NAMES,
}

RULES = {
    **{key: _one_of(*names) for key, names in ENUMS.items()},
    "video.fps": _above(0),
    "video.frames": _at_least(1), "video.height": _at_least(1), "video.width": _at_least(1),
    "video.temporal_factor": _at_least(1), "video.spatial_factor": _at_least(1),
    "video.latent_channels": _at_least(1),
    "audio.sample_rate": _above(0),
    "audio.latent_channels": _at_least(1), "audio.latents_per_second": _above(0),
    "text.width": _at_least(1),
    "text.max_length": _at_least(1),
    "model.hidden": _at_least(1), "model.heads": _at_least(1), "model.mlp_ratio": _above(0),
    "model.dual_blocks": _at_least(0), "model.single_blocks": _at_least(0),
    "model.video_patch": _at_least(1), "model.audio_patch": _at_least(1),
    "model.i2v_mask_channels": _at_least(0), "model.freq_dim": _at_least(2),
    "model.rope_theta": _above(0), "model.norm_eps": _above(0),
    "model.scan_unroll": _at_least(1),
    "model.lora.rank": _at_least(0), "model.lora.alpha": _above(0),
    "model.lora.dropout": _fraction(upper_open=True),
    "flow.logit_std": _above(0),
    "flow.shift": _above(0), "flow.p_clean_audio": _fraction(), "flow.p_clean_video": _fraction(),
    "flow.x0_min_sigma": _above(0),
    "flow.sigma_data": _at_least(0),
    "loss.lambda_mouth": _at_least(0), "loss.lambda_audio": _at_least(0),
    "data.worker_count": _at_least(0),
    "data.max_train_clips": _at_least(0),
    "data.worker_buffer_size": _at_least(1), "data.read_threads": _at_least(1),
    "data.p_uncond": _fraction(), "data.p_i2v": _fraction(),
    "train.steps": _at_least(1), "train.batch_size": _at_least(1), "train.seed": _at_least(0),
    "train.lr": _at_least(0), "train.warmup_steps": _at_least(0), "train.min_lr_ratio": _fraction(),
    "train.weight_decay": _at_least(0), "train.b1": _fraction(upper_open=True),
    "train.b2": _fraction(upper_open=True), "train.eps": _above(0),
    "train.clip_norm": _at_least(0), "train.grad_accum": _at_least(1),
    "train.ema_decay": _fraction(upper_open=True), "train.log_every": _at_least(1),
    "train.max_nonfinite": _at_least(1), "train.stop_check_every": _at_least(1),
    "eval.every_steps": _at_least(0), "eval.batches": _at_least(1), "eval.sigmas": _fraction(),
    "eval.sample_every_steps": _at_least(0), "eval.sample_prompts": _at_least(1),
    "eval.sample_steps": _at_least(0),
    "checkpoint.every_steps": _at_least(0), "checkpoint.keep": _at_least(0),
    "mesh.data": _MESH_SIZE, "mesh.fsdp": _MESH_SIZE, "mesh.context": _MESH_SIZE,
    "mesh.tensor": _MESH_SIZE, "mesh.dcn_data": _at_least(1), "mesh.dcn_fsdp": _at_least(1),
    "parallel.attention_chunk": _at_least(1),
    "sample.steps": _at_least(1), "sample.shift": _above(0), "sample.video_guidance": _at_least(0),
    "sample.audio_guidance": _at_least(0), "sample.batch_size": _at_least(1),
}


def _lookup(config, key: str):
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return None
    node = node[part]
  return node


def range_errors(config) -> list[str]:
  """'key=value: expected ...' for every key of RULES outside its range or enum."""
  errors = []
  for key, (check, expected) in RULES.items():
    value = _lookup(config, key)
    if value is None:
      continue
    try:
      ok = all(check(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))
    except TypeError:  # a string where a number belongs, or the reverse
      ok = False
    if not ok:
      errors.append(f"{key}={value!r}: expected {expected}")
  return errors


def validate(config, mesh_shape: dict | None = None) -> None:
  """Fails early, naming the keys and values, on a config that cannot work."""
  errors = range_errors(config)
  if errors:  # the checks below divide by these numbers
    raise ConfigError("invalid config: " + "; ".join(errors))
  m, v = config.model, config.video
  if m.hidden % m.heads:
    errors.append(f"model.hidden={m.hidden} is not divisible by model.heads={m.heads}")
  head_dim = m.hidden // max(m.heads, 1)
  t_band, h_band, _ = rope_split(head_dim)
  if h_band < 2 or t_band < 2 or t_band % 2 or h_band % 2:
    errors.append(f"head_dim={head_dim} (model.hidden / model.heads) is too small for the 3D RoPE "
                  f"split (time {t_band}, height {h_band}, width {h_band}): each band must be even "
                  f"and >= 2, so head_dim must be even and >= 6")
  if v.height % v.spatial_factor or v.width % v.spatial_factor:
    errors.append(f"video.height x video.width = {v.height}x{v.width} is not divisible by "
                  f"video.spatial_factor={v.spatial_factor}")
  if (v.frames - 1) % v.temporal_factor:
    errors.append(f"video.frames={v.frames} must be 1 + k*video.temporal_factor "
                  f"(temporal_factor={v.temporal_factor})")
  shapes = latent_shapes(config)
  t, h, w, _ = shapes.video
  pt, ph, pw = m.video_patch
  if t % pt or h % ph or w % pw:
    errors.append(f"video latent grid (T',H',W')=({t},{h},{w}) is not divisible by "
                  f"model.video_patch={tuple(m.video_patch)}")
  if shapes.audio[0] % m.audio_patch:
    errors.append(f"audio latent length {shapes.audio[0]} is not divisible by "
                  f"model.audio_patch={m.audio_patch}")
  if config.train.batch_size % config.train.grad_accum:
    errors.append(f"train.batch_size={config.train.batch_size} is not divisible by "
                  f"train.grad_accum={config.train.grad_accum}")
  if shapes.audio[0] < 1:
    errors.append(f"audio latent length is {shapes.audio[0]}: clip too short "
                  f"(video.frames={v.frames}, video.fps={v.fps})")
  if mesh_shape:
    errors += _mesh_errors(int(m.heads), int(m.hidden * m.mlp_ratio),
                           config.parallel.context_strategy, int(config.train.batch_size),
                           mesh_shape)
  if errors:
    raise ConfigError("invalid config: " + "; ".join(errors))


def _mesh_errors(heads: int, ffn: int, strategy: str, batch_size: int | None,
                 mesh_shape: dict) -> list:
  """Divisibility of heads, FFN width, batch (None: not checked) and Ulysses heads by the mesh
  axes."""
  errors, tensor = [], mesh_shape.get("tensor", 1)
  if heads % tensor:
    errors.append(f"model.heads={heads} is not divisible by mesh tensor={tensor}")
  if ffn % tensor:
    errors.append(f"FFN width {ffn} (model.hidden*model.mlp_ratio) is not "
                  f"divisible by mesh tensor={tensor}")
  batch_shards = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
  if batch_size is not None and batch_size % batch_shards:
    errors.append(f"train.batch_size={batch_size} is not divisible by the batch "
                  f"shards data*fsdp={batch_shards}")
  if strategy == "ulysses":
    ctx = mesh_shape.get("context", 1)
    if (heads // tensor) % ctx:
      errors.append(f"parallel.context_strategy=ulysses needs heads per tensor shard "
                    f"({heads}//{tensor}) divisible by mesh context={ctx}")
  return errors
