"""Token order of the joint sequence, so that each context shard holds its own video slice.

The joint sequence is [audio ; text_a ; text_v ; video]. Video tokens are sharded over the
'context' mesh axis (act_video_length), the rest is replicated (act_length), and attention splits
the joint sequence evenly over 'context'. Concatenated in that order, shard i of the joint sequence
would not be shard i of the video: every layer would move tokens between devices before and after
attention. Attention does not depend on token order (RoPE angles and the key mask travel with their
tokens), so with c context shards the sequence is laid out shard-major instead:

  [rest_0 ; video_0 ; rest_1 ; video_1 ; ... ; rest_{c-1} ; video_{c-1}]

video_i is the slice context shard i already holds, rest_i an even share of audio + text (padded
with masked tokens to a multiple of c). Splitting that evenly over 'context' moves no video token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jova_jax.model.attention import CONTEXT, context_size


def context_shards(video_tokens: int) -> int:
  """The 'context' size of the current mesh when it divides the video tokens, else 1 (plain order)."""
  shards = context_size()
  return shards if video_tokens % shards == 0 else 1


def _pin(x, axis: int, mesh_axis):
  """Pins dimension `axis` of x to mesh_axis (None: replicated), leaving the others to XLA.

  Without this XLA may reach the same layout through all-to-alls and permutes of small slices."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  spec = [jax.sharding.PartitionSpec.UNCONSTRAINED] * x.ndim
  spec[axis] = mesh_axis
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def _by_shard(x, shards: int, axis: int):
  """(..., L, ...) -> (..., shards, L / shards, ...), the new `axis` over 'context'."""
  x = x.reshape(*x.shape[:axis], shards, -1, *x.shape[axis + 1:])
  return _pin(x, axis, CONTEXT) if shards > 1 else x


def _merge(x, axis: int):
  return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])


def join(segments, shards: int, axis: int = 1):
  """Concatenates segments (video last) along `axis` in the shard-major order; padding is zeros
  (False for masks), so padded keys are invalid."""
  *rest, video = segments
  rest = jnp.concatenate(rest, axis=axis)
  pad = -rest.shape[axis] % shards
  rest = jnp.pad(rest, [(0, pad if a == axis else 0) for a in range(rest.ndim)])
  if shards > 1:  # replicated, as act_length has it: each shard then slices its share locally
    rest = _pin(rest, axis, None)
  return _merge(jnp.concatenate([_by_shard(rest, shards, axis), _by_shard(video, shards, axis)],
                                axis=axis + 1), axis)


def split(joint, lengths, shards: int, axis: int = 1):
  """Inverse of join: the segments of `lengths` (video last) from a shard-major joint sequence;
  audio and text come back replicated over 'context' (one all-gather), as act_length has them."""
  *rest_lengths, _ = lengths
  rest_per_shard = -(-sum(rest_lengths) // shards)
  rest, video = jnp.split(_by_shard(joint, shards, axis), [rest_per_shard], axis=axis + 1)
  rest = _merge(rest, axis)
  if shards > 1:
    rest = _pin(rest, axis, None)
  offsets = [sum(rest_lengths[:i + 1]) for i in range(len(rest_lengths))]
  *segments, _padding = jnp.split(rest, offsets, axis=axis)
  return [*segments, _merge(video, axis)]


def from_plain(joint, lengths, shards: int, axis: int = 1):
  """The shard-major order of a sequence given in plain segment order (e.g. RoPE angles)."""
  offsets = [sum(lengths[:i + 1]) for i in range(len(lengths) - 1)]
  return join(jnp.split(joint, offsets, axis=axis), shards, axis)
