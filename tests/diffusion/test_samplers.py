"""Tests for diffusion/samplers.py: timesteps and coefficients as the paper's code, every intermediate
latent of each sampler against the diffusers scheduler loop it corresponds to (same toy model, same
noise), img2img against diffusers' img2img pipeline's timesteps and noising, masked DDIM,
parameterisations, and one compilation per (shape, num_steps)."""

import types

import diffusers.schedulers.scheduling_ddpm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler,
                       StableDiffusionImg2ImgPipeline)

from latent_diffusion.diffusion import process, samplers, schedules

T = 1000
BETA_START, BETA_END = 0.00085, 0.012
SHAPE = (2, 8, 8, 4)  # NHWC here, NCHW in diffusers
# diffusers' 'scaled_linear' is our (the paper's) 'linear'; its 'linear' is our 'sqrt_linear'.
DIFFUSERS_SCHEDULE = dict(num_train_timesteps=T, beta_start=BETA_START, beta_end=BETA_END,
                          beta_schedule='scaled_linear')


@pytest.fixture(scope='module')
def schedule():
  return schedules.make_schedule(schedules.make_betas('linear', T, BETA_START, BETA_END))


@pytest.fixture(scope='module')
def small_schedule():
  return schedules.make_schedule(schedules.make_betas('linear', 100, 0.001, 0.02))


@pytest.fixture(scope='module')
def x_T():
  return np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)


def toy_model(x, t):
  """A deterministic 'denoiser' of x and t, so that a trajectory depends on every step."""
  return 0.9 * x + 0.1 * jnp.sin(t.astype(jnp.float32) / 100).reshape((-1,) + (1,) * (x.ndim - 1))


def toy_model_torch(x, t):
  return 0.9 * x + 0.1 * torch.sin(torch.tensor(float(t), dtype=torch.float32) / 100).to(x.dtype)


def to_torch(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def to_nhwc(x):
  return x.numpy().transpose(0, 2, 3, 1)


def step_noise(rng, num_steps, dtype=torch.float32):
  """Our samplers' per-step noise (documented in samplers.py), NCHW for diffusers."""
  return [to_torch(jax.random.normal(key, SHAPE)).to(dtype) for key in jax.random.split(rng, num_steps)]


def diffusers_trajectory(scheduler, x_T, step_kwargs=lambda i: {}, dtype=torch.float32):
  """x after every scheduler.step of the loop over scheduler.timesteps, NHWC, stacked."""
  x, trajectory = to_torch(x_T).to(dtype), []
  for i, t in enumerate(scheduler.timesteps):
    x = scheduler.step(toy_model_torch(x, int(t)), int(t), x, **step_kwargs(i)).prev_sample
    trajectory.append(to_nhwc(x))
  return np.stack(trajectory)


def assert_same_trajectory(ours, theirs):
  final, intermediates = ours
  assert intermediates.shape == theirs.shape and intermediates.dtype == jnp.float32
  np.testing.assert_allclose(intermediates, theirs, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(final, intermediates[-1])


def paper_ddim_timesteps(method, num_ddim_timesteps, num_ddpm_timesteps):
  """Transcription of the paper's util.make_ddim_timesteps."""
  if method == 'uniform':
    c = num_ddpm_timesteps // num_ddim_timesteps
    steps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
  else:
    steps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * .8), num_ddim_timesteps)) ** 2).astype(int)
  return steps + 1


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
  scheduler = DDIMScheduler(**DIFFUSERS_SCHEDULE, steps_offset=1, timestep_spacing='leading')
  scheduler.set_timesteps(num_steps)
  np.testing.assert_array_equal(samplers.ddim_timesteps(T, num_steps)[::-1], scheduler.timesteps.numpy())


@pytest.mark.parametrize('num_steps', [7, 30, 50, 333])
@pytest.mark.parametrize('spacing,offset', [('leading', 0), ('leading', 1), ('trailing', 0),
                                            ('linspace', 0)])
