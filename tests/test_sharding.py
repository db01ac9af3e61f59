"""A sharded forward and loss+gradient equal the single-device result (float32)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jova_jax import config_lib
from jova_jax.model import jova, sharded
from jova_jax.parallel import mesh as mesh_lib, rules
from jova_jax.training import objective
from tests.conftest import load


def _batch(config, seed=0):
  s = config_lib.latent_shapes(config)
  b = config.train.batch_size
  k = jax.random.split(jax.random.key(seed), 6)
  lengths = jnp.arange(b) % s.text_tokens + 1
  return {
      "video": jax.random.normal(k[0], (b,) + s.video),
      "audio": jax.random.normal(k[1], (b,) + s.audio),
      "mouth_mask": (jax.random.uniform(k[2], (b,) + s.video[:3]) < 0.2).astype(jnp.float32),
      "text": jax.random.normal(k[3], (b, s.text_tokens, config.text.width)),
      "text_mask": jnp.arange(s.text_tokens)[None] < lengths[:, None],
      "drop_text": jax.random.uniform(k[4], (b,)) < 0.3,
      "use_first_frame": jax.random.uniform(k[5], (b,)) < 0.5,
  }


def _randomized_params(config):
  """Random values everywhere (adaLN-Zero init would make most gradients trivially zero)."""
  graphdef, abstract, _ = sharded.split_abstract(config)
  leaves, treedef = jax.tree.flatten(abstract)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  vals = [jax.random.normal(k, x.shape) * 0.05 for k, x in zip(keys, leaves)]
  return graphdef, jax.tree.unflatten(treedef, vals)


def _loss_and_grad(graphdef, params, batch, config):
  def f(p):
    return objective.training_loss(graphdef, p, batch, jax.random.key(7), config)
  (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(params)
  return loss, metrics, grads


@pytest.fixture(scope="module")
def reference():
  config = load("tiny")
  graphdef, params = _randomized_params(config)
  batch = _batch(config)
  loss, metrics, grads = jax.jit(lambda p, b: _loss_and_grad(graphdef, p, b, config))(params, batch)
  return config, graphdef, params, batch, loss, metrics, grads


@pytest.mark.parametrize("axes", [dict(fsdp=8), dict(fsdp=4, tensor=2),
                                  dict(data=2, fsdp=2, tensor=2)])
def test_sharded_loss_and_grad_equal_single_device(reference, axes):
  config, graphdef, params, batch, loss_ref, metrics_ref, grads_ref = reference
  config = config.copy_and_resolve_references()
  config.mesh.update({**dict(data=1, fsdp=1, context=1, tensor=1), **axes})
  mesh = mesh_lib.make_mesh(config)
  config_lib.validate(config, dict(mesh.shape))
  shardings = sharded.param_shardings(config, mesh)
  p = jax.device_put(params, shardings)
  batch_sharding = rules.batch_sharding(mesh)
  b = jax.device_put(batch, batch_sharding)
  with jax.set_mesh(mesh):
    step = jax.jit(lambda p, b: _loss_and_grad(graphdef, p, b, config),
                   in_shardings=(shardings, batch_sharding))
    loss, metrics, grads = step(p, b)
  # Params really are sharded (not silently replicated).
  kernel = p["dual_blocks"]["video"]["fc1"]["kernel"]
  assert kernel.addressable_shards[0].data.size < kernel.size
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5, atol=1e-5)
  for k in metrics_ref:
    np.testing.assert_allclose(metrics[k], metrics_ref[k], rtol=1e-5, atol=1e-5)
  flat_ref = jax.tree_util.tree_leaves_with_path(grads_ref)
  flat = dict(jax.tree_util.tree_leaves_with_path(grads))
  for path, g_ref in flat_ref:
    np.testing.assert_allclose(np.asarray(flat[path]), np.asarray(g_ref), rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_sharded_forward_equals_single_device(reference):
  config, graphdef, params, batch, *_ = reference
  s = config_lib.latent_shapes(config)
  args = (batch["video"], batch["audio"], batch["text"], batch["text_mask"],
          jnp.linspace(0.1, 0.9, config.train.batch_size), jnp.linspace(0.9, 0.0, config.train.batch_size))
  fwd = lambda p, *a: sharded.apply(graphdef, p, *a, drop_text=batch["drop_text"])  # noqa: E731
  ref_v, ref_a = jax.jit(fwd)(params, *args)
  config = config.copy_and_resolve_references()
  config.mesh.update(data=2, fsdp=2, context=1, tensor=2)
  mesh = mesh_lib.make_mesh(config)
  p = jax.device_put(params, sharded.param_shardings(config, mesh))
  with jax.set_mesh(mesh):
    out_v, out_a = jax.jit(fwd)(p, *args)
  assert out_v.shape == (config.train.batch_size,) + s.video
  np.testing.assert_allclose(out_v, ref_v, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out_a, ref_a, rtol=1e-5, atol=1e-5)


def test_init_params_is_sharded_and_deterministic():
  config = load("tiny")
  config.mesh.update(data=1, fsdp=8, context=1, tensor=1)
  mesh = mesh_lib.make_mesh(config)
  a = sharded.init_params(config, mesh, seed=0)
  b = sharded.init_params(config, mesh, seed=0)
  kernel = a["single_blocks"]["audio"]["qkv"]["kernel"]
  assert kernel.sharding.spec[1] == ("fsdp", "context")  # (layers, embed, ...) -> embed sharded
  np.testing.assert_array_equal(kernel, b["single_blocks"]["audio"]["qkv"]["kernel"])
  # Same values as an unsharded init: sharding must not change the model.
  model = jova.JoVA(config_lib.model_spec(config), rngs=nnx.Rngs(params=0))
  np.testing.assert_allclose(kernel, model.single_blocks.audio.qkv.kernel[...], atol=0)
