"""Single-device attention kernels with a key-validity mask, used by model/attention.py.

Every kernel takes q (B, Lq, H, D), k and v (B, Lk, H, D), kv_valid (B, Lk) bool and returns
(B, Lq, H, D) in q.dtype, with scale 1/sqrt(D) and the softmax accumulated in float32. Lq may differ
from Lk (all-gather context parallelism keeps queries local). The 'cpu' kernel is C++ (an XLA FFI
custom call pair in kernels/attention_cpu.cc).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jova_jax.kernels import attention_cpu

KERNELS = ("auto", "xla", "chunked", "cudnn", "splash", "cpu")
# Finite, so a key block with no valid key gives exp(0) * 0 = 0 in the online softmax instead of NaN.
MASK_VALUE = -1e30
SPLASH_TILE = 128  # splash's kv compute block must be a multiple of the 128 TPU lanes
_HALF_PRECISION = (jnp.bfloat16, jnp.float16)


def resolve_kernel(kernel: str, dtype) -> str:
  """Maps 'auto' to the platform's kernel and checks the name (config parallel.attention_kernel)."""
  if kernel not in KERNELS:
    raise ValueError(f"parallel.attention_kernel must be one of {KERNELS}, found {kernel!r}")
  if kernel != "auto":
    return kernel
  backend = jax.default_backend()
  if backend == "tpu":
    return "splash"
  if backend == "gpu" and jnp.dtype(dtype) in _HALF_PRECISION:
    return "cudnn"
  if attention_cpu.applies(dtype):
    return "cpu"  # the C++ kernel, where it could be built
  return "xla"  # GPU in float32 where cuDNN's fused attention is unavailable; CPU otherwise


def _scores(q, k, kv_valid):
  """Scaled logits (B, Lq, H, Lk) in float32, MASK_VALUE where the key is invalid."""
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("bqhd,bkhd->bqhk", q, k, preferred_element_type=jnp.float32) * scale
  return jnp.where(kv_valid[:, None, None, :], logits, MASK_VALUE)


def _weighted_values(probs, v):
  """probs (B, Lq, H, Lk) float32 times v (B, Lk, H, D) -> float32 (B, Lq, H, D)."""
  return jnp.einsum("bqhk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)


@jax.custom_vjp
def xla_attention(q, k, v, kv_valid):
  """Dense einsum + masked softmax; materialises Lq x Lk probabilities, heads-major.

  The logits are laid out (B, H, Lq, Lk), the order XLA's batched dot produces, so no L x L
  transpose surrounds the softmax; the hand-written backward saves the probabilities and takes
  the softmax gradient from rowsum(dout * out) (an L x D reduction) instead of an L x L one.
  """
  return _xla_forward(q, k, v, kv_valid)[0]


def _heads_major_probs(q, k, kv_valid):
  # Scaling q (L x D) and masking by an added (B, 1, 1, Lk) bias keep the L x L work to the softmax.
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k,
                      preferred_element_type=jnp.float32)
  bias = jnp.where(kv_valid, 0.0, MASK_VALUE).astype(jnp.float32)
  return jax.nn.softmax(logits + bias[:, None, None, :], axis=-1)


def _xla_forward(q, k, v, kv_valid):
  probs = _heads_major_probs(q, k, kv_valid)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32).astype(q.dtype)
  return out, (q, k, v, kv_valid, probs, out)


def _xla_backward(residuals, dout):
  q, k, v, kv_valid, probs, out = residuals
  f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  dv = f32("bhqk,bqhd->bkhd", probs.astype(v.dtype), dout)
  dprobs = f32("bqhd,bkhd->bhqk", dout, v)
  # softmax: dlogits = p * (dp - sum_k p dp), and sum_k p dp = sum_d dout * out.
  row_dot = f32("bqhd,bqhd->bhq", dout, out)
  dlogits = (probs * (dprobs - row_dot[..., None])).astype(q.dtype)
  scale = 1.0 / math.sqrt(q.shape[-1])
  dq = f32("bhqk,bkhd->bqhd", dlogits, k) * scale
  dk = f32("bhqk,bqhd->bkhd", dlogits, q) * scale
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


xla_attention.defvjp(_xla_forward, _xla_backward)


class SoftmaxState(NamedTuple):
  """Running online-softmax statistics over the key blocks seen so far (all float32)."""
  acc: jax.Array      # (B, Lq, H, D) sum of exp(logit - row_max) * v
  row_max: jax.Array  # (B, Lq, H)
  row_sum: jax.Array  # (B, Lq, H) sum of exp(logit - row_max)


