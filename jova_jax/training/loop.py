"""The training loop, top to bottom: mesh, data, state (restore or init), compile, steps,
eval, checkpoints, metrics.

State is a pytree {"params", "opt_state", "ema", "step", "nonfinite"}, plus "frozen" when
train.trainable or LoRA freezes params ("params" then holds the trainable ones: finetune.py);
everything random comes from (train.seed, step), so a resumed run continues bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jova_jax import cli, config_lib, files
from jova_jax.data import pipeline
from jova_jax.errors import UserError
from jova_jax.model import sharded, summary
from jova_jax.model.jova import JoVA
from jova_jax.parallel import mesh as mesh_lib
from jova_jax.training import checkpoint, finetune, objective, optim, perf, preview
from jova_jax.training.metrics import MetricsWriter
from jova_jax.training.preemption import PreemptionWatcher

# Batch keys the model consumes (the pipeline also yields record_index for bookkeeping).
MODEL_KEYS = ("video", "audio", "mouth_mask", "text", "text_mask", "drop_text", "use_first_frame")


def model_inputs(batch: dict) -> dict:
  return {k: batch[k] for k in MODEL_KEYS}


class TrainingDiverged(RuntimeError):
  """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


@dataclasses.dataclass
class Program:
  """Everything compiled for one config on one mesh."""
  config: object
  mesh: jax.sharding.Mesh
  graphdef: object
  tx: optax.GradientTransformation
  state_shardings: dict
  abstract_state: dict
  batch_sharding: NamedSharding

  def abstract_batch(self):
    s = config_lib.latent_shapes(self.config)
    b = int(self.config.train.batch_size)
    shapes = {
        "video": ((b,) + s.video, jnp.float32), "audio": ((b,) + s.audio, jnp.float32),
        "mouth_mask": ((b,) + s.video[:3], jnp.float32),
        "text": ((b, s.text_tokens, self.config.text.width), jnp.float32),
        "text_mask": ((b, s.text_tokens), jnp.bool_), "drop_text": ((b,), jnp.bool_),
        "use_first_frame": ((b,), jnp.bool_)}
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
            for k, (shape, dtype) in shapes.items()}


# ============================================================================ state
def build_program(config, mesh) -> Program:
  config_lib.validate(config, dict(mesh.shape))
  graphdef, all_params, _ = sharded.split_abstract(config)
  abstract_params, frozen = finetune.partition(config, all_params)
  param_sh, frozen_sh = finetune.partition(config, sharded.param_shardings(config, mesh))
  tx = optim.make_optimizer(config)
  replicated = NamedSharding(mesh, P())
  opt_abstract = jax.eval_shape(tx.init, abstract_params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, param_sh,
                                 transform_non_params=lambda _: replicated)
  shardings = {"params": param_sh, "opt_state": opt_sh, "ema": param_sh,
               "step": replicated, "nonfinite": replicated}
  shapes = {"params": abstract_params, "opt_state": opt_abstract, "ema": abstract_params,
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "nonfinite": jax.ShapeDtypeStruct((), jnp.int32)}
  if frozen:
    shardings["frozen"], shapes["frozen"] = frozen_sh, finetune.frozen_like(frozen, config)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          shapes, shardings)
  return Program(config, mesh, graphdef, tx, shardings, abstract,
                 NamedSharding(mesh, P(("data", "fsdp"))))


