"""Weighted flow-matching loss, training sigma densities, and the mouth mask on patch tokens."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jova_jax import flow

from jova_jax.codecs import pixel_mask_to_latent
from jova_jax.model import embeddings as emb
from jova_jax.training import losses, noising
from tests.conftest import load


def test_loss_equals_hand_computed_value():
  # B=1, video (T,H,W,C) = (1,1,2,1): errors 1 and 2, mouth on the second element.
  pv = jnp.array([[[[[1.0], [2.0]]]]])
  tv = jnp.zeros_like(pv)
  mouth = jnp.array([[[[0.0, 1.0]]]])
  pa = jnp.array([[[3.0], [1.0]]])  # audio (La, Ca) = (2, 1): errors 9, 1
  ta = jnp.zeros_like(pa)
  loss, m = losses.flow_matching_loss(pv, tv, pa, ta, mouth, lambda_mouth=2.0, lambda_audio=0.5)
  # video: (1*1 + (1+2)*4) / 2 = 6.5; audio: (9 + 1) / 2 = 5; total 6.5 + 0.5*5 = 9
  assert float(m["loss_video"]) == pytest.approx(6.5)
  assert float(m["loss_audio"]) == pytest.approx(5.0)
  assert float(loss) == pytest.approx(9.0)
  assert float(m["loss_mouth"]) == pytest.approx(4.0)
  assert float(m["loss_video_mse"]) == pytest.approx(2.5)


def test_clean_modality_and_invalid_audio_are_left_out():
  pv = jnp.ones((2, 1, 1, 1, 1))
  pv = pv.at[1].set(3.0)
  pa = jnp.ones((2, 2, 1)).at[0, 1].set(5.0)
  zeros_v, zeros_a = jnp.zeros_like(pv), jnp.zeros_like(pa)
  mouth = jnp.zeros((2, 1, 1, 1))
  _, m = losses.flow_matching_loss(pv, zeros_v, pa, zeros_a, mouth, lambda_mouth=1.0, lambda_audio=1.0,
                                   video_on=jnp.array([True, False]), audio_on=jnp.array([True, True]),
                                   audio_valid=jnp.array([[True, False], [True, True]]))
  assert float(m["loss_video"]) == pytest.approx(1.0)      # example 1 (error 9) is clean video
  assert float(m["loss_audio"]) == pytest.approx(1.0)      # the error-25 frame is padding


def test_lambda_mouth_zero_is_plain_mse():
  k = jax.random.split(jax.random.key(0), 5)
  pv, tv = jax.random.normal(k[0], (2, 3, 4, 4, 5)), jax.random.normal(k[1], (2, 3, 4, 4, 5))
  pa, ta = jax.random.normal(k[2], (2, 7, 3)), jax.random.normal(k[3], (2, 7, 3))
  mouth = (jax.random.uniform(k[4], (2, 3, 4, 4)) < 0.3).astype(jnp.float32)
  loss, m = losses.flow_matching_loss(pv, tv, pa, ta, mouth, lambda_mouth=0.0, lambda_audio=1.0)
  np.testing.assert_allclose(m["loss_video"], np.mean((np.asarray(pv) - np.asarray(tv)) ** 2), rtol=1e-6)
  np.testing.assert_allclose(loss, np.mean((np.asarray(pv) - np.asarray(tv)) ** 2) +
                             np.mean((np.asarray(pa) - np.asarray(ta)) ** 2), rtol=1e-6)


def test_mouth_mask_reaches_the_right_patch_tokens():
  """A pixel mouth box in frames 1-4 (T=5, 4x temporal compression, first frame alone) lands on
  latent frame 1 only; with a (1,2,2) patch its latent cell (1, 2, 1) is token 1*4 + 1*2 + 0."""
  pixels = np.zeros((5, 32, 32), np.uint8)
  pixels[1:5, 17:20, 9:12] = 1  # 8x8 spatial cells: rows 2, cols 1
  latent = pixel_mask_to_latent(pixels, 4, 8)
  assert latent.shape == (2, 4, 4)
  expected = np.zeros((2, 4, 4), np.uint8)
  expected[1, 2, 1] = 1
  np.testing.assert_array_equal(latent, expected)

  grid, patch, channels = (2, 4, 4), (1, 2, 2), 3
  n_tokens = 2 * 2 * 2
  target = jnp.zeros((1,) + grid + (channels,))
  pa = jnp.zeros((1, 1, 1))

  def mouth_loss(tokens):
    pred = emb.unpatchify_video(tokens, patch, grid)
    return losses.flow_matching_loss(pred, target, pa, pa, jnp.asarray(latent)[None].astype(jnp.float32),
                                     lambda_mouth=1.0, lambda_audio=0.0)[1]["loss_mouth"]

  tokens = jnp.ones((1, n_tokens, 4 * channels))
  grads = np.asarray(jax.grad(mouth_loss)(tokens))[0]
  touched = np.flatnonzero(np.abs(grads).sum(-1))
  np.testing.assert_array_equal(touched, [1 * 4 + 1 * 2 + 0])
  # Inside that token, only the (h=0, w=1) sub-position of the 2x2 patch: channels 3..5.
  np.testing.assert_array_equal(np.flatnonzero(grads[touched[0]]), [3, 4, 5])


def test_patchify_round_trip_and_raster_order():
  x = jnp.arange(2 * 3 * 4 * 6 * 2, dtype=jnp.float32).reshape(2, 3, 4, 6, 2)
  tokens = emb.patchify_video(x, (1, 2, 2))
  assert tokens.shape == (2, 3 * 2 * 3, 8)
  np.testing.assert_array_equal(emb.unpatchify_video(tokens, (1, 2, 2), (3, 4, 6)), x)
  # token (t=1, h=1, w=2) holds x[:, 1, 2:4, 4:6]
  np.testing.assert_array_equal(tokens[0, 1 * 6 + 1 * 3 + 2].reshape(2, 2, 2), x[0, 1, 2:4, 4:6])


@pytest.mark.parametrize("density", ["logit_normal", "uniform", "mode"])
def test_sigma_densities(density):
  c = load("tiny").flow
  c.density = density
  s = np.asarray(noising.sample_sigma(jax.random.key(0), (20000,), c))
  assert s.min() >= 0 and s.max() <= 1
  if density == "uniform":
    assert abs(s.mean() - 0.5) < 0.01 and abs(s.var() - 1 / 12) < 0.005
  if density == "logit_normal":  # symmetric around 0.5, concentrated in the middle
    assert abs(np.median(s) - 0.5) < 0.01 and np.mean(np.abs(s - 0.5) < 0.25) > 0.6


def test_shift_and_noising():
  s = jnp.array([0.0, 0.25, 0.5, 1.0])
  np.testing.assert_allclose(flow.shift_sigma(s, 3.0), [0.0, 0.5, 0.75, 1.0], rtol=1e-6)
  x0, eps = jnp.array([[2.0]]), jnp.array([[-1.0]])
  xs = noising.add_noise(x0, eps, jnp.array([0.25]))
  np.testing.assert_allclose(xs, [[0.75 * 2 - 0.25]])
  v = noising.velocity_target(x0, eps)
  np.testing.assert_allclose(flow.denoised(xs, v, jnp.array([0.25])), x0, rtol=1e-6)


def test_clean_modalities_are_exclusive_and_at_the_configured_rate():
  c = load("tiny").flow
  c.update(p_clean_audio=0.2, p_clean_video=0.3)
  sv, sa = noising.sample_modality_sigmas(jax.random.key(1), 20000, c)
  sv, sa = np.asarray(sv), np.asarray(sa)
  assert not np.any((sv == 0) & (sa == 0))
  assert abs(np.mean(sa == 0) - 0.2) < 0.015 and abs(np.mean(sv == 0) - 0.3) < 0.015
  both = (sv > 0) & (sa > 0)
  np.testing.assert_array_equal(sv[both], sa[both])  # one shared sigma otherwise


def _flow_cfg(prediction, min_sigma=0.05):
  c = load("tiny").flow
  c.update(prediction=prediction, x0_min_sigma=min_sigma)
  return c


def test_x0_prediction_loss_is_the_velocity_loss_with_a_clamped_sigma():
  rng = np.random.default_rng(0)
  x0, eps, out = (jnp.asarray(rng.normal(size=(4, 3, 2)), jnp.float32) for _ in range(3))
  sigma = jnp.array([0.01, 0.05, 0.4, 1.0])
  xs = noising.add_noise(x0, eps, sigma)
  pred, target = noising.loss_pair(out, xs, x0, eps, sigma, _flow_cfg("x0"))
  # Where sigma >= the clamp both are the true velocities (x - D) / s and eps - x0 ...
  np.testing.assert_allclose(target[1:], (eps - x0)[1:], atol=1e-5)
  np.testing.assert_allclose(pred[1:], ((xs - out) / sigma[:, None, None])[1:], rtol=1e-5)
  # ... and the error is the x0 error over max(sigma, clamp): bounded at small sigma.
  weight = 1.0 / np.maximum(np.asarray(sigma), 0.05)[:, None, None]
  np.testing.assert_allclose(pred - target, (x0 - out) * weight, rtol=1e-4, atol=1e-5)
  # The velocity convention passes the output through against eps - x0.
  pred_v, target_v = noising.loss_pair(out, xs, x0, eps, sigma, _flow_cfg("velocity"))
  np.testing.assert_array_equal(pred_v, out)
  np.testing.assert_allclose(target_v, eps - x0)


def test_data_prediction_inverts_each_convention():
  rng = np.random.default_rng(1)
  x0, eps = (jnp.asarray(rng.normal(size=(2, 5)), jnp.float32) for _ in range(2))
  sigma = jnp.array([0.3, 0.9])
  xs = noising.add_noise(x0, eps, sigma)
  # A perfect model of either kind gives back x0 to the solvers.
  np.testing.assert_allclose(flow.data_prediction(eps - x0, xs, sigma, _flow_cfg("velocity")),
                             x0, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(flow.data_prediction(x0, xs, sigma, _flow_cfg("x0")), x0)


def test_prediction_key_is_checked_and_old_runs_predict_velocity():
  with pytest.raises(ValueError, match="flow.prediction='eps'"):
    flow.prediction_of(_flow_cfg("eps"))
  old = load("tiny").flow
  del old["prediction"]
  assert flow.prediction_of(old) == "velocity"


def test_skip_scalings_give_the_best_linear_guess_and_a_unit_variance_target():
  """For x0 of std sigma_data: c_skip x_s is the least-squares x0 from x_s alone, and the
  network's target (x0 - c_skip x_s) / c_out has unit variance at every sigma."""
  rng = np.random.default_rng(2)
  x0 = 0.5 * rng.normal(size=200000)
  eps = rng.normal(size=200000)
  for s in (0.05, 0.3, 0.7, 0.99):
    xs = (1 - s) * x0 + s * eps
    c_skip, c_out = (float(c) for c in flow.skip_scalings(jnp.float32(s), 0.5))
    best = np.dot(xs, x0) / np.dot(xs, xs)
    assert abs(c_skip - best) < 0.01, (s, c_skip, best)
    assert abs(np.std((x0 - c_skip * xs) / c_out) - 1.0) < 0.01
  # At the ends: clean input passes through; pure noise leaves D = sigma_data * F.
  np.testing.assert_allclose(flow.skip_scalings(jnp.float32(0.0), 0.5), (1.0, 0.0), atol=1e-6)
  np.testing.assert_allclose(flow.skip_scalings(jnp.float32(1.0), 0.5), (0.0, 0.5), atol=1e-6)


def test_x0_with_skip_inverts_and_feeds_the_same_loss():
  cfg = _flow_cfg("x0")
  cfg.sigma_data = 0.5
  rng = np.random.default_rng(3)
  x0, eps, out = (jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for _ in range(3))
  sigma = jnp.array([0.2, 0.5, 0.9])
  xs = noising.add_noise(x0, eps, sigma)
  c_skip, c_out = flow.skip_scalings(sigma[:, None], 0.5)
  d = flow.data_prediction(out, xs, sigma, cfg)
  np.testing.assert_allclose(d, c_skip * xs + c_out * out, rtol=1e-6)
  # The loss sees the D the sampler will integrate with.
  pred, target = noising.loss_pair(out, xs, x0, eps, sigma, cfg)
  np.testing.assert_allclose(pred - target, (x0 - d) / sigma[:, None], rtol=1e-4, atol=1e-5)