def empty_state(q) -> SoftmaxState:
  # *_like keeps q's shard_map varying axes, so the state can be a scan carry inside shard_map.
  return SoftmaxState(acc=jnp.zeros_like(q, dtype=jnp.float32),
                      row_max=jnp.full_like(q[..., 0], MASK_VALUE, dtype=jnp.float32),
                      row_sum=jnp.zeros_like(q[..., 0], dtype=jnp.float32))


def _update(state: SoftmaxState, q, k, v, kv_valid) -> SoftmaxState:
  logits = _scores(q, k, kv_valid)
  row_max = jnp.maximum(state.row_max, logits.max(axis=-1))
  probs = jnp.where(kv_valid[:, None, None, :], jnp.exp(logits - row_max[..., None]), 0.0)
  correction = jnp.exp(state.row_max - row_max)
  return SoftmaxState(acc=state.acc * correction[..., None] + _weighted_values(probs, v),
                      row_max=row_max,
                      row_sum=state.row_sum * correction + probs.sum(axis=-1))


def _key_blocks(length: int, block: int) -> int:
  """How many `block`-sized pieces tile `length` keys (1 when block >= length)."""
  if block >= length:
    return 1
  if length % block:
    raise ValueError(f"chunked attention: key length {length} is not a multiple of the chunk {block} "
                     "(joint_attention pads it; pad before calling the kernel directly)")
  return length // block


def _split(x, blocks: int):
  """(B, Lk, ...) -> (blocks, B, Lk / blocks, ...): the scan axis first."""
  return jnp.moveaxis(x.reshape(x.shape[0], blocks, -1, *x.shape[2:]), 1, 0)


def _merge(x):
  """Inverse of _split."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def fold_keys(state: SoftmaxState, q, k, v, kv_valid, block: int) -> SoftmaxState:
  """Adds the keys k/v to the state, `block` keys at a time (one step when block >= Lk)."""
  blocks = _key_blocks(k.shape[1], block)
  if blocks == 1:
    return _update(state, q, k, v, kv_valid)

  def step(carry, key_block):
    return _update(carry, q, *key_block), None

  state, _ = jax.lax.scan(step, state, tuple(_split(x, blocks) for x in (k, v, kv_valid)))
  return state


def finish(state: SoftmaxState, dtype):
  return (state.acc / state.row_sum[..., None]).astype(dtype)


def log_sum_exp(state: SoftmaxState):
  """(B, Lq, H) float32 log of each row's softmax denominator: all the backward pass keeps of it."""
  return state.row_max + jnp.log(state.row_sum)


def output_delta(out, out_grad):
  """D = rowsum(dO * O) (B, Lq, H) float32: the softmax Jacobian's correction term."""
  return jnp.einsum("bqhd,bqhd->bqh", out, out_grad, preferred_element_type=jnp.float32)


