"""The forward process, conversions between predictions, and the simple training loss."""

import jax
import jax.numpy as jnp

from latent_diffusion.diffusion.schedules import Schedule


def extract(coefficients: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
  """coefficients[t] shaped to broadcast against a (B, ...) array of rank ndim."""
  return coefficients[t].reshape(t.shape + (1,) * (ndim - 1))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def predict_x0_from_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
          - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps)


def predict_eps_from_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
  return ((extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - x0)
          / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim))


def q_posterior(schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array):
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
  mean = (extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x0
          + extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t)
  return (mean, extract(schedule.posterior_variance, t, x_t.ndim),
          extract(schedule.posterior_log_variance_clipped, t, x_t.ndim))


def elementwise_loss(prediction: jax.Array, target: jax.Array, loss_type: str) -> jax.Array:
  """'l1' |p - y| or 'l2' (p - y)^2, elementwise."""
  if loss_type == 'l1':
    return jnp.abs(prediction - target)
  if loss_type == 'l2':
    return jnp.square(prediction - target)
  raise ValueError(f'unknown loss_type {loss_type!r}; expected "l1" or "l2"')


def simple_loss(prediction: jax.Array, target: jax.Array, loss_type: str) -> jax.Array:
  """The paper's L_simple: the elementwise loss averaged over all but the batch axis. (B,)"""
  loss = elementwise_loss(prediction.astype(jnp.float32), target.astype(jnp.float32), loss_type)
  return loss.mean(axis=tuple(range(1, loss.ndim)))