def test_diffusers_spacings_equal_diffusers_set_timesteps(spacing, offset, num_steps):
  for scheduler_class in (DDIMScheduler, DDPMScheduler):
    scheduler = scheduler_class(**DIFFUSERS_SCHEDULE, steps_offset=offset, timestep_spacing=spacing)
    scheduler.set_timesteps(num_steps)
    ours = samplers.sampling_timesteps(T, num_steps, spacing, offset)
    np.testing.assert_array_equal(ours[::-1], scheduler.timesteps.numpy(), err_msg=scheduler_class.__name__)


@pytest.mark.parametrize('num_steps', [7, 20, 50])
@pytest.mark.parametrize('spacing,offset', [('linspace', 0), ('leading', 0), ('leading', 1),
                                            ('trailing', 0)])
def test_dpm_solver_timesteps_equal_diffusers(spacing, offset, num_steps):
  scheduler = DPMSolverMultistepScheduler(**DIFFUSERS_SCHEDULE, timestep_spacing=spacing,
                                          steps_offset=offset)
  scheduler.set_timesteps(num_steps)
  ours = samplers.dpm_solver_timesteps(T, num_steps, spacing, offset)
  np.testing.assert_array_equal(ours[::-1], scheduler.timesteps.numpy())


@pytest.mark.parametrize('spacing,offset,num_steps', [('linear', 0, 10), ('trailing', 1, 10),
                                                      ('leading', 0, 0), ('leading', 0, T + 1)])
def test_bad_spacing_offset_or_step_count_raises_value_error(spacing, offset, num_steps):
  with pytest.raises(ValueError, match=repr(spacing) if spacing == 'linear' else None):
    samplers.sampling_timesteps(T, num_steps, spacing, offset)


@pytest.mark.parametrize('eta', [0.0, 0.5, 1.0])
@pytest.mark.parametrize('final_alpha_cumprod', [None, 1.0])
def test_ddim_coefficients_match_papers_sampling_parameters(schedule, eta, final_alpha_cumprod):
  timesteps = samplers.ddim_timesteps(T, 20)
  alphas, alphas_prev, sigmas = samplers.ddim_coefficients(schedule, timesteps, eta, final_alpha_cumprod)
  # Recomputed in float64 from the betas (the paper uses its float32 alphas_cumprod buffer: the same
  # to float32 rounding, but sigma's 1 - a_t / a_prev would lose ~1e-4 of its value to it).
  alphacums = np.cumprod(1 - np.asarray(schedule.betas, np.float64))
  np.testing.assert_allclose(alphacums, schedule.alphas_cumprod, rtol=1e-6)
  first = alphacums[0] if final_alpha_cumprod is None else final_alpha_cumprod
  expected_alphas = alphacums[timesteps]
  expected_prev = np.asarray([first] + alphacums[timesteps[:-1]].tolist())
  expected_sigmas = eta * np.sqrt((1 - expected_prev) / (1 - expected_alphas)
                                  * (1 - expected_alphas / expected_prev))
  np.testing.assert_allclose(alphas, expected_alphas, rtol=1e-12)
  np.testing.assert_allclose(alphas_prev, expected_prev, rtol=1e-12)
  np.testing.assert_allclose(sigmas, expected_sigmas, rtol=1e-12, atol=0)


# Every intermediate latent against diffusers, 50 steps, T = 1000.


@pytest.mark.parametrize('prediction_type,parameterization,clip', [
    ('epsilon', 'eps', False), ('v_prediction', 'v', False), ('epsilon', 'eps', True)])
def test_ddpm_sample_respaced_equals_diffusers_ddpm_scheduler(schedule, x_T, monkeypatch,
                                                              prediction_type, parameterization, clip):
  rng = jax.random.PRNGKey(5)
  ours = samplers.ddpm_sample(toy_model, jnp.asarray(x_T), rng, schedule, 50, parameterization,
                              clip_denoised=clip, return_intermediates=True)
  scheduler = DDPMScheduler(**DIFFUSERS_SCHEDULE, variance_type='fixed_small', clip_sample=clip,
                            clip_sample_range=1.0, prediction_type=prediction_type)
  scheduler.set_timesteps(50)
  noise = iter(step_noise(rng, 50))
  monkeypatch.setattr(diffusers.schedulers.scheduling_ddpm, 'randn_tensor', lambda *a, **k: next(noise))
  assert_same_trajectory(ours, diffusers_trajectory(scheduler, x_T))


