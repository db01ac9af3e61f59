"""Batched generation: prompts -> conditions -> flow ODE from sigma = 1 to 0 -> media files.

One jitted step per ODE step (one compile for every step and solver: the solver's weights are
traced numbers, see flow.SolverPlan) runs the model once on [conditional ; unconditional]
(drop_text on the second half), applies separate video and audio guidance, then the solver's
corrector and predictor. A given modality (audio-to-video, video-to-audio) enters at sigma 0
and its latents are put back after every step, so it comes out unchanged. The batch is sharded
over ("data", "fsdp"); each prompt's noise comes from its own seed alone, so a prompt gives the
same output whatever batch or position it lands in.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jova_jax import codecs, config_lib, files, flow, text
from jova_jax.data import latent_norm
from jova_jax.errors import UserError
from jova_jax.media import io as media
from jova_jax.model import sharded
from jova_jax.parallel import mesh as mesh_lib
from jova_jax.text import base as text_base
from jova_jax.training import checkpoint, finetune

BATCH_AXES = ("data", "fsdp")
CAPTION_FIELDS = ("video_caption", "audio_caption", "transcript")
PROMPT_FIELDS = CAPTION_FIELDS + ("prompt", "seed", "image", "audio", "video", "name",
                                  "frames", "height", "width")


class PromptError(UserError):
  """A prompt line that cannot be sampled; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Settings:
  steps: int
  solver: str
  shift: float
  video_guidance: float
  audio_guidance: float

  @classmethod
  def from_config(cls, config, **overrides) -> "Settings":
    """config.sample.* with the non-None overrides on top."""
    s = config.sample
    # Unset, the sampler's shift is the training one: it then walks the sigmas the model saw.
    shift = config.flow.shift if s.get("shift") is None else s.shift
    values = dict(steps=s.steps, solver=s.solver, shift=shift, video_guidance=s.video_guidance,
                  audio_guidance=s.audio_guidance)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(steps=int(values["steps"]), solver=str(values["solver"]),
               shift=float(values["shift"]), video_guidance=float(values["video_guidance"]),
               audio_guidance=float(values["audio_guidance"]))


@dataclasses.dataclass
class Prompt:
  line: int               # 1-based line in the prompts file
  name: str               # output file stem
  text: str               # the structured prompt
  seed: int
  image: str | None = None  # I2V reference image
  audio: str | None = None  # given speech: audio-to-video
  video: str | None = None  # given video: video-to-audio


# ---------------------------------------------------------------- prompts

def parse_prompt(record, *, line: int, where: str, default_seed: int, config) -> Prompt:
  """One JSON line -> Prompt; raises PromptError naming `where` (file:line)."""
  if not isinstance(record, dict):
    raise PromptError(f"{where}: expected a JSON object, got {type(record).__name__}")
  unknown = sorted(set(record) - set(PROMPT_FIELDS))
  if unknown:
    raise PromptError(f"{where}: unknown keys {unknown}; known: {list(PROMPT_FIELDS)}")
  if "prompt" in record:
    if any(k in record for k in CAPTION_FIELDS):
      raise PromptError(f"{where}: give either 'prompt' or {list(CAPTION_FIELDS)}, not both")
    prompt = record["prompt"]
  else:
    missing = [k for k in CAPTION_FIELDS if k not in record]
    if missing:
      raise PromptError(f"{where}: missing {missing} (or give a ready 'prompt')")
    if not all(isinstance(record[k], str) for k in CAPTION_FIELDS):
      raise PromptError(f"{where}: {list(CAPTION_FIELDS)} must be strings")
    prompt = text_base.structured_prompt(record)
  if not isinstance(prompt, str) or not prompt.strip():
    raise PromptError(f"{where}: the prompt is empty")
  shapes = {"frames": config.video.frames, "height": config.video.height,
            "width": config.video.width}
  for key, model_value in shapes.items():
    if key in record and record[key] != model_value:
      raise PromptError(f"{where}: asks for {key}={record[key]!r} but the model makes "
                        f"{config.video.frames} frames of {config.video.height}x"
                        f"{config.video.width} (video.{key}={model_value})")
  seed = record.get("seed", default_seed + line - 1)
  if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 32:
    raise PromptError(f"{where}: seed must be an integer in [0, 2**32), got {seed!r}")
  paths = {}
  for key in ("image", "audio", "video"):
    value = record.get(key)
    if value is not None and (not isinstance(value, str) or not value):
      raise PromptError(f"{where}: {key!r} must be a file path, got {value!r}")
    paths[key] = value
  if paths["audio"] and paths["video"]:
    raise PromptError(f"{where}: both 'audio' and 'video' are given: nothing left to generate")
  if paths["image"] and paths["video"]:
    raise PromptError(f"{where}: 'image' and 'video' both fix the video; give one")
  name = record.get("name", f"sample_{line:05d}")
  if not isinstance(name, str) or not name or os.sep in name or name.startswith("."):
    raise PromptError(f"{where}: name must be a plain file stem, got {name!r}")
  return Prompt(line=line, name=name, text=prompt, seed=seed, **paths)


