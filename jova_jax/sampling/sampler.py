"""The jitted sampler: a batch of conditions -> flow ODE from sigma = 1 to 0 -> latents.

One jitted step per ODE step (one compile for every step and solver: the solver's weights are
traced numbers, see solvers.SolverPlan) runs the model once on [conditional ; unconditional]
(drop_text on the second half), applies separate video and audio guidance, then the solver's
corrector and predictor. A given modality (audio-to-video, video-to-audio) enters at sigma 0
and its latents are put back after every step, so it comes out unchanged. The batch is sharded
by rules.batch_sharding (act_batch); each prompt's noise comes from its own seed alone, so a prompt gives the
same output whatever batch or position it lands in.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jova_jax import config_lib, flow
from jova_jax.model import sharded
from jova_jax.parallel import rules
from jova_jax.sampling import solvers



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
    m_video = solvers.guided(m_video[:b], m_video[b:], scales[0])
    m_audio = solvers.guided(m_audio[:b], m_audio[b:], scales[1])
  return m_video, m_audio


def _ode_step(graphdef, guided, flow_cfg, params, state, cond, sigma, w_pred, w_corr, scales):
  """One solver step for both modalities; state[k] = (x, x_prev, m_prev, m_prev2)."""
  x_video, x_audio = state["video"][0], state["audio"][0]
  m_video, m_audio = _data_predictions(graphdef, params, x_video, x_audio, cond, sigma, scales,
                                       guided, flow_cfg)
  new = {}
  for key, m in (("video", m_video), ("audio", m_audio)):
    x, x_prev, m_prev, m_prev2 = state[key]
    x = solvers.correct(w_corr, x, x_prev, m, m_prev, m_prev2)
    x_next = solvers.predict(w_pred, x, m, m_prev)
    given = flow.per_example(cond[f"given_{key}"], x_next)
    new[key] = (jnp.where(given, cond[f"clean_{key}"], x_next), x, m, m_prev)
  return new


class LatentSampler:
  """Samples latents for batches of conditions with one model on one mesh."""

  def __init__(self, config, mesh, graphdef, params, *, shapes=None):
    """shapes: the run's config_lib.LatentShapes when the caller derived them."""
    self.config, self.mesh, self.graphdef, self.params = config, mesh, graphdef, params
    self.shapes = shapes or config_lib.latent_shapes(config)
    self.batch_shards = rules.batch_shards(mesh)
    self._batch_sharding = rules.batch_sharding(mesh)
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
    plan = solvers.solver_plan(settings.solver, settings.steps, settings.shift)
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
        given = flow.per_example(cond[f"given_{key}"], noise)
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
