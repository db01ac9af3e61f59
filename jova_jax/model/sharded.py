"""Building JoVA on a mesh: abstract shapes, param shardings, sharded init (never a full copy
on one device), and a functional apply for jitted steps."""
from __future__ import annotations

import jax
from flax import nnx

from jova_jax.model.jova import JoVA, param_logical_axes
from jova_jax.parallel import rules


def abstract_model(config) -> JoVA:
  """The model with ShapeDtypeStructs instead of arrays: allocates nothing."""
  return nnx.eval_shape(lambda: JoVA(config, rngs=nnx.Rngs(0)))


def split_abstract(config):
  """(graphdef, abstract params as a pure dict, logical axes as a pure dict)."""
  model = abstract_model(config)
  graphdef, state = nnx.split(model, nnx.Param)
  axes = param_logical_axes(state)
  return graphdef, nnx.to_pure_dict(state), nnx.to_pure_dict(axes)


def param_shardings(config, mesh):
  """NamedSharding per param from the logical-axis table."""
  _, _, axes = split_abstract(config)
  return jax.tree.map(lambda names: rules.sharding(mesh, names), axes,
                      is_leaf=lambda x: isinstance(x, tuple))


def init_params(config, mesh, seed: int):
  """Params created directly in their shardings by a jitted init."""
  shardings = param_shardings(config, mesh)

  def init():
    model = JoVA(config, rngs=nnx.Rngs(params=seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))

  with jax.set_mesh(mesh):
    return jax.jit(init, out_shardings=shardings)()


def apply(graphdef, params, *args, **kwargs):
  """Functional forward: params is the pure dict of init_params."""
  return nnx.merge(graphdef, params)(*args, **kwargs)
