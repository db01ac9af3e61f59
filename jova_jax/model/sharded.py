"""Building JoVA on a mesh: abstract shapes, param shardings, sharded init (never a full copy
on one device), and a functional apply for jitted steps.

abstract_model(spec, mesh) is the one place the model is traced for its shapes; every user of
"the model on a mesh" (training/state.abstract_state, and through it init, restore, sampling
and the planner) takes the AbstractModel it returns.
"""
from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from jova_jax import config_lib
from jova_jax.model.jova import JoVA, param_logical_axes
from jova_jax.parallel import rules


@dataclasses.dataclass(frozen=True)
class AbstractModel:
  """The model traced once: its graphdef, its params as ShapeDtypeStructs (each with its
  NamedSharding when a mesh was given), their logical axes and shardings (pure dicts)."""
  spec: config_lib.ModelSpec
  graphdef: object
  params: dict
  axes: dict
  shardings: dict | None


def _spec(spec_or_config) -> config_lib.ModelSpec:
  if isinstance(spec_or_config, config_lib.ModelSpec):
    return spec_or_config
  return config_lib.model_spec(spec_or_config)  # tests and tools holding a config


def abstract_model(spec_or_config, mesh=None) -> AbstractModel:
  """The model with ShapeDtypeStructs instead of arrays (allocates nothing), on `mesh` when
  given (a jax Mesh or AbstractMesh)."""
  spec = _spec(spec_or_config)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: JoVA(spec, rngs=nnx.Rngs(0))), nnx.Param)
  params = nnx.to_pure_dict(state)
  axes = nnx.to_pure_dict(param_logical_axes(state))
  shardings = None
  if mesh is not None:
    shardings = jax.tree.map(lambda names: rules.sharding(mesh, names), axes,
                             is_leaf=lambda x: isinstance(x, tuple))
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          params, shardings)
  return AbstractModel(spec, graphdef, params, axes, shardings)


def split_abstract(spec_or_config):
  """(graphdef, abstract params as a pure dict, logical axes as a pure dict)."""
  model = abstract_model(spec_or_config)
  return model.graphdef, model.params, model.axes


def param_shardings(spec_or_config, mesh):
  """NamedSharding per param from the logical-axis table."""
  return abstract_model(spec_or_config, mesh).shardings


def init_params(spec_or_config, mesh, seed: int, model: AbstractModel | None = None):
  """Params created directly in their shardings by a jitted init (model: the AbstractModel
  on this mesh when the caller has it)."""
  model = model or abstract_model(spec_or_config, mesh)

  def init():
    return nnx.to_pure_dict(nnx.state(JoVA(model.spec, rngs=nnx.Rngs(params=seed)), nnx.Param))

  with jax.set_mesh(mesh):
    return jax.jit(init, out_shardings=model.shardings)()


def apply(graphdef, params, *args, **kwargs):
  """Functional forward: params is the pure dict of init_params."""
  return nnx.merge(graphdef, params)(*args, **kwargs)
