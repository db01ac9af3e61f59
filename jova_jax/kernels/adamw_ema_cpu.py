"""The train step's optimizer+EMA update on CPU as one fused loop per leaf (adamw_ema_cpu.cc),
compiled on first use with the system's C++ compiler and cached; where it cannot be built the
update stays XLA's (optim.adamw_ema_update), with a warning that says why.

Used only on a one-device CPU program with float32 state: on TPU and GPU XLA already fuses each
leaf's update into one loop, and a sharded program would need the custom call partitioned.
"""
from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jova_jax.kernels import cpu_build

SOURCE = pathlib.Path(__file__).with_name("adamw_ema_cpu.cc")
# The order of the .cc's `Coefficients` struct.
COEFFICIENTS = ("clip", "apply", "new_weight1", "b1", "new_weight2", "b2", "correct1", "correct2",
                "eps", "weight_decay", "step_size", "ema_weight")
# No fused multiply-add (the XLA expression has none); sqrt without errno so the loop vectorizes;
# OpenMP's simd pragma only (no runtime) for the sum of squares.
FLAGS = (*cpu_build.BASE_FLAGS, "-ffp-contract=off", "-fno-math-errno", "-fopenmp-simd")
_TARGETS = {"jova_sum_of_squares": "JovaSumOfSquares", "jova_adamw_ema": "JovaAdamwEma"}


@functools.cache
def available() -> bool:
  """Built and registered with XLA (once per process); False, with a warning, where not."""
  return cpu_build.load(SOURCE, FLAGS, _TARGETS, what="fused CPU update", fallback="XLA's update")


def applies(mesh, *trees, mu=()) -> bool:
  """Whether the train step over `mesh` with these (abstract) state trees uses the kernel: one CPU
  device, float32 params, second moments and EMA (the counts are integers), and first moments
  `mu` all float32 or all bfloat16 (train.mu_dtype)."""
  floats = [x.dtype for x in jax.tree.leaves(trees) if jnp.issubdtype(x.dtype, jnp.floating)]
  mu_dtypes = {x.dtype for x in jax.tree.leaves(mu)}
  return (mesh.size == 1 and mesh.devices.flat[0].platform == "cpu"
          and all(dtype == jnp.float32 for dtype in floats)
          and len(mu_dtypes) <= 1 and mu_dtypes <= {jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)}
          and available())


def _require() -> None:
  if not available():
    raise RuntimeError("the fused CPU update was asked for but could not be built (see the "
                       "warning above); leave fused_cpu unset to fall back to XLA's update")


def global_norm(grads):
  """optax.tree.norm(grads), summed in one pass over all leaves."""
  _require()
  sum_of_squares = jax.ffi.ffi_call("jova_sum_of_squares", jax.ShapeDtypeStruct((), jnp.float32))
  return jnp.sqrt(sum_of_squares(*jax.tree.leaves(grads)))


def update(coefficients: dict, grads, params, mu, nu, ema, decays):
  """(params, mu, nu, ema) after one fused AdamW + EMA step; coefficients: COEFFICIENTS' scalars,
  decays: a tree of bools like params (weight decay applies)."""
  _require()
  treedef = jax.tree.structure(params)
  groups = [treedef.flatten_up_to(tree) for tree in (grads, params, mu, nu, ema)]
  n = len(groups[0])
  packed = jnp.stack([jnp.asarray(coefficients[name], jnp.float32) for name in COEFFICIENTS])
  state = [leaf for group in groups[1:] for leaf in group]
  call = jax.ffi.ffi_call(
      "jova_adamw_ema", [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in state],
      # Argument 0 is the coefficients, 1..n the gradients; each state leaf is updated in place.
      input_output_aliases={1 + n + i: i for i in range(len(state))})
  results = call(packed, *groups[0], *state,
                 decays=np.array([bool(d) for d in treedef.flatten_up_to(decays)], np.int64))
  return tuple(treedef.unflatten(results[k * n:(k + 1) * n]) for k in range(4))