def test_ddpm_sample_over_all_timesteps_equals_diffusers_unrespaced_chain(small_schedule, x_T,
                                                                        monkeypatch):
  """num_steps=None: the paper's p_sample_loop over every t of a T = 100 schedule.

  diffusers is run in float64 here: in float32 its per-step beta 1 - a_t / a_{t-1} loses ~1e-4 of
  its value to cancellation, which over 100 steps moves its trajectory by 2.5e-5 (ours: 1.3e-6 from
  the float64 run)."""
  rng = jax.random.PRNGKey(6)
  ours = samplers.ddpm_sample(toy_model, jnp.asarray(x_T), rng, small_schedule,
                              return_intermediates=True)
  scheduler = DDPMScheduler(num_train_timesteps=100, beta_start=0.001, beta_end=0.02,
                            beta_schedule='scaled_linear', variance_type='fixed_small', clip_sample=False)
  assert scheduler.num_inference_steps is None  # previous timestep = t - 1
  scheduler.alphas_cumprod = torch.from_numpy(np.cumprod(1 - schedules.make_betas('linear', 100, 0.001,
                                                                                   0.02)))
  scheduler.one = torch.tensor(1.0, dtype=torch.float64)
  noise = iter(step_noise(rng, 100, torch.float64))
  monkeypatch.setattr(diffusers.schedulers.scheduling_ddpm, 'randn_tensor', lambda *a, **k: next(noise))
  theirs = diffusers_trajectory(scheduler, x_T, dtype=torch.float64)
  assert theirs.dtype == np.float64
  assert_same_trajectory(ours, theirs)


def test_ddpm_sample_without_noise_at_t0_is_the_posterior_mean_there(small_schedule):
  """The last step (t = 0) adds no noise: two rngs give the same x0 when x_1 is the same."""
  x = jnp.ones((1, 2, 2, 1))
  first = samplers.ddpm_sample(toy_model, x, jax.random.PRNGKey(0), small_schedule, 1)
  other = samplers.ddpm_sample(toy_model, x, jax.random.PRNGKey(1), small_schedule, 1)
  np.testing.assert_array_equal(first, other)  # one step of 'leading': t = 0 only
  noisy = samplers.ddpm_sample(toy_model, x, jax.random.PRNGKey(1), small_schedule, 2)
  assert not np.allclose(noisy, samplers.ddpm_sample(toy_model, x, jax.random.PRNGKey(2),
                                                     small_schedule, 2))


@pytest.mark.parametrize('eta,paper_defaults', [(0.0, True), (1.0, True), (0.0, False), (1.0, False)])
def test_ddim_sample_equals_diffusers_ddim_scheduler(schedule, x_T, eta, paper_defaults):
  """The paper's setting (uniform = 'leading' + steps_offset 1, alpha_prev alphas_cumprod[0] at the
  end) and diffusers' defaults ('leading', offset 0, set_alpha_to_one)."""
  rng = jax.random.PRNGKey(3)
  if paper_defaults:
    ours = samplers.ddim_sample(toy_model, jnp.asarray(x_T), rng, schedule, 50, eta,
                                return_intermediates=True)
    scheduler = DDIMScheduler(**DIFFUSERS_SCHEDULE, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, timestep_spacing='leading')
  else:
    ours = samplers.ddim_sample(toy_model, jnp.asarray(x_T), rng, schedule, 50, eta, 'leading',
                                final_alpha_cumprod=1.0, return_intermediates=True)
    scheduler = DDIMScheduler(**DIFFUSERS_SCHEDULE, clip_sample=False)
  scheduler.set_timesteps(50)
  noise = step_noise(rng, 50)
  theirs = diffusers_trajectory(scheduler, x_T,
                                lambda i: dict(eta=eta, variance_noise=noise[i] if eta else None))
  assert_same_trajectory(ours, theirs)


