"""The training loop, top to bottom: mesh, data, state (restore or init), compile, steps,
eval, checkpoints, metrics.

The state and its shardings come from state.py, the compiled steps from steps.py; everything
random comes from (train.seed, step), so a resumed run continues bit for bit.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time

import jax
import numpy as np
from absl import logging

from jova_jax import cli, config_lib, files
from jova_jax.data import pipeline
from jova_jax.errors import UserError
from jova_jax.model import summary
from jova_jax.parallel import mesh as mesh_lib
from jova_jax.training import (checkpoint, finetune, perf, preview, state as train_state, steps as train_steps)
from jova_jax.training.metrics import MetricsWriter
from jova_jax.training.preemption import PreemptionWatcher


class TrainingDiverged(RuntimeError):
  """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


def train(config, workdir: str, *, init_from: str | None = None,
          strict_resume: bool = False) -> dict:
  """Trains to config.train.steps (resuming from workdir if it holds a checkpoint).
  Returns the last logged metrics.

  Nothing is written to workdir before the config, the data and the checkpoint to resume
  from pass their checks. The latest checkpoint that fails to restore is skipped for the one
  before (strict_resume: refused). A signal saves, then raises cli.Stopped (exit 128 + signum).
  """
  program = _checked_program(config, workdir)  # checks: nothing written
  train_iter, eval_batches = _open_data(config, program)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  ckpt, start_step, state = _resume_or_init(program, train_iter, ckpt_dir, init_from,
                                            strict_resume)

  # ---------------------------------------------------------------- workdir (checks passed)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    _write_config(workdir, config, start_step)
  ckpt = ckpt or _open_checkpointer(config, ckpt_dir)

  # ---------------------------------------------------------------- compile
  train_step = train_steps.compile_train_step(program)
  eval_step = train_steps.compile_eval_step(program) if eval_batches is not None else None
  mesh_lib.barrier("compiled")
  throughput = _Throughput(program.spec)

  # ---------------------------------------------------------------- steps
  writer = MetricsWriter(workdir, int(config.train.steps), start_step=start_step)
  sample_every = int(config.eval.get("sample_every_steps", 0))
  samples = (preview.TrainingPreview(config, program, workdir, writer.tensorboard)
             if sample_every else None)
  watcher = PreemptionWatcher(check_every=int(config.train.stop_check_every))
  run = _Run(program, train_iter, eval_batches, ckpt, train_step, eval_step, writer, samples,
             sample_every, watcher, throughput)
  try:
    last, step, stopped_by = run.steps(state)
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
    watcher.close()
  if stopped_by is not None:
    raise cli.Stopped(f"{signal.Signals(stopped_by).name}: saved step {step} to {ckpt.directory}; "
                      f"the same command resumes", 128 + int(stopped_by))
  return last


# ============================================================================ before step 0
def _checked_program(config, workdir: str) -> train_state.Program:
  """The Program on its mesh, once the config and the workdir pass their checks.

  The one entry into config_lib of a run: run_spec validates (ranges and enums, before the
  mesh divides by them) and derives the shapes and the model spec everything below takes."""
  spec = config_lib.run_spec(config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir}: expected a folder, found a file")
  mesh_lib.initialize_distributed()
  mesh = mesh_lib.make_mesh(config)
  logging.info("mesh %s on %d processes", dict(mesh.shape), jax.process_count())
  return train_state.build_program(config, mesh, spec)


def _open_data(config, program: train_state.Program):
  """(train iterator, eval batches or None)."""
  mesh, shapes = program.mesh, program.spec.shapes
  train_iter = pipeline.make_train_iterator(config, mesh, shapes=shapes)
  eval_batches = (pipeline.make_eval_iterator(config, mesh, shapes=shapes)
                  if config.eval.every_steps else None)
  # The run keeps the statistics its batches are normalised with, in the config saved with it
  # and with every checkpoint: the sampler undoes them (data/latent_norm.py).
  config.data.latent_norm = train_iter.latent_norm.to_json()
  return train_iter, eval_batches


def _open_checkpointer(config, ckpt_dir: str) -> checkpoint.Checkpointer:
  return checkpoint.Checkpointer(ckpt_dir, every_steps=int(config.checkpoint.every_steps),
                                 keep=int(config.checkpoint.keep),
                                 async_save=bool(config.checkpoint.async_save))


