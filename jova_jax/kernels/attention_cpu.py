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
and k and their gradients than preparing them first. `segment_attention` takes the sequence as
the blocks project it, each segment's QKV projection apart and before its bias, and returns each
segment's output apart, skipping the padding rows: the blocks' path on one device
(attention.segments_apart).
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
            "jova_attention_backward": "JovaAttentionBackward",
            "jova_segment_attention_forward": "JovaSegmentAttentionForward",
            "jova_segment_attention_backward": "JovaSegmentAttentionBackward"}


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
  _check_usable(q.dtype)
  segments, scales, eps = _norm_tables(q.shape[1], k.shape[1], q.shape[-1], norm)
  rope = _rope_tables(q.shape[1], k.shape[1], q.shape[-1], rope)
  return _attention(q, k, v, kv_valid.astype(bool), scales, segments, rope, eps)


def segment_attention(qkv, bias, kv_valid, rope=None, norm=None):
  """The same attention over a sequence of segments given apart, as the blocks project them:
  qkv[s] (B, L_s, 3, H, D) is segment s's QKV projection before its bias bias[s] (3, H, D), which
  the kernel adds as it reads each row. The joint sequence is the segments in order: kv_valid
  (B, L) with L the sum of the L_s, `rope` None or its (L, D/2) angles, `norm` as in `attention`
  with Lq = Lk = L. Returns each segment's output (B, L_s, H, D). The kernel reads and writes
  every segment where it lies: no joined q, k, v or split output, forward or backward.
  Self-attention: a row whose key is masked is padding, which no valid row reads; its output is 0
  and it is not computed (text padding: up to 62 of the demo's 402 rows). Where an example has no
  valid key at all, every row attends to every key, as in `attention`."""
  qkv, bias = tuple(qkv), tuple(bias)
  _check_usable(qkv[0].dtype)
  length, dim = sum(x.shape[1] for x in qkv), qkv[0].shape[-1]
  for x, b in zip(qkv, bias, strict=True):
    if (x.ndim != 5 or x.shape[2] != 3 or b.shape != (3, *x.shape[3:])
        or (x.shape[0], *x.shape[3:]) != (qkv[0].shape[0], *qkv[0].shape[3:])):
      raise ValueError(f"attention_cpu: each segment's qkv must be (B, L, 3, H, D) with one B, H, "
                       f"D and its bias (3, H, D), found {x.shape} and {b.shape}")
  segments, scales, eps = _norm_tables(length, length, dim, norm)
  rope = _rope_tables(length, length, dim, None if rope is None else (rope, rope))
  return _segment_attention(qkv, tuple(b.astype(jnp.float32) for b in bias),
                            kv_valid.astype(bool), scales, segments, rope, eps)


def _check_usable(dtype):
  if jnp.dtype(dtype) != jnp.float32:
    raise ValueError(f"parallel.attention_kernel='cpu' needs model.compute_dtype float32, found "
                     f"{jnp.dtype(dtype).name}; use 'xla' or 'chunked' for half precision")
  if not available():
    raise RuntimeError("parallel.attention_kernel='cpu' could not be built (see the warning above); "
                       "use 'auto' or 'xla'")


def _norm_tables(queries: int, keys: int, dim: int, norm):
  """((q_segment, k_segment), (q_scales, k_scales), eps), or empty tables: no norm."""
  if norm is None:
    empty = jnp.zeros((0,), jnp.int32), jnp.zeros((0, dim), jnp.float32)
    return (empty[0], empty[0]), (empty[1], empty[1]), 0.0
  q_segment, q_scales, k_segment, k_scales, eps = norm
  for name, segment, scales, length in (("q", q_segment, q_scales, queries),
                                        ("k", k_segment, k_scales, keys)):
    if segment.shape != (length,) or scales.ndim != 2 or scales.shape[1] != dim:
      raise ValueError(f"attention_cpu: the {name} norm needs a segment per row ({length},) and "
                       f"scales (S, D = {dim}), found {segment.shape} and {scales.shape}")
  return ((jnp.asarray(q_segment, jnp.int32), jnp.asarray(k_segment, jnp.int32)),
          (q_scales.astype(jnp.float32), k_scales.astype(jnp.float32)), float(eps))


def _rope_tables(queries: int, keys: int, dim: int, rope):
  """(cos_q, sin_q, cos_k, sin_k) of the angles, or four empty tables: no rotation."""
  if rope is None:
    return (jnp.zeros((0,), jnp.float32),) * 4
  half = dim // 2
  q_angles, k_angles = (jnp.asarray(a, jnp.float32) for a in rope)
  if dim % 2 or q_angles.shape != (queries, half) or k_angles.shape != (keys, half):
    raise ValueError(f"attention_cpu: rope angles must be (Lq, D/2) = {(queries, half)} and "
                     f"(Lk, D/2) = {(keys, half)} with D even, found {q_angles.shape} and "
                     f"{k_angles.shape} for D = {dim}")
  return jnp.cos(q_angles), jnp.sin(q_angles), jnp.cos(k_angles), jnp.sin(k_angles)