def read_prompts(path: str, *, default_seed: int, config) -> tuple[list[Prompt], list[str]]:
  """(good prompts, one error message per bad line). A missing file is an error by itself."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompts file {path} does not exist")
  prompts, errors, names = [], [], {}
  base = os.path.dirname(os.path.abspath(path))
  for line, where, record in files.jsonl_records(path):
    try:
      if isinstance(record, ValueError):
        raise PromptError(str(record))
      prompt = parse_prompt(record, line=line, where=where, default_seed=default_seed,
                            config=config)
    except PromptError as e:
      errors.append(str(e))
      continue
    if prompt.name in names:
      errors.append(f"{where}: name {prompt.name!r} is already used on line {names[prompt.name]}")
      continue
    names[prompt.name] = line
    for key in ("image", "audio", "video"):  # relative to the prompts file
      value = getattr(prompt, key)
      if value and not os.path.isabs(value):
        setattr(prompt, key, os.path.join(base, value))
    prompts.append(prompt)
  return prompts, errors


# ---------------------------------------------------------------- loading a run

def locate_checkpoint(path: str) -> tuple[str, int | None]:
  """(checkpoints dir, step or None for the latest) from a workdir, checkpoints dir or step dir."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  if os.path.isdir(os.path.join(path, "state")) and os.path.basename(path.rstrip("/")).isdigit():
    return os.path.dirname(path.rstrip("/")), int(os.path.basename(path.rstrip("/")))
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  return path, None


def apply_overrides(config, overrides: list[str]):
  """'a.b=value' strings (value as JSON, else a string) onto a copy of config."""
  config = ml_collections.ConfigDict(config.to_dict())
  for item in overrides:
    key, sep, raw = item.partition("=")
    if not sep:
      raise ValueError(f"config override {item!r}: expected KEY=VALUE, e.g. mesh.fsdp=-1")
    try:
      value = json.loads(raw)
    except json.JSONDecodeError:
      value = raw
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise KeyError(f"config override {item!r}: no key {key!r} in the run's config")
      node = node[p]
    if leaf not in node:
      raise KeyError(f"config override {item!r}: no key {key!r} in the run's config")
    node[leaf] = value
  return config


