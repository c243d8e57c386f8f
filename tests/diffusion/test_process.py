"""Tests for diffusion/process.py against diffusers' DDPMScheduler and numpy formulas."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from latent_diffusion.diffusion import process, schedules

T = 1000


@pytest.fixture(scope='module')
def schedule():
  return schedules.make_schedule(schedules.make_betas('linear', T, 0.0015, 0.0155))


@pytest.fixture(scope='module')
def reference():
  return DDPMScheduler(num_train_timesteps=T, beta_start=0.0015, beta_end=0.0155,
                       beta_schedule='scaled_linear', prediction_type='sample', clip_sample=False,
                       variance_type='fixed_small')


def arrays(seed, shape=(4, 3, 3, 2)):
  rng = np.random.default_rng(seed)
  return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


def test_extract_broadcasts_per_example_coefficients():
  coefficients = jnp.arange(10.0)
  out = process.extract(coefficients, jnp.array([2, 7]), ndim=4)
  assert out.shape == (2, 1, 1, 1)
  np.testing.assert_array_equal(out.ravel(), [2.0, 7.0])


def test_q_sample_equals_diffusers_add_noise(schedule, reference):
  x0, noise = arrays(0)
  t = np.array([0, 10, 500, 999])
  ours = process.q_sample(schedule, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
  expected = reference.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
  np.testing.assert_allclose(ours, expected.numpy(), atol=1e-5)


def test_predict_x0_from_eps_inverts_q_sample(schedule):
  x0, noise = arrays(1)
  t = jnp.array([1, 250, 750, 999])
  x_t = process.q_sample(schedule, jnp.asarray(x0), t, jnp.asarray(noise))
  recovered = process.predict_x0_from_eps(schedule, x_t, t, jnp.asarray(noise))
  # 1/sqrt(alpha_bar) reaches ~150 at t = 999, so float32 rounding grows accordingly.
  np.testing.assert_allclose(recovered, x0, atol=2e-3)
  np.testing.assert_allclose(recovered[:2], x0[:2], atol=1e-5)


def test_predict_eps_from_x0_inverts_q_sample(schedule):
  x0, noise = arrays(2)
  t = jnp.array([1, 250, 750, 999])
  x_t = process.q_sample(schedule, jnp.asarray(x0), t, jnp.asarray(noise))
  np.testing.assert_allclose(process.predict_eps_from_x0(schedule, x_t, t, jnp.asarray(x0)), noise,
                             atol=2e-3)


def test_q_posterior_matches_numpy_formula(schedule):
  x0, x_t = arrays(3)
  t = np.array([0, 1, 300, 999])
  mean, variance, log_variance = process.q_posterior(schedule, jnp.asarray(x0), jnp.asarray(x_t),
                                                     jnp.asarray(t))
  betas = schedules.make_betas('linear', T, 0.0015, 0.0155)
  a = np.cumprod(1 - betas)
  a_prev = np.concatenate([[1.0], a[:-1]])
  coef1 = (betas * np.sqrt(a_prev) / (1 - a))[t][:, None, None, None]
  coef2 = ((1 - a_prev) * np.sqrt(1 - betas) / (1 - a))[t][:, None, None, None]
  expected_var = (betas * (1 - a_prev) / (1 - a))[t][:, None, None, None]
  np.testing.assert_allclose(mean, coef1 * x0 + coef2 * x_t, rtol=1e-5, atol=1e-6)
  assert variance.shape == (4, 1, 1, 1) and log_variance.shape == (4, 1, 1, 1)
  np.testing.assert_allclose(variance, expected_var, rtol=1e-5)
  np.testing.assert_allclose(log_variance[1:], np.log(expected_var[1:]), rtol=1e-5)


@pytest.mark.parametrize('t', [1, 37, 500, 999])
def test_q_posterior_sample_equals_diffusers_ddpm_step_given_x0(schedule, reference, t):
  """DDPMScheduler.step with prediction_type='sample' draws x_{t-1} ~ q(x_{t-1} | x_t, x0) with
  'fixed_small' (posterior) variance; with its noise replayed, ours must land on the same point."""
  x0, x_t = arrays(10 + t, shape=(2, 4, 3, 3))  # NCHW for diffusers, layout-free math
  seed = 1234 + t
  step = reference.step(torch.from_numpy(x0), t, torch.from_numpy(x_t),
                        generator=torch.Generator().manual_seed(seed))
  noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).numpy()
  mean, variance, _ = process.q_posterior(schedule, jnp.asarray(x0), jnp.asarray(x_t),
                                          jnp.full((2,), t))
  ours = np.asarray(mean) + np.sqrt(np.asarray(variance)) * noise
  np.testing.assert_allclose(ours, step.prev_sample.numpy(), atol=1e-5)


def test_simple_loss_l1_and_l2_average_over_all_but_the_batch_axis():
  prediction = np.array([[[1.0, -2.0]], [[0.5, 0.5]]], np.float32)   # (2, 1, 2)
  target = np.array([[[0.0, 0.0]], [[0.5, 1.5]]], np.float32)
  l1 = process.simple_loss(jnp.asarray(prediction), jnp.asarray(target), 'l1')
  l2 = process.simple_loss(jnp.asarray(prediction), jnp.asarray(target), 'l2')
  np.testing.assert_allclose(l1, [1.5, 0.5])
  np.testing.assert_allclose(l2, [2.5, 0.5])


def test_simple_loss_is_float32_for_bfloat16_inputs():
  loss = process.simple_loss(jnp.ones((2, 3), jnp.bfloat16), jnp.zeros((2, 3), jnp.bfloat16), 'l2')
  assert loss.dtype == jnp.float32 and loss.shape == (2,)


def test_unknown_loss_type_raises_value_error_naming_it():
  with pytest.raises(ValueError, match="'huber'"):
    process.simple_loss(jnp.ones(2), jnp.ones(2), 'huber')
