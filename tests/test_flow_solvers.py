"""ODE solvers and guidance (jova_jax/sampling/solvers.py) on a Gaussian toy problem with an exact answer.

Data x0 ~ N(mu, s^2) per coordinate under x_t = (1-t) x0 + t eps: the marginal at t is
N((1-t) mu, (1-t)^2 s^2 + t^2), the exact velocity field is
  v(x, t) = -mu + (x - (1-t) mu) * (t - (1-t) s^2) / ((1-t)^2 s^2 + t^2),
and the ODE keeps the standardised coordinate z fixed, so it maps noise eps to mu + s*eps.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jova_jax.sampling import solvers
from jova_jax.training import noising
from tests.conftest import load

MU, STD = 0.7, 1.0
TOLERANCE = 0.05  # max abs error over 2000 coordinates, noise ~ N(0, 1)


def _velocity(x, t):
  var = (1 - t) ** 2 * STD ** 2 + t ** 2
  return -MU + (x - (1 - t) * MU) * (t - (1 - t) * STD ** 2) / var


@pytest.fixture(scope="module")
def noise():
  return jnp.asarray(np.random.default_rng(0).standard_normal(2000), jnp.float32)


def _error(noise, solver, steps, shift=1.0):
  x = solvers.integrate(_velocity, noise, solvers.solver_plan(solver, steps, shift))
  return float(jnp.max(jnp.abs(x - (MU + STD * noise))))


def test_both_solvers_reach_the_exact_end_point_unipc_with_fewer_steps(noise):
  assert _error(noise, "euler", 128) < TOLERANCE
  assert _error(noise, "unipc", 16) < TOLERANCE
  assert _error(noise, "euler", 16) > TOLERANCE  # Euler needs many more steps than UniPC
  assert _error(noise, "unipc", 64) < 2e-3


def test_convergence_orders(noise):
  # Euler is 1st order: doubling the steps halves the error; UniPC at least 2nd order.
  euler = _error(noise, "euler", 32) / _error(noise, "euler", 64)
  unipc = _error(noise, "unipc", 32) / _error(noise, "unipc", 64)
  assert 1.8 < euler < 2.2
  assert unipc > 3.5


def test_shifted_schedule(noise):
  assert _error(noise, "unipc", 64, shift=3.0) < 0.02
  assert _error(noise, "euler", 64, shift=3.0) > 0.05


def test_timesteps():
  sigmas = solvers.timesteps(4, 3.0)
  s = np.linspace(1, 0, 5)
  np.testing.assert_allclose(sigmas, 3 * s / (1 + 2 * s))
  assert sigmas[0] == 1.0 and sigmas[-1] == 0.0
  with pytest.raises(ValueError, match="steps"):
    solvers.timesteps(0, 1.0)


@pytest.mark.parametrize("solver", solvers.SOLVERS)
def test_plans_are_consistent(solver):
  # A constant field (every data prediction equal to the sample) must stay put: the weights
  # of each update sum to 1.
  plan = solvers.solver_plan(solver, 7, 2.0)
  np.testing.assert_allclose(plan.predictor.sum(axis=1), 1.0, atol=1e-12)
  np.testing.assert_allclose(plan.corrector.sum(axis=1), 1.0, atol=1e-12)
  assert np.all(np.isfinite(plan.predictor)) and np.all(np.isfinite(plan.corrector))


def test_euler_step_is_the_velocity_step():
  plan = solvers.solver_plan("euler", 3, 1.0)
  x, v = 0.8, -0.3
  s, s_next = plan.sigmas[1], plan.sigmas[2]
  m = x - s * v
  np.testing.assert_allclose(float(solvers.predict(plan.predictor[1], x, m, 0.0)),
                             x + (s_next - s) * v, rtol=1e-12)


def test_unknown_solver():
  with pytest.raises(ValueError, match="sample.solver='heun'"):
    solvers.solver_plan("heun", 4, 1.0)


def test_guidance():
  cond, uncond = jnp.array([1.0, -2.0]), jnp.array([0.5, 1.0])
  np.testing.assert_array_equal(solvers.guided(cond, uncond, 1.0), cond)
  np.testing.assert_array_equal(solvers.guided(cond, uncond, 0.0), uncond)
  np.testing.assert_allclose(solvers.guided(cond, uncond, 3.0), [2.0, -8.0])


def _seen_in_training(flow_cfg, sampler_sigmas, window=0.025) -> np.ndarray:
  """Share of training sigmas within +-window of each sampler sigma."""
  s = np.asarray(noising.sample_sigma(jax.random.key(0), (200000,), flow_cfg))
  return np.array([np.mean(np.abs(s - x) < window) for x in sampler_sigmas])


@pytest.mark.parametrize("name", ["demo", "jova_24b"])
def test_sampler_walks_the_sigmas_the_model_trained_on(name):
  """Unset, sample.shift is the training flow.shift, so the sampler's first, noisiest steps
  land where training put weight; a sampler shifted away from training does not."""
  from jova_jax.sampling import sampler as sampler_lib
  config = load(name)
  settings = sampler_lib.Settings.from_config(config)
  assert settings.shift == config.flow.shift
  first_steps = solvers.timesteps(settings.steps, settings.shift)[1:4]
  assert _seen_in_training(config.flow, first_steps).min() > 0.01
  config.flow.shift = 1.0  # trained without the shift the sampler uses
  assert _seen_in_training(config.flow, first_steps).min() < 0.005
  config.sample.shift = 2.0  # an explicit sampler shift still wins
  assert sampler_lib.Settings.from_config(config).shift == 2.0
