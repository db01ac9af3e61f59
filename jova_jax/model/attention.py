"""Joint bidirectional self-attention over [audio ; text_a ; text_v ; video], partitioned over 'context'.

Strategies (config parallel.context_strategy), run inside jax.shard_map with the sequence sharded
over the 'context' mesh axis, batch over ('data', 'fsdp') and heads over 'tensor':
  none       - one local kernel over the whole sequence: the XLA kernels (xla, chunked) leave the
               sharding to XLA; splash, cuDNN and the C++ CPU kernel still run per batch / head
               shard.
  all_gather - queries stay sharded; K/V and the key mask are all-gathered over 'context'.
  ulysses    - all-to-all from sequence-sharded to head-sharded, full-sequence attention on
               H/context heads, all-to-all back.
  ring       - K/V blocks travel around 'context' with ppermute, folded into an online softmax;
               the backward pass sends them round again with their gradients (custom VJP).
Local kernels (config parallel.attention_kernel) live in attention_kernels.py.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jova_jax.model import attention_kernels as kernels
from jova_jax.model.embeddings import apply_rope
from jova_jax.model.layers import rms_norm
from jova_jax.parallel.rules import BATCH_AXES

STRATEGIES = ("none", "all_gather", "ulysses", "ring")
CONTEXT = "context"
_HEAD_AXIS = "tensor"
_OPAQUE_KERNELS = ("splash", "cudnn", "cpu")


class QKNorm(NamedTuple):
  """RMS norms of q and k by row: row j of q becomes rms_norm(q_j) * q_scales[segment[j]], and
  likewise k, each segment (stream) of the joint sequence with its own scales."""
  segment: jax.Array  # (L,) int, in the joint sequence's order
  q_scales: jax.Array  # (S, D)
  k_scales: jax.Array  # (S, D)
  eps: float

  def apply(self, q, k):
    rows = lambda scales: scales[self.segment][None, :, None, :]
    return rms_norm(q, rows(self.q_scales), self.eps), rms_norm(k, rows(self.k_scales), self.eps)


def reference_attention(q, k, v, kv_valid):
  """Dense masked softmax attention in float32: the test oracle."""
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  logits = jnp.einsum("bqhd,bkhd->bhqk", f32[0], f32[1]) / math.sqrt(q.shape[-1])
  logits = jnp.where(kv_valid[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), f32[2]).astype(q.dtype)


def attention_flops(batch, length, heads, head_dim) -> float:
  """Forward FLOPs of QK^T and PV (2 per multiply-add)."""
  return 4.0 * batch * length * length * heads * head_dim


def context_size() -> int:
  """Size of the 'context' axis of the current mesh (1 without a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get(CONTEXT, 1)


def segments_apart(dtype, kernel: str) -> bool:
  """Whether the blocks hand attention each segment's QKV projection where it lies
  (attention_cpu.segment_attention) rather than the joined q, k, v: where joint_attention would
  run the 'cpu' kernel over the whole sequence, on one device. Elsewhere the sequence may be
  split, sharded or padded, which takes it joined."""
  mesh = jax.sharding.get_abstract_mesh()
  return kernels.resolve_kernel(kernel, dtype) == "cpu" and (mesh.empty or mesh.size == 1)


def joint_attention(q, k, v, kv_valid, *, qk_norm: QKNorm | None = None, rope=None, strategy="none",
                    kernel="auto", chunk=512):
  """Bidirectional softmax attention over the joint sequence.

  q, k, v: (B, L, H, D) in the compute dtype. kv_valid: (B, L) bool, False for keys that may not
  be attended (text and sequence padding). qk_norm: None or the QK norms q and k go through
  first; rope: None or the joint sequence's (L, D/2) RoPE angles by which they are then rotated
  (embeddings.apply_rope). The 'cpu' kernel applies both as it packs q and k where the sequence
  is not split over 'context' (strategy 'none'); elsewhere they are applied here first.
  Returns (B, L, H, D) in q.dtype; scale
  1/sqrt(D), softmax accumulated in float32. Call under jax.set_mesh(mesh) for the sharded
  strategies; without a mesh, or with a 'context' axis of size 1, every strategy runs the local
  kernel (splash, cuDNN and 'cpu' in a shard_map over batch and heads on a mesh of several
  devices). The
  sharded strategies split L evenly over 'context' and pad each shard's part where they need
  padding, so a sequence laid out per shard (model/joint_layout.py) stays in place. The ring
  strategy folds each K/V block into its own online softmax: densely for kernel='xla', else in
  `chunk`-sized pieces (splash and cuDNN expose no log-sum-exp to combine, and whoever picks them
  wants no L x L logits either).
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"parallel.context_strategy must be one of {STRATEGIES}, found {strategy!r}")
  if chunk < 1:
    raise ValueError(f"parallel.attention_chunk must be >= 1, found {chunk}")
  kernel = kernels.resolve_kernel(kernel, q.dtype)
  mesh = jax.sharding.get_abstract_mesh()
  shards = context_size()
  if shards == 1:
    strategy = "none"
  if strategy == "ring":
    kernel = "xla" if kernel == "xla" else "chunked"
  if not (kernel == "cpu" and strategy == "none"):
    if qk_norm is not None:
      q, k = qk_norm.apply(q, k)
    if rope is not None:
      q, k = apply_rope(q, rope), apply_rope(k, rope)
    qk_norm, rope = None, None

  # Only the sharded strategies split the sequence (evenly); each shard then pads its own part to
  # what the kernel tiles, so a caller's shard boundaries (model/joint_layout.py) stay where they are.
  split = shards if strategy != "none" else 1
  length = q.shape[1]
  q, k, v, kv_valid = (_pad_sequence(x, _round_up(length, split)) for x in (q, k, v, kv_valid))
  local = _padded_shard(q.shape[1] // split, split, kernel, chunk, ring=strategy == "ring")

  # Pallas, cuDNN and FFI calls have no partitioning rule: left to XLA, they would be fed whole gathered
  # arrays on every device. Under a mesh they always run per shard; the XLA kernels may stay global,
  # and so may every kernel on a mesh of one device (a shard_map there adds no-op all-reduces of
  # the cotangents to the backward).
  if strategy == "none" and (mesh.empty or mesh.size == 1 or kernel not in _OPAQUE_KERNELS):
    out = _with_padding(functools.partial(kernels.local_attention, kernel=kernel, chunk=chunk,
                                          qk_norm=qk_norm, rope=rope), local)(q, k, v, kv_valid)
  else:
    out = _sharded(strategy, mesh, shards, q, k, v, kv_valid, kernel, chunk, local, qk_norm, rope)
  return out[:, :length]


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _pad_sequence(x, length: int):
  """x (B, L, ...) padded with zeros (False: invalid keys) to `length` tokens."""
  return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def _padded_shard(local: int, shards: int, kernel: str, chunk: int, ring: bool) -> int:
  """Smallest length >= local per shard with which every kernel call can tile its keys."""
  if kernel == "splash":  # each shard's queries and the (gathered) keys in 128-wide tiles
    return _round_up(local, kernels.SPLASH_TILE)
  if kernel != "chunked":
    return local
  if ring:  # each ring step folds one shard's keys in chunks
    return _round_up(local, chunk) if local > chunk else local
  # all_gather / ulysses: the gathered shards * local keys in chunks
  return _round_up(local, chunk // math.gcd(chunk, shards)) if local * shards > chunk else local


def _with_padding(body, length: int):
  """body over q, k, v, kv_valid padded to `length` tokens with invalid keys; the output cut back."""
  def padded(q, k, v, kv_valid):
    out = body(*(_pad_sequence(x, length) for x in (q, k, v, kv_valid)))
    return out[:, :q.shape[1]]
  return padded


def _sharded(strategy, mesh, shards, q, k, v, kv_valid, kernel, chunk, local, qk_norm, rope):
  """`qk_norm`, `rope`: for the 'cpu' kernel under strategy 'none' (every shard sees the whole
  sequence, so each takes all of them), else None."""
  batch, _, heads, _ = q.shape
  batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  # Axes that do not divide the array replicate it instead (e.g. batch 1 on fsdp=2).
  if batch % math.prod(mesh.shape[a] for a in batch_axes):
    batch_axes = ()
  head_axis = _HEAD_AXIS if _HEAD_AXIS in mesh.axis_names and heads % mesh.shape[_HEAD_AXIS] == 0 else None
  batch_spec = batch_axes or None
  sequence_axis = None if strategy == "none" else CONTEXT  # 'none': every shard sees the whole sequence
  qkv_spec = P(batch_spec, sequence_axis, head_axis, None)
  valid_spec = P(batch_spec, sequence_axis)

  if strategy == "none":
    body = functools.partial(kernels.local_attention, kernel=kernel, chunk=chunk, qk_norm=qk_norm,
                             rope=rope)
  elif strategy == "all_gather":
    body = functools.partial(_all_gather_body, kernel=kernel, chunk=chunk)
  elif strategy == "ulysses":
    local_heads = heads // mesh.shape[head_axis] if head_axis else heads
    if local_heads % shards:
      raise ValueError(
          f"context_strategy='ulysses' splits heads over the context axis: heads={heads} "
          f"({local_heads} per '{_HEAD_AXIS}' shard) is not divisible by the context size {shards} "
          f"(mesh.context); use 'all_gather' or 'ring', or a context size dividing {local_heads}")
    body = functools.partial(_ulysses_body, kernel=kernel, chunk=chunk)
  else:
    body = functools.partial(_ring_body, shards=shards, kernel=kernel, chunk=chunk)
  # Pallas, cuDNN and FFI calls cannot state how their outputs vary over mesh axes: skip that check.
  return jax.shard_map(_with_padding(body, local), mesh=mesh, in_specs=(qkv_spec,) * 3 + (valid_spec,),
                       out_specs=qkv_spec,
                       check_vma=kernel not in _OPAQUE_KERNELS)(q, k, v, kv_valid)


def _gather_sequence(x):
  return jax.lax.all_gather(x, CONTEXT, axis=1, tiled=True)


def _all_gather_body(q, k, v, kv_valid, *, kernel, chunk):
  k, v, kv_valid = _gather_sequence(k), _gather_sequence(v), _gather_sequence(kv_valid)
  return kernels.local_attention(q, k, v, kv_valid, kernel, chunk)


def _ulysses_body(q, k, v, kv_valid, *, kernel, chunk):
  to_heads = lambda x: jax.lax.all_to_all(x, CONTEXT, split_axis=2, concat_axis=1, tiled=True)
  out = kernels.local_attention(to_heads(q), to_heads(k), to_heads(v), _gather_sequence(kv_valid),
                                kernel, chunk)
  return jax.lax.all_to_all(out, CONTEXT, split_axis=1, concat_axis=2, tiled=True)


def _ring_body(q, k, v, kv_valid, *, shards, kernel, chunk):
  return _ring(q, k, v, kv_valid, shards, chunk if kernel == "chunked" else k.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring(q, k, v, kv_valid, shards, block):
  """Ring attention over this shard's queries, folding `block` keys at a time; a flash-style custom
  VJP keeps only q, k, v, the output and the row log-sum-exp, and sends the K/V gradients round too."""
  return _ring_forward(q, k, v, kv_valid, shards, block)[0]


def _to_next(x, shards):
  return jax.lax.ppermute(x, CONTEXT, [(i, (i + 1) % shards) for i in range(shards)])


def _ring_forward(q, k, v, kv_valid, shards, block):
  def step(carry, _):
    state, k, v, kv_valid = carry
    # Send the current block on while folding it in: the two are independent, so XLA can overlap them.
    k_next, v_next, valid_next = (_to_next(x, shards) for x in (k, v, kv_valid))
    state = kernels.fold_keys(state, q, k, v, kv_valid, block)
    return (state, k_next, v_next, valid_next), None

  (state, k_last, v_last, valid_last), _ = jax.lax.scan(
      step, (kernels.empty_state(q), k, v, kv_valid), None, length=shards - 1)
  state = kernels.fold_keys(state, q, k_last, v_last, valid_last, block)
  out = kernels.finish(state, q.dtype)
  return out, (q, k, v, kv_valid, out, kernels.log_sum_exp(state))


def _ring_backward(shards, block, residuals, out_grad):
  q, k, v, kv_valid, out, lse = residuals
  delta = kernels.output_delta(out, out_grad)

  def add_block(dq, k, v, kv_valid, dk, dv):
    block_dq, block_dk, block_dv = kernels.key_gradients(q, k, v, kv_valid, out_grad, lse, delta, block)
    return dq + block_dq, dk + block_dk, dv + block_dv

  def step(carry, _):
    dq, k, v, kv_valid, dk, dv = carry
    k_next, v_next, valid_next = (_to_next(x, shards) for x in (k, v, kv_valid))
    dq, dk, dv = add_block(dq, k, v, kv_valid, dk, dv)
    # Each K/V block's gradient travels with it; after `shards` sends it is back on its own shard.
    return (dq, k_next, v_next, valid_next, _to_next(dk, shards), _to_next(dv, shards)), None

  zeros = lambda x: jnp.zeros_like(x, dtype=jnp.float32)
  carry, _ = jax.lax.scan(step, (zeros(q), k, v, kv_valid, zeros(k), zeros(v)), None, length=shards - 1)
  dq, dk, dv = add_block(*carry)
  dk, dv = _to_next(dk, shards), _to_next(dv, shards)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None  # kv_valid: no gradient


_ring.defvjp(_ring_forward, _ring_backward)