def _per_task(scales, batch: int, heads: int):
  """The backward's scale gradients: each (example, head) returns its own share (B, H, S, D)."""
  return jax.ShapeDtypeStruct((batch, heads, *scales.shape), jnp.float32)


def _scale_grads(dscales_q, dscales_k):
  """The scales' gradients, summed over the (example, head) shares."""
  return dscales_q.sum((0, 1)), dscales_k.sum((0, 1))


def _no_rope_grads(rope):
  """kv_valid and the segments take no gradient; the RoPE tables none wanted (positions, not
  parameters)."""
  return jax.tree.map(jnp.zeros_like, rope)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(q, k, v, kv_valid, scales, segments, rope, eps):
  return _forward(q, k, v, kv_valid, scales, segments, rope, eps)[0]


def _operands(q, k, v, kv_valid, scales, segments, rope):
  """The FFI calls' leading operands, in the order attention_cpu.cc binds them."""
  return (q, k, v, kv_valid, segments[0], scales[0], segments[1], scales[1], *rope)


def saved_probabilities_shape(batch: int, heads: int, queries: int, keys: int) -> tuple[int, ...]:
  """The buffer of probabilities the forward saves (opaque to Python: the kernel's layout):
  (B, H, Lq, Lk_padded), or (0,) where it would take more than SAVED_PROBABILITIES_BYTES and the
  backward recomputes them."""
  shape = (batch, heads, queries, -(-keys // cpu_build.LANES) * cpu_build.LANES)
  return shape if 4 * math.prod(shape) <= SAVED_PROBABILITIES_BYTES else (0,)


def _forward(q, k, v, kv_valid, scales, segments, rope, eps):
  batch, queries, heads, _ = q.shape
  out, lse, probs = jax.ffi.ffi_call(
      "jova_attention_forward",
      (jax.ShapeDtypeStruct(q.shape, jnp.float32),
       jax.ShapeDtypeStruct((batch, heads, queries), jnp.float32),
       jax.ShapeDtypeStruct(saved_probabilities_shape(batch, heads, queries, k.shape[1]),
                            jnp.float32)),
      vmap_method="sequential")(*_operands(q, k, v, kv_valid, scales, segments, rope),
                                eps=np.float32(eps))
  return out, (q, k, v, kv_valid, scales, segments, rope, out, lse, probs)


def _backward(eps, residuals, dout):
  q, k, v, kv_valid, scales, segments, rope, out, lse, probs = residuals
  batch, _, heads, _ = q.shape
  dq, dk, dv, dscales_q, dscales_k = jax.ffi.ffi_call(
      "jova_attention_backward",
      (*(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)),
       _per_task(scales[0], batch, heads), _per_task(scales[1], batch, heads)),
      vmap_method="sequential")(*_operands(q, k, v, kv_valid, scales, segments, rope), out, lse,
                                probs, dout.astype(jnp.float32), eps=np.float32(eps))
  return dq, dk, dv, None, _scale_grads(dscales_q, dscales_k), None, _no_rope_grads(rope)


_attention.defvjp(_forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _segment_attention(qkv, bias, kv_valid, scales, segments, rope, eps):
  return _segment_forward(qkv, bias, kv_valid, scales, segments, rope, eps)[0]


def _segment_tables(kv_valid, scales, segments, rope):
  """The segment calls' leading operands, in the order attention_cpu.cc binds them."""
  return (kv_valid, segments[0], scales[0], segments[1], scales[1], *rope)


def _segment_forward(qkv, bias, kv_valid, scales, segments, rope, eps):
  batch, _, _, heads, dim = qkv[0].shape
  length = kv_valid.shape[1]
  lse, probs, *out = jax.ffi.ffi_call(
      "jova_segment_attention_forward",
      (jax.ShapeDtypeStruct((batch, heads, length), jnp.float32),
       jax.ShapeDtypeStruct(saved_probabilities_shape(batch, heads, length, length), jnp.float32),
       *(jax.ShapeDtypeStruct((batch, x.shape[1], heads, dim), jnp.float32) for x in qkv)),
      vmap_method="sequential")(*_segment_tables(kv_valid, scales, segments, rope), *qkv, *bias,
                                eps=np.float32(eps))
  return tuple(out), (qkv, bias, kv_valid, scales, segments, rope, tuple(out), lse, probs)


def _segment_backward(eps, residuals, douts):
  qkv, bias, kv_valid, scales, segments, rope, out, lse, probs = residuals
  batch, _, _, heads, _ = qkv[0].shape
  dscales_q, dscales_k, *dqkv = jax.ffi.ffi_call(
      "jova_segment_attention_backward",
      (_per_task(scales[0], batch, heads), _per_task(scales[1], batch, heads),
       *(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in qkv)),
      vmap_method="sequential")(*_segment_tables(kv_valid, scales, segments, rope), lse, probs,
                                *qkv, *bias, *out, *(d.astype(jnp.float32) for d in douts),
                                eps=np.float32(eps))
  dbias = tuple(d.sum((0, 1)) for d in dqkv)
  return tuple(dqkv), dbias, None, _scale_grads(dscales_q, dscales_k), None, _no_rope_grads(rope)


_segment_attention.defvjp(_segment_forward, _segment_backward)
