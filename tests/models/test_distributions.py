"""Tests for models/distributions.py: the diagonal Gaussian posterior against numpy closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.models.distributions import DiagonalGaussian


def moments(mean, logvar):
  return jnp.asarray(np.concatenate([mean, logvar], axis=-1), jnp.float32)


def random_moments(seed, shape=(3, 4, 5, 2)):
  rng = np.random.default_rng(seed)
  return rng.normal(size=shape), rng.uniform(-3, 2, size=shape)


def test_moments_split_on_the_channel_axis_into_mean_and_logvar():
  mean, logvar = random_moments(0)
  posterior = DiagonalGaussian(moments(mean, logvar))
  np.testing.assert_allclose(posterior.mean, mean, rtol=1e-6)
  np.testing.assert_allclose(posterior.logvar, logvar, rtol=1e-6)
  np.testing.assert_allclose(posterior.std, np.exp(0.5 * logvar), rtol=1e-5)
  np.testing.assert_allclose(posterior.var, np.exp(logvar), rtol=1e-5)
  np.testing.assert_array_equal(posterior.mode(), posterior.mean)


def test_kl_to_standard_normal_matches_closed_form_per_example():
  mean, logvar = random_moments(1)
  kl = DiagonalGaussian(moments(mean, logvar)).kl()
  # KL(N(m, s^2) || N(0, 1)) = 0.5 (m^2 + s^2 - 1 - log s^2), summed over all latent elements.
  expected = 0.5 * np.sum(mean ** 2 + np.exp(logvar) - 1 - logvar, axis=(1, 2, 3))
  assert kl.shape == (3,)
  np.testing.assert_allclose(kl, expected, rtol=1e-5)


def test_kl_is_zero_for_a_standard_normal_posterior():
  posterior = DiagonalGaussian(jnp.zeros((2, 3, 3, 8)))
  np.testing.assert_allclose(posterior.kl(), np.zeros(2), atol=1e-7)


def test_nll_matches_gaussian_log_density():
  mean, logvar = random_moments(2)
  sample = np.random.default_rng(3).normal(size=mean.shape)
  nll = DiagonalGaussian(moments(mean, logvar)).nll(jnp.asarray(sample, jnp.float32))
  var = np.exp(logvar)
  log_density = -0.5 * (np.log(2 * math.pi * var) + (sample - mean) ** 2 / var)
  np.testing.assert_allclose(nll, -log_density.sum(axis=(1, 2, 3)), rtol=1e-5)


def test_samples_have_the_posterior_mean_and_std():
  mean = np.array([-2.0, 0.5, 3.0])
  logvar = np.log(np.array([0.25, 1.0, 4.0]))
  shape = (20000, 1, 1, 3)
  posterior = DiagonalGaussian(moments(np.broadcast_to(mean, shape), np.broadcast_to(logvar, shape)))
  samples = np.asarray(posterior.sample(jax.random.PRNGKey(0)))[:, 0, 0]
  assert samples.shape == (20000, 3)
  # Standard errors: std/sqrt(n) <= 0.015 for the mean, std/sqrt(2n) <= 0.01 for the std.
  np.testing.assert_allclose(samples.mean(axis=0), mean, atol=0.06)
  np.testing.assert_allclose(samples.std(axis=0), np.exp(0.5 * logvar), rtol=0.03)


def test_samples_are_deterministic_per_key_and_differ_across_keys():
  posterior = DiagonalGaussian(jnp.zeros((1, 4, 4, 8)))
  first = posterior.sample(jax.random.PRNGKey(1))
  np.testing.assert_array_equal(first, posterior.sample(jax.random.PRNGKey(1)))
  assert not np.allclose(first, posterior.sample(jax.random.PRNGKey(2)))


def test_logvar_is_clipped_to_the_papers_range():
  mean = np.zeros((1, 1, 1, 3))
  logvar = np.array([-100.0, 0.0, 100.0]).reshape(1, 1, 1, 3)
  posterior = DiagonalGaussian(moments(mean, logvar))
  np.testing.assert_array_equal(np.asarray(posterior.logvar).ravel(), [-30.0, 0.0, 20.0])
  np.testing.assert_allclose(np.asarray(posterior.std).ravel(), np.exp([-15.0, 0.0, 10.0]), rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(posterior.kl())))


def test_bfloat16_moments_give_float32_statistics():
  posterior = DiagonalGaussian(jnp.ones((1, 2, 2, 4), jnp.bfloat16))
  assert posterior.mean.dtype == jnp.float32 and posterior.kl().dtype == jnp.float32
