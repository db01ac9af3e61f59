"""Masked softmax attention on CPU as a C++ XLA FFI kernel pair (attention_cpu.cc): the 'cpu'
attention kernel of model/attention_kernels.py, and what 'auto' picks on one CPU device in float32.
Compiled on first use (kernels/cpu_build.py); where it cannot be built 'auto' keeps the 'xla'
kernel, with a warning that says why.

Same contract as the other kernels: q (B, Lq, H, D), k and v (B, Lk, H, D), kv_valid (B, Lk) bool,
scale 1/sqrt(D). The backward recomputes the probabilities from the row log-sum-exp, so the
forward saves only its output and that (B, H, Lq) statistic, as a flash kernel does. With
`rope=(q_angles, k_angles)` ((Lq, D/2) and (Lk, D/2)) it attends with q and k rotated as
embeddings.apply_rope rotates them, rotating each row as it packs it (one pass fewer over q and k
and their gradients than rotating them first).
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


def attention(q, k, v, kv_valid, rope=None):
  if jnp.dtype(q.dtype) != jnp.float32:
    raise ValueError(f"parallel.attention_kernel='cpu' needs model.compute_dtype float32, found "
                     f"{jnp.dtype(q.dtype).name}; use 'xla' or 'chunked' for half precision")
  if not available():
    raise RuntimeError("parallel.attention_kernel='cpu' could not be built (see the warning above); "
                       "use 'auto' or 'xla'")
  return _attention(q, k, v, kv_valid.astype(bool), _tables(q, k, rope))


def _tables(q, k, rope):
  """(cos_q, sin_q, cos_k, sin_k) of the angles, or four empty tables: no rotation."""
  if rope is None:
    return (jnp.zeros((0,), jnp.float32),) * 4
  half = q.shape[-1] // 2
  q_angles, k_angles = (jnp.asarray(a, jnp.float32) for a in rope)
  if q.shape[-1] % 2 or q_angles.shape != (q.shape[1], half) or k_angles.shape != (k.shape[1], half):
    raise ValueError(f"attention_cpu: rope angles must be (Lq, D/2) = {(q.shape[1], half)} and "
                     f"(Lk, D/2) = {(k.shape[1], half)} with D even, found {q_angles.shape} and "
                     f"{k_angles.shape} for D = {q.shape[-1]}")
  return jnp.cos(q_angles), jnp.sin(q_angles), jnp.cos(k_angles), jnp.sin(k_angles)


@jax.custom_vjp
def _attention(q, k, v, kv_valid, tables):
  return _forward(q, k, v, kv_valid, tables)[0]


def _forward(q, k, v, kv_valid, tables):
  batch, queries, heads, _ = q.shape
  out, lse = jax.ffi.ffi_call(
      "jova_attention_forward",
      (jax.ShapeDtypeStruct(q.shape, jnp.float32),
       jax.ShapeDtypeStruct((batch, heads, queries), jnp.float32)),
      vmap_method="sequential")(q, k, v, kv_valid, *tables)
  return out, (q, k, v, kv_valid, tables, out, lse)


def _backward(residuals, dout):
  q, k, v, kv_valid, tables, out, lse = residuals
  dq, dk, dv = jax.ffi.ffi_call(
      "jova_attention_backward",
      tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
      vmap_method="sequential")(q, k, v, kv_valid, *tables, out, lse, dout.astype(jnp.float32))
  # kv_valid: no gradient; the tables: none wanted (positions, not parameters).
  return dq, dk, dv, None, jax.tree.map(jnp.zeros_like, tables)


_attention.defvjp(_forward, _backward)