def _resume_or_init(program: train_state.Program, train_iter, ckpt_dir: str,
                    init_from: str | None, strict_resume: bool):
  """(checkpointer or None when there is no checkpoint folder yet, start step, state): the
  latest checkpoint that restores (with the data iterator's position), else a fresh state
  (with --init_from's params)."""
  config = program.config
  mesh_lib.barrier("before_state")
  ckpt = _open_checkpointer(config, ckpt_dir) if os.path.isdir(ckpt_dir) else None
  resumed = ckpt.restore_latest(finetune.saved_state(program.abstract_state, config),
                                strict=strict_resume) if ckpt else None
  if resumed is None:
    finetune.require_base_source(config, init_from)
    state = train_state.init_state(program)
    if init_from:
      state = finetune.init_from(state, init_from, program.abstract_state, config)
    return ckpt, 0, state
  start_step, state, data_state = resumed
  if data_state is not None:
    train_iter.set_state(data_state)
  if finetune.uses_base(config):  # a LoRA checkpoint names its base: read it from there
    config.model.lora.base = ckpt.restore_config(start_step)["model"]["lora"]["base"]
    state["frozen"] = finetune.load_base(config, program.abstract_state["frozen"])
  logging.info("resumed from %s at step %d", ckpt.directory, start_step)
  return ckpt, start_step, state


# ============================================================================ steps
class _Throughput:
  """Step time, examples/s, tokens/s, model FLOP/s and MFU over the steps since restart()."""

  def __init__(self, spec: config_lib.RunSpec):
    self.flops = summary.train_step_flops(spec.model, spec.batch_size)
    self.peak = perf.published_peak()
    self.batch_size = spec.batch_size
    self.tokens_per_step = spec.shapes.joint_tokens * self.batch_size
    self.restart()

  def restart(self) -> None:
    self.start, self.steps = time.perf_counter(), 0

  def figures(self) -> dict:
    step_time = (time.perf_counter() - self.start) / max(self.steps, 1)
    out = dict(step_time=step_time, examples_per_s=self.batch_size / step_time,
               tokens_per_s=self.tokens_per_step / step_time,
               model_flops_per_s=self.flops / step_time)
    util = perf.mfu(self.flops, step_time, self.peak, jax.device_count())
    if util is not None:
      out["mfu"] = util
    return out


@dataclasses.dataclass
class _Run:
  """The steps of one train() call and what they log, evaluate, preview and save."""
  program: train_state.Program
  train_iter: object
  eval_batches: object
  ckpt: checkpoint.Checkpointer
  train_step: object
  eval_step: object
  writer: MetricsWriter
  samples: preview.TrainingPreview | None
  sample_every: int
  watcher: PreemptionWatcher
  throughput: _Throughput

  def steps(self, state) -> tuple[dict, int, int | None]:
    """Steps to train.steps or to a stop request; (last logged metrics, step, the signal that
    stopped the run (SIGTERM for a preemption notice) or None)."""
    config = self.program.config
    total = int(config.train.steps)
    step, last = int(state["step"]), {}
    pending = None  # metrics of the step before: read after the next one is dispatched
    self.throughput.restart()
    while step < total:
      batch = train_state.model_inputs(next(self.train_iter))
      with jax.set_mesh(self.program.mesh):
        state, metrics = self.train_step(state, batch)
      step += 1
      self.throughput.steps += 1
      if pending is not None:
        _check_finite(pending, config, self.ckpt)
      pending = (step, metrics)
      if step % int(config.train.log_every) == 0 or step == total:
        last = self._log(step, metrics)
      self._periodic(step, state)
      if self.watcher.should_stop(step):
        logging.warning("stop requested (signal or preemption) at step %d: saving", step)
        self._save(step, state, force=True)
        return last, step, self.watcher.signum or signal.SIGTERM
    if pending is not None:
      _check_finite(pending, config, self.ckpt)
    self._save(step, state, force=True)
    return last, step, None

  def _log(self, step: int, metrics) -> dict:
    host = jax.device_get(metrics)
    _check_finite((step, host), self.program.config, self.ckpt)
    last = {k: float(v) for k, v in host.items()}
    last.update(self.throughput.figures())
    self.writer.write(step, last)
    self.writer.console(step, last)
    self.throughput.restart()
    return last

  def _periodic(self, step: int, state) -> None:
    """Eval, preview and checkpoint when their step comes."""
    config = self.program.config
    if self.eval_step is not None and step % int(config.eval.every_steps) == 0:
      ev = run_eval(self.eval_step, finetune.model_params(state), self.eval_batches,
                    self.program.mesh)
      self.writer.write(step, ev)
      logging.info("eval at step %d: %s", step, _brief(ev))
    if self.samples is not None and (step % self.sample_every == 0
                                     or step == int(config.train.steps)):
      self.samples(step, finetune.model_params(
          state, "ema" if float(config.train.ema_decay) > 0 else "params"))
    if self.ckpt.should_save(step):
      self._save(step, state)

  def _save(self, step: int, state, force: bool = False) -> None:
    config = self.program.config
    self.ckpt.save(step, finetune.saved_state(state, config),
                   data_state=self.train_iter.get_state(), config=config, force=force)


# ============================================================================ helpers
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
      out = jax.device_get(eval_step(params, {**train_state.model_inputs(batch),
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
