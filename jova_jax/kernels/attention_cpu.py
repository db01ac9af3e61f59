"""Masked softmax attention on CPU as a C++ XLA FFI kernel pair (attention_cpu.cc): the 'cpu'
attention kernel of model/attention_kernels.py, and what 'auto' picks on one CPU device in float32.
Compiled on first use (kernels/cpu_build.py); where it cannot be built 'auto' keeps the 'xla'
kernel, with a warning that says why.

Same contract as the other kernels: q (B, Lq, H, D), k and v (B, Lk, H, D), kv_valid (B, Lk) bool,
scale 1/sqrt(D). The backward recomputes the probabilities from the row log-sum-exp, so the
forward saves only its output and that (B, H, Lq) statistic, as a flash kernel does.
"""
from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp

from jova_jax.kernels import cpu_build

SOURCE = pathlib.Path(__file__).with_name("attention_cpu.cc")
# Multiply-adds fused (the matmuls' inner loop is one FMA); exp without errno.
FLAGS = (*cpu_build.BASE_FLAGS, "-ffp-contract=fast", "-fno-math-errno")
_TARGETS = {"jova_attention_forward": "JovaAttentionForward",
            "jova_attention_backward": "JovaAttentionBackward"}


@functools.cache
def available() -> bool:
  """Built and registered with XLA (once per process); False, with a warning, where not."""
  return cpu_build.load(SOURCE, FLAGS, _TARGETS, what="CPU attention kernel",
                        fallback="the 'xla' attention kernel")


def applies(dtype) -> bool:
  """Whether 'auto' picks this kernel: on a CPU backend, in float32, in a one-device program (no
  mesh or a mesh of one; several CPU devices are the test suite's fake devices, whose programs
  keep the XLA kernels), when it could be built."""
  mesh = jax.sharding.get_abstract_mesh()
  return (jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32
          and (mesh.empty or mesh.size == 1) and available())


def attention(q, k, v, kv_valid):
  if jnp.dtype(q.dtype) != jnp.float32:
    raise ValueError(f"parallel.attention_kernel='cpu' needs model.compute_dtype float32, found "
                     f"{jnp.dtype(q.dtype).name}; use 'xla' or 'chunked' for half precision")
  if not available():
    raise RuntimeError("parallel.attention_kernel='cpu' could not be built (see the warning above); "
                       "use 'auto' or 'xla'")
  return _attention(q, k, v, kv_valid.astype(bool))


@jax.custom_vjp
def _attention(q, k, v, kv_valid):
  return _forward(q, k, v, kv_valid)[0]


def _forward(q, k, v, kv_valid):
  batch, queries, heads, _ = q.shape
  out, lse = jax.ffi.ffi_call(
      "jova_attention_forward",
      (jax.ShapeDtypeStruct(q.shape, jnp.float32),
       jax.ShapeDtypeStruct((batch, heads, queries), jnp.float32)),
      vmap_method="sequential")(q, k, v, kv_valid)
  return out, (q, k, v, kv_valid, out, lse)


def _backward(residuals, dout):
  q, k, v, kv_valid, out, lse = residuals
  dq, dk, dv = jax.ffi.ffi_call(
      "jova_attention_backward",
      tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
      vmap_method="sequential")(q, k, v, kv_valid, out, lse, dout.astype(jnp.float32))
  return dq, dk, dv, None  # kv_valid: no gradient


_attention.defvjp(_forward, _backward)
