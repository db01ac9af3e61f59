"""Compiled backward-pass temporaries of chunked and ring attention as the sequence grows.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python -m jova_jax.model.attention_memory [--lengths=16384,32768]

Compiles jax.grad of a scalar loss of joint_attention for abstract inputs (nothing runs) and prints
XLA's memory_analysis().temp_size_in_bytes per device: chunked on one device, ring on a mesh of
data=2 x context=4 (one sample and L/4 tokens per device). An O(L x chunk) backward roughly doubles
its temporaries when L doubles; one that keeps a softmax state per key block grows ~4x.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jova_jax.model.attention import joint_attention
from jova_jax.parallel.rules import MESH_AXES

HEADS, HEAD_DIM, CHUNK = 4, 64, 512
RING_MESH = {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}

_LENGTHS = flags.DEFINE_list("lengths", ["16384", "32768"], "Joint sequence lengths to compile.")


def _ring_mesh():
  shape = tuple(RING_MESH[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=jax.devices()[:RING_MESH["data"] * RING_MESH["context"]])


def backward_temp_bytes(strategy: str, length: int) -> int:
  """Per-device temporaries of grad(sum(joint_attention)) w.r.t. q, k, v in float32.

  strategy 'none': chunked kernel on one device, batch 1. 'ring': chunked ring on RING_MESH, batch 2.
  """
  mesh = _ring_mesh() if strategy == "ring" else None
  batch = RING_MESH["data"] if mesh else 1

  def loss(q, k, v, valid):
    out = joint_attention(q, k, v, valid, strategy=strategy, kernel="chunked", chunk=CHUNK)
    return out.astype(jnp.float32).sum()

  def spec(shape, dtype, names):
    sharding = NamedSharding(mesh, P(*names)) if mesh else None
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  qkv = spec((batch, length, HEADS, HEAD_DIM), jnp.float32, ("data", "context", None, None))
  valid = spec((batch, length), jnp.bool_, ("data", "context"))
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  if mesh is None:
    return grad.lower(qkv, qkv, qkv, valid).compile().memory_analysis().temp_size_in_bytes
  with jax.set_mesh(mesh):
    return grad.lower(qkv, qkv, qkv, valid).compile().memory_analysis().temp_size_in_bytes


def main(argv):
  del argv
  lengths = [int(n) for n in _LENGTHS.value]
  print(f"backward temporaries per device (float32, heads {HEADS}, head_dim {HEAD_DIM}, chunk {CHUNK})")
  for strategy, where in (("none", "chunked, 1 device, batch 1"),
                          ("ring", "ring, data=2 x context=4, batch 2")):
    sizes = [backward_temp_bytes(strategy, n) for n in lengths]
    figures = ", ".join(f"{n} tokens {b / 2**20:.1f} MiB" for n, b in zip(lengths, sizes))
    print(f"  {where}: {figures}; ratio {sizes[-1] / sizes[0]:.2f}")


if __name__ == "__main__":
  app.run(main)