def test_ddim_sample_v_prediction_equals_diffusers(schedule, x_T):
  ours = samplers.ddim_sample(toy_model, jnp.asarray(x_T), jax.random.PRNGKey(0), schedule, 50,
                              parameterization='v', return_intermediates=True)
  scheduler = DDIMScheduler(**DIFFUSERS_SCHEDULE, clip_sample=False, set_alpha_to_one=False,
                            steps_offset=1, prediction_type='v_prediction')
  scheduler.set_timesteps(50)
  assert_same_trajectory(ours, diffusers_trajectory(scheduler, x_T))


def test_plms_sample_equals_diffusers_pndm_without_prk_steps(schedule, x_T):
  """diffusers runs 51 model calls (the first timestep twice, like the paper) in 51 scheduler steps,
  the first of which is the Euler predictor; our intermediates are the 50 steps after it."""
  ours = samplers.plms_sample(toy_model, jnp.asarray(x_T), schedule, 50, return_intermediates=True)
  scheduler = PNDMScheduler(**DIFFUSERS_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False,
                            steps_offset=1)
  scheduler.set_timesteps(50)
  assert len(scheduler.timesteps) == 51
  assert_same_trajectory(ours, diffusers_trajectory(scheduler, x_T)[1:])


@pytest.mark.parametrize('num_steps', [50, 8])
def test_dpm_solver_sample_equals_diffusers_dpmsolver_plus_plus_2m(schedule, x_T, num_steps):
  ours = samplers.dpm_solver_sample(toy_model, jnp.asarray(x_T), schedule, num_steps,
                                    return_intermediates=True)
  scheduler = DPMSolverMultistepScheduler(**DIFFUSERS_SCHEDULE, algorithm_type='dpmsolver++',
                                          solver_order=2)
  scheduler.set_timesteps(num_steps)
  assert_same_trajectory(ours, diffusers_trajectory(scheduler, x_T))


def test_dpm_solver_last_step_lands_on_the_x0_prediction(schedule, x_T):
  final, intermediates = samplers.dpm_solver_sample(toy_model, jnp.asarray(x_T), schedule, 10,
                                                    return_intermediates=True)
  t_last = samplers.dpm_solver_timesteps(T, 10)[0]
  t = jnp.full((SHAPE[0],), t_last, jnp.int32)
  _, x0 = process.eps_and_x0(schedule, 'eps', intermediates[-2], t, toy_model(intermediates[-2], t))
  np.testing.assert_allclose(final, x0, rtol=1e-6, atol=1e-6)


# Other properties.


def equivalent_model(schedule, parameterization):
  """The toy eps-model rewritten to output x0 or v: every sampler must then walk the same path."""
  def model_fn(x, t):
    eps = toy_model(x, t)
    if parameterization == 'x0':
      return process.predict_x0_from_eps(schedule, x, t, eps)
    # eps = sqrt(a) v + sqrt(1 - a) x
    return ((eps - process.extract(schedule.sqrt_one_minus_alphas_cumprod, t, x.ndim) * x)
            / process.extract(schedule.sqrt_alphas_cumprod, t, x.ndim))
  return model_fn


def run_sampler(name, model_fn, x, schedule, num_steps, **kwargs):
  rng = jax.random.PRNGKey(4)
  if name == 'ddpm':
    return samplers.ddpm_sample(model_fn, x, rng, schedule, num_steps, **kwargs)
  if name == 'ddim':
    return samplers.ddim_sample(model_fn, x, rng, schedule, num_steps, 0.5, **kwargs)
  if name == 'plms':
    return samplers.plms_sample(model_fn, x, schedule, num_steps, **kwargs)
  return samplers.dpm_solver_sample(model_fn, x, schedule, num_steps, **kwargs)


@pytest.mark.parametrize('name', ['ddpm', 'ddim', 'plms', 'dpm_solver'])
def test_x0_and_v_parameterisations_of_the_same_model_give_the_same_samples(small_schedule, x_T, name):
  x = jnp.asarray(x_T)
  reference = run_sampler(name, toy_model, x, small_schedule, 10)
  for parameterization in ('x0', 'v'):
    out = run_sampler(name, equivalent_model(small_schedule, parameterization), x, small_schedule, 10,
                      parameterization=parameterization)
    np.testing.assert_allclose(out, reference, atol=1e-4, err_msg=parameterization)


