"""Tests for diffusion/process.py against diffusers' DDPMScheduler, numpy formulas and the paper's own
DDPM/LatentDiffusion methods (register_schedule, q_sample, get_v, p_losses of the `ldm` package, run
in PyTorch on a stand-in module)."""

import ast
import importlib.util
import pathlib
import types
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.util import default, exists

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


# The paper's DDPM methods, run live. Importing ldm.models.diffusion.ddpm needs pytorch_lightning and
# a working torchvision, so its methods are compiled from the installed source file instead.

LDM_DDPM = pathlib.Path(importlib.util.find_spec('ldm').origin).parent / 'models/diffusion/ddpm.py'


def paper_method(class_name, method_name):
  """The function `class_name.method_name` of the `ldm` package's ddpm.py, compiled from its source."""
  tree = ast.parse(LDM_DDPM.read_text())
  cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name)
  fn = next(node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == method_name)
  namespace = dict(np=np, torch=torch, partial=partial, make_beta_schedule=make_beta_schedule,
                   extract_into_tensor=extract_into_tensor, default=default, exists=exists)
  exec(compile(ast.Module(body=[fn], type_ignores=[]), str(LDM_DDPM), 'exec'), namespace)
  return namespace[method_name]


class PaperDiffusion(torch.nn.Module):
  """Just enough of the paper's LatentDiffusion for register_schedule and p_losses."""

  def __init__(self, parameterization, betas, v_posterior=0.0, loss_type='l2', logvar=None,
               l_simple_weight=1.0, original_elbo_weight=0.0, output=None):
    super().__init__()
    self.parameterization, self.v_posterior, self.loss_type = parameterization, v_posterior, loss_type
    self.l_simple_weight, self.original_elbo_weight = l_simple_weight, original_elbo_weight
    self.training, self.device = True, torch.device('cpu')
    for name in ('register_schedule', 'q_sample', 'get_v', 'get_loss'):
      setattr(self, name, types.MethodType(paper_method('DDPM', name), self))
    self.p_losses = types.MethodType(paper_method('LatentDiffusion', 'p_losses'), self)
    self.register_schedule(given_betas=betas)
    self.logvar = logvar
    self.learn_logvar = logvar is not None and logvar.requires_grad
    self.output = output

  def apply_model(self, x_noisy, t, cond):
    return self.output


@pytest.fixture(scope='module')
def betas():
  return schedules.make_betas('linear', T, 0.0015, 0.0155)


def nhwc_to_nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@pytest.mark.parametrize('v_posterior', [0.0, 0.3])
@pytest.mark.parametrize('parameterization', ['eps', 'x0', 'v'])
def test_lvlb_weights_equal_papers_register_schedule(betas, parameterization, v_posterior):
  paper = PaperDiffusion(parameterization, betas, v_posterior=v_posterior)
  ours = process.lvlb_weights(schedules.make_schedule(betas, v_posterior), parameterization)
  assert ours.shape == (T,) and ours.dtype == jnp.float32
  np.testing.assert_allclose(ours, paper.lvlb_weights.numpy(), rtol=2e-5)
  assert ours[0] == ours[1]


def test_lvlb_weights_unknown_parameterization_raises_value_error_naming_it(schedule):
  with pytest.raises(ValueError, match="'mu'"):
    process.lvlb_weights(schedule, 'mu')


def test_v_target_and_v_conversions_equal_papers_methods(schedule, betas):
  paper = PaperDiffusion('v', betas)
  x0, noise = arrays(20)
  t = np.array([0, 3, 480, 999])
  x_t = process.q_sample(schedule, jnp.asarray(x0), jnp.asarray(t), jnp.asarray(noise))
  v = process.v_target(schedule, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  t_torch = torch.from_numpy(t)
  expected_v = paper.get_v(torch.from_numpy(x0), torch.from_numpy(noise), t_torch).numpy()
  np.testing.assert_allclose(v, expected_v, atol=1e-6)
  predict_start = paper_method('DDPM', 'predict_start_from_z_and_v')
  predict_eps = paper_method('DDPM', 'predict_eps_from_z_and_v')
  x_t_torch, v_torch = torch.tensor(np.asarray(x_t)), torch.tensor(np.asarray(v))
  np.testing.assert_allclose(process.predict_x0_from_v(schedule, x_t, jnp.asarray(t), v),
                             predict_start(paper, x_t_torch, t_torch, v_torch).numpy(), atol=1e-6)
  np.testing.assert_allclose(process.predict_eps_from_v(schedule, x_t, jnp.asarray(t), v),
                             predict_eps(paper, x_t_torch, t_torch, v_torch).numpy(), atol=1e-6)


@pytest.mark.parametrize('parameterization', ['eps', 'x0', 'v'])
def test_eps_and_x0_recover_noise_and_sample_from_the_training_target(schedule, parameterization):
  """A perfect network outputs the training target; both predictions must then be exact."""
  x0, noise = arrays(30)
  t = jnp.array([1, 200, 600, 900])
  x_t = process.q_sample(schedule, jnp.asarray(x0), t, jnp.asarray(noise))
  target = process.training_target(schedule, parameterization, jnp.asarray(x0), jnp.asarray(noise), t)
  eps, predicted_x0 = process.eps_and_x0(schedule, parameterization, x_t, t, target)
  # Through 1/sqrt(a_t) (~23 at t = 900), float32 rounding of x_t is amplified.
  np.testing.assert_allclose(eps, noise, atol=2e-4)
  np.testing.assert_allclose(predicted_x0, x0, atol=2e-4)


def test_training_targets_are_noise_sample_and_v(schedule):
  x0, noise = arrays(31)
  t = jnp.array([5, 50, 500, 995])
  np.testing.assert_array_equal(process.training_target(schedule, 'eps', x0, noise, t), noise)
  np.testing.assert_array_equal(process.training_target(schedule, 'x0', x0, noise, t), x0)
  a = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(t)][:, None, None, None]
  np.testing.assert_allclose(process.training_target(schedule, 'v', x0, noise, t),
                             np.sqrt(a) * noise - np.sqrt(1 - a) * x0, atol=1e-6)


