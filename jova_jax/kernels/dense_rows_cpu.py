"""A dense layer's product over the rows that are read, on CPU: y = x . W where `rows_valid`
marks a row, 0 elsewhere, with its backward (dx likewise, dW summed over those rows only), as
C++ XLA FFI kernels (dense_rows_cpu.cc for y and dx, weight_grad_cpu.cc for dW), compiled on
first use (kernels/cpu_build.py). The blocks give the text streams' layers their rows' text mask
(layers.contract): a prompt shorter than the text length leaves padding rows, which XLA's dot
computes and nothing reads (the joint attention masks their keys). Exact where nothing reads
those rows: their dy is 0, so dx and dW are what XLA's backward gives up to the order of the
sums. Where it cannot be built every row stays XLA's, with a warning that says why.
"""
from __future__ import annotations

import functools
import math
import pathlib

import jax
import jax.numpy as jnp

from jova_jax.kernels import cpu_build, weight_grad_cpu

SOURCE = pathlib.Path(__file__).with_name("dense_rows_cpu.cc")
FLAGS = (*cpu_build.BASE_FLAGS, "-ffp-contract=fast")
_TARGETS = {"jova_dense_rows": "JovaDenseRows"}


@functools.cache
def available() -> bool:
  """Built and registered with XLA (once per process); False, with a warning, where not."""
  return cpu_build.load(SOURCE, FLAGS, _TARGETS, what="CPU dense-rows kernel",
                        fallback="XLA's dot over every row")


def applies(dtype, in_features: int, out_features: int) -> bool:
  """Whether a layer computing in `dtype` takes its products here: in a one-device float32 CPU
  program (cpu_build.one_cpu_device), with whole vectors of inputs and outputs (the forward's
  columns are the outputs, the backward's the inputs), when both kernels could be built."""
  return (cpu_build.one_cpu_device(dtype) and in_features % cpu_build.LANES == 0
          and out_features % cpu_build.LANES == 0 and available()
          and weight_grad_cpu.available())


def product(x, w, rows_valid, n_in: int):
  """x (..., *in) . W (*in, *out) over x's last n_in dims, on the rows (x's leading dims) that
  rows_valid (bool, those dims) marks; the others come out 0."""
  leading = x.shape[:x.ndim - n_in]
  if jnp.shape(rows_valid) != leading:
    raise ValueError(f"dense_rows_cpu: rows_valid must be x's leading dims {leading}, found "
                     f"{jnp.shape(rows_valid)}")
  if not (available() and weight_grad_cpu.available()):
    raise RuntimeError("the CPU dense-rows kernels could not be built (see the warning above)")
  return _product(x, w, jnp.asarray(rows_valid, bool), n_in)


def _rows(a2d, b2d, valid):
  call = jax.ffi.ffi_call("jova_dense_rows",
                          jax.ShapeDtypeStruct((a2d.shape[0], b2d.shape[1]), jnp.float32),
                          vmap_method="sequential")
  return call(a2d, b2d, valid)


def _flat(x, w, rows_valid, n_in):
  """x as (rows, in), W as (in, out), rows_valid as (rows,)."""
  rows, m = math.prod(x.shape[:x.ndim - n_in]), math.prod(w.shape[:n_in])
  return (x.reshape(rows, m).astype(jnp.float32), w.reshape(m, -1).astype(jnp.float32),
          rows_valid.reshape(rows))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _product(x, w, rows_valid, n_in):
  x2d, w2d, valid = _flat(x, w, rows_valid, n_in)
  return _rows(x2d, w2d, valid).reshape(*x.shape[:x.ndim - n_in], *w.shape[n_in:])


def _forward(x, w, rows_valid, n_in):
  return _product(x, w, rows_valid, n_in), (x, w, rows_valid)


def _backward(n_in, residuals, dy):
  x, w, rows_valid = residuals
  _, w2d, valid = _flat(x, w, rows_valid, n_in)
  # dx = dy W^T over the same rows: dy (rows, out) times W^T (out, in).
  dx = _rows(dy.reshape(valid.shape[0], -1).astype(jnp.float32), w2d.T, valid)
  dw = weight_grad_cpu.weight_gradient(x, dy, n_in, rows_valid)
  return dx.reshape(x.shape).astype(x.dtype), dw.astype(w.dtype), None


_product.defvjp(_forward, _backward)
