"""Collectives around one joint attention with the plain and the shard-major token order.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python -m jova_jax.model.layout_collectives [--train_steps=ulysses:4,ring:4,all_gather:2]

Compiles the gradient of segments -> joint sequence -> joint_attention -> segments (what every
block does) for the segment lengths of configs/tiny.py on data=1 x fsdp=2 x context=4, video
sharded over context and the rest replicated as in parallel/rules.py, and counts the collective
instructions of the compiled HLO (an instruction inside a loop counts once). --train_steps also
counts them in the whole train step of configs/tiny.py (synthetic data, fsdp = 8 / context) for
each strategy:context listed (minutes each on 2 cores).
"""
from __future__ import annotations

import collections
import os
import re

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.sharding import AxisType

from jova_jax import config_lib
from jova_jax.model import joint_layout
from jova_jax.model.attention import joint_attention
from jova_jax.parallel import mesh as mesh_lib
from jova_jax.parallel import rules
from jova_jax.parallel.rules import MESH_AXES
from jova_jax.training import state as train_state, steps as train_steps

_TINY_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.py")
TINY_LENGTHS = (19, 8, 8, 20)  # audio, text_a, text_v, video tokens of configs/tiny.py
MESH = {"data": 1, "fsdp": 2, "context": 4, "tensor": 1}
_TRAIN_STEPS = flags.DEFINE_list("train_steps", [], "strategy:context pairs whose tiny train step to count.")
_COLLECTIVE = re.compile(r" = .*\b(all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)"
                         r"(?:-start)?\(")


def count_collectives(hlo_text: str) -> collections.Counter:
  return collections.Counter(m.group(1) for m in map(_COLLECTIVE.search, hlo_text.splitlines()) if m)


def layout_collectives(strategy: str, shard_major: bool, lengths=TINY_LENGTHS) -> collections.Counter:
  mesh = jax.make_mesh(tuple(MESH[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES))
  shards = MESH["context"] if shard_major else 1
  batch, heads, head_dim = 8, 4, 16

  def spec(shape, dtype, video):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=rules.sharding(
        mesh, ("act_batch", "act_video_length" if video else None)))

  video = [i == len(lengths) - 1 for i in range(len(lengths))]
  tokens = [spec((batch, n, heads, head_dim), jnp.float32, v) for n, v in zip(lengths, video)]
  valid = [spec((batch, n), jnp.bool_, v) for n, v in zip(lengths, video)]

  def loss(tokens, valid):
    x = joint_layout.join(tokens, shards)
    out = joint_attention(x, x, x, joint_layout.join(valid, shards), strategy=strategy, kernel="xla")
    return sum(jnp.sin(part).sum() for part in joint_layout.split(out, lengths, shards))

  with jax.set_mesh(mesh):
    return count_collectives(jax.jit(jax.grad(loss)).lower(tokens, valid).compile().as_text())


def train_step_collectives(strategy: str, context: int) -> collections.Counter:
  config = config_lib.load_config(_TINY_CONFIG)
  config.data.source = "synthetic"
  config.mesh.update(fsdp=8 // context, context=context)
  config.parallel.context_strategy = strategy
  program = train_state.build_program(config, mesh_lib.make_mesh(config))
  return count_collectives(train_steps.compile_train_step(program).as_text())


def main(argv):
  del argv
  print(f"collectives of grad(join -> joint_attention -> split), segments {TINY_LENGTHS}, mesh {MESH}")
  for strategy in ("all_gather", "ulysses", "ring"):
    for shard_major in (False, True):
      counts = layout_collectives(strategy, shard_major)
      layout = "shard-major" if shard_major else "plain"
      print(f"  {strategy:10s} {layout:11s} {dict(sorted(counts.items()))}")
  for pair in _TRAIN_STEPS.value:
    strategy, context = pair.split(":")
    counts = train_step_collectives(strategy, int(context))
    print(f"  train step {strategy}, context {context}: {dict(sorted(counts.items()))}")


if __name__ == "__main__":
  app.run(main)