@pytest.mark.parametrize('name', ['ddpm', 'ddim', 'plms', 'dpm_solver'])
def test_unknown_parameterization_raises_value_error_naming_it(small_schedule, name):
  with pytest.raises(ValueError, match="'score'"):
    run_sampler(name, toy_model, jnp.zeros((1, 2, 2, 1)), small_schedule, 5, parameterization='score')


def test_ddim_sample_with_zero_eps_scales_by_sqrt_alpha_ratio(schedule):
  """eps = 0 makes every step x <- sqrt(a_prev / a) x: the product telescopes."""
  x = jnp.ones((1, 2, 2, 1))
  out = samplers.ddim_sample(lambda x, t: jnp.zeros_like(x), x, jax.random.PRNGKey(0), schedule, 10)
  first = samplers.ddim_timesteps(T, 10)[-1]
  alphacums = np.asarray(schedule.alphas_cumprod, np.float64)
  np.testing.assert_allclose(out, np.sqrt(alphacums[0] / alphacums[first]), rtol=1e-5)


def test_ddim_sample_with_eta_is_deterministic_per_rng_and_differs_across_rngs(small_schedule, x_T):
  sample = jax.jit(lambda key: samplers.ddim_sample(toy_model, jnp.asarray(x_T), key, small_schedule,
                                                    10, eta=1.0))
  first, again, other = sample(jax.random.PRNGKey(1)), sample(jax.random.PRNGKey(1)), sample(
      jax.random.PRNGKey(2))
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)
  assert np.all(np.isfinite(first))


# img2img (SDEdit): diffusers' StableDiffusionImg2ImgPipeline picks the timesteps (get_timesteps, run
# here on a bare object holding the scheduler) and noises the image (scheduler.add_noise at the first of
# them); the loop is then its plain scheduler loop.


def diffusers_img2img_trajectory(scheduler, num_steps, strength, x0_init, noise, step_kwargs=lambda i: {}):
  pipeline = types.SimpleNamespace(scheduler=scheduler)
  scheduler.set_timesteps(num_steps)
  timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(pipeline, num_steps, strength, 'cpu')
  x = scheduler.add_noise(to_torch(x0_init), to_torch(noise), timesteps[:1])
  trajectory = []
  for i, t in enumerate(timesteps):
    x = scheduler.step(toy_model_torch(x, int(t)), int(t), x, **step_kwargs(i)).prev_sample
    trajectory.append(to_nhwc(x))
  return np.stack(trajectory)


@pytest.fixture(scope='module')
def x0_init():
  return np.random.default_rng(2).uniform(-1, 1, size=SHAPE).astype(np.float32)


