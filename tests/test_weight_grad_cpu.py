"""The CPU weight-gradient kernel (kernels/weight_grad_cpu): X^T dY equal to a float64 product for
shapes that hit every tile and block edge, a Dense layer's gradients through it equal to XLA's
autodiff, used by one-device float32 CPU programs only, and a missing compiler falls back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jova_jax.kernels import weight_grad_cpu
from jova_jax.model import layers
from tests.conftest import assert_falls_back_without_a_compiler
from tests.test_attention import make_mesh


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("depth, rows, columns", [
    (1, 1, 16),          # one row of X and dY, one 1-row tile, one vector
    (7, 13, 32),         # the 4-row and 1-row tail tiles, a 2-vector panel
    (300, 200, 400),     # depth past one 256-row chunk; rows and columns past one block
    (2176, 192, 576),    # the demo's QKV projection: 8 x 272 video tokens
    (8, 192, 1152),      # the adaLN modulation: one row per example
])
def test_the_kernel_equals_a_float64_product(depth, rows, columns):
  x, dy = _normal(0, (depth, rows)), _normal(1, (depth, columns))
  exact = np.asarray(x, np.float64).T @ np.asarray(dy, np.float64)
  ours = jax.jit(lambda x, dy: weight_grad_cpu.weight_gradient(x, dy, 1))(x, dy)
  assert ours.shape == (rows, columns)
  np.testing.assert_allclose(ours, exact, rtol=1e-5, atol=1e-5 * np.sqrt(depth))


def test_no_rows_give_a_zero_gradient():
  ours = jax.jit(lambda x, dy: weight_grad_cpu.weight_gradient(x, dy, 1))(
      jnp.zeros((0, 5)), jnp.zeros((0, 16)))
  np.testing.assert_array_equal(ours, np.zeros((5, 16)))


def test_columns_not_in_whole_vectors_are_refused():
  with pytest.raises(Exception, match="dy's columns must be a multiple of 16"):
    jax.jit(lambda x, dy: weight_grad_cpu.weight_gradient(x, dy, 1))(
        jnp.ones((4, 3)), jnp.ones((4, 10)))


@pytest.mark.parametrize("in_shape, out_shape", [
    (24, (3, 2, 16)),   # a QKV projection: (in) -> (3, heads, head_dim)
    ((2, 16), 24),      # an output projection: (heads, head_dim) -> (out): 24 is no whole vector
    (40, 48),
])
def test_a_dense_layers_gradients_equal_xlas(in_shape, out_shape):
  in_shape, out_shape = np.atleast_1d(in_shape).tolist(), np.atleast_1d(out_shape).tolist()
  axes = ("in",) * len(in_shape) + ("out",) * len(out_shape)
  kernel = nnx.Param(_normal(2, (*in_shape, *out_shape)), axes=axes)
  x, target = _normal(3, (2, 9, *in_shape)), _normal(4, (2, 9, *out_shape))
  n_in = len(in_shape)

  def loss(product):
    return lambda x, w: jnp.sum(jnp.sin(product(x, w)) * target)

  def through_layer(x, w):
    return layers.contract(x, nnx.Param(w, axes=axes), n_in, jnp.float32)

  def xla(x, w):
    return jnp.tensordot(x, w, axes=n_in)

  ours, reference = (jax.jit(jax.grad(loss(product), argnums=(0, 1)))(x, kernel[...])
                     for product in (through_layer, xla))
  for got, want in zip(ours, reference):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  program = jax.jit(jax.grad(loss(through_layer), argnums=1)).lower(x, kernel[...]).as_text()
  assert ("jova_weight_gradient" in program) == (np.prod(out_shape) % 16 == 0)


def test_applies_to_one_cpu_device_in_float32_only():
  assert weight_grad_cpu.applies(jnp.float32, 192)
  assert not weight_grad_cpu.applies(jnp.bfloat16, 192)
  assert not weight_grad_cpu.applies(jnp.float32, 10)
  with jax.set_mesh(make_mesh((1, 1, 1, 1))):
    assert weight_grad_cpu.applies(jnp.float32, 192)
  with jax.set_mesh(make_mesh((1, 2, 2, 2))):  # the fake devices keep XLA's dot
    assert not weight_grad_cpu.applies(jnp.float32, 192)


def test_without_a_compiler_the_product_stays_xlas_and_says_why(tmp_path):
  code = ("import jax.numpy as jnp; from jova_jax.kernels import weight_grad_cpu as k; "
          "print('applies:', k.applies(jnp.float32, 192))")
  assert_falls_back_without_a_compiler(
      code, tmp_path, "applies: False", "CPU weight-gradient kernel unavailable, using XLA's dot")
