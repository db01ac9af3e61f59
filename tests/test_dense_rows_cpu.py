"""The CPU dense-rows kernels (kernels/dense_rows_cpu): a dense layer's product over the rows a
mask marks, 0 in the others, equal to XLA's masked product in output and in the gradients of x
and W; the weight-gradient kernel's sum over marked rows equal to a float64 product; the text
streams' layers take them in one-device float32 CPU programs only; a missing compiler falls back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jova_jax import config_lib
from jova_jax.kernels import dense_rows_cpu, weight_grad_cpu
from jova_jax.model import jova, layers
from tests.conftest import assert_falls_back_without_a_compiler, load
from tests.test_attention import make_mesh


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _prefix_mask(lengths, length):
  """A prompt's mask per example: its first `lengths[b]` tokens."""
  return jnp.asarray(np.arange(length)[None, :] < np.asarray(lengths)[:, None])


@pytest.mark.parametrize("in_shape, out_shape, lengths", [
    (32, (3, 2, 16), (5, 21, 0)),   # a QKV projection; a 5-row run, a full example, an empty one
    ((2, 16), 48, (13, 1, 20)),     # an output projection; 13 rows: the 4- and 1-row tail tiles
    (192, 768, (9, 32, 17)),        # the demo's fc1 on its 32 text tokens
    (192, 768, (300, 250, 0, 37)),  # several 64-row blocks of rows
])
def test_the_product_and_its_gradients_equal_xlas_on_the_marked_rows(in_shape, out_shape,
                                                                      lengths):
  in_shape, out_shape = np.atleast_1d(in_shape).tolist(), np.atleast_1d(out_shape).tolist()
  n_in, length = len(in_shape), max(*lengths, 21)
  valid = _prefix_mask(lengths, length)
  x, w = _normal(0, (len(lengths), length, *in_shape)), _normal(1, (*in_shape, *out_shape))
  target = _normal(2, (len(lengths), length, *out_shape))
  rows = valid.reshape(*valid.shape, *[1] * len(out_shape))

  def xla(x, w):
    return jnp.where(rows, jnp.tensordot(x, w, axes=n_in), 0.0)

  def ours(x, w):
    return dense_rows_cpu.product(x, w, valid, n_in)

  def value_and_grads(product):
    loss = lambda x, w: jnp.sum(jnp.sin(product(x, w)) * target)
    return jax.jit(product)(x, w), jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)

  (got, got_grads), (want, want_grads) = value_and_grads(ours), value_and_grads(xla)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert not np.asarray(got)[~np.asarray(valid)].any()  # unmarked rows are exactly 0
  for name, g, w_ in zip(("dx", "dW"), got_grads, want_grads):  # float32 sums in another order
    np.testing.assert_allclose(g, w_, rtol=1e-5, atol=4e-6 * float(jnp.max(jnp.abs(w_))),
                               err_msg=name)


def test_the_weight_gradient_sums_the_marked_rows_only():
  depth, rows, columns = 300, 40, 32  # past one 256-row chunk of the kernel
  x, dy = _normal(3, (depth, rows)), _normal(4, (depth, columns))
  valid = np.random.default_rng(5).random(depth) < 0.6
  exact = np.asarray(x, np.float64)[valid].T @ np.asarray(dy, np.float64)[valid]
  ours = jax.jit(lambda x, dy, v: weight_grad_cpu.weight_gradient(x, dy, 1, v))(
      x, dy, jnp.asarray(valid))
  np.testing.assert_allclose(ours, exact, rtol=1e-5, atol=1e-5 * np.sqrt(depth))


def test_a_mask_of_the_wrong_length_and_columns_not_in_whole_vectors_are_refused():
  with pytest.raises(ValueError, match=r"rows_valid must mark x's 4 rows, found shape \(3,\)"):
    jax.jit(lambda x, dy: weight_grad_cpu.weight_gradient(x, dy, 1, jnp.ones((3,), bool)))(
        jnp.ones((4, 3)), jnp.ones((4, 16)))
  with pytest.raises(Exception, match="b's columns must be a multiple of 16"):
    jax.jit(lambda x, w: dense_rows_cpu.product(x, w, jnp.ones((4,), bool), 1))(
        jnp.ones((4, 16)), jnp.ones((16, 10)))


def test_a_layer_with_a_row_mask_takes_the_kernels_where_they_apply():
  kernel = nnx.Param(_normal(6, (32, 48)), axes=("in", "out"))
  x, valid = _normal(7, (2, 8, 32)), _prefix_mask((3, 8), 8)

  def program(rows_valid):
    return jax.jit(lambda x: layers.contract(x, kernel, 1, jnp.float32, rows_valid)).lower(x).as_text()

  assert "jova_dense_rows" in program(valid)
  assert "jova_dense_rows" not in program(None)
  assert dense_rows_cpu.applies(jnp.float32, 32, 48)
  assert not dense_rows_cpu.applies(jnp.bfloat16, 32, 48)
  assert not dense_rows_cpu.applies(jnp.float32, 24, 48)  # dx's columns: no whole vector
  with jax.set_mesh(make_mesh((1, 2, 2, 2))):  # the fake devices keep XLA's dot
    assert not dense_rows_cpu.applies(jnp.float32, 32, 48)


def test_without_a_compiler_every_row_stays_xlas_and_says_why(tmp_path):
  code = ("import jax.numpy as jnp; from jova_jax.kernels import dense_rows_cpu as k; "
          "print('applies:', k.applies(jnp.float32, 32, 48))")
  assert_falls_back_without_a_compiler(
      code, tmp_path, "applies: False",
      "CPU dense-rows kernel unavailable, using XLA's dot over every row")


def test_the_model_skipping_its_text_padding_rows_equals_the_model_computing_them(monkeypatch):
  """What the blocks rely on: a text padding row is read by no valid row, so the video and audio
  outputs and every param's gradient are XLA's over every row (tiny config, prompts of 3 and 7 of
  its text tokens)."""
  c = load("tiny")
  s = config_lib.latent_shapes(c)
  model = jova.JoVA(config_lib.model_spec(c), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  video, audio = _normal(8, (2,) + s.video), _normal(9, (2,) + s.audio)
  text = _normal(10, (2, s.text_tokens, c.text.width))
  text_mask = _prefix_mask((3, 7), s.text_tokens)
  sigmas = jnp.array([0.3, 0.8]), jnp.array([0.5, 0.2])

  def outputs_and_grads():
    def loss(params):
      out_v, out_a = nnx.merge(graphdef, params)(video, audio, text, text_mask, *sigmas)
      return jnp.sum(jnp.sin(out_v)) + jnp.sum(jnp.cos(out_a)), (out_v, out_a)
    (_, outs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return outs, grads, jax.jit(jax.grad(lambda p: loss(p)[0])).lower(params).as_text()

  skipping, skipped_grads, program = outputs_and_grads()
  assert "jova_dense_rows" in program
  monkeypatch.setattr(dense_rows_cpu, "applies", lambda *args: False)
  every_row, grads, program = outputs_and_grads()
  assert "jova_dense_rows" not in program
  for got, want in zip(skipping, every_row):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(skipped_grads),
                               jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 + 1e-5 * float(jnp.max(jnp.abs(want))),
                               err_msg=jax.tree_util.keystr(path))