@pytest.mark.parametrize('strength', [0.3, 0.75, 1.0])
@pytest.mark.parametrize('eta', [0.0, 1.0])
def test_img2img_ddim_equals_diffusers_img2img_pipeline_loop(schedule, x_T, x0_init, strength, eta):
  rng = jax.random.PRNGKey(8)
  ours = samplers.ddim_sample(toy_model, jnp.asarray(x_T), rng, schedule, 50, eta,
                              x0_init=jnp.asarray(x0_init), strength=strength, return_intermediates=True)
  scheduler = DDIMScheduler(**DIFFUSERS_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
  kept = int(50 * strength)
  noise = step_noise(rng, kept)
  theirs = diffusers_img2img_trajectory(scheduler, 50, strength, x0_init, x_T,
                                        lambda i: dict(eta=eta, variance_noise=noise[i] if eta else None))
  assert len(theirs) == kept
  assert_same_trajectory(ours, theirs)


@pytest.mark.parametrize('strength', [0.3, 1.0])
def test_img2img_dpm_solver_equals_diffusers_img2img_pipeline_loop(schedule, x_T, x0_init, strength):
  """diffusers starts the multistep solver at set_begin_index with its first-order step, as ours."""
  ours = samplers.dpm_solver_sample(toy_model, jnp.asarray(x_T), schedule, 20, x0_init=jnp.asarray(x0_init),
                                    strength=strength, return_intermediates=True)
  scheduler = DPMSolverMultistepScheduler(**DIFFUSERS_SCHEDULE, algorithm_type='dpmsolver++', solver_order=2)
  assert_same_trajectory(ours, diffusers_img2img_trajectory(scheduler, 20, strength, x0_init, x_T))


def test_img2img_plms_at_strength_one_equals_diffusers_pndm_img2img_loop(schedule, x_T, x0_init):
  """Below strength 1, diffusers' PNDM runs one step more than int(strength * S): get_timesteps slices
  its 51-entry list, which holds its second timestep twice (for the pseudo improved-Euler start). At
  strength 1 both run every step from the image noised to the top timestep: ours are its last 50."""
  ours = samplers.plms_sample(toy_model, jnp.asarray(x_T), schedule, 50, x0_init=jnp.asarray(x0_init),
                              strength=1.0, return_intermediates=True)
  scheduler = PNDMScheduler(**DIFFUSERS_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
  assert_same_trajectory(ours, diffusers_img2img_trajectory(scheduler, 50, 1.0, x0_init, x_T)[1:])


def test_img2img_respaced_ddpm_equals_diffusers_img2img_pipeline_loop(schedule, x_T, x0_init, monkeypatch):
  rng = jax.random.PRNGKey(9)
  ours = samplers.ddpm_sample(toy_model, jnp.asarray(x_T), rng, schedule, 50, x0_init=jnp.asarray(x0_init),
                              strength=0.5, return_intermediates=True)
  scheduler = DDPMScheduler(**DIFFUSERS_SCHEDULE, variance_type='fixed_small', clip_sample=False)
  noise = iter(step_noise(rng, 25))
  monkeypatch.setattr(diffusers.schedulers.scheduling_ddpm, 'randn_tensor', lambda *a, **k: next(noise))
  assert_same_trajectory(ours, diffusers_img2img_trajectory(scheduler, 50, 0.5, x0_init, x_T))


@pytest.mark.parametrize('name', ['ddim', 'plms', 'dpm_solver', 'ddpm'])
def test_img2img_at_the_least_strength_runs_one_step_from_the_slightly_noised_image(small_schedule, x_T,
                                                                                    x0_init, name):
  """strength 1/S: one step, from the image noised to the lowest visited timestep. Every sampler then
  returns close to the image (the toy model's eps is far from the noise), and far from plain sampling."""
  sample = {'ddim': lambda **k: samplers.ddim_sample(toy_model, jnp.asarray(x_T), jax.random.PRNGKey(0),
                                                     small_schedule, 10, **k),
            'plms': lambda **k: samplers.plms_sample(toy_model, jnp.asarray(x_T), small_schedule, 10, **k),
            'dpm_solver': lambda **k: samplers.dpm_solver_sample(toy_model, jnp.asarray(x_T), small_schedule,
                                                                 10, **k),
            'ddpm': lambda **k: samplers.ddpm_sample(toy_model, jnp.asarray(x_T), jax.random.PRNGKey(0),
                                                     small_schedule, 10, **k)}[name]
  one_step = np.asarray(sample(x0_init=jnp.asarray(x0_init), strength=0.1, return_intermediates=True)[1])
  assert one_step.shape == (1,) + SHAPE
  close = np.abs(one_step[0] - x0_init).mean()
  assert close < 0.15, close
  assert np.abs(np.asarray(sample()) - x0_init).mean() > 4 * close


@pytest.mark.parametrize('strength, message', [(0.0, r'\(0, 1\]'), (1.5, r'\(0, 1\]'),
                                               (0.01, 'the least that runs one is 0.1$')])
def test_img2img_strength_outside_0_1_or_running_no_step_raises_naming_it(small_schedule, strength, message):
  x = jnp.zeros((1, 2, 2, 1))
  with pytest.raises(samplers.StrengthError, match=message):
    samplers.ddim_sample(toy_model, x, jax.random.PRNGKey(0), small_schedule, 10, x0_init=x, strength=strength)


@pytest.mark.parametrize('num_steps', [3, 7, 10, 49, 50, 999])
def test_the_least_strength_the_error_names_runs_exactly_one_step(num_steps):
  with pytest.raises(samplers.StrengthError, match='the least that runs one is') as error:
    samplers.img2img_steps(num_steps, 0.5 / num_steps)
  least = float(str(error.value).rsplit(' ', 1)[1])
  assert samplers.img2img_steps(num_steps, least) == 1


def test_masked_ddim_keeps_the_known_region_and_samples_the_rest(small_schedule, x_T):
  """With an elementwise model the two regions evolve independently: where mask = 0 the samples
  equal unmasked DDIM; where mask = 1 they are one DDIM step from q_sample(x0_known, t_1) with the
  documented forward noise of the last step."""
  rng = jax.random.PRNGKey(7)
  mask = jnp.zeros(SHAPE[:3] + (1,)).at[:, :, :4].set(1.0)  # the left half is known
  x0_known = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, size=SHAPE), jnp.float32)
  masked = samplers.ddim_sample(toy_model, jnp.asarray(x_T), rng, small_schedule, 10, mask=mask,
                                x0_known=x0_known)
  plain = samplers.ddim_sample(toy_model, jnp.asarray(x_T), rng, small_schedule, 10)
  np.testing.assert_array_equal(np.asarray(masked)[:, :, 4:], np.asarray(plain)[:, :, 4:])

  t_1 = int(samplers.ddim_timesteps(100, 10)[0])
  forward_noise = jax.random.normal(jax.random.split(jax.random.fold_in(rng, 1), 10)[-1], SHAPE)
  t = jnp.full((SHAPE[0],), t_1, jnp.int32)
  x = process.q_sample(small_schedule, x0_known, t, forward_noise)
  eps = toy_model(x, t)
  a, a_prev = float(small_schedule.alphas_cumprod[t_1]), float(small_schedule.alphas_cumprod[0])
  expected = np.sqrt(a_prev) * (x - np.sqrt(1 - a) * eps) / np.sqrt(a) + np.sqrt(1 - a_prev) * eps
  np.testing.assert_allclose(np.asarray(masked)[:, :, :4], np.asarray(expected)[:, :, :4], atol=1e-5)
  assert np.abs(np.asarray(masked)[:, :, :4] - np.asarray(x0_known)[:, :, :4]).max() < 0.3
  assert np.abs(np.asarray(plain)[:, :, :4] - np.asarray(x0_known)[:, :, :4]).max() > 0.5


