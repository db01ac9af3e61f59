"""The fused CPU update (kernels/adamw_ema_cpu): equal to XLA's update (the optax reference is
in test_optim.py), used by one-device CPU train steps only, and a missing compiler falls back."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jova_jax.kernels import adamw_ema_cpu
from jova_jax.parallel import mesh as mesh_lib
from jova_jax.training import optim, state as train_state, steps as train_steps
from tests.conftest import assert_falls_back_without_a_compiler, load


def _tree(key, sizes):
  """Leaves of odd sizes: a vector tail after the 16 lanes, several 32k-element chunks."""
  keys = jax.random.split(key, len(sizes))
  return {f"layer{i}": {"kernel" if n > 100 else "bias": jax.random.normal(k, (n,))}
          for i, (k, n) in enumerate(zip(keys, sizes))}


def test_the_kernels_global_norm_equals_a_float64_sum_and_optax():
  grads = _tree(jax.random.key(0), [1, 17, 1000, 100_003])
  norm = jax.jit(adamw_ema_cpu.global_norm)(grads)
  exact = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(norm, exact, rtol=1e-7)  # summed in double
  np.testing.assert_allclose(norm, optax.tree.norm(grads), rtol=1e-5)  # XLA's float32 sum


@pytest.mark.parametrize("mu_dtype", ["params", "bfloat16"])
def test_the_kernel_steps_as_xla_does_over_clipped_unclipped_and_skipped_steps(mu_dtype):
  """With a bfloat16 mu both round float32 values an ulp apart at most to nearest even: equal to
  the bit but where the two straddle a rounding boundary (truncating would differ in half)."""
  c = load("tiny")
  c.train.update(lr=1e-2, warmup_steps=2, clip_norm=1.0, weight_decay=0.1, mu_dtype=mu_dtype)
  params = _tree(jax.random.key(1), [7, 300, 70_001])
  tx = optim.make_optimizer(c)

  def step(fused_cpu):
    return jax.jit(lambda p, s, e, g, ok: optim.adamw_ema_update(
        c, s, p, e, g, optax.tree.norm(g), ok, jnp.float32(0.9), fused_cpu))

  xla, kernel = step(False), step(True)
  ref = ours = (params, tx.init(params), jax.tree.map(lambda x: 0.5 * x, params))
  for i in range(5):  # under, over the clip norm; step 3 non-finite (skipped)
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(jax.random.key(2), i),
                                                     x.shape) * (3.0 if i % 2 else 1e-3), params)
    if i == 3:
      grads["layer0"]["bias"] = grads["layer0"]["bias"].at[0].set(jnp.nan)
    ok = jnp.bool_(i != 3)
    ref, ours = xla(*ref, grads, ok), kernel(*ours, grads, ok)
    close = []
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):  # atol: an ulp of O(1) params
      assert a.dtype == b.dtype
      a, b = np.float32(a), np.float32(b)
      if mu_dtype == "params":
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
      else:  # a mu an ulp (2^-8..2^-7) apart moves its param by up to lr x that the next step
        np.testing.assert_allclose(a, b, rtol=2.0 ** -7, atol=1e-4)
        close.append(np.isclose(a, b, rtol=1e-6, atol=1e-7).ravel())
    if close:
      assert np.mean(np.concatenate(close)) > 0.999
  assert int(optim.adam_state(ours[1]).count) == 4


@pytest.mark.parametrize("mu_dtype", ["params", "bfloat16"])
def test_a_one_device_cpu_train_step_uses_the_kernel_and_equals_xlas(mu_dtype):
  config = load("tiny")
  config.train.mu_dtype = mu_dtype
  program = train_state.build_program(config, mesh_lib.make_mesh(config, jax.devices()[:1]))
  state = train_state.init_state(program)
  grads = jax.tree.map(lambda p: 1e-2 * jnp.cos(p), state["params"])
  updates = {fused: jax.jit(train_steps.make_update(program, fused)) for fused in (None, False)}
  assert "jova_adamw_ema" in updates[None].lower(state, grads, jnp.float32(1)).as_text()
  assert "jova_adamw_ema" not in updates[False].lower(state, grads, jnp.float32(1)).as_text()
  with jax.set_mesh(program.mesh):
    (ours, m_ours), (ref, m_ref) = (updates[f](state, grads, jnp.float32(1)) for f in (None, False))
  np.testing.assert_allclose(m_ours["grad_norm"], m_ref["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    assert a.dtype == b.dtype  # a bfloat16 mu: an ulp apart where the two straddle a rounding
    rtol = 2.0 ** -7 if a.dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=rtol, atol=1e-7)


def test_a_sharded_or_non_float32_state_keeps_xlas_update():
  config = load("tiny")
  program = train_state.build_program(config, mesh_lib.make_mesh(config))  # 8 fake devices
  state = program.abstract_state
  assert not adamw_ema_cpu.applies(program.mesh, state["params"])
  one = mesh_lib.make_mesh(config, jax.devices()[:1])
  assert adamw_ema_cpu.applies(one, state["params"])
  as_dtype = lambda tree, dtype: jax.tree.map(  # noqa: E731
      lambda x: jax.ShapeDtypeStruct(x.shape, dtype), tree)
  assert not adamw_ema_cpu.applies(one, as_dtype(state["params"], jnp.bfloat16))
  # A first moment may be bfloat16 (train.mu_dtype), all of it, or float32; nothing else.
  assert adamw_ema_cpu.applies(one, state["params"], mu=as_dtype(state["params"], jnp.bfloat16))
  assert not adamw_ema_cpu.applies(one, state["params"], mu=as_dtype(state["params"], jnp.float16))
  mixed = as_dtype(state["params"], jnp.bfloat16)
  mixed["null_text"] = as_dtype(mixed["null_text"], jnp.float32)
  assert not adamw_ema_cpu.applies(one, state["params"], mu=mixed)


def test_without_a_compiler_the_update_stays_xlas_and_says_why(tmp_path):
  code = ("import jax; from jova_jax.kernels import adamw_ema_cpu as k; "
          "print('available', k.available())")
  assert_falls_back_without_a_compiler(code, tmp_path, "available False",
                                       "fused CPU update unavailable, using XLA's update")
