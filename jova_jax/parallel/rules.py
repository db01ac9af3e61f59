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


def _batch_pin_miscompiles(mesh) -> bool:
  """True on meshes where pinning the activation batch to ("data", "fsdp") is miscompiled.

  Seen with jax 0.10.2 on CPU (both Shardy and GSPMD), mesh data=2, fsdp=2, tensor=2 only
  (fsdp=8, fsdp=4 x tensor=2, data=2 x fsdp=4 and data=4 x tensor=2 are exact): the FORWARD
  output of the text streams (text_a, text_v) of every block is wrong (~3% relative), audio and
  video are exact. The partitioned HLO inserts collective-permutes with source_target_pairs
  {2<->4, 3<->5} (data and fsdp coordinates swapped) on the text segments' slice of the joint
  attention output before the `out` projection and on their FFN hidden before `fc2`, i.e. it
  reorders those segments' batch rows across devices. Any single batch pin triggers it (the
  video input alone, or the block outputs alone); constraining the attention output and FFN
  hidden as well does not help. The text projections' and null_text's gradients inherit the
  error (relative error 0.5-2), hence tests/test_sharding.py's data=2,fsdp=2,tensor=2 case.
  Where it happens the batch stays free (the old behaviour: correct, more temporaries).
  """
  shape = dict(mesh.shape)
  return all(shape.get(a, 1) > 1 for a in ("data", "fsdp", "tensor"))


def constrain(x, names):
  """with_sharding_constraint by logical names; a no-op outside a mesh context.

  Pins the batch axis to ("data", "fsdp") (without it XLA keeps full-batch activations on
  fsdp meshes: 248 MiB of temporaries instead of 180 MiB at fsdp=8, docs/scaling.md), the
  video sequence to `context`; the embed axis stays free (the partitioner picks it per op).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  free = {"act_embed"} | ({"act_batch"} if _batch_pin_miscompiles(mesh) else set())
  spec = [P.UNCONSTRAINED if n in free else part for n, part in zip(names, logical_to_spec(names))]
  return jax.lax.with_sharding_constraint(x, P(*spec))