@pytest.mark.parametrize('function', ['eps_and_x0', 'training_target'])
def test_unknown_parameterization_raises_value_error_naming_it(schedule, function):
  x = jnp.zeros((2, 2, 2, 1))
  with pytest.raises(ValueError, match="'score'"):
    getattr(process, function)(schedule, 'score', x, x, jnp.zeros((2,), jnp.int32))


def paper_p_losses(parameterization, betas, x0, noise, t, output, *, loss_type, logvar,
                   l_simple_weight, original_elbo_weight):
  """The paper's LatentDiffusion.p_losses on NCHW copies; returns (loss, loss_dict, logvar grad)."""
  logvar = torch.tensor(np.asarray(logvar), requires_grad=True)
  paper = PaperDiffusion(parameterization, betas, loss_type=loss_type, logvar=logvar,
                         l_simple_weight=l_simple_weight, original_elbo_weight=original_elbo_weight,
                         output=nhwc_to_nchw(output))
  loss, loss_dict = paper.p_losses(nhwc_to_nchw(x0), None, torch.from_numpy(np.asarray(t)),
                                   noise=nhwc_to_nchw(noise))
  loss.backward()
  return loss, loss_dict, logvar.grad.numpy()


@pytest.mark.parametrize('parameterization,loss_type', [('eps', 'l2'), ('x0', 'l1'), ('v', 'l2'),
                                                        ('eps', 'l1')])
def test_diffusion_loss_equals_papers_p_losses_with_logvar_and_elbo_weight(
    schedule, betas, parameterization, loss_type):
  x0, noise = arrays(40, shape=(4, 4, 4, 3))
  output = np.random.default_rng(41).normal(size=x0.shape).astype(np.float32)
  t = np.array([0, 7, 7, 950])  # a repeated t: its logvar gradient sums two examples
  logvar = np.random.default_rng(42).normal(scale=0.5, size=T).astype(np.float32)
  settings = dict(loss_type=loss_type, l_simple_weight=0.7, original_elbo_weight=0.3)

  def ours(logvar):
    target = process.training_target(schedule, parameterization, jnp.asarray(x0), jnp.asarray(noise),
                                     jnp.asarray(t))
    return process.diffusion_loss(jnp.asarray(output), target, jnp.asarray(t), logvar=logvar,
                                  lvlb_weights=process.lvlb_weights(schedule, parameterization),
                                  **settings)

  (loss, metrics), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logvar))
  paper_loss, paper_dict, paper_grad = paper_p_losses(parameterization, betas, x0, noise, t, output,
                                                      logvar=logvar, **settings)
  np.testing.assert_allclose(loss, paper_loss.item(), rtol=1e-5)
  np.testing.assert_allclose(metrics['loss'], paper_dict['train/loss'].item(), rtol=1e-5)
  np.testing.assert_allclose(metrics['loss_simple'], paper_dict['train/loss_simple'].item(), rtol=1e-5)
  np.testing.assert_allclose(metrics['loss_vlb'], paper_dict['train/loss_vlb'].item(), rtol=1e-5)
  np.testing.assert_allclose(metrics['logvar'], logvar[t].mean(), rtol=1e-6)
  assert all(value.shape == () and value.dtype == jnp.float32 for value in metrics.values())
  # Gradients reach exactly the sampled timesteps' log-variances, and equal torch autograd's.
  np.testing.assert_allclose(grad, paper_grad, rtol=1e-5, atol=1e-7)
  assert set(np.flatnonzero(np.asarray(grad))) == {0, 7, 950}


def test_diffusion_loss_with_zero_logvar_and_no_elbo_is_the_mean_simple_loss():
  output, target = arrays(50)
  t = jnp.array([3, 1, 4, 1])
  loss, metrics = process.diffusion_loss(jnp.asarray(output), jnp.asarray(target), t, loss_type='l2',
                                         logvar=jnp.zeros((10,)))
  np.testing.assert_allclose(loss, np.mean((output - target) ** 2), rtol=1e-6)
  np.testing.assert_allclose(metrics['loss_vlb'], metrics['loss_simple'], rtol=1e-6)


def test_diffusion_loss_refuses_an_elbo_weight_without_lvlb_weights():
  x = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match='lvlb_weights'):
    process.diffusion_loss(x, x, jnp.zeros((2,), jnp.int32), loss_type='l2', logvar=jnp.zeros((5,)),
                           original_elbo_weight=0.1)