def test_masked_ddim_needs_both_mask_and_known_latents(small_schedule):
  x = jnp.zeros((1, 2, 2, 1))
  with pytest.raises(ValueError, match='x0_known'):
    samplers.ddim_sample(toy_model, x, jax.random.PRNGKey(0), small_schedule, 5, mask=x)


def test_plms_calls_the_model_num_steps_plus_one_times(small_schedule):
  calls = []

  def model_fn(x, t):
    jax.debug.callback(lambda t: calls.append(int(t[0])), t)
    return toy_model(x, t)

  jax.block_until_ready(samplers.plms_sample(model_fn, jnp.zeros((1, 2, 2, 1)), small_schedule, 10))
  jax.effects_barrier()
  timesteps = samplers.ddim_timesteps(100, 10)[::-1]
  # The paper: the first timestep, the second one at the Euler prediction, then each step's own.
  assert calls == [int(timesteps[0])] + [int(t) for t in timesteps[1:2]] + [int(t) for t in timesteps[1:]]


@pytest.mark.parametrize('name', ['ddpm', 'ddim', 'plms', 'dpm_solver'])
def test_jitted_sampler_traces_once_per_shape_and_num_steps(small_schedule, name):
  traces = []

  def model_fn(x, t):
    traces.append(x.shape)
    return toy_model(x, t)

  sample = jax.jit(lambda x, *, num_steps: run_sampler(name, model_fn, x, small_schedule, num_steps),
                   static_argnames='num_steps')
  x = jnp.zeros((2, 4, 4, 3))
  first = sample(x, num_steps=10)
  sample(x + 1.0, num_steps=10)
  assert len(traces) == 1
  sample(x, num_steps=20)
  assert len(traces) == 2
  sample(x[:1], num_steps=20)
  assert len(traces) == 3
  assert np.all(np.isfinite(first))
  jaxpr = str(jax.make_jaxpr(lambda x: run_sampler(name, toy_model, x, small_schedule, 10))(x))
  assert jaxpr.count('scan[') == 1
