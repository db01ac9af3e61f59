"""Masked softmax attention on CPU as a C++ XLA FFI kernel pair (attention_cpu.cc): the 'cpu'
attention kernel of model/attention_kernels.py, and what 'auto' picks on one CPU device in float32.
Compiled on first use (kernels/cpu_build.py); where it cannot be built 'auto' keeps the 'xla'
kernel, with a warning that says why.

Same contract as the other kernels: q (B, Lq, H, D), k and v (B, Lk, H, D), kv_valid (B, Lk) bool,
scale 1/sqrt(D). The forward saves the softmax probabilities for the backward where they take at
most SAVED_PROBABILITIES_BYTES (the demo's 402 tokens: 21 MiB a layer), which spares the backward
a fifth of its matmuls and its exp; beyond that the backward recomputes them from the row
log-sum-exp, as a flash kernel does, and memory stays linear in the sequence. With
`norm` and `rope` (see `attention`) it attends with q and k normalised as layers.rms_norm does and
rotated as embeddings.apply_rope does, preparing each row as it packs it: fewer passes over q
and k and their gradients than preparing them first.
"""
from __future__ import annotations

import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jova_jax.kernels import cpu_build

SOURCE = pathlib.Path(__file__).with_name("attention_cpu.cc")
# Multiply-adds fused (the matmuls' inner loop is one FMA); exp without errno.
FLAGS = (*cpu_build.BASE_FLAGS, "-ffp-contract=fast", "-fno-math-errno")
# Probabilities (B, H, Lq, Lk rounded up to the kernel's 16 lanes) of one call, up to which the
# forward saves them: a few layers' worth at the demo's lengths, a small share of a CPU host's memory.
SAVED_PROBABILITIES_BYTES = 64 * 2**20
_TARGETS = {"jova_attention_forward": "JovaAttentionForward",
            "jova_attention_backward": "JovaAttentionBackward"}


@functools.cache
def available() -> bool:
  """Built and registered with XLA (once per process); False, with a warning, where not."""
  return cpu_build.load(SOURCE, FLAGS, _TARGETS, what="CPU attention kernel",
                        fallback="the 'xla' attention kernel")


def applies(dtype) -> bool:
  """Whether 'auto' picks this kernel: in a one-device float32 CPU program
  (cpu_build.one_cpu_device), when it could be built."""
  return cpu_build.one_cpu_device(dtype) and available()


def attention(q, k, v, kv_valid, rope=None, norm=None):
  """`rope`: None or (q_angles (Lq, D/2), k_angles (Lk, D/2)). `norm`: None or (q_segment (Lq,),
  q_scales (Sq, D), k_segment (Lk,), k_scales (Sk, D), eps): row j of q becomes
  rms_norm(q_j) * q_scales[q_segment[j]] before its rotation, and likewise k (layers.rms_norm)."""
  if jnp.dtype(q.dtype) != jnp.float32:
    raise ValueError(f"parallel.attention_kernel='cpu' needs model.compute_dtype float32, found "
                     f"{jnp.dtype(q.dtype).name}; use 'xla' or 'chunked' for half precision")
  if not available():
    raise RuntimeError("parallel.attention_kernel='cpu' could not be built (see the warning above); "
                       "use 'auto' or 'xla'")
  segments, scales, eps = _norm_tables(q, k, norm)
  return _attention(q, k, v, kv_valid.astype(bool), scales, segments, _rope_tables(q, k, rope), eps)


def _norm_tables(q, k, norm):
  """((q_segment, k_segment), (q_scales, k_scales), eps), or empty tables: no norm."""
  if norm is None:
    empty = jnp.zeros((0,), jnp.int32), jnp.zeros((0, q.shape[-1]), jnp.float32)
    return (empty[0], empty[0]), (empty[1], empty[1]), 0.0
  q_segment, q_scales, k_segment, k_scales, eps = norm
  for name, segment, scales, length in (("q", q_segment, q_scales, q.shape[1]),
                                        ("k", k_segment, k_scales, k.shape[1])):
    if segment.shape != (length,) or scales.ndim != 2 or scales.shape[1] != q.shape[-1]:
      raise ValueError(f"attention_cpu: the {name} norm needs a segment per row ({length},) and "
                       f"scales (S, D = {q.shape[-1]}), found {segment.shape} and {scales.shape}")
  return ((jnp.asarray(q_segment, jnp.int32), jnp.asarray(k_segment, jnp.int32)),
          (q_scales.astype(jnp.float32), k_scales.astype(jnp.float32)), float(eps))


def _rope_tables(q, k, rope):
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, kv_valid, scales, segments, rope, eps):
  return _forward(q, k, v, kv_valid, scales, segments, rope, eps)[0]


def _operands(q, k, v, kv_valid, scales, segments, rope):
  """The FFI calls' leading operands, in the order attention_cpu.cc binds them."""
  return (q, k, v, kv_valid, segments[0], scales[0], segments[1], scales[1], *rope)


def saved_probabilities_shape(q, k) -> tuple[int, ...]:
  """The buffer of probabilities the forward saves for these q and k (opaque to Python: the
  kernel's layout): (B, H, Lq, Lk_padded), or (0,) where it would take more than
  SAVED_PROBABILITIES_BYTES and the backward recomputes them."""
  batch, queries, heads, _ = q.shape
  shape = (batch, heads, queries, -(-k.shape[1] // cpu_build.LANES) * cpu_build.LANES)
  return shape if 4 * math.prod(shape) <= SAVED_PROBABILITIES_BYTES else (0,)


def _forward(q, k, v, kv_valid, scales, segments, rope, eps):
  batch, queries, heads, _ = q.shape
  out, lse, probs = jax.ffi.ffi_call(
      "jova_attention_forward",
      (jax.ShapeDtypeStruct(q.shape, jnp.float32),
       jax.ShapeDtypeStruct((batch, heads, queries), jnp.float32),
       jax.ShapeDtypeStruct(saved_probabilities_shape(q, k), jnp.float32)),
      vmap_method="sequential")(*_operands(q, k, v, kv_valid, scales, segments, rope),
                                eps=np.float32(eps))
  return out, (q, k, v, kv_valid, scales, segments, rope, out, lse, probs)


def _backward(eps, residuals, dout):
  q, k, v, kv_valid, scales, segments, rope, out, lse, probs = residuals
  batch, _, heads, _ = q.shape
  per_task = lambda table: jax.ShapeDtypeStruct((batch, heads, *table.shape), jnp.float32)
  dq, dk, dv, dscales_q, dscales_k = jax.ffi.ffi_call(
      "jova_attention_backward",
      (*(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
       per_task(scales[0]), per_task(scales[1])),
      vmap_method="sequential")(*_operands(q, k, v, kv_valid, scales, segments, rope), out, lse,
                                probs, dout.astype(jnp.float32), eps=np.float32(eps))
  # Each (example, head) returned its own share of the scales' gradients. kv_valid and the
  # segments: no gradient; the RoPE tables: none wanted (positions, not parameters).
  dscales = (dscales_q.sum((0, 1)), dscales_k.sum((0, 1)))
  return dq, dk, dv, None, dscales, None, jax.tree.map(jnp.zeros_like, rope)


_attention.defvjp(_forward, _backward)
