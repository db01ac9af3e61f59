"""The sampler's ODE solvers for the flow of jova_jax/flow.py.

Every solver here is a plan of per-step weights over the current sample and the model's
data predictions m = x - s * v (flow.denoised), precomputed in float64 from the sigma
schedule alone. One step i (sigma_i -> sigma_{i+1}) runs, with m_i evaluated at x_i:
  corrector: x_i <- c0*x_{i-1} + c1*m_{i-1} + c2*m_{i-2} + c3*m_i + c4*x_i
  predictor: x_{i+1} = p0*x_i + p1*m_i + p2*m_{i-1}
so a jitted step takes the weights as traced numbers and compiles once for every solver.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jova_jax.flow import shift_sigma

SOLVERS = ("euler", "unipc")


def timesteps(steps: int, shift: float) -> np.ndarray:
  """(steps + 1,) float64 sigmas from 1 to 0, uniform then shifted (shift > 1: more steps at
  high noise, as in training)."""
  if steps < 1:
    raise ValueError(f"sample.steps={steps}: need at least 1 step")
  if shift <= 0:
    raise ValueError(f"sample.shift={shift}: must be > 0")
  sigmas = shift_sigma(np.linspace(1.0, 0.0, steps + 1), float(shift))
  sigmas[0], sigmas[-1] = 1.0, 0.0  # exact ends whatever the rounding of the shift
  return sigmas


def guided(cond, uncond, scale):
  """Classifier-free guidance: u + scale * (c - u); scale 1 is the conditional one. Applied to
  data predictions it equals guidance on velocities (m = x - s v is affine in v, same x)."""
  return uncond + scale * (cond - uncond)


@dataclasses.dataclass(frozen=True)
class SolverPlan:
  sigmas: np.ndarray     # (N + 1,) from 1 to 0
  predictor: np.ndarray  # (N, 3) weights on (x_i, m_i, m_{i-1})
  corrector: np.ndarray  # (N, 5) weights on (x_{i-1}, m_{i-1}, m_{i-2}, m_i, x_i)
  solver: str

  @property
  def steps(self) -> int:
    return len(self.sigmas) - 1


def _log_snr(s: float) -> float:
  """lambda = log(alpha / sigma) = log((1 - s) / s) for x_s = (1 - s) x0 + s eps."""
  with np.errstate(divide="ignore"):
    return float(np.log(1.0 - s) - np.log(s))


def _euler_plan(sigmas) -> tuple[np.ndarray, np.ndarray]:
  # x + (s' - s) v with v = (x - m) / s  ==  (s'/s) x + (1 - s'/s) m.
  ratio = sigmas[1:] / sigmas[:-1]
  predictor = np.stack([ratio, 1.0 - ratio, np.zeros_like(ratio)], axis=1)
  corrector = np.tile([0.0, 0.0, 0.0, 0.0, 1.0], (len(ratio), 1))
  return predictor, corrector


def _unipc_terms(s_from: float, s_to: float):
  """(a, b, alpha_t * B_h, h, hh) of the exponential-integrator step in data prediction:
  x_t = a x_s + b m_s is exact for a constant data prediction (B_h = expm1(-h): UniPC bh2)."""
  h = _log_snr(s_to) - _log_snr(s_from)
  hh = -h
  phi_1 = np.expm1(hh)
  alpha_t = 1.0 - s_to
  return s_to / s_from, -alpha_t * phi_1, alpha_t * phi_1, h, hh


def _unipc_b(hh: float, order: int) -> np.ndarray:
  """UniPC's right-hand side b_k = k! * phi_{k+1}(hh) / B(hh) for k < order (bh2)."""
  b, phi_k, factorial = [], np.expm1(hh) / hh - 1.0, 1.0
  for k in range(1, order + 1):
    b.append(phi_k * factorial / np.expm1(hh))
    factorial *= k + 1
    phi_k = phi_k / hh - 1.0 / factorial
  return np.array(b)