def load_run(path: str, *, overrides=(), subtree: str | None = None, mesh=None,
             lora_scale: float = 1.0):
  """(config, mesh, graphdef, params) of a checkpoint; params ('ema' by default, 'params'
  when the run kept no EMA) are read straight into their shardings on the current mesh, with
  a run's frozen params or LoRA base (adapters scaled by lora_scale: finetune.py)."""
  directory, step = locate_checkpoint(path)
  with checkpoint.Checkpointer(directory, every_steps=1, keep=1, read_only=True) as ckpt:
    try:
      saved = ckpt.restore_config(step)
    except FileNotFoundError as e:
      raise FileNotFoundError(f"checkpoint {path}: {e}") from e
  config = apply_overrides(ml_collections.ConfigDict(saved), list(overrides))
  config_lib.validate(config)
  mesh = mesh if mesh is not None else mesh_lib.make_mesh(config)
  if subtree is None:
    subtree = "ema" if float(config.train.get("ema_decay", 0.0)) > 0 else "params"
  graphdef, abstract, _ = sharded.split_abstract(config)
  shardings = sharded.param_shardings(config, mesh)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  step_path = os.path.join(directory, str(step)) if step is not None else directory
  params = finetune.load_model_params(config, step_path, target, subtree, lora_scale)
  return config, mesh, graphdef, params


def text_encoder_for(config):
  """The encoder named in the run's dataset metadata (what training used), else text.encoder."""
  data_dir = config.data.get("dir", "")
  if data_dir and os.path.exists(os.path.join(data_dir, "metadata.json")):
    from jova_jax.data.features import read_metadata
    name = read_metadata(data_dir).get("text_encoder", {}).get("name")
    if name and name != config.text.encoder:
      config = ml_collections.ConfigDict(config.to_dict())
      config.text.encoder = name
  return text.get_text_encoder(config)


# ---------------------------------------------------------------- the ODE

def _per_example(flags, x):
  """(B,) flags broadcast against x (B, ...)."""
  return flags.reshape(flags.shape + (1,) * (x.ndim - 1))


def _noise(seeds, video_shape, audio_shape):
  def one(seed):
    k_video, k_audio = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(k_video, video_shape, jnp.float32),
            jax.random.normal(k_audio, audio_shape, jnp.float32))
  return jax.vmap(one)(seeds)


def _data_predictions(graphdef, params, x_video, x_audio, cond, sigma, scales, guided: bool,
                      flow_cfg):
  """Guided x0 estimates (m_video, m_audio) at one sigma; a given modality is fed at sigma 0."""
  b = x_video.shape[0]
  sigma_video = jnp.where(cond["given_video"], 0.0, sigma)
  sigma_audio = jnp.where(cond["given_audio"], 0.0, sigma)
  inputs = (x_video, x_audio, cond["text"], cond["text_mask"], sigma_video, sigma_audio,
            cond["first_frame"], cond["use_first_frame"])
  drop = jnp.zeros((b,), bool)
  if guided:  # [conditional ; unconditional] in one forward
    inputs = tuple(jnp.concatenate([x, x]) for x in inputs)
    drop = jnp.concatenate([drop, jnp.ones((b,), bool)])
  xv, xa, txt, txt_mask, sv, sa, ff, use_ff = inputs
  out_video, out_audio = sharded.apply(graphdef, params, xv, xa, txt, txt_mask, sv, sa,
                                       first_frame=ff, use_first_frame=use_ff, drop_text=drop)
  m_video = flow.data_prediction(out_video, xv, sv, flow_cfg)
  m_audio = flow.data_prediction(out_audio, xa, sa, flow_cfg)
  if guided:
    m_video = flow.guided(m_video[:b], m_video[b:], scales[0])
    m_audio = flow.guided(m_audio[:b], m_audio[b:], scales[1])
  return m_video, m_audio


def _ode_step(graphdef, guided, flow_cfg, params, state, cond, sigma, w_pred, w_corr, scales):
  """One solver step for both modalities; state[k] = (x, x_prev, m_prev, m_prev2)."""
  x_video, x_audio = state["video"][0], state["audio"][0]
  m_video, m_audio = _data_predictions(graphdef, params, x_video, x_audio, cond, sigma, scales,
                                       guided, flow_cfg)
  new = {}
  for key, m in (("video", m_video), ("audio", m_audio)):
    x, x_prev, m_prev, m_prev2 = state[key]
    x = flow.correct(w_corr, x, x_prev, m, m_prev, m_prev2)
    x_next = flow.predict(w_pred, x, m, m_prev)
    given = _per_example(cond[f"given_{key}"], x_next)
    new[key] = (jnp.where(given, cond[f"clean_{key}"], x_next), x, m, m_prev)
  return new


