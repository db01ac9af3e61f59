"""LoRA and frozen-subset fine-tuning (issue 17): the model with fresh adapters equals its base,
merged equals unmerged, training moves only what train.trainable / LoRA allows, the optimizer
holds only adapter leaves, and a sharded LoRA step equals the single-device one.
(The train -> LoRA -> sample -> merge path on a dataset: tests/test_lora_e2e.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jova_jax import config_lib, finetune, trainer
from jova_jax.data.synthetic import SyntheticIterator
from jova_jax.model import lora, sharded
from jova_jax.model.jova import JoVA, param_logical_axes
from jova_jax.parallel import mesh as mesh_lib
from tests.conftest import load


def lora_config(rank=4, targets=("qkv", "out", "mlp", "embedders"), **train):
  c = load("tiny")
  c.model.lora.update(rank=rank, alpha=8.0, targets=targets)
  c.train.update(**train)
  return c


def _inputs(config, seed=0):
  batch = SyntheticIterator(config, seed=seed).batch(0)
  b = 2
  sig = jnp.asarray([0.3, 0.8], jnp.float32)
  args = (batch["video"][:b], batch["audio"][:b], batch["text"][:b], batch["text_mask"][:b],
          sig, sig)
  return args, dict(first_frame=batch["video"][:b, 0], use_first_frame=jnp.asarray([True, False]))


def _forward(config, params, args, kwargs):
  graphdef, _, _ = sharded.split_abstract(config)
  return jax.jit(lambda p: sharded.apply(graphdef, p, *args, **kwargs))(params)


def _params(config, seed=0):
  """Fresh params, every leaf but the adapters' B moved off its init (the zero-initialised
  adaLN gates and output layers would hide any difference in the outputs)."""
  flat = finetune.flatten(
      nnx.to_pure_dict(nnx.state(JoVA(config, rngs=nnx.Rngs(params=seed)), nnx.Param)))
  keys = iter(jax.random.split(jax.random.key(seed + 100), len(flat)))
  return finetune.unflatten({k: v if k.endswith("lora/b") else
                             v + 0.05 * jax.random.normal(next(keys), v.shape)
                             for k, v in flat.items()})


def _adapter_paths(tree):
  return sorted(k for k in finetune.flatten(tree) if finetune.ADAPTER.search(k))


def _with_random_b(params, seed=1):
  flat = finetune.flatten(params)
  keys = iter(jax.random.split(jax.random.key(seed), len(flat)))
  return finetune.unflatten({k: (0.05 * jax.random.normal(next(keys), v.shape)
                                 if k.endswith("lora/b") else v) for k, v in flat.items()})


def test_fresh_adapters_leave_the_outputs_of_the_base():
  base_cfg, cfg = load("tiny"), lora_config()
  base = _params(base_cfg)
  adapted = finetune.flatten(_params(cfg, seed=7))  # random adapters A; B at zero
  paths = _adapter_paths(adapted)
  # every stream's qkv/out/fc1/fc2 in both stacks (4 + 2 streams) and 6 embedders, A and B each
  assert len(paths) == 2 * (4 * 4 + 2 * 4 + 6)
  assert all(float(jnp.abs(adapted[p]).max()) > 0 for p in paths if p.endswith("/a"))
  params = finetune.combine(base, finetune.unflatten({p: adapted[p] for p in paths}))
  args, kwargs = _inputs(cfg)
  want = _forward(base_cfg, base, args, kwargs)
  got = _forward(cfg, params, args, kwargs)
  for w, g in zip(want, got):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  # The adapters are live: nonzero B moves the outputs.
  moved = _forward(cfg, _with_random_b(params), args, kwargs)
  assert float(jnp.abs(moved[0] - want[0]).max()) > 1e-3


def test_merged_equals_unmerged():
  cfg = lora_config()
  params = _with_random_b(_params(cfg))
  merged = lora.merge_adapters(params, scale=cfg.model.lora.alpha / cfg.model.lora.rank)
  assert _adapter_paths(merged) == []
  base_cfg = load("tiny")
  assert jax.tree.structure(merged) == jax.tree.structure(_params(base_cfg))
  args, kwargs = _inputs(cfg)
  unmerged_out = _forward(cfg, params, args, kwargs)
  merged_out = _forward(base_cfg, merged, args, kwargs)
  for u, m in zip(unmerged_out, merged_out):
    scale = float(jnp.abs(u).max())
    np.testing.assert_allclose(np.asarray(m), np.asarray(u), rtol=0, atol=1e-5 * scale)
