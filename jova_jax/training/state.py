"""The model on a mesh for training: the Program (graph, optimizer, state shardings, abstract
state and batch) and a fresh train state created directly in its shardings.

State is a pytree {"params", "opt_state", "ema", "step", "nonfinite"}, plus "frozen" when
train.trainable or LoRA freezes params ("params" then holds the trainable ones: finetune.py).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jova_jax import config_lib
from jova_jax.model import sharded
from jova_jax.model.jova import JoVA
from jova_jax.training import finetune, optim

# Batch keys the model consumes (the pipeline also yields record_index for bookkeeping).
MODEL_KEYS = ("video", "audio", "mouth_mask", "text", "text_mask", "drop_text", "use_first_frame")


def model_inputs(batch: dict) -> dict:
  return {k: batch[k] for k in MODEL_KEYS}


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
