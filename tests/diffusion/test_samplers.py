"""Tests for diffusion/samplers.py: DDIM timesteps and coefficients as the paper's ddim.py, and the
sampling loop against a step-by-step diffusers DDIMScheduler loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from latent_diffusion.diffusion import samplers, schedules

T = 1000


@pytest.fixture(scope='module')
def schedule():
  return schedules.make_schedule(schedules.make_betas('linear', T, 0.0015, 0.0155))


def diffusers_ddim(num_steps):
  scheduler = DDIMScheduler(num_train_timesteps=T, beta_start=0.0015, beta_end=0.0155,
                            beta_schedule='scaled_linear', clip_sample=False, set_alpha_to_one=False,
                            steps_offset=1, timestep_spacing='leading', prediction_type='epsilon')
  scheduler.set_timesteps(num_steps)
  return scheduler


def paper_ddim_timesteps(method, num_ddim_timesteps, num_ddpm_timesteps):
  """Transcription of the paper's util.make_ddim_timesteps."""
  if method == 'uniform':
    c = num_ddpm_timesteps // num_ddim_timesteps
    steps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
  else:
    steps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * .8), num_ddim_timesteps)) ** 2).astype(int)
  return steps + 1


def linear_model(x, t):
  """A fixed 'denoiser' that depends on both inputs: eps = 0.3 x + 0.1 t / T."""
  t = jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
  return 0.3 * x + 0.1 * t / T


# Timesteps and coefficients.


@pytest.mark.parametrize('num_steps', [10, 50, 200, 30, 7])
@pytest.mark.parametrize('spacing', ['uniform', 'quad'])
def test_ddim_timesteps_follow_papers_make_ddim_timesteps(num_steps, spacing):
  ours = samplers.ddim_timesteps(T, num_steps, spacing)
  np.testing.assert_array_equal(ours, paper_ddim_timesteps(spacing, num_steps, T))


def test_uniform_timesteps_are_shifted_by_one():
  np.testing.assert_array_equal(samplers.ddim_timesteps(T, 4), [1, 251, 501, 751])


@pytest.mark.parametrize('num_steps', [10, 50, 250])
def test_uniform_timesteps_equal_diffusers_leading_with_offset_one(num_steps):
  """For num_steps dividing T, diffusers' 'leading' spacing with steps_offset=1 selects the same
  timesteps, in sampling (descending) order."""
  ours = samplers.ddim_timesteps(T, num_steps)
  np.testing.assert_array_equal(ours[::-1], diffusers_ddim(num_steps).timesteps.numpy())


def test_unknown_spacing_raises_value_error_naming_it():
  with pytest.raises(ValueError, match="'linear'"):
    samplers.ddim_timesteps(T, 10, 'linear')


@pytest.mark.parametrize('eta', [0.0, 0.5, 1.0])
def test_ddim_coefficients_match_papers_sampling_parameters(schedule, eta):
  timesteps = samplers.ddim_timesteps(T, 20)
  alphas, alphas_prev, sigmas = samplers.ddim_coefficients(schedule, timesteps, eta)
  alphacums = np.asarray(schedule.alphas_cumprod, np.float64)
  expected_alphas = alphacums[timesteps]
  expected_prev = np.asarray([alphacums[0]] + alphacums[timesteps[:-1]].tolist())
  expected_sigmas = eta * np.sqrt((1 - expected_prev) / (1 - expected_alphas)
                                  * (1 - expected_alphas / expected_prev))
  np.testing.assert_allclose(alphas, expected_alphas, rtol=1e-12)
  np.testing.assert_allclose(alphas_prev, expected_prev, rtol=1e-12)
  np.testing.assert_allclose(sigmas, expected_sigmas, rtol=1e-12, atol=0)


# The sampling loop.


@pytest.mark.parametrize('num_steps', [10, 50])
def test_ddim_sample_eta0_equals_diffusers_ddim_loop(schedule, num_steps):
  x_T = np.random.default_rng(num_steps).normal(size=(2, 4, 4, 3)).astype(np.float32)
  ours = samplers.ddim_sample(linear_model, jnp.asarray(x_T), jax.random.PRNGKey(0), schedule,
                              num_steps, eta=0.0)
  scheduler = diffusers_ddim(num_steps)
  x = torch.from_numpy(x_T)
  for t in scheduler.timesteps:
    eps = 0.3 * x + 0.1 * int(t) / T  # linear_model in torch
    x = scheduler.step(eps, int(t), x, eta=0.0).prev_sample
  assert ours.shape == x_T.shape and ours.dtype == jnp.float32
  np.testing.assert_allclose(ours, x.numpy(), atol=1e-4, rtol=1e-4)


def test_ddim_sample_with_zero_eps_scales_by_sqrt_alpha_ratio(schedule):
  """eps = 0 makes every step x <- sqrt(a_prev / a) x: the product telescopes."""
  x_T = jnp.ones((1, 2, 2, 1))
  out = samplers.ddim_sample(lambda x, t: jnp.zeros_like(x), x_T, jax.random.PRNGKey(0), schedule, 10)
  first = samplers.ddim_timesteps(T, 10)[-1]
  alphacums = np.asarray(schedule.alphas_cumprod, np.float64)
  np.testing.assert_allclose(out, np.sqrt(alphacums[0] / alphacums[first]), rtol=1e-5)


def test_ddim_sample_with_eta_is_deterministic_per_rng_and_differs_across_rngs(schedule):
  x_T = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32))
  sample = jax.jit(lambda key: samplers.ddim_sample(linear_model, x_T, key, schedule, 10, eta=1.0))
  first, again = sample(jax.random.PRNGKey(1)), sample(jax.random.PRNGKey(1))
  other = sample(jax.random.PRNGKey(2))
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)
  assert np.all(np.isfinite(first))


def test_ddim_sample_traces_the_model_once_for_all_steps(schedule):
  """The whole loop is one lax.scan: 50 steps trace the model once and compile once."""
  traces = []

  def model_fn(x, t):
    traces.append(t.shape)
    return linear_model(x, t)

  sample = jax.jit(lambda x, key: samplers.ddim_sample(model_fn, x, key, schedule, 50))
  x_T = jnp.zeros((2, 4, 4, 3))
  first = sample(x_T, jax.random.PRNGKey(0))
  sample(x_T + 1.0, jax.random.PRNGKey(1))
  assert traces == [(2,)]
  assert np.all(np.isfinite(first))
  assert 'scan' in str(jax.make_jaxpr(lambda x: samplers.ddim_sample(model_fn, x, jax.random.PRNGKey(0),
                                                                      schedule, 50))(x_T))
