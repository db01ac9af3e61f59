"""The one logical-axis table (DESIGN 3): logical names -> mesh axes.

Params carry logical names in their nnx metadata; activations are constrained with
`constrain(x, names)`. Names starting with `act_` are activation axes, kept apart from the
param names because the same dimension is sharded differently in the two (a param's `embed`
is sharded over fsdp, an activation's embed never is: its batch already uses fsdp).
"""
from __future__ import annotations

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
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_kv", None),
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


# Left to XLA's propagation inside the model: the inputs already fix them. Pinning the batch
# axis of activations to ("data", "fsdp") as well gave wrong gradients on a
# (data=2, fsdp=2, tensor=2) CPU mesh with jax 0.10.2 (tests/test_sharding.py catches it).
_FREE_IN_CONSTRAINTS = frozenset({"act_batch", "act_embed"})


def constrain(x, names):
  """with_sharding_constraint by logical names; a no-op outside a mesh context.

  Only the axes that need pinning (video sequence over `context`, heads over `tensor`) are
  constrained; batch and embed stay UNCONSTRAINED.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  spec = [P.UNCONSTRAINED if n in _FREE_IN_CONSTRAINTS else part
          for n, part in zip(names, logical_to_spec(names))]
  return jax.lax.with_sharding_constraint(x, P(*spec))
