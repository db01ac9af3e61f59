"""The one logical-axis table (docs/design.md section 3): logical names -> mesh axes.

Params carry logical names in their nnx metadata; activations are constrained with
`constrain(x, names)`. Names starting with `act_` are activation axes, kept apart from the
param names because the same dimension is sharded differently in the two (a param's `embed`
is sharded over fsdp, an activation's embed never is: its batch already uses fsdp).
"""
from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")

RULES: tuple[tuple[str, object], ...] = (
    # params
    ("embed", ("fsdp", "context")),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("layers", None),
    ("patch", None),
    ("modulation", None),
    ("text_embed", None),
    ("lora_rank", None),  # the rank dim of LoRA adapters (small: replicated)
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_video_length", "context"),
    ("act_length", None),  # audio + text: under 2% of the sequence, replicated over context
    ("act_embed", None),
)
_RULES = dict(RULES)


def logical_to_spec(names) -> P:
  """Maps a tuple of logical names (or None) to a PartitionSpec over the mesh axes."""
  if names is None:
    return P()
  axes = []
  for name in names:
    if name is None:
      axes.append(None)
      continue
    if name not in _RULES:
      raise KeyError(f"logical axis {name!r} is not in jova_jax/parallel/rules.py RULES")
    axes.append(_RULES[name])
  return P(*axes)


def sharding(mesh, names) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(names))


BATCH_AXES = _RULES["act_batch"]  # the mesh axes a batch's leading dim is split over


def batch_sharding(mesh) -> NamedSharding:
  """The one sharding of every batch (leading dim over act_batch's axes, the rest replicated):
  the pipeline's global arrays, the train and eval steps' inputs, the sampler's conditions."""
  return sharding(mesh, ("act_batch",))


def batch_shards(mesh) -> int:
  """How many ways a batch is split (the product of act_batch's mesh axes)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def weights_sharded() -> bool:
  """True under a mesh that splits params over their FSDP axes (`embed`: fsdp x context)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return False
  shape = dict(mesh.shape)
  return shape.get("fsdp", 1) * shape.get("context", 1) > 1


def gathered(w, names):
  """A param as its layer uses it: the FSDP shards (`embed` over fsdp x context) all-gathered,
  tensor sharding kept. Call under a mesh (weights_sharded())."""
  return jax.lax.with_sharding_constraint(
      w, logical_to_spec(tuple(None if n == "embed" else n for n in names)))


def constrain(x, names):
  """with_sharding_constraint by logical names; a no-op outside a mesh context.

  Pins the batch axis to ("data", "fsdp") (without it XLA keeps full-batch activations on
  fsdp meshes: 248 MiB of temporaries instead of 184 MiB at fsdp=8, docs/scaling.md), the
  video sequence to `context`; the embed axis stays free (the partitioner picks it per op).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  spec = [P.UNCONSTRAINED if n == "act_embed" else part for n, part in zip(names, logical_to_spec(names))]
  return jax.lax.with_sharding_constraint(x, P(*spec))