def init_state(program: Program):
  """Fresh state, created directly in its shardings."""
  config, tx = program.config, program.tx

  def init():
    model = JoVA(config, rngs=nnx.Rngs(params=int(config.train.seed)))
    params, frozen = finetune.partition(config, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    state = {"params": params, "opt_state": tx.init(params), "ema": params,
             "step": jnp.zeros((), jnp.int32), "nonfinite": jnp.zeros((), jnp.int32)}
    return dict(state, frozen=finetune.frozen_like(frozen, config)) if frozen else state

  with jax.set_mesh(program.mesh):
    return jax.jit(init, out_shardings=program.state_shardings)()


# ============================================================================ steps
def accumulated_grads(loss_fn, params, batch, key, accum: int):
  """((loss, metrics), grads) of loss_fn(params, batch, key) -> (loss, metrics), averaged over
  `accum` micro-batches. Micro-batch i takes examples i::accum (so each stays spread over all
  devices) and the key fold_in(key, i)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum == 1:
    return grad_fn(params, batch, key)
  micro = jax.tree.map(
      lambda x: x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1), batch)

  def body(total, inputs):
    mb, i = inputs
    return jax.tree.map(jnp.add, total, grad_fn(params, mb, jax.random.fold_in(key, i))), None

  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
      grad_fn, params, jax.tree.map(lambda x: x[0], micro), key))
  total, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
  return jax.tree.map(lambda x: x / accum, total)


def make_train_step(program: Program):
  config, graphdef, tx = program.config, program.graphdef, program.tx
  accum = int(config.train.grad_accum)
  ema_decay = float(config.train.ema_decay)
  base_key = jax.random.key(int(config.train.seed))

  def train_step(state, batch):
    params = state["params"]

    def loss_fn(trainable, batch, key):  # gradients of the trainable params only
      return objective.training_loss(
          graphdef, finetune.combine(trainable, state.get("frozen", {})), batch, key, config)

    key = jax.random.fold_in(base_key, state["step"])
    (loss, metrics), grads = accumulated_grads(loss_fn, params, batch, key, accum)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    # Finite loss and gradients give finite AdamW updates: checking the updates too cost a
    # reduction over them that kept XLA from fusing the update, the EMA and the selects.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step changes nothing but the counters.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_params = keep(optax.apply_updates(params, updates), params)
    # EMA warm-up: early on the average must not stay anchored to the random init.
    step_f = state["step"].astype(jnp.float32)
    decay = jnp.minimum(ema_decay, (1.0 + step_f) / (10.0 + step_f))
    ema = jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype),
                       state["ema"], new_params)  # decay is float32: keep model.param_dtype
    new_state = {
        "params": new_params, "opt_state": keep(opt_state, state["opt_state"]),
        "ema": keep(ema, state["ema"]), "step": state["step"] + 1,
        "nonfinite": jnp.where(finite, 0, state["nonfinite"] + 1).astype(jnp.int32)}
    if "frozen" in state:
      new_state["frozen"] = state["frozen"]
    # The lr this update applied (optax counts only the applied steps, not the skipped ones).
    metrics = dict(metrics, grad_norm=grad_norm,
                   lr=optim.applied_learning_rate(config, state["opt_state"]),
                   nonfinite=new_state["nonfinite"])
    return new_state, metrics

  return train_step


def make_eval_step(program: Program):
  """Loss at each fixed sigma (both modalities noised to it) with fixed noise."""
  config, graphdef = program.config, program.graphdef
  sigmas = tuple(float(s) for s in config.eval.sigmas)
  key = jax.random.key(int(config.train.seed) + 1)

  def eval_step(params, batch):
    valid = batch["example_valid"]  # padding rows sit at sigma 0: input only, out of the losses
    out = {"eval_examples": jnp.sum(valid)}
    for i, sigma in enumerate(sigmas):
      s = jnp.where(valid, sigma, 0.0).astype(jnp.float32)
      _, m = objective.loss_at(graphdef, params, batch, jax.random.fold_in(key, i), s, s, config)
      for name in ("loss", "loss_video", "loss_audio", "loss_mouth"):
        out[f"eval_{name}_s{sigma:g}"] = m[name]
    return out

  return eval_step


def compile_train_step(program: Program):
  """Compiled once before step 0; logs memory per device, FLOPs per step and the MFU estimate."""
  step = jax.jit(make_train_step(program),
                 in_shardings=(program.state_shardings, program.batch_sharding),
                 out_shardings=(program.state_shardings, None), donate_argnums=0)
  with jax.set_mesh(program.mesh):
    compiled = step.lower(program.abstract_state, program.abstract_batch()).compile()
  _log_compiled(compiled, program)
  return compiled


def compile_eval_step(program: Program):
  step = jax.jit(make_eval_step(program),
                 in_shardings=(finetune.model_params(program.state_shardings),
                               program.batch_sharding))
  with jax.set_mesh(program.mesh):
    batch = program.abstract_batch()
    batch["example_valid"] = jax.ShapeDtypeStruct(batch["drop_text"].shape, jnp.bool_,
                                                  sharding=program.batch_sharding)
    return step.lower(finetune.model_params(program.abstract_state), batch).compile()


def _log_compiled(compiled, program: Program) -> None:
  try:
    mem = compiled.memory_analysis()
    logging.info("train step memory per device: arguments %.1f MiB, outputs %.1f MiB, temporaries "
                 "%.1f MiB", mem.argument_size_in_bytes / 2**20, mem.output_size_in_bytes / 2**20,
                 mem.temp_size_in_bytes / 2**20)
  except Exception as e:  # Not every backend reports it.
    logging.info("memory_analysis unavailable on %s: %s", jax.default_backend(), e)
  flops = summary.train_step_flops(program.config)
  logging.info("train step: %.3e model FLOPs (analytic), %d devices", flops, jax.device_count())


# ============================================================================ loop
def train(config, workdir: str, *, init_from: str | None = None,
          strict_resume: bool = False) -> dict:
  """Trains to config.train.steps (resuming from workdir if it holds a checkpoint).
  Returns the last logged metrics.

  Nothing is written to workdir before the config, the data and the checkpoint to resume
  from pass their checks. The latest checkpoint that fails to restore is skipped for the one
  before (strict_resume: refused). A signal saves, then raises cli.Stopped (exit 128 + signum).
  """
  # ---------------------------------------------------------------- checks (nothing written)
  config_lib.validate(config)  # ranges and enums, before the mesh divides by them
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir}: expected a folder, found a file")
  mesh_lib.initialize_distributed()
  mesh = mesh_lib.make_mesh(config)
  logging.info("mesh %s on %d processes", dict(mesh.shape), jax.process_count())
  program = build_program(config, mesh)

  # ---------------------------------------------------------------- data
  train_iter = pipeline.make_train_iterator(config, mesh)
  eval_batches = (pipeline.make_eval_iterator(config, mesh)
                  if config.eval.every_steps else None)
  # The run keeps the statistics its batches are normalised with, in the config saved with it
  # and with every checkpoint: the sampler undoes them (data/latent_norm.py).
  config.data.latent_norm = train_iter.latent_norm.to_json()

  # ---------------------------------------------------------------- state: resume or init
  ckpt_dir = os.path.join(workdir, "checkpoints")

  def open_ckpt():
    return checkpoint.Checkpointer(ckpt_dir, every_steps=int(config.checkpoint.every_steps),
                                   keep=int(config.checkpoint.keep),
                                   async_save=bool(config.checkpoint.async_save))

  mesh_lib.barrier("before_state")
  ckpt = open_ckpt() if os.path.isdir(ckpt_dir) else None
  resumed = ckpt.restore_latest(finetune.saved_state(program.abstract_state, config),
                                strict=strict_resume) if ckpt else None
  if resumed is not None:
    start_step, state, data_state = resumed
    if data_state is not None:
      train_iter.set_state(data_state)
    if finetune.uses_base(config):  # a LoRA checkpoint names its base: read it from there
      config.model.lora.base = ckpt.restore_config(start_step)["model"]["lora"]["base"]
      state["frozen"] = finetune.load_base(config, program.abstract_state["frozen"])
    logging.info("resumed from %s at step %d", ckpt.directory, start_step)
  else:
    finetune.require_base_source(config, init_from)
    start_step, state = 0, init_state(program)
    if init_from:
      state = finetune.init_from(state, init_from, program.abstract_state, config)

  # ---------------------------------------------------------------- workdir (checks passed)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    _write_config(workdir, config, start_step)
  ckpt = ckpt or open_ckpt()

  # ---------------------------------------------------------------- compile
  train_step = compile_train_step(program)
  eval_step = compile_eval_step(program) if eval_batches is not None else None
  mesh_lib.barrier("compiled")
  flops = summary.train_step_flops(config)
  peak = perf.published_peak()
  tokens_per_step = config_lib.latent_shapes(config).joint_tokens * int(config.train.batch_size)

  # ---------------------------------------------------------------- steps
  writer = MetricsWriter(workdir, int(config.train.steps), start_step=start_step)
  sample_every = int(config.eval.get("sample_every_steps", 0))
  samples = (preview.TrainingPreview(config, mesh, program.graphdef, workdir, writer.tensorboard)
             if sample_every else None)
  watcher = PreemptionWatcher(check_every=int(config.train.stop_check_every))
  step = int(state["step"])
  stopped_by = None  # the signal (SIGTERM for a preemption notice) that stopped the run
  pending = None  # metrics of the step before: read after the next one is dispatched
  last = {}
  window_start, window_steps = time.perf_counter(), 0
  try:
    while step < int(config.train.steps):
      batch = model_inputs(next(train_iter))
      with jax.set_mesh(mesh):
        state, metrics = train_step(state, batch)
      step += 1
      window_steps += 1
      if pending is not None:
        _check_finite(pending, config, ckpt)
      pending = (step, metrics)

      if step % int(config.train.log_every) == 0 or step == int(config.train.steps):
        host = jax.device_get(metrics)
        _check_finite((step, host), config, ckpt)
        elapsed = time.perf_counter() - window_start
        step_time = elapsed / max(window_steps, 1)
        last = {k: float(v) for k, v in host.items()}
        last.update(step_time=step_time,
                    examples_per_s=int(config.train.batch_size) / step_time,
                    tokens_per_s=tokens_per_step / step_time,
                    model_flops_per_s=flops / step_time)
        util = perf.mfu(flops, step_time, peak, jax.device_count())
        if util is not None:
          last["mfu"] = util
        writer.write(step, last)
        writer.console(step, last)
        window_start, window_steps = time.perf_counter(), 0

      if eval_step is not None and step % int(config.eval.every_steps) == 0:
        ev = run_eval(eval_step, finetune.model_params(state), eval_batches, mesh)
        writer.write(step, ev)
        logging.info("eval at step %d: %s", step, _brief(ev))

      if samples is not None and (step % sample_every == 0 or step == int(config.train.steps)):
        samples(step, finetune.model_params(
            state, "ema" if float(config.train.ema_decay) > 0 else "params"))

      if ckpt.should_save(step):
        ckpt.save(step, finetune.saved_state(state, config), data_state=train_iter.get_state(),
                  config=config)

      if watcher.should_stop(step):
        logging.warning("stop requested (signal or preemption) at step %d: saving", step)
        ckpt.save(step, finetune.saved_state(state, config), data_state=train_iter.get_state(),
                  config=config, force=True)
        stopped_by = watcher.signum or signal.SIGTERM
        break
    else:
      if pending is not None:
        _check_finite(pending, config, ckpt)
      ckpt.save(step, finetune.saved_state(state, config), data_state=train_iter.get_state(),
                config=config, force=True)
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
    watcher.close()
  if stopped_by is not None:
    raise cli.Stopped(f"{signal.Signals(stopped_by).name}: saved step {step} to {ckpt.directory}; "
                      f"the same command resumes", 128 + int(stopped_by))
  return last


def _write_config(workdir: str, config, step: int) -> None:
  """<workdir>/config.json of the run that starts now; a different one from before is kept
  beside it as config.before_step_<step>.json."""
  path, text = os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
    os.replace(path, os.path.join(workdir, f"config.before_step_{step}.json"))
  files.write_text(path, text)


def run_eval(eval_step, params, eval_batches, mesh) -> dict:
  """Mean of the fixed-sigma losses over the eval split (batches weighted by their real,
  unpadded examples), plus their means over sigmas."""
  totals, count = {}, 0
  for batch in eval_batches:
    with jax.set_mesh(mesh):
      out = jax.device_get(eval_step(params, {**model_inputs(batch),
                                              "example_valid": batch["example_valid"]}))
    examples = int(out.pop("eval_examples"))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v) * examples
    count += examples
  result = {k: v / max(count, 1) for k, v in totals.items()}
  for name in ("loss", "loss_video", "loss_audio", "loss_mouth"):
    vals = [v for k, v in result.items() if k.startswith(f"eval_{name}_s")]
    if vals:
      result[f"eval_{name}"] = float(np.mean(vals))
  return result


def _check_finite(pending, config, ckpt) -> None:
  step, metrics = pending
  nonfinite = int(jax.device_get(metrics["nonfinite"]))
  if nonfinite and nonfinite >= int(config.train.max_nonfinite):
    ckpt.wait()
    raise TrainingDiverged(
        f"{nonfinite} non-finite steps in a row up to step {step} (train.max_nonfinite="
        f"{config.train.max_nonfinite}); updates were skipped and no checkpoint was written after "
        f"them: the last good checkpoint is step {ckpt.latest_step()}")
  if nonfinite:
    logging.warning("step %d: non-finite loss or gradients, update skipped (%d in a row)", step,
                    nonfinite)


def _brief(metrics: dict) -> str:
  """The per-modality means only (the per-sigma values go to metrics.jsonl)."""
  keys = [k for k in metrics if not re.search(r"_s[0-9.]+$", k)]
  return json.dumps({k: round(metrics[k], 5) for k in sorted(keys)})