class LatentSampler:
  """Samples latents for batches of conditions with one model on one mesh."""

  def __init__(self, config, mesh, graphdef, params):
    self.config, self.mesh, self.graphdef, self.params = config, mesh, graphdef, params
    self.shapes = config_lib.latent_shapes(config)
    self.batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    self._batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
    self._steps = {}  # guided -> jitted step

  def _step_fn(self, guided: bool):
    if guided not in self._steps:
      def step(params, state, cond, sigma, w_pred, w_corr, scales):
        return _ode_step(self.graphdef, guided, self.config.flow, params, state, cond, sigma,
                         w_pred, w_corr, scales)
      self._steps[guided] = jax.jit(step, donate_argnums=1)
    return self._steps[guided]

  def _shard(self, tree):
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x), self._batch_sharding), tree)

  def own_rows(self, batch_size: int) -> list[int]:
    """The rows of a batch this process writes: each row is written once in the job, by the
    lowest-numbered process whose devices hold it (all rows with one process)."""
    owner = {}
    for device, index in self._batch_sharding.devices_indices_map((batch_size,)).items():
      for row in range(batch_size)[index[0]]:
        owner[row] = min(owner.get(row, device.process_index), device.process_index)
    return [row for row in range(batch_size) if owner[row] == jax.process_index()]

  def sample(self, cond: dict, seeds, settings: Settings, progress=None):
    """cond: numpy arrays with a leading batch axis (see conditions()); seeds (B,) uint32.

    Returns (video latents (B,T',H',W',Cv), audio latents (B,La,Ca), seconds per step), the
    whole batch on every process (gathered from the others in a multi-host job).
    """
    b = len(seeds)
    if b % self.batch_shards:
      raise ValueError(f"batch of {b} is not divisible by the batch shards data*fsdp="
                       f"{self.batch_shards}")
    plan = flow.solver_plan(settings.solver, settings.steps, settings.shift)
    guided = not (settings.video_guidance == 1.0 and settings.audio_guidance == 1.0)
    step = self._step_fn(guided)
    scales = jnp.asarray([settings.video_guidance, settings.audio_guidance], jnp.float32)
    with jax.set_mesh(self.mesh):
      cond = self._shard(cond)
      seeds = jax.device_put(np.asarray(seeds, np.uint32), self._batch_sharding)
      noise_video, noise_audio = jax.jit(_noise, static_argnums=(1, 2))(
          seeds, self.shapes.video, self.shapes.audio)
      state = {}
      for key, noise in (("video", noise_video), ("audio", noise_audio)):
        given = _per_example(cond[f"given_{key}"], noise)
        x = jnp.where(given, cond[f"clean_{key}"], noise)
        state[key] = (x, jnp.zeros_like(x), jnp.zeros_like(x), jnp.zeros_like(x))
      times = []
      for i in range(plan.steps):
        start = time.perf_counter()
        state = step(self.params, state, cond, jnp.float32(plan.sigmas[i]),
                     jnp.asarray(plan.predictor[i], jnp.float32),
                     jnp.asarray(plan.corrector[i], jnp.float32), scales)
        jax.block_until_ready(state["video"][0])
        times.append(time.perf_counter() - start)
        if progress is not None:
          progress(i + 1, plan.steps)
      return _whole(state["video"][0]), _whole(state["audio"][0]), times


def _whole(x: jax.Array) -> np.ndarray:
  """All of a batch-sharded array on this process (gathered from the others if need be)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ---------------------------------------------------------------- conditions and media

@dataclasses.dataclass
class Media:
  """What a prompt gives besides text, at the model's size, plus its latents."""
  frames: np.ndarray | None = None       # given video (T,H,W,3) uint8
  wave: np.ndarray | None = None         # given audio (S,) float32
  first_frame: np.ndarray | None = None  # I2V latent (H',W',Cv)
  video_latent: np.ndarray | None = None  # latents in model space (normalised, as in training)
  audio_latent: np.ndarray | None = None