def _unipc_plan(sigmas) -> tuple[np.ndarray, np.ndarray]:
  """UniPC-bh2 (Zhao et al. 2023), 2nd order, in data prediction for the flow ODE.

  Edges, where log-SNR is infinite: a history point at sigma = 1 carries no slope (the
  limit of its finite-difference term is 0), so the steps next to the start are 1st order;
  the step to sigma = 0 is x = m_{N-1}, 1st order in log-SNR; since m(s) = x(0) + O(s^2)
  along an ODE path (m = x - s v with v smooth), its error is O(sigma_{N-1}^2).
  """
  n = len(sigmas) - 1
  predictor = np.zeros((n, 3))
  corrector = np.tile([0.0, 0.0, 0.0, 0.0, 1.0], (n, 1))
  orders = np.zeros(n, int)
  for i in range(n):
    s0, t = sigmas[i], sigmas[i + 1]
    if t == 0.0:
      predictor[i] = (0.0, 1.0, 0.0)
      orders[i] = 1
      continue
    a, b, alpha_bh, h, _ = _unipc_terms(s0, t)
    predictor[i] = (a, b, 0.0)
    orders[i] = 1
    if i >= 1 and sigmas[i - 1] < 1.0:
      rk = (_log_snr(sigmas[i - 1]) - _log_snr(s0)) / h
      # x -= alpha_t B_h * 0.5 * (m_{i-1} - m_i) / rk
      w = 0.5 * alpha_bh / rk
      predictor[i] += (0.0, w, -w)
      orders[i] = 2
  for i in range(1, n):
    # Corrects x_i, reached by predictor i-1 from sigma_{i-1}, with the new m_i.
    s0, t = sigmas[i - 1], sigmas[i]
    a, b, alpha_bh, h, hh = _unipc_terms(s0, t)
    weights = np.array([a, b, 0.0, 0.0, 0.0])
    if orders[i - 1] == 1:
      rhos = np.array([0.5])
      weights += (0.0, alpha_bh * rhos[0], 0.0, -alpha_bh * rhos[0], 0.0)
    else:
      rk = (_log_snr(sigmas[i - 2]) - _log_snr(s0)) / h
      rhos = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), _unipc_b(hh, 2))
      # x -= alpha_t B_h (rho_0 (m_{i-2} - m_{i-1}) / rk + rho_1 (m_i - m_{i-1}))
      w0, w1 = alpha_bh * rhos[0] / rk, alpha_bh * rhos[1]
      weights += (0.0, w0 + w1, -w0, -w1, 0.0)
    corrector[i] = weights
  return predictor, corrector


def solver_plan(solver: str, steps: int, shift: float) -> SolverPlan:
  sigmas = timesteps(steps, shift)
  if solver == "euler":
    predictor, corrector = _euler_plan(sigmas)
  elif solver == "unipc":
    predictor, corrector = _unipc_plan(sigmas)
  else:
    raise ValueError(f"sample.solver={solver!r}: expected one of {SOLVERS}")
  return SolverPlan(sigmas=sigmas, predictor=predictor, corrector=corrector, solver=solver)


def correct(w, x, x_prev, m, m_prev, m_prev2):
  """The corrector of one step; w: (5,) weights (identity for solvers without one)."""
  return w[0] * x_prev + w[1] * m_prev + w[2] * m_prev2 + w[3] * m + w[4] * x


def predict(w, x, m, m_prev):
  """The predictor of one step; w: (3,) weights."""
  return w[0] * x + w[1] * m + w[2] * m_prev


def integrate(velocity_fn, noise, plan: SolverPlan):
  """Runs a plan from sigma = 1 (x = noise) to 0; velocity_fn(x, sigma) -> v.

  A plain loop for tests and small problems; the sampler runs the same two updates inside
  its jitted step.
  """
  x = noise
  x_prev = m_prev = m_prev2 = jnp.zeros_like(noise)
  for i in range(plan.steps):
    sigma = plan.sigmas[i]
    m = x - sigma * velocity_fn(x, sigma)
    x = correct(jnp.asarray(plan.corrector[i], x.dtype), x, x_prev, m, m_prev, m_prev2)
    x_prev, m_prev2, m_prev = x, m_prev, m
    x = predict(jnp.asarray(plan.predictor[i], x.dtype), x, m, m_prev2)
  return x
