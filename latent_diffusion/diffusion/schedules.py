"""Beta schedules of the paper's code and the Schedule of precomputed arrays derived from them."""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ('linear', 'cosine', 'sqrt_linear', 'sqrt')


def make_betas(schedule: str, timesteps: int, linear_start: float = 1e-4,
               linear_end: float = 2e-2, cosine_s: float = 8e-3) -> np.ndarray:
  """betas (T,) in float64, as `make_beta_schedule` in the paper's code."""
  if schedule == 'linear':  # linear in sqrt(beta)
    return np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
  if schedule == 'cosine':
    steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps + cosine_s
    alphas = np.cos(steps / (1 + cosine_s) * np.pi / 2) ** 2
    alphas = alphas / alphas[0]
    return np.clip(1 - alphas[1:] / alphas[:-1], 0, 0.999)
  if schedule == 'sqrt_linear':
    return np.linspace(linear_start, linear_end, timesteps, dtype=np.float64)
  if schedule == 'sqrt':
    return np.linspace(linear_start, linear_end, timesteps, dtype=np.float64) ** 0.5
  raise ValueError(f'unknown beta schedule {schedule!r}; expected one of {BETA_SCHEDULES}')


@flax.struct.dataclass
class Schedule:
  """Per-timestep coefficients of the forward process and its posterior, each (T,) float32."""
  betas: jax.Array
  alphas_cumprod: jax.Array
  alphas_cumprod_prev: jax.Array
  sqrt_alphas_cumprod: jax.Array
  sqrt_one_minus_alphas_cumprod: jax.Array
  sqrt_recip_alphas_cumprod: jax.Array
  sqrt_recipm1_alphas_cumprod: jax.Array
  posterior_variance: jax.Array
  posterior_log_variance_clipped: jax.Array
  posterior_mean_coef1: jax.Array
  posterior_mean_coef2: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def make_schedule(betas: np.ndarray, v_posterior: float = 0.0) -> Schedule:
  """All coefficients computed in float64 (as the paper's register_schedule), stored as float32."""
  betas = np.asarray(betas, np.float64)
  alphas_cumprod = np.cumprod(1.0 - betas)
  alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
  posterior_variance = ((1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                        + v_posterior * betas)
  arrays = dict(
      betas=betas,
      alphas_cumprod=alphas_cumprod,
      alphas_cumprod_prev=alphas_cumprod_prev,
      sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
      sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
      sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
      posterior_variance=posterior_variance,
      posterior_log_variance_clipped=np.log(np.maximum(posterior_variance, 1e-20)),
      posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
      posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
  )
  return Schedule(**{k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()})


def schedule_from_config(diffusion_config) -> Schedule:
  """The Schedule for `config.diffusion` (its v_posterior when the config has one)."""
  return make_schedule(make_betas(diffusion_config.beta_schedule, diffusion_config.timesteps,
                                  diffusion_config.linear_start, diffusion_config.linear_end,
                                  diffusion_config.cosine_s),
                       diffusion_config.get('v_posterior', 0.0))