def text_conditions(text, text_mask, shapes) -> dict:
  """The condition batch (see LatentSampler.sample) of text embeddings (B, L, Dt) and masks
  (B, L) alone: no reference frame, nothing given."""
  b = len(text)
  return {"text": np.asarray(text, np.float32), "text_mask": np.asarray(text_mask, bool),
          "first_frame": np.zeros((b,) + shapes.video[1:], np.float32),
          "use_first_frame": np.zeros(b, bool), "given_video": np.zeros(b, bool),
          "given_audio": np.zeros(b, bool),
          "clean_video": np.zeros((b,) + shapes.video, np.float32),
          "clean_audio": np.zeros((b,) + shapes.audio, np.float32)}


class Pipeline:
  """Prompts -> conditions (text encoder, codecs) -> latents -> mp4 / wav / json files.
  Latents are normalised after encoding and denormalised before decoding with the run's
  statistics (data/latent_norm.py: data.latent_norm of the checkpoint's config)."""

  def __init__(self, sampler: LatentSampler, text_encoder=None):
    self.sampler = sampler
    config = sampler.config
    self.config = config
    self.text_encoder = text_encoder if text_encoder is not None else text_encoder_for(config)
    self.video_codec = codecs.get_video_codec(config)
    self.audio_codec = codecs.get_audio_codec(config)
    self.norm = latent_norm.of_run(config)
    self.shapes = sampler.shapes

  def media(self, prompt: Prompt) -> Media:
    """Reads and encodes the prompt's files; raises PromptError naming its line."""
    v, a = self.config.video, self.config.audio
    out = Media()
    try:
      if prompt.image:
        image = media.read_image(prompt.image, v.height, v.width)
        out.first_frame = self._encode_video(image[None])[0]
      if prompt.video:
        out.frames = media.read_video(prompt.video, v.fps, v.frames, v.height, v.width)
        out.video_latent = self._encode_video(out.frames)
      if prompt.audio:
        out.wave = media.read_audio(prompt.audio, a.sample_rate, self.shapes.num_samples)
        out.audio_latent = np.asarray(
            self.norm.audio.normalize(self.audio_codec.encode(out.wave[None])[0]))
    except media.MediaError as e:
      raise PromptError(f"line {prompt.line}: {e}") from e
    return out

  def _encode_video(self, frames: np.ndarray) -> np.ndarray:
    """(T,H,W,3) uint8 -> model-space latents (T',H',W',Cv)."""
    return np.asarray(self.norm.video.normalize(self.video_codec.encode(frames[None])[0]))

  def conditions(self, prompts: list[Prompt], given: list[Media]) -> dict:
    """Numpy batch of the model's conditions (keys: text, text_mask, first_frame,
    use_first_frame, given_video, given_audio, clean_video, clean_audio)."""
    emb, mask = self.text_encoder.encode([p.text for p in prompts],
                                         max_length=int(self.config.text.max_length))
    emb = np.where(mask[..., None], emb, 0.0).astype(np.float32)  # zero padding, as in training
    cond = text_conditions(emb, mask, self.shapes)
    for i, m in enumerate(given):
      if m.first_frame is not None:
        cond["first_frame"][i], cond["use_first_frame"][i] = m.first_frame, True
      if m.video_latent is not None:
        cond["clean_video"][i], cond["given_video"][i] = m.video_latent, True
      if m.audio_latent is not None:
        cond["clean_audio"][i], cond["given_audio"][i] = m.audio_latent, True
    return cond

  def write(self, outdir: str, prompt: Prompt, given: Media, video_latent, audio_latent,
            settings: Settings, timings: dict) -> dict:
    """Decodes one sample (a given modality is written as it was given) and writes
    <name>.mp4, <name>.wav and <name>.json; returns the json record."""
    start = time.perf_counter()
    v, a = self.config.video, self.config.audio
    frames = given.frames if given.frames is not None else \
        self.video_codec.decode(self.norm.video.denormalize(video_latent[None]))[0]
    wave = given.wave if given.wave is not None else \
        self.audio_codec.decode(self.norm.audio.denormalize(audio_latent[None]))[0]
    wave = media.fit_length(wave, self.shapes.num_samples)
    stem = os.path.join(outdir, prompt.name)
    media.write_wav(stem + ".wav", wave, a.sample_rate)
    media.write_mp4(stem + ".mp4", frames, v.fps, wave, a.sample_rate)
    record = {"line": prompt.line, "name": prompt.name, "prompt": prompt.text, "seed": prompt.seed,
              "image": prompt.image, "audio": prompt.audio, "video": prompt.video,
              "settings": dataclasses.asdict(settings),
              "frames": int(frames.shape[0]), "fps": float(v.fps),
              "height": int(frames.shape[1]), "width": int(frames.shape[2]),
              "sample_rate": int(a.sample_rate), "seconds": wave.size / a.sample_rate,
              "timings": dict(timings, decode_write_s=time.perf_counter() - start)}
    files.write_text(stem + ".json", json.dumps(record, indent=1))
    return record


