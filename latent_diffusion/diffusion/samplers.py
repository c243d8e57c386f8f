"""Samplers: pure functions whose whole loop is one `lax.scan`.

`model_fn(x_t, t) -> eps` is the denoiser with its parameters closed over; t is (B,) int32.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.diffusion.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: str = 'uniform') -> np.ndarray:
  """The paper's `make_ddim_timesteps`: `num_steps` of T timesteps, shifted by one. (S,) int32."""
  if spacing == 'uniform':
    stride = num_timesteps // num_steps
    steps = np.arange(0, num_timesteps, stride)
  elif spacing == 'quad':
    steps = (np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(np.int64)
  else:
    raise ValueError(f'unknown DDIM spacing {spacing!r}; expected "uniform" or "quad"')
  return (steps + 1).astype(np.int32)


def ddim_coefficients(schedule: Schedule, timesteps: np.ndarray, eta: float):
  """alphas, alphas_prev and sigmas (S,) for DDIM on `timesteps`, as the paper's code."""
  alphas_cumprod = np.asarray(schedule.alphas_cumprod, np.float64)
  alphas = alphas_cumprod[timesteps]
  alphas_prev = np.concatenate([alphas_cumprod[:1], alphas_cumprod[timesteps[:-1]]])
  sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
  return alphas, alphas_prev, sigmas


def ddim_sample(model_fn: ModelFn, x_T: jax.Array, rng: jax.Array, schedule: Schedule,
                num_steps: int, eta: float = 0.0, spacing: str = 'uniform') -> jax.Array:
  """DDIM (Song et al. 2021) from noise x_T (B,...) to x_0.

  Makes len(ddim_timesteps(T, num_steps)) model calls: num_steps when it divides T, else a few
  more (the paper's uniform spacing takes every T // num_steps-th step).
  """
  timesteps = ddim_timesteps(schedule.num_timesteps, num_steps, spacing)
  alphas, alphas_prev, sigmas = ddim_coefficients(schedule, timesteps, eta)
  # Iterate from the noisiest step to the cleanest.
  per_step = tuple(jnp.asarray(a[::-1], dtype) for a, dtype in (
      (timesteps, jnp.int32), (alphas, jnp.float32), (alphas_prev, jnp.float32), (sigmas, jnp.float32)))
  step_keys = jax.random.split(rng, len(timesteps))  # len may exceed num_steps, as in the paper

  def step(x, inputs):
    t, alpha, alpha_prev, sigma, key = inputs
    eps = model_fn(x, jnp.full((x.shape[0],), t, jnp.int32)).astype(jnp.float32)
    x0 = (x - jnp.sqrt(1 - alpha) * eps) / jnp.sqrt(alpha)
    direction = jnp.sqrt(1 - alpha_prev - sigma ** 2) * eps
    noise = sigma * jax.random.normal(key, x.shape, x.dtype)
    return jnp.sqrt(alpha_prev) * x0 + direction + noise, None

  x0, _ = jax.lax.scan(step, x_T.astype(jnp.float32), per_step + (step_keys,))
  return x0
