"""Flow matching (docs/design.md, section 1): sigma in [0, 1], sigma = 1 is pure noise. This
module holds what training and sampling share: the path, the shift and the output
parametrization.

x_s = (1 - s) * x0 + s * eps and the velocity is v = eps - x0 = (x_s - x0) / s, so dx/ds = v
and integrating from s = 1 to 0 takes noise to data.

What the network outputs is `flow.prediction`:
- 'velocity': v directly.
- 'x0': the clean latent D. Where a token carries about as many values as the model is wide
  (the pixels codec), predicting the noise-free signal is learnable and predicting v (which
  contains the noise) is not (Li & He 2025, arXiv 2511.13720). The loss stays a velocity loss:
  both velocities are formed with the sigma clamped at `flow.x0_min_sigma`,
      v_hat = (x_s - D) / max(s, s_min),   v = (x_s - x0) / max(s, s_min),
  i.e. an x0 loss weighted by 1 / max(s, s_min)^2: equal to the v-loss wherever s >= s_min,
  bounded below it (without the clamp the weight diverges at s -> 0 and the loss spikes).
  With `flow.sigma_data` > 0 the clean latent is D = c_skip(s) x_s + c_out(s) F (Karras et al.
  2022's preconditioning, for data of that std): at low noise the input reaches D through the
  skip, so the network need not copy a token of as many values as it is wide through its
  width (it could not: a plain x0 model denoised sigma 0.1 worse than x_s / 0.9 does), and at
  high noise F is the clean signal, as in plain x0 prediction.
The sampler's solvers take the data prediction m (x0 estimate) of either output.

Training's sigmas, noise and loss pair are in training/noising.py, the sampler's solvers in
sampling/solvers.py.
"""
from __future__ import annotations

import jax.numpy as jnp


def shift_sigma(s, shift: float):
  """s' = shift*s / (1 + (shift-1)*s): shift > 1 spends more time at high noise."""
  return shift * s / (1.0 + (shift - 1.0) * s)


def per_example(values, x):
  """(B,) values (sigmas, flags) broadcast against x (B, ...)."""
  return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


PREDICTIONS = ("velocity", "x0")


def denoised(x_s, v, sigma):
  """x0 estimate from a velocity: x0 = x_s - s * v."""
  return x_s - per_example(sigma, x_s) * v


def prediction_of(flow_cfg) -> str:
  """flow.prediction (runs saved before the key existed predicted velocities)."""
  prediction = flow_cfg.get("prediction", "velocity")
  if prediction not in PREDICTIONS:
    raise ValueError(f"flow.prediction={prediction!r}: expected one of {PREDICTIONS}")
  return prediction


def skip_scalings(sigma, sigma_data: float):
  """(c_skip, c_out) of D = c_skip x_s + c_out F for x_s = (1 - s) x0 + s eps: the D of least
  error from x_s alone is c_skip x_s (x0 of std sigma_data), and c_out makes the target of F
  unit-variance."""
  alpha = 1.0 - sigma
  norm = alpha ** 2 * sigma_data ** 2 + sigma ** 2
  return alpha * sigma_data ** 2 / norm, sigma * sigma_data / jnp.sqrt(norm)


def data_prediction(output, x_s, sigma, flow_cfg):
  """The x0 estimate m the solvers integrate with, from the network's output at sigma (B,)."""
  if prediction_of(flow_cfg) == "velocity":
    return denoised(x_s, output, sigma)
  sigma_data = float(flow_cfg.get("sigma_data", 0.0))
  if sigma_data <= 0:
    return output
  c_skip, c_out = skip_scalings(per_example(sigma, x_s).astype(x_s.dtype), sigma_data)
  return c_skip * x_s + c_out * output