def check_outdir(outdir: str) -> None:
  """Creates the output folder, or refuses one that is a file or not writable."""
  if os.path.exists(outdir) and not os.path.isdir(outdir):
    raise UserError(f"--outdir={outdir}: expected a folder, found a file")
  os.makedirs(outdir, exist_ok=True)
  if not os.access(outdir, os.W_OK):
    raise UserError(f"--outdir={outdir}: expected a writable folder, found no write permission")


def run(pipeline: Pipeline, prompts: list[Prompt], outdir: str, settings: Settings,
        batch_size: int, log=print) -> tuple[list[dict], list[str]]:
  """Samples every prompt in batches of batch_size (the last padded by repeating a prompt);
  a prompt whose files cannot be read or written is reported and skipped. Returns
  (records, errors). In a multi-host job every process reads every prompt and runs the same
  global batches, and writes (and returns) only the prompts of its own batch rows
  (LatentSampler.own_rows): each prompt once in the job; read errors come from process 0."""
  import tqdm
  check_outdir(outdir)
  ready, errors = [], []
  for prompt in prompts:
    start = time.perf_counter()
    try:
      ready.append((prompt, pipeline.media(prompt), time.perf_counter() - start))
    except PromptError as e:
      errors.append(str(e))
  if jax.process_index():
    errors = []  # the same on every process: process 0 reports them
  own = set(pipeline.sampler.own_rows(batch_size))
  records = []
  bar = tqdm.tqdm(total=len(ready) * settings.steps, unit="step", desc="sampling")
  for first in range(0, len(ready), batch_size):
    chunk = ready[first:first + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
    start = time.perf_counter()
    cond = pipeline.conditions([p for p, _, _ in padded], [m for _, m, _ in padded])
    encode_s = time.perf_counter() - start
    video, audio, step_times = pipeline.sampler.sample(
        cond, [p.seed for p, _, _ in padded], settings,
        progress=lambda done, total, n=len(chunk): bar.update(n))
    for i, (prompt, given, media_s) in enumerate(chunk):
      if i not in own:
        continue
      timings = {"read_media_s": media_s, "encode_text_s": encode_s, "ode_s": sum(step_times),
                 "ode_step_s": step_times, "batch_size": batch_size, "batch_prompts": len(chunk)}
      try:
        records.append(pipeline.write(outdir, prompt, given, video[i], audio[i], settings,
                                      timings))
      except (media.MediaError, OSError) as e:  # a full disk, a bad name: the others go on
        errors.append(f"line {prompt.line}: writing {prompt.name}: {e}")
  bar.close()
  for e in errors:
    log(f"skipped: {e}")
  return records, errors
