"""A dense layer's weight gradient on CPU, dW = X^T dY, as a C++ XLA FFI kernel
(weight_grad_cpu.cc), compiled on first use (kernels/cpu_build.py). layers.contract's backward
uses it where `applies`: XLA CPU makes a transposed copy of X or dY for this product and then
runs it in Eigen, at ~75 GFLOP/s on a core where its library matmuls and this kernel reach ~95
(docs/performance.md, "Fifteenth round"). Where it cannot be built the product stays XLA's,
with a warning that says why.
"""
from __future__ import annotations

import functools
import math
import pathlib

import jax
import jax.numpy as jnp

from jova_jax.kernels import cpu_build

SOURCE = pathlib.Path(__file__).with_name("weight_grad_cpu.cc")
FLAGS = (*cpu_build.BASE_FLAGS, "-ffp-contract=fast")
_TARGETS = {"jova_weight_gradient": "JovaWeightGradient"}


@functools.cache
def available() -> bool:
  """Built and registered with XLA (once per process); False, with a warning, where not."""
  return cpu_build.load(SOURCE, FLAGS, _TARGETS, what="CPU weight-gradient kernel",
                        fallback="XLA's dot")


def applies(dtype, out_features: int) -> bool:
  """Whether a layer with `out_features` outputs computing in `dtype` takes its weight gradient
  here: in a one-device float32 CPU program (cpu_build.one_cpu_device), with whole vectors of
  outputs, when the kernel could be built."""
  return cpu_build.one_cpu_device(dtype) and out_features % cpu_build.LANES == 0 and available()


def weight_gradient(x, dy, n_in: int, rows_valid=None):
  """The gradient of W in y = x . W, x's last n_in dims contracted with W's first: x (..., *in),
  dy (..., *out) with the same leading dims. `rows_valid` (those leading dims, bool): sum over
  the rows it marks only (None: all). Returns (*in, *out) in float32."""
  if not available():
    raise RuntimeError("the CPU weight-gradient kernel could not be built (see the warning above)")
  in_shape, out_shape = x.shape[x.ndim - n_in:], dy.shape[x.ndim - n_in:]
  rows, m, n = math.prod(x.shape[:x.ndim - n_in]), math.prod(in_shape), math.prod(out_shape)
  if rows_valid is not None and math.prod(jnp.shape(rows_valid)) != rows:
    raise ValueError(f"weight_grad_cpu: rows_valid must mark x's {rows} rows, found shape "
                     f"{jnp.shape(rows_valid)}")
  valid = (jnp.zeros((0,), bool) if rows_valid is None
           else jnp.asarray(rows_valid, bool).reshape(rows))
  call = jax.ffi.ffi_call("jova_weight_gradient", jax.ShapeDtypeStruct((m, n), jnp.float32),
                          vmap_method="sequential")
  dw = call(x.reshape(rows, m).astype(jnp.float32), dy.reshape(rows, n).astype(jnp.float32), valid)
  return dw.reshape(*in_shape, *out_shape)
