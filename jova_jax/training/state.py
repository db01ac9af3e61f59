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
from jova_jax.data import batch_spec
from jova_jax.model import sharded
from jova_jax.model.jova import JoVA
from jova_jax.parallel import rules
from jova_jax.training import finetune, optim

MODEL_KEYS = batch_spec.MODEL_KEYS  # the batch keys the model consumes (data/batch_spec.py)


def model_inputs(batch: dict) -> dict:
  return {k: batch[k] for k in MODEL_KEYS}


@dataclasses.dataclass(frozen=True)
class AbstractState:
  """The run's state on a mesh, built once (abstract_state) and passed down to init, restore,
  sampling and the planner: the model traced once, the optimizer, and the state as
  ShapeDtypeStructs with their NamedShardings (`state`) and those shardings (`shardings`)."""
  spec: config_lib.RunSpec
  model: sharded.AbstractModel
  tx: optax.GradientTransformation
  shardings: dict
  state: dict


def abstract_state(config, mesh, spec: config_lib.RunSpec | None = None, *,
                   training: bool = True) -> AbstractState:
  """The train state of `config` on `mesh` (a Mesh or AbstractMesh), allocating nothing.
  spec: the run's spec when the caller derived it (else derived here). training=False (a run
  loaded to sample): the train batch need not divide over the mesh."""
  spec = spec or config_lib.run_spec(config)
  spec.check_mesh(dict(mesh.shape), batch=training)
  model = sharded.abstract_model(spec.model, mesh)
  abstract_params, frozen = finetune.partition(config, model.params)
  param_sh, frozen_sh = finetune.partition(config, model.shardings)
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
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       shapes, shardings)
  return AbstractState(spec, model, tx, shardings, state)


@dataclasses.dataclass
class Program:
  """Everything compiled for one config on one mesh: its AbstractState and batch sharding."""
  config: object
  mesh: jax.sharding.Mesh
  abstract: AbstractState
  batch_sharding: NamedSharding

  @property
  def spec(self) -> config_lib.RunSpec:
    return self.abstract.spec

  @property
  def graphdef(self):
    return self.abstract.model.graphdef

  @property
  def tx(self) -> optax.GradientTransformation:
    return self.abstract.tx

  @property
  def state_shardings(self) -> dict:
    return self.abstract.shardings

  @property
  def abstract_state(self) -> dict:
    return self.abstract.state

  @property
  def batch_spec(self) -> dict:
    """{key: (per-example shape, dtype)} of the run's batches (data/batch_spec.py)."""
    return batch_spec.example_spec(self.spec.shapes, self.spec.model.text_width)

  def abstract_batch(self):
    return batch_spec.abstract_batch(self.batch_spec, self.spec.batch_size, self.batch_sharding)


def build_program(config, mesh, spec: config_lib.RunSpec | None = None) -> Program:
  """The Program of config on mesh (spec: the run's, when the caller derived it)."""
  return Program(config, mesh, abstract_state(config, mesh, spec),
                 rules.batch_sharding(mesh))


def init_state(program: Program):
  """Fresh state, created directly in its shardings."""
  config, tx, spec = program.config, program.tx, program.spec.model

  def init():
    model = JoVA(spec, rngs=nnx.Rngs(params=int(config.train.seed)))
    params, frozen = finetune.partition(config, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    state = {"params": params, "opt_state": tx.init(params), "ema": params,
             "step": jnp.zeros((), jnp.int32), "nonfinite": jnp.zeros((), jnp.int32)}
    return dict(state, frozen=finetune.frozen_like(frozen, config)) if frozen else state

  with jax.set_mesh(program.mesh):
    return jax.jit(init, out_shardings=program.state_shardings)()
