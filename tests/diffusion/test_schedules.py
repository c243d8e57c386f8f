"""Tests for diffusion/schedules.py against diffusers' DDPMScheduler and the paper's own
make_beta_schedule and register_schedule (the `ldm` package, PyTorch)."""

import ast
import importlib.util
import pathlib
import types
from functools import partial

import jax
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.util import exists

from latent_diffusion.diffusion import schedules


def test_linear_schedule_equals_diffusers_scaled_linear():
  """The paper's 'linear' is linear in sqrt(beta): diffusers calls the same thing 'scaled_linear'."""
  ours = schedules.make_betas('linear', 1000, linear_start=0.0015, linear_end=0.0155)
  reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0155,
                            beta_schedule='scaled_linear')
  assert ours.shape == (1000,) and ours.dtype == np.float64
  # diffusers computes in float32.
  np.testing.assert_allclose(ours, reference.betas.numpy(), rtol=1e-6)
  assert ours[0] == pytest.approx(0.0015) and ours[-1] == pytest.approx(0.0155)


def test_cosine_schedule_equals_diffusers_squaredcos_cap_v2():
  """diffusers' squaredcos_cap_v2 discretises alpha_bar(t) = cos((t + 0.008) / 1.008 * pi/2)^2 and caps
  betas at 0.999: the paper's cosine schedule with s = 0.008 (its division by alphas[0] cancels in
  the ratio alphas[t+1] / alphas[t])."""
  ours = schedules.make_betas('cosine', 1000, cosine_s=8e-3)
  reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule='squaredcos_cap_v2')
  np.testing.assert_allclose(ours, reference.betas.numpy(), rtol=1e-5, atol=1e-7)
  assert ours.max() == pytest.approx(0.999)  # the cap is reached at the last step


def test_cosine_schedule_matches_papers_formula_for_other_offsets():
  timesteps, s = 50, 0.02
  steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps + s
  alphas_cumprod = np.cos(steps / (1 + s) * np.pi / 2) ** 2
  alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
  expected = np.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0, 0.999)
  np.testing.assert_allclose(schedules.make_betas('cosine', timesteps, cosine_s=s), expected, rtol=1e-12)


def test_sqrt_linear_and_sqrt_schedules_match_papers_formulas():
  linear = np.linspace(1e-4, 2e-2, 10)
  np.testing.assert_allclose(schedules.make_betas('sqrt_linear', 10), linear, rtol=1e-12)
  np.testing.assert_allclose(schedules.make_betas('sqrt', 10), np.sqrt(linear), rtol=1e-12)


def test_unknown_schedule_raises_value_error_naming_it():
  with pytest.raises(ValueError, match="'quadratic'"):
    schedules.make_betas('quadratic', 10)


@pytest.fixture(scope='module')
def schedule_and_betas():
  betas = schedules.make_betas('linear', 1000, 0.0015, 0.0155)
  return schedules.make_schedule(betas), betas


def test_alphas_cumprod_equal_diffusers(schedule_and_betas):
  schedule, _ = schedule_and_betas
  reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0155,
                            beta_schedule='scaled_linear')
  np.testing.assert_allclose(schedule.alphas_cumprod, reference.alphas_cumprod.numpy(), rtol=1e-5)


def test_schedule_arrays_are_consistent_with_betas(schedule_and_betas):
  schedule, betas = schedule_and_betas
  a = np.cumprod(1 - betas)
  a_prev = np.concatenate([[1.0], a[:-1]])
  variance = betas * (1 - a_prev) / (1 - a)
  expected = {
      'betas': betas,
      'alphas_cumprod': a,
      'alphas_cumprod_prev': a_prev,
      'sqrt_alphas_cumprod': np.sqrt(a),
      'sqrt_one_minus_alphas_cumprod': np.sqrt(1 - a),
      'sqrt_recip_alphas_cumprod': 1 / np.sqrt(a),
      'sqrt_recipm1_alphas_cumprod': np.sqrt(1 / a - 1),
      'posterior_variance': variance,
      'posterior_log_variance_clipped': np.log(np.maximum(variance, 1e-20)),
      'posterior_mean_coef1': betas * np.sqrt(a_prev) / (1 - a),
      'posterior_mean_coef2': (1 - a_prev) * np.sqrt(1 - betas) / (1 - a),
  }
  for name, values in expected.items():
    array = getattr(schedule, name)
    assert array.shape == (1000,) and array.dtype == np.float32, name
    np.testing.assert_allclose(array, values, rtol=1e-5, err_msg=name)
  assert schedule.num_timesteps == 1000


def test_posterior_variance_is_zero_at_t0_and_its_log_is_clipped(schedule_and_betas):
  schedule, _ = schedule_and_betas
  assert float(schedule.posterior_variance[0]) == 0.0
  assert float(schedule.posterior_log_variance_clipped[0]) == pytest.approx(np.log(1e-20), rel=1e-6)
  assert np.all(np.isfinite(schedule.posterior_log_variance_clipped))


