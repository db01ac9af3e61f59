"""LoRA adapters on JoVA's projections (config `model.lora`, docs/design.md section 8).

An adapter adds `scale * dropout(x) @ A @ B` to a Dense layer's output, scale = alpha / rank.
A (in dims..., rank) starts random and B (rank, out dims...) at zero, so a model with fresh
adapters computes exactly what its base computes. Adapters sit on the Dense they adapt, as
`<dense>/lora/{a,b}`: the base's param paths stay those of a run without LoRA, so a base
checkpoint loads into the adapted model unchanged. A's input dims carry the kernel's logical
axes and B's output dims too (sharded like their base weight); the rank dim is `lora_rank`.

Dropout runs only inside `dropout_scope(key)` (the training loss); evaluation and sampling
never enter one. The scanned blocks take one key per layer (JoVA._run_blocks).
"""
from __future__ import annotations

import contextlib
import math
import threading

import jax
import jax.numpy as jnp
from flax import nnx

from jova_jax.model.layers import Dense, contract

TARGETS = ("qkv", "out", "mlp", "embedders")
TOWERS = ("video", "audio")
# The segments (streams) of each tower in the blocks, and the Dense layers of each target.
_STREAM_TOWER = {"video": "video", "text_v": "video", "audio": "audio", "text_a": "audio"}
_BLOCK_LAYERS = {"qkv": ("qkv",), "out": ("out",), "mlp": ("fc1", "fc2")}
_EMBEDDERS = {"video": (("video_in",), ("text_video", "fc1"), ("text_video", "fc2")),
              "audio": (("audio_in",), ("text_audio", "fc1"), ("text_audio", "fc2"))}

_scope = threading.local()


def enabled(lora_config) -> bool:
  return lora_config is not None and int(lora_config.get("rank", 0)) > 0


@contextlib.contextmanager
def dropout_scope(key):
  """Adapter dropout with `key` while tracing the calls inside (None: no dropout)."""
  previous = getattr(_scope, "key", None)
  _scope.key = key
  try:
    yield
  finally:
    _scope.key = previous


def dropout_key():
  """The key of the innermost dropout_scope, None outside one."""
  return getattr(_scope, "key", None)


class LoraAdapter(nnx.Module):
  """The low-rank update of one Dense (stacked on a leading `layers` dim in scanned blocks)."""

  def __init__(self, dense: Dense, rank: int, alpha: float, dropout: float, salt: int,
               key: jax.Array):
    axes = tuple(dense.kernel.get_metadata()["axes"])
    n_in = len(dense.in_shape)
    layers = dense.kernel.shape[:dense.kernel.ndim - len(axes)]  # () or (num_layers,)
    fan_in = math.prod(dense.in_shape)
    a = jax.random.normal(key, layers + dense.in_shape + (rank,), jnp.float32) / math.sqrt(fan_in)
    self.a = nnx.Param(a, axes=axes[:n_in] + ("lora_rank",))
    self.b = nnx.Param(jnp.zeros(layers + (rank,) + dense.out_shape, jnp.float32),
                       axes=("lora_rank",) + axes[n_in:])
    self.scale = alpha / rank
    self.dropout = dropout
    self.salt = salt  # tells this adapter's dropout mask apart from the others'
    self.dtype = dense.dtype

  def __call__(self, x, n_in: int):
    key = dropout_key()
    if key is not None and self.dropout > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(key, self.salt), 1 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1 - self.dropout), 0).astype(x.dtype)
    y = contract(contract(x, self.a, n_in, self.dtype), self.b, 1, self.dtype)
    return y * jnp.asarray(self.scale, self.dtype)


def target_paths(model, lora_config) -> list[tuple[str, ...]]:
  """Module paths of the Dense layers that `lora_config` (targets, towers) adapts."""
  targets, towers = tuple(lora_config.targets), tuple(lora_config.towers)
  paths = []
  for stack in ("dual_blocks", "single_blocks"):
    block = getattr(model, stack)
    for stream, tower in _STREAM_TOWER.items():
      if tower not in towers or not hasattr(block, stream):
        continue
      for target in targets:
        paths += [(stack, stream, layer) for layer in _BLOCK_LAYERS.get(target, ())]
  if "embedders" in targets:
    paths += [p for tower in towers for p in _EMBEDDERS[tower]]
  return paths


def attach(model, lora_config, rngs: nnx.Rngs) -> None:
  """Puts an adapter on every targeted Dense of `model`."""
  paths = target_paths(model, lora_config)
  keys = jax.random.split(rngs.params(), max(len(paths), 1))
  for salt, path in enumerate(paths):
    dense = model
    for name in path:
      dense = getattr(dense, name)
    # Dense.lora starts as a static None: nnx.data makes the adapter part of the state.
    dense.lora = nnx.data(LoraAdapter(dense, int(lora_config.rank), float(lora_config.alpha),
                                      float(lora_config.dropout), salt, keys[salt]))


# ------------------------------------------------------------------ pure-dict params

def _adapter_parents(params: dict) -> list[dict]:
  """Every dict of a pure-dict params tree that holds a 'lora' adapter entry."""
  found = [params] if isinstance(params.get("lora"), dict) else []
  for key, value in params.items():
    if isinstance(value, dict) and key != "lora":
      found += _adapter_parents(value)
  return found


def _delta(a, b, kernel):
  """scale-free A @ B in the kernel's shape: a (L.., in.., r), b (L.., r, out..) where L.. are
  the stacked layer dims (none outside the scanned blocks)."""
  layers = a.ndim + b.ndim - 2 - kernel.ndim
  lead = kernel.shape[:layers]
  a2 = a.astype(jnp.float32).reshape(lead + (-1, a.shape[-1]))
  b2 = b.astype(jnp.float32).reshape(lead + (b.shape[layers], -1))
  return jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(kernel.shape)


def merge_adapters(params: dict, scale: float) -> dict:
  """A copy of params with every adapter folded into its kernel (kernel + scale * A @ B, in
  float32) and removed: the params of the same model without LoRA. scale: alpha / rank (times
  any sampling lora_scale)."""
  out = jax.tree.map(lambda x: x, params)
  for node in _adapter_parents(out):
    adapter = node.pop("lora")
    kernel = node["kernel"]
    node["kernel"] = kernel.astype(jnp.float32) + scale * _delta(
        adapter["a"], adapter["b"], kernel)
  return out


def scale_adapters(params: dict, scale: float) -> dict:
  """A copy of params whose adapters contribute `scale` times as much (B scaled)."""
  out = jax.tree.map(lambda x: x, params)
  for node in _adapter_parents(out):
    node["lora"] = dict(node["lora"], b=node["lora"]["b"] * scale)
  return out
