"""model.param_dtype: bfloat16 params are stored, optimised, averaged and
checkpointed in bfloat16, while the model still computes in model.compute_dtype."""
import jax
import jax.numpy as jnp
import numpy as np

from jova_jax.model import sharded
from jova_jax.training import loop
from tests.conftest import load
from tests.datasets import write_random_dataset
from tests.test_lora import _forward, _inputs, _params
from tests.test_trainer import _restore, tiny


def _bf16(config):
  c = config.copy_and_resolve_references()
  c.model.param_dtype = "bfloat16"
  return c


def test_bf16_params_compute_like_float32_params_rounded_to_bf16():
  config = load("tiny")
  assert config.model.compute_dtype == "float32"
  _, abstract, _ = sharded.split_abstract(_bf16(config))
  assert {x.dtype for x in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.bfloat16)}
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _params(config))
  args, kwargs = _inputs(config)
  # Reference: the float32 model on the same values held in float32.
  want = _forward(config, jax.tree.map(lambda x: x.astype(jnp.float32), rounded), args, kwargs)
  got = _forward(_bf16(config), rounded, args, kwargs)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_bf16_params_train_and_checkpoint_in_bf16(tmp_path):
  dataset = write_random_dataset(tmp_path / "ds", load("tiny"), 8, 4)
  config = _bf16(tiny(dataset))
  config.train.steps = 2
  loop.train(config, str(tmp_path / "run"))
  state, _ = _restore(str(tmp_path / "run"), config)
  for part in ("params", "ema"):
    dtypes = {x.dtype for x in jax.tree.leaves(state[part])}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}, (part, dtypes)
  mu = [x for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
  assert mu and all(x.dtype == jnp.bfloat16 for x in mu)
  assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(state["params"]))