def test_posterior_mean_coefficients_recover_x0_when_xt_is_noise_free(schedule_and_betas):
  """If x_t = sqrt(a_t) x0 exactly, the posterior mean is sqrt(a_{t-1}) x0."""
  schedule, _ = schedule_and_betas
  a = np.asarray(schedule.alphas_cumprod, np.float64)
  coef = (np.asarray(schedule.posterior_mean_coef1) + np.asarray(schedule.posterior_mean_coef2)
          * np.sqrt(a))
  np.testing.assert_allclose(coef, np.asarray(schedule.alphas_cumprod_prev, np.float64) ** 0.5,
                             rtol=1e-5)


def test_v_posterior_mixes_posterior_variance_with_beta():
  betas = schedules.make_betas('linear', 20)
  plain, mixed = schedules.make_schedule(betas), schedules.make_schedule(betas, v_posterior=0.25)
  np.testing.assert_allclose(mixed.posterior_variance,
                             0.75 * np.asarray(plain.posterior_variance) + 0.25 * betas, rtol=1e-6)


def test_schedule_is_a_pytree_usable_under_jit(schedule_and_betas):
  schedule, _ = schedule_and_betas
  assert len(jax.tree.leaves(schedule)) == 11
  total = jax.jit(lambda s: s.betas.sum())(schedule)
  np.testing.assert_allclose(total, np.asarray(schedule.betas, np.float64).sum(), rtol=1e-5)


def test_schedule_from_config_uses_the_diffusion_fields():
  config = ml_collections.ConfigDict(dict(timesteps=100, beta_schedule='sqrt_linear',
                                          linear_start=1e-3, linear_end=3e-2, cosine_s=8e-3))
  schedule = schedules.schedule_from_config(config)
  np.testing.assert_allclose(schedule.betas, np.linspace(1e-3, 3e-2, 100), rtol=1e-6)


# Parity with the paper's code, run live.


@pytest.mark.parametrize('name,timesteps,start,end,cosine_s', [
    ('linear', 777, 0.00085, 0.012, 8e-3),
    ('sqrt_linear', 500, 2e-4, 3e-2, 8e-3),
    ('sqrt', 300, 5e-5, 4e-3, 8e-3),
    ('cosine', 640, 1e-4, 2e-2, 1.5e-2),
])
def test_betas_equal_papers_make_beta_schedule(name, timesteps, start, end, cosine_s):
  ours = schedules.make_betas(name, timesteps, start, end, cosine_s)
  paper = np.asarray(make_beta_schedule(name, timesteps, linear_start=start, linear_end=end,
                                        cosine_s=cosine_s))
  assert ours.dtype == np.float64 and paper.dtype == np.float64 and ours.shape == (timesteps,)
  np.testing.assert_allclose(ours, paper, rtol=1e-12, atol=0)


LDM_DDPM = pathlib.Path(importlib.util.find_spec('ldm').origin).parent / 'models/diffusion/ddpm.py'


def papers_register_schedule():
  """DDPM.register_schedule compiled from the `ldm` package's source: importing its module needs
  pytorch_lightning and a working torchvision."""
  tree = ast.parse(LDM_DDPM.read_text())
  cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == 'DDPM')
  fn = next(node for node in cls.body
            if isinstance(node, ast.FunctionDef) and node.name == 'register_schedule')
  namespace = dict(np=np, torch=torch, partial=partial, make_beta_schedule=make_beta_schedule,
                   exists=exists)
  exec(compile(ast.Module(body=[fn], type_ignores=[]), str(LDM_DDPM), 'exec'), namespace)
  return namespace['register_schedule']


@pytest.mark.parametrize('name,v_posterior', [('linear', 0.0), ('linear', 0.2), ('cosine', 0.5),
                                              ('sqrt_linear', 0.1)])
def test_schedule_arrays_equal_papers_register_schedule(name, v_posterior):
  paper = torch.nn.Module()
  paper.parameterization, paper.v_posterior = 'eps', v_posterior
  types.MethodType(papers_register_schedule(), paper)(
      beta_schedule=name, timesteps=250, linear_start=3e-4, linear_end=2.5e-2, cosine_s=1e-2)
  ours = schedules.make_schedule(schedules.make_betas(name, 250, 3e-4, 2.5e-2, 1e-2), v_posterior)
  fields = [field for field in ours.__dataclass_fields__]
  assert set(fields) <= set(dict(paper.named_buffers()))
  for field in fields:
    expected = getattr(paper, field).numpy()
    assert expected.dtype == np.float32
    # Both compute in float64 and store float32: equal up to float32 rounding.
    np.testing.assert_allclose(getattr(ours, field), expected, rtol=1e-6, atol=0, err_msg=field)
  assert paper.num_timesteps == ours.num_timesteps == 250
