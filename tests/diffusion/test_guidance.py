"""Tests for diffusion/guidance.py with a toy conditional denoiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion.diffusion import guidance, process, samplers, schedules

B, L, D = 3, 4, 5


def toy_apply(calls=None):
  """A denoiser whose output depends on x, t and every conditioning leaf, per example."""
  def apply_fn(x, t, cond):
    if calls is not None:
      calls.append(x.shape[0])
    per_example = (cond['context'].sum(axis=(1, 2)) + 0.5 * cond['y'].astype(jnp.float32)
                   + cond['concat'].mean(axis=(1, 2, 3)))
    per_example = per_example + 0.01 * t.astype(jnp.float32)
    return 0.9 * x + per_example[:, None, None, None] * jnp.sin(x)
  return apply_fn


def conditions(seed, batch=B):
  rng = np.random.default_rng(seed)
  return {'context': jnp.asarray(rng.normal(size=(batch, L, D)), jnp.float32),
          'y': jnp.asarray(rng.integers(0, 10, size=(batch,)), jnp.int32),
          'concat': jnp.asarray(rng.normal(size=(batch, 2, 2, 1)), jnp.float32)}


@pytest.fixture
def inputs():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, 2, 2, 3)), jnp.float32)
  return x, jnp.array([5, 500, 999], jnp.int32)


@pytest.mark.parametrize('scale', [0.0, 3.0, 7.5])
def test_guided_output_is_unconditional_plus_scale_times_difference(inputs, scale):
  x, t = inputs
  cond, uncond = conditions(1), conditions(2)
  apply_fn = toy_apply()
  guided = guidance.classifier_free_guidance(apply_fn, cond, uncond, scale)(x, t)
  c, u = apply_fn(x, t, cond), apply_fn(x, t, uncond)
  np.testing.assert_allclose(guided, u + scale * (c - u), rtol=1e-5, atol=1e-5)
  if scale == 0.0:
    np.testing.assert_allclose(guided, u, rtol=1e-6)


def test_guidance_calls_the_model_once_on_the_doubled_batch(inputs):
  x, t = inputs
  calls = []
  model_fn = guidance.classifier_free_guidance(toy_apply(calls), conditions(1), conditions(2), 5.0)
  model_fn(x, t)
  assert calls == [2 * B]


def test_scale_one_calls_the_conditional_model_only_once_on_the_batch(inputs):
  x, t = inputs
  calls = []
  cond = conditions(1)
  guided = guidance.classifier_free_guidance(toy_apply(calls), cond, conditions(2), 1.0)(x, t)
  assert calls == [B]
  np.testing.assert_allclose(guided, toy_apply()(x, t, cond), rtol=1e-6)


def test_unconditional_with_batch_one_is_shared_by_every_example(inputs):
  x, t = inputs
  cond, single = conditions(1), conditions(3, batch=1)
  repeated = jax.tree.map(lambda a: jnp.repeat(a, B, axis=0), single)
  shared = guidance.classifier_free_guidance(toy_apply(), cond, single, 4.0)(x, t)
  expected = guidance.classifier_free_guidance(toy_apply(), cond, repeated, 4.0)(x, t)
  np.testing.assert_allclose(shared, expected, rtol=1e-6)


def test_guidance_works_under_jit_with_a_traced_scale(inputs):
  x, t = inputs
  cond, uncond = conditions(1), conditions(2)
  guided = jax.jit(lambda s: guidance.classifier_free_guidance(toy_apply(), cond, uncond, s)(x, t))
  c, u = toy_apply()(x, t, cond), toy_apply()(x, t, uncond)
  np.testing.assert_allclose(guided(jnp.float32(2.0)), u + 2.0 * (c - u), rtol=1e-5, atol=1e-5)


def linear_eps_model(x, t):
  """eps = 0.1 x, whatever t: the clean estimate is then c_t x, linear in x."""
  del t
  return 0.1 * x


def test_image_guidance_adds_the_scaled_gradient_of_the_measurement_loss():
  schedule = schedules.make_schedule(schedules.make_betas('linear', 100, 0.0015, 0.0195))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3, 3, 2)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(2, 3, 3, 2)), jnp.float32)
  t = jnp.asarray([10, 70], jnp.int32)
  guided = guidance.image_guidance(linear_eps_model, schedule, 'eps', lambda x0: 2.0 * x0 - y, scale=0.3)(x, t)
  # By hand: x0 = c x with c = (1 - 0.1 sqrt(1 - a)) / sqrt(a); the loss 1/2 ||2 c x - y||^2 has gradient
  # 2 c (2 c x - y), and eps moves by scale sqrt(1 - a) times it.
  a = np.asarray(schedule.alphas_cumprod)[np.asarray(t)][:, None, None, None]
  c = (1 - 0.1 * np.sqrt(1 - a)) / np.sqrt(a)
  expected = 0.1 * x + 0.3 * np.sqrt(1 - a) * 2 * c * (2 * c * x - y)
  np.testing.assert_allclose(guided, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('parameterization', ['x0', 'v'])
def test_image_guidance_returns_the_same_step_in_every_parameterization(parameterization):
  """A model in x0 or v units that implies the same eps is guided to the same eps."""
  schedule = schedules.make_schedule(schedules.make_betas('linear', 100, 0.0015, 0.0195))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 3))
  t = jnp.asarray([5, 90], jnp.int32)
  y = jax.random.normal(jax.random.PRNGKey(1), (2, 2, 2, 3))
  residual_fn = lambda x0: jax.image.resize(jnp.tanh(x0), (2, 2, 2, 3), 'linear') - y

  def in_units(x, t):
    eps = jnp.sin(x)
    x0 = process.predict_x0_from_eps(schedule, x, t, eps)
    return x0 if parameterization == 'x0' else process.v_target(schedule, x0, eps, t)

  eps_guided = guidance.image_guidance(lambda x, t: jnp.sin(x), schedule, 'eps', residual_fn, 2.0)(x, t)
  other = guidance.image_guidance(in_units, schedule, parameterization, residual_fn, 2.0)(x, t)
  other_eps, _ = process.eps_and_x0(schedule, parameterization, x, t, other)
  np.testing.assert_allclose(other_eps, eps_guided, rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(eps_guided - jnp.sin(x)).mean()) > 1e-3  # the guidance did move eps


def test_image_guidance_steers_ddim_towards_the_measurement():
  """A prior that knows nothing of y (eps = 0.1 x) lands far from it; guided, it lands near it."""
  schedule = schedules.make_schedule(schedules.make_betas('linear', 100, 0.0015, 0.0195))
  y = jax.random.normal(jax.random.PRNGKey(3), (4, 2, 2, 1))
  residual_fn = lambda x0: jax.image.resize(x0, (4, 2, 2, 1), 'linear', antialias=True) - y
  x_T = jax.random.normal(jax.random.PRNGKey(4), (4, 8, 8, 1))

  def error(scale):
    model_fn = guidance.image_guidance(linear_eps_model, schedule, 'eps', residual_fn, scale)
    x0 = samplers.ddim_sample(model_fn, x_T, jax.random.PRNGKey(5), schedule, 20)
    return float(jnp.sqrt(jnp.mean(jnp.square(residual_fn(x0)))))

  errors = [error(scale) for scale in (0.0, 16.0, 64.0)]
  assert errors[2] < errors[1] < errors[0] and errors[2] < 0.5 * errors[0], errors
