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


PARAMETERIZATIONS = ('eps', 'x0', 'v')


def check_parameterization(parameterization: str) -> None:
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(f'unknown parameterization {parameterization!r}; expected one of {PARAMETERIZATIONS}')


def v_target(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022; the `ldm` package's get_v)."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * noise
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0)


def predict_x0_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """x0 = sqrt(a_t) x_t - sqrt(1 - a_t) v."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
          - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v)


def predict_eps_from_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
  """eps = sqrt(a_t) v + sqrt(1 - a_t) x_t."""
  return (extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * v
          + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t)


def eps_and_x0(schedule: Schedule, parameterization: str, x_t: jax.Array, t: jax.Array,
               output: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The noise and clean-sample predictions implied by a network `output` under `parameterization`."""
  if parameterization == 'eps':
    return output, predict_x0_from_eps(schedule, x_t, t, output)
  if parameterization == 'x0':
    return predict_eps_from_x0(schedule, x_t, t, output), output
  if parameterization == 'v':
    return predict_eps_from_v(schedule, x_t, t, output), predict_x0_from_v(schedule, x_t, t, output)
  check_parameterization(parameterization)
  raise AssertionError('unreachable')


def training_target(schedule: Schedule, parameterization: str, x0: jax.Array, noise: jax.Array,
                    t: jax.Array) -> jax.Array:
  """What the network regresses: noise ('eps'), the clean sample ('x0') or v ('v')."""
  if parameterization == 'eps':
    return noise
  if parameterization == 'x0':
    return x0
  if parameterization == 'v':
    return v_target(schedule, x0, noise, t)
  check_parameterization(parameterization)
  raise AssertionError('unreachable')


def lvlb_weights(schedule: Schedule, parameterization: str) -> jax.Array:
  """Per-timestep weights of the variational bound term, as the paper's register_schedule. (T,) float32.

  eps: beta^2 / (2 sigma_post^2 alpha (1 - a)). x0: 0.5 sqrt(a) / (2 - a), which is what the paper's
  `0.5 * sqrt(a) / (2. * 1 - a)` evaluates to (by operator precedence; 2 (1 - a) was likely meant).
  v: ones (Stable Diffusion 2). Weight 0 is undefined (sigma_post^2 = 0) and copied from weight 1.
  """
  betas, alphas_cumprod = schedule.betas, schedule.alphas_cumprod
  if parameterization == 'eps':
    weights = betas ** 2 / (2 * schedule.posterior_variance * (1 - betas) * (1 - alphas_cumprod))
  elif parameterization == 'x0':
    weights = 0.5 * jnp.sqrt(alphas_cumprod) / (2.0 - alphas_cumprod)
  elif parameterization == 'v':
    weights = jnp.ones_like(betas)
  else:
    check_parameterization(parameterization)
  return weights.at[0].set(weights[1]).astype(jnp.float32)


def diffusion_loss(output: jax.Array, target: jax.Array, t: jax.Array, *, loss_type: str,
                   logvar: jax.Array, l_simple_weight: float = 1.0, original_elbo_weight: float = 0.0,
                   lvlb_weights: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """The paper's LatentDiffusion.p_losses given the network output, its target and t (B,).

  loss = l_simple_weight * mean(loss_simple / exp(logvar[t]) + logvar[t])
         + original_elbo_weight * mean(lvlb_weights[t] * loss_simple),
  with loss_simple (B,) the elementwise loss averaged over all but the batch axis. `logvar` (T,) is
  the learned per-timestep log-variance (zeros when not learned). lvlb_weights=None means unit
  weights, allowed only while original_elbo_weight is 0. Returns (loss, metrics) with the batch
  means 'loss_simple', 'loss_vlb', 'loss' and 'logvar' (of logvar[t]), all float32 scalars.
  """
  loss_simple = simple_loss(output, target, loss_type)  # (B,)
  logvar_t = logvar.astype(jnp.float32)[t]  # (B,)
  loss = l_simple_weight * jnp.mean(loss_simple / jnp.exp(logvar_t) + logvar_t)
  if lvlb_weights is None:
    if not isinstance(original_elbo_weight, (int, float)) or original_elbo_weight != 0:
      raise ValueError('original_elbo_weight is nonzero but no lvlb_weights were given')
    loss_vlb = jnp.mean(loss_simple)
  else:
    loss_vlb = jnp.mean(lvlb_weights.astype(jnp.float32)[t] * loss_simple)
  loss = loss + original_elbo_weight * loss_vlb
  metrics = {'loss_simple': jnp.mean(loss_simple), 'loss_vlb': loss_vlb, 'loss': loss,
             'logvar': jnp.mean(logvar_t)}
  return loss, {name: value.astype(jnp.float32) for name, value in metrics.items()}
