"""The jitted steps: the train step (gradient accumulation, optimizer, EMA, non-finite
steps skipped) and the fixed-sigma eval step, each compiled once for a Program
(state.py) before step 0. Everything random comes from (train.seed, step), so a resumed run
continues bit for bit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from absl import logging

from jova_jax.kernels import adamw_ema_cpu
from jova_jax.model import summary
from jova_jax.training import finetune, objective, optim
from jova_jax.training.state import Program

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


def uses_fused_cpu_update(program: Program) -> bool:
  """Whether the train step's update runs as kernels/adamw_ema_cpu (a one-device CPU program
  with float32 params, second moments and EMA, first moments float32 or bfloat16)."""
  state = program.abstract_state
  adam = optim.adam_state(state["opt_state"])
  return adamw_ema_cpu.applies(program.mesh, state["params"], adam.nu, state["ema"], mu=adam.mu)


# The update's ops carry this in their op_name, so a profile of the step can tell them apart
# (tools/step_trace).
UPDATE_SCOPE = "optimizer_ema"


def make_update(program: Program, fused_cpu: bool | None = None):
  """update(state, grads, loss) -> (state, metrics): clipping, AdamW, EMA and the counters; a
  non-finite loss or gradient changes nothing but the counters. The train step's tail, apart so
  `bench train --breakdown` can time it alone. `fused_cpu`: the update as one loop per leaf
  (kernels/adamw_ema_cpu); None: wherever it applies (a one-device CPU program)."""
  config = program.config
  ema_decay = float(config.train.ema_decay)
  if fused_cpu is None:
    fused_cpu = uses_fused_cpu_update(program)

  def update(state, grads, loss):
    with jax.named_scope(UPDATE_SCOPE):
      grad_norm = adamw_ema_cpu.global_norm(grads) if fused_cpu else optax.tree.norm(grads)
      # Finite loss and gradients give finite AdamW updates (no reduction over the updates).
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      # EMA warm-up: early on the average must not stay anchored to the random init.
      step_f = state["step"].astype(jnp.float32)
      decay = jnp.minimum(ema_decay, (1.0 + step_f) / (10.0 + step_f))
      params, opt_state, ema = optim.adamw_ema_update(
          config, state["opt_state"], state["params"], state["ema"], grads, grad_norm, finite,
          decay, fused_cpu)
      nonfinite = jnp.where(finite, 0, state["nonfinite"] + 1).astype(jnp.int32)
      new_state = dict(state, params=params, opt_state=opt_state, ema=ema, step=state["step"] + 1,
                       nonfinite=nonfinite)
      # The lr this update applied (optax counts only the applied steps, not the skipped ones).
      return new_state, {"grad_norm": grad_norm, "nonfinite": nonfinite,
                         "lr": optim.applied_learning_rate(config, state["opt_state"])}

  return update


def make_train_step(program: Program):
  config, graphdef = program.config, program.graphdef
  accum = int(config.train.grad_accum)
  base_key = jax.random.key(int(config.train.seed))
  update = make_update(program)

  def train_step(state, batch):
    def loss_fn(trainable, batch, key):  # gradients of the trainable params only
      return objective.training_loss(
          graphdef, finetune.combine(trainable, state.get("frozen", {})), batch, key, config)

    key = jax.random.fold_in(base_key, state["step"])
    (loss, metrics), grads = accumulated_grads(loss_fn, state["params"], batch, key, accum)
    new_state, update_metrics = update(state, grads, loss)
    return new_state, dict(metrics, **update_metrics)

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
  flops = summary.train_step_flops(program.spec.model, program.spec.batch_size)
  logging.info("train step: %.3e model FLOPs (analytic), %d devices", flops, jax.device_count())