def _block_gradients(q, k, v, kv_valid, out_grad, lse, delta):
  """float32 (dq, dk, dv) of one key block, its probabilities recomputed from the row log-sum-exp."""
  probs = jnp.where(kv_valid[:, None, None, :], jnp.exp(_scores(q, k, kv_valid) - lse[..., None]), 0.0)
  dv = jnp.einsum("bqhk,bqhd->bkhd", probs.astype(q.dtype), out_grad, preferred_element_type=jnp.float32)
  dprobs = jnp.einsum("bqhd,bkhd->bqhk", out_grad, v, preferred_element_type=jnp.float32)
  dlogits = (probs * (dprobs - delta[..., None]) / math.sqrt(q.shape[-1])).astype(q.dtype)
  dq = jnp.einsum("bqhk,bkhd->bqhd", dlogits, k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bqhk,bqhd->bkhd", dlogits, q, preferred_element_type=jnp.float32)
  return dq, dk, dv


def key_gradients(q, k, v, kv_valid, out_grad, lse, delta, block: int):
  """float32 (dq, dk, dv) of attention over the keys k/v, `block` keys at a time.

  lse and delta come from the forward pass over ALL keys (log_sum_exp, output_delta), so the keys
  here may be one part of them: dq is this part's contribution, dk/dv are this part's gradients.
  """
  out_grad = out_grad.astype(q.dtype)
  blocks = _key_blocks(k.shape[1], block)
  if blocks == 1:
    return _block_gradients(q, k, v, kv_valid, out_grad, lse, delta)

  def step(dq, key_block):
    block_dq, dk, dv = _block_gradients(q, *key_block, out_grad, lse, delta)
    return dq + block_dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(step, jnp.zeros_like(q, dtype=jnp.float32),
                              tuple(_split(x, blocks) for x in (k, v, kv_valid)))
  return dq, _merge(dk), _merge(dv)


def chunked_attention(q, k, v, kv_valid, chunk: int):
  """Online softmax over key blocks of `chunk`: memory O(Lq x chunk) per head, never Lq x Lk,
  in the backward pass too (a flash-style custom VJP recomputes each block's probabilities)."""
  return _chunked(q, k, v, kv_valid, chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked(q, k, v, kv_valid, chunk):
  return _chunked_forward(q, k, v, kv_valid, chunk)[0]


def _chunked_forward(q, k, v, kv_valid, chunk):
  state = fold_keys(empty_state(q), q, k, v, kv_valid, chunk)
  out = finish(state, q.dtype)
  return out, (q, k, v, kv_valid, out, log_sum_exp(state))


def _chunked_backward(chunk, residuals, out_grad):
  q, k, v, kv_valid, out, lse = residuals
  grads = key_gradients(q, k, v, kv_valid, out_grad, lse, output_delta(out, out_grad), chunk)
  return (*(g.astype(x.dtype) for g, x in zip(grads, (q, k, v))), None)  # kv_valid: no gradient


_chunked.defvjp(_chunked_forward, _chunked_backward)


def cudnn_attention(q, k, v, kv_valid):
  if jnp.dtype(q.dtype) not in _HALF_PRECISION:
    raise ValueError(f"parallel.attention_kernel='cudnn' needs model.compute_dtype bfloat16 or float16, "
                     f"found {jnp.dtype(q.dtype).name}; use 'xla' or 'chunked' for float32")
  return jax.nn.dot_product_attention(q, k, v, mask=kv_valid[:, None, None, :], implementation="cudnn")


def _splash_block(length: int) -> int:
  return next(b for b in (512, 256, SPLASH_TILE) if length % b == 0)


def splash_attention(q, k, v, kv_valid):
  """Pallas splash attention; padding via segment ids (query 1, valid key 1, invalid key 0).

  Lq and Lk must be multiples of 128. Off TPU it runs in Pallas interpret mode (slow; tests only).
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash
  q_len, kv_len, heads = q.shape[1], k.shape[1], q.shape[2]
  if q_len % SPLASH_TILE or kv_len % SPLASH_TILE:
    raise ValueError(f"splash attention needs query/key lengths that are multiples of {SPLASH_TILE}, "
                     f"found {q_len}/{kv_len} (joint_attention pads them)")
  bq, bkv = _splash_block(q_len), _splash_block(kv_len)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                            block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                            block_q_dq=bq, block_kv_dq=bkv)
  mask = splash.MultiHeadMask([splash.FullMask((q_len, kv_len))] * heads)
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=jax.default_backend() != "tpu")
  query_segments = jnp.ones((q_len,), jnp.int32)

  def one_example(q, k, v, valid):  # splash works on (H, L, D) without a batch axis
    return kernel(q, k, v, segment_ids=splash.SegmentIds(q=query_segments, kv=valid.astype(jnp.int32)))

  scaled_q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)  # splash applies no scale
  heads_major = lambda x: jnp.swapaxes(x, 1, 2)
  out = jax.vmap(one_example)(heads_major(scaled_q), heads_major(k), heads_major(v), kv_valid)
  return heads_major(out).astype(q.dtype)


def local_attention(q, k, v, kv_valid, kernel: str, chunk: int, qk_norm=None, rope=None):
  """Dispatches to a resolved kernel name ('auto' already mapped by resolve_kernel). `qk_norm`
  (attention.QKNorm) and `rope` (the (L, D/2) angles): what the 'cpu' kernel applies to q and k
  itself (self-attention: Lq = Lk); the others take q and k normalised and rotated."""
  if (qk_norm is not None or rope is not None) and kernel != "cpu":
    raise ValueError(f"only the 'cpu' attention kernel normalises and rotates q and k itself, "
                     f"not {kernel!r}")
  if kernel == "xla":
    return xla_attention(q, k, v, kv_valid)
  if kernel == "chunked":
    return chunked_attention(q, k, v, kv_valid, chunk)
  if kernel == "cudnn":
    return cudnn_attention(q, k, v, kv_valid)
  if kernel == "splash":
    return splash_attention(q, k, v, kv_valid)
  if kernel == "cpu":
    norm = None if qk_norm is None else (qk_norm.segment, qk_norm.q_scales, qk_norm.segment,
                                         qk_norm.k_scales, qk_norm.eps)
    return attention_cpu.attention(q, k, v, kv_valid, None if rope is None else (rope, rope), norm)
  raise ValueError(f"parallel.attention_kernel must be one of {KERNELS}, found {kernel!r}")
