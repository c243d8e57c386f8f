"""Samplers: pure functions whose whole loop is one `lax.scan`.

`model_fn(x_t, t) -> raw network output` is the denoiser with its parameters (and conditioning) closed
over; t is (B,) int32. `parameterization` says what that output is ('eps', 'x0' or 'v'); every sampler
converts it with `process.eps_and_x0` and computes in float32.

The per-step coefficients of a (schedule, num_steps, spacing) are computed in numpy (float64) when the
sampler is traced and enter the scan as constants, so a jitted sampler compiles once per (batch shape,
num_steps) and traces `model_fn` once. The schedule must therefore be concrete (closed over, not a
traced jit argument).

Randomness: step i of the sampling loop (i = 0 is the noisiest) draws its noise from
`jax.random.split(rng, S)[i]`, so a reference implementation can replay it.

img2img (SDEdit, Meng et al. 2022): given `x0_init`, every sampler runs only the last
`img2img_steps(S, strength)` of its S steps, starting from x0_init noised to the noisiest of them with
x_T as the noise, as diffusers' img2img pipelines (get_timesteps, then scheduler.add_noise).
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.diffusion import process
from latent_diffusion.diffusion.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

SPACINGS = ('uniform', 'quad', 'leading', 'trailing', 'linspace')


def sampling_timesteps(num_timesteps: int, num_steps: int, spacing: str = 'uniform',
                       offset: int = 0) -> np.ndarray:
  """The timesteps a sampler visits, ascending. (S,) int32.

  'uniform' and 'quad': the paper's `make_ddim_timesteps` (every T // S-th step, or quadratically
  spaced, then shifted by one; uniform gives more than S steps when S does not divide T).
  diffusers' `timestep_spacing`: 'leading' (arange(S) * (T // S) + offset; offset is diffusers'
  steps_offset, and 'leading' with offset 1 is the paper's 'uniform'), 'trailing'
  (round(arange(T, 0, -T / S)) - 1) and 'linspace' (round(linspace(0, T - 1, S))).
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f'num_steps must be in [1, {num_timesteps}], got {num_steps}')
  if offset and spacing != 'leading':
    raise ValueError(f'offset applies to the "leading" spacing only, got offset={offset} with {spacing!r}')
  if spacing == 'uniform':
    steps = np.arange(0, num_timesteps, num_timesteps // num_steps) + 1
  elif spacing == 'quad':
    steps = (np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(np.int64) + 1
  elif spacing == 'leading':
    steps = np.arange(num_steps) * (num_timesteps // num_steps) + offset
  elif spacing == 'trailing':
    steps = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)).astype(np.int64)[::-1] - 1
  elif spacing == 'linspace':
    steps = np.linspace(0, num_timesteps - 1, num_steps).round().astype(np.int64)
  else:
    raise ValueError(f'unknown spacing {spacing!r}; expected one of {SPACINGS}')
  if steps.min() < 0 or steps.max() >= num_timesteps:
    raise ValueError(f'{spacing!r} spacing with offset {offset} leaves [0, {num_timesteps}): {steps}')
  return steps.astype(np.int32)


def ddim_timesteps(num_timesteps: int, num_steps: int, spacing: str = 'uniform',
                   offset: int = 0) -> np.ndarray:
  """The timesteps DDIM visits: `sampling_timesteps` (the paper's make_ddim_timesteps by default)."""
  return sampling_timesteps(num_timesteps, num_steps, spacing, offset)


class StrengthError(ValueError):
  """An img2img strength outside (0, 1], or one that leaves no sampler step to run."""


def img2img_steps(num_steps: int, strength: float) -> int:
  """How many of a sampler's `num_steps` steps img2img runs: int(strength * num_steps), as diffusers'
  get_timesteps. strength 1 runs them all (from the noisiest timestep, not from pure noise)."""
  if not 0.0 < strength <= 1.0:
    raise StrengthError(f'strength must be in (0, 1], got {strength}')
  kept = int(num_steps * strength)  # <= num_steps, as strength <= 1
  if kept < 1:
    least = math.ceil(1e4 / num_steps) / 1e4  # 1 / num_steps rounded up, so that it does run one
    raise StrengthError(f'strength {strength} runs none of the {num_steps} sampler steps; '
                        f'the least that runs one is {least:g}')
  return kept


def img2img_start(schedule: Schedule, timesteps: np.ndarray, x_T: jax.Array, x0_init: jax.Array | None,
                  strength: float) -> tuple[np.ndarray, jax.Array]:
  """(ascending timesteps to run, start x): all of them and x_T without x0_init; with it, the lowest
  img2img_steps of them and x0_init forward-noised to the highest of those, x_T being the noise."""
  if x0_init is None:
    return timesteps, x_T.astype(jnp.float32)
  timesteps = timesteps[:img2img_steps(len(timesteps), strength)]
  x = process.q_sample(schedule, x0_init.astype(jnp.float32), batch_of(timesteps[-1], x_T),
                       x_T.astype(jnp.float32))
  return timesteps, x


def alphas_cumprod_f64(schedule: Schedule) -> np.ndarray:
  """alphas_cumprod recomputed in float64 from the betas: ratios a_t / a_s of nearby timesteps (the
  respaced betas 1 - a_t / a_s) would lose ~1e-4 of their value to the float32 rounding of a_t."""
  return np.cumprod(1.0 - np.asarray(schedule.betas, np.float64))


def ddim_coefficients(schedule: Schedule, timesteps: np.ndarray, eta: float,
                      final_alpha_cumprod: float | None = None):
  """alphas, alphas_prev and sigmas (S,) for DDIM on ascending `timesteps`, as the paper's code.

  The step from timesteps[0] lands on final_alpha_cumprod: None is the paper's alphas_cumprod[0],
  1.0 is diffusers' set_alpha_to_one.
  """
  alphas_cumprod = alphas_cumprod_f64(schedule)
  final = alphas_cumprod[0] if final_alpha_cumprod is None else float(final_alpha_cumprod)
  alphas = alphas_cumprod[timesteps]
  alphas_prev = np.concatenate([[final], alphas_cumprod[timesteps[:-1]]])
  sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
  return alphas, alphas_prev, sigmas


def sampling_order(*arrays, dtype=jnp.float32):
  """Per-step numpy arrays (ascending timesteps) as scan inputs, noisiest step first."""
  return tuple(jnp.asarray(np.asarray(a)[::-1], dtype) for a in arrays)


def batch_of(t: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.full((x.shape[0],), t, jnp.int32)


def finish(final, stacked, return_intermediates: bool):
  return (final, stacked) if return_intermediates else final


def ddpm_coefficients(schedule: Schedule, timesteps: np.ndarray | None):
  """Posterior mean coefficients (of x0 and x_t) and standard deviations (S,) on ascending timesteps.

  None: every timestep with the schedule's own posterior (the paper's p_sample, v_posterior
  included). A subsequence: the posterior between consecutive visited timesteps (diffusers'
  respaced DDPMScheduler), landing on alpha_cumprod = 1 after the first. No noise at t = 0.
  """
  if timesteps is None:
    timesteps = np.arange(schedule.num_timesteps)
    coef_x0 = np.asarray(schedule.posterior_mean_coef1, np.float64)
    coef_xt = np.asarray(schedule.posterior_mean_coef2, np.float64)
    std = np.exp(0.5 * np.asarray(schedule.posterior_log_variance_clipped, np.float64))
  else:
    alphas_cumprod = alphas_cumprod_f64(schedule)
    a = alphas_cumprod[timesteps]
    a_prev = np.concatenate([[1.0], alphas_cumprod[timesteps[:-1]]])
    beta = 1 - a / a_prev  # of the respaced chain
    coef_x0 = np.sqrt(a_prev) * beta / (1 - a)
    coef_xt = np.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
    std = np.sqrt((1 - a_prev) / (1 - a) * beta)
  std = np.where(timesteps == 0, 0.0, std)
  return timesteps, coef_x0, coef_xt, std


def ddpm_sample(model_fn: ModelFn, x_T: jax.Array, rng: jax.Array, schedule: Schedule,
                num_steps: int | None = None, parameterization: str = 'eps',
                clip_denoised: bool = False, *, spacing: str = 'leading', offset: int = 0,
                x0_init: jax.Array | None = None, strength: float = 1.0,
                return_intermediates: bool = False):
  """Ancestral sampling (Ho et al. 2020) with the posterior variance ('fixed_small').

  num_steps=None walks all T timesteps as the paper's p_sample_loop; fewer steps walk the
  `sampling_timesteps(T, num_steps, spacing, offset)` subsequence with the respaced posterior, as
  diffusers' DDPMScheduler.set_timesteps (its defaults: 'leading', offset 0). clip_denoised clips the
  x0 prediction to [-1, 1]. x0_init, strength: img2img (module docstring). Returns x_0, and with
  return_intermediates the x after every step (S, B, ...).
  """
  process.check_parameterization(parameterization)
  timesteps = (np.arange(schedule.num_timesteps) if num_steps is None
               else sampling_timesteps(schedule.num_timesteps, num_steps, spacing, offset))
  timesteps, x = img2img_start(schedule, timesteps, x_T, x0_init, strength)
  _, coef_x0, coef_xt, std = ddpm_coefficients(schedule, None if num_steps is None else timesteps)
  per_step = (sampling_order(timesteps, dtype=jnp.int32)
              + sampling_order(*(c[:len(timesteps)] for c in (coef_x0, coef_xt, std))))
  keys = jax.random.split(rng, len(timesteps))

  def step(x, inputs):
    t, c_x0, c_xt, sigma, key = inputs
    t_batch = batch_of(t, x)
    _, x0 = process.eps_and_x0(schedule, parameterization, x, t_batch,
                               model_fn(x, t_batch).astype(jnp.float32))
    if clip_denoised:
      x0 = jnp.clip(x0, -1.0, 1.0)
    x = c_x0 * x0 + c_xt * x + sigma * jax.random.normal(key, x.shape, x.dtype)
    return x, x if return_intermediates else None

  x0, stacked = jax.lax.scan(step, x, per_step + (keys,))
  return finish(x0, stacked, return_intermediates)


def ddim_sample(model_fn: ModelFn, x_T: jax.Array, rng: jax.Array, schedule: Schedule,
                num_steps: int, eta: float = 0.0, spacing: str = 'uniform', *,
                parameterization: str = 'eps', offset: int = 0,
                final_alpha_cumprod: float | None = None, mask: jax.Array | None = None,
                x0_known: jax.Array | None = None, x0_init: jax.Array | None = None,
                strength: float = 1.0, return_intermediates: bool = False):
  """DDIM (Song et al. 2021) from noise x_T (B, ...) to x_0, as the paper's DDIMSampler.

  Makes len(ddim_timesteps(T, num_steps, spacing, offset)) model calls: num_steps, or a few more
  for the paper's 'uniform' spacing when num_steps does not divide T. eta scales the noise (0:
  deterministic). final_alpha_cumprod: see `ddim_coefficients`. Masked sampling (the paper's
  inpainting/outpainting): before each step at t, x <- q_sample(x0_known, t) * mask + (1 - mask) * x,
  so mask = 1 keeps the known latents; its forward noise comes from keys split from
  fold_in(rng, 1). x0_init, strength: img2img (module docstring). Returns x_0, and with
  return_intermediates the x after every step (S, B, ...).
  """
  process.check_parameterization(parameterization)
  if (mask is None) != (x0_known is None):
    raise ValueError('masked sampling needs both mask and x0_known')
  timesteps, x = img2img_start(schedule, ddim_timesteps(schedule.num_timesteps, num_steps, spacing, offset),
                               x_T, x0_init, strength)
  alphas, alphas_prev, sigmas = ddim_coefficients(schedule, timesteps, eta, final_alpha_cumprod)
  per_step = sampling_order(timesteps, dtype=jnp.int32) + sampling_order(alphas_prev, sigmas)
  keys = jax.random.split(rng, len(timesteps))
  mask_keys = jax.random.split(jax.random.fold_in(rng, 1), len(timesteps))

  def step(x, inputs):
    t, alpha_prev, sigma, key, mask_key = inputs
    t_batch = batch_of(t, x)
    if mask is not None:
      known = process.q_sample(schedule, x0_known.astype(jnp.float32), t_batch,
                               jax.random.normal(mask_key, x.shape, x.dtype))
      x = known * mask + (1.0 - mask) * x
    eps, x0 = process.eps_and_x0(schedule, parameterization, x, t_batch,
                                 model_fn(x, t_batch).astype(jnp.float32))
    direction = jnp.sqrt(1 - alpha_prev - sigma ** 2) * eps
    noise = sigma * jax.random.normal(key, x.shape, x.dtype)
    x = jnp.sqrt(alpha_prev) * x0 + direction + noise
    return x, x if return_intermediates else None

  x0, stacked = jax.lax.scan(step, x, per_step + (keys, mask_keys))
  return finish(x0, stacked, return_intermediates)


# PLMS: Adams-Bashforth weights of (eps now, eps one step ago, two ago, three ago).
ADAMS_BASHFORTH = (np.array([1.0, 0, 0, 0]), np.array([3, -1, 0, 0]) / 2,
                   np.array([23, -16, 5, 0]) / 12, np.array([55, -59, 37, -9]) / 24)


def plms_schedule(timesteps: np.ndarray, alphas: np.ndarray, alphas_prev: np.ndarray):
  """Per-iteration inputs of PLMS's S + 1 model calls (sampling order), one call per iteration.

  Iteration 0 evaluates the model at x_T and takes a DDIM step (the Euler predictor); iteration 1
  evaluates it at that prediction and the next timestep and repeats the first step from x_T with
  the average of both (pseudo improved Euler); iteration k + 1 is step k with the order-min(k + 1, 4)
  Adams-Bashforth combination of eps. Returns model timesteps, combination weights (S + 1, 4),
  the step's alpha and alpha_prev, whether eps joins the history and whether the step's start
  point is kept (iteration 0 only).
  """
  t_desc, a_desc, a_prev_desc = timesteps[::-1], alphas[::-1], alphas_prev[::-1]
  num_steps = len(t_desc)
  model_t = np.concatenate([[t_desc[0], t_desc[min(1, num_steps - 1)]], t_desc[1:]])
  weights = np.stack([ADAMS_BASHFORTH[0], np.array([0.5, 0.5, 0, 0])]
                     + [ADAMS_BASHFORTH[min(k, 3)] for k in range(1, num_steps)])
  step_alpha = np.concatenate([a_desc[:1], a_desc])
  step_alpha_prev = np.concatenate([a_prev_desc[:1], a_prev_desc])
  push = np.array([True, False] + [True] * (num_steps - 1))
  keep_start = np.array([True] + [False] * num_steps)
  return model_t, weights, step_alpha, step_alpha_prev, push, keep_start


def plms_sample(model_fn: ModelFn, x_T: jax.Array, schedule: Schedule, num_steps: int,
                spacing: str = 'uniform', parameterization: str = 'eps', *, offset: int = 0,
                final_alpha_cumprod: float | None = None, x0_init: jax.Array | None = None,
                strength: float = 1.0, return_intermediates: bool = False):
  """The paper's PLMS sampler (pseudo linear multistep, Liu et al. 2022), deterministic.

  A pseudo improved-Euler first step (a second model call at the predicted point), then 2nd, 3rd and
  4th-order Adams-Bashforth on eps: len(timesteps) + 1 model calls, all inside one scan. The raw
  outputs are converted to eps first, so it works for every parameterisation. x0_init, strength:
  img2img (module docstring). Returns x_0, and with return_intermediates the x after every step (S, B, ...).
  """
  process.check_parameterization(parameterization)
  timesteps, x = img2img_start(schedule, ddim_timesteps(schedule.num_timesteps, num_steps, spacing, offset),
                               x_T, x0_init, strength)
  alphas, alphas_prev, _ = ddim_coefficients(schedule, timesteps, 0.0, final_alpha_cumprod)
  model_t, weights, step_alpha, step_alpha_prev, push, keep_start = plms_schedule(
      timesteps, alphas, alphas_prev)
  per_step = (jnp.asarray(model_t, jnp.int32), jnp.asarray(weights, jnp.float32),
              jnp.asarray(step_alpha, jnp.float32), jnp.asarray(step_alpha_prev, jnp.float32),
              jnp.asarray(push), jnp.asarray(keep_start))

  def step(carry, inputs):
    x_in, start, history = carry  # history: (3, B, ...) eps of the last three steps, newest first
    t, w, alpha, alpha_prev, push_eps, keep = inputs
    t_batch = batch_of(t, x_in)
    eps, _ = process.eps_and_x0(schedule, parameterization, x_in, t_batch,
                                model_fn(x_in, t_batch).astype(jnp.float32))
    eps_prime = w[0] * eps + jnp.tensordot(w[1:], history, axes=1)
    x0 = (start - jnp.sqrt(1 - alpha) * eps_prime) / jnp.sqrt(alpha)
    out = jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1 - alpha_prev) * eps_prime
    history = jnp.where(push_eps, jnp.concatenate([eps[None], history[:-1]]), history)
    start = jnp.where(keep, start, out)
    return (out, start, history), out if return_intermediates else None

  (x0, _, _), stacked = jax.lax.scan(step, (x, x, jnp.zeros((3,) + x.shape, x.dtype)), per_step)
  return finish(x0, stacked[1:] if return_intermediates else None, return_intermediates)


def dpm_solver_timesteps(num_timesteps: int, num_steps: int, spacing: str = 'linspace',
                         offset: int = 0) -> np.ndarray:
  """Ascending timesteps of DPM-Solver, as diffusers' DPMSolverMultistepScheduler: 'linspace' and
  'leading' place num_steps + 1 points and drop the cleanest; other spacings as `sampling_timesteps`."""
  if spacing in ('linspace', 'leading'):
    return sampling_timesteps(num_timesteps, num_steps + 1, spacing, offset)[1:]
  return sampling_timesteps(num_timesteps, num_steps, spacing, offset)


def dpm_solver_coefficients(schedule: Schedule, timesteps: np.ndarray):
  """x_next = a x + b D_now + c D_before (D: x0 predictions) per step, in sampling order. (S,) each.

  DPM-Solver++(2M), midpoint form, on the VP path alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t):
  first order at the first step, second order after, and the last step goes to sigma = 0, where the
  first-order update is the x0 prediction itself (diffusers' final_sigmas_type='zero', which also
  makes its lower_order_final always apply there).
  """
  a = alphas_cumprod_f64(schedule)[timesteps[::-1]]
  alpha, sigma = np.sqrt(a), np.sqrt(1 - a)
  lam = np.log(alpha) - np.log(sigma)
  num_steps = len(timesteps)
  coef_x, coef_now, coef_before = np.zeros(num_steps), np.ones(num_steps), np.zeros(num_steps)
  for k in range(num_steps - 1):  # the last step keeps (0, 1, 0): x_next = D_now
    h = lam[k + 1] - lam[k]
    coef_x[k] = sigma[k + 1] / sigma[k]
    first_order = alpha[k + 1] * -np.expm1(-h)
    if k == 0:
      coef_now[k] = first_order
    else:
      r = (lam[k] - lam[k - 1]) / h
      coef_now[k] = first_order * (1 + 0.5 / r)
      coef_before[k] = -first_order * 0.5 / r
  return coef_x, coef_now, coef_before


def dpm_solver_sample(model_fn: ModelFn, x_T: jax.Array, schedule: Schedule, num_steps: int,
                      parameterization: str = 'eps', spacing: str = 'linspace', *, offset: int = 0,
                      x0_init: jax.Array | None = None, strength: float = 1.0,
                      return_intermediates: bool = False):
  """DPM-Solver++(2M) (Lu et al. 2022): multistep, data prediction, deterministic; num_steps model
  calls, the last step landing on the x0 prediction. x0_init, strength: img2img (module docstring;
  its first step is first order, as diffusers' from set_begin_index). Returns x_0, and with
  return_intermediates the x after every step (S, B, ...)."""
  process.check_parameterization(parameterization)
  timesteps, x = img2img_start(schedule, dpm_solver_timesteps(schedule.num_timesteps, num_steps, spacing, offset),
                               x_T, x0_init, strength)
  per_step = ((jnp.asarray(timesteps[::-1], jnp.int32),)
              + tuple(jnp.asarray(c, jnp.float32) for c in dpm_solver_coefficients(schedule, timesteps)))

  def step(carry, inputs):
    x, x0_before = carry
    t, c_x, c_now, c_before = inputs
    t_batch = batch_of(t, x)
    _, x0 = process.eps_and_x0(schedule, parameterization, x, t_batch,
                               model_fn(x, t_batch).astype(jnp.float32))
    x = c_x * x + c_now * x0 + c_before * x0_before
    return (x, x0), x if return_intermediates else None

  (x0, _), stacked = jax.lax.scan(step, (x, jnp.zeros_like(x)), per_step)
  return finish(x0, stacked, return_intermediates)
