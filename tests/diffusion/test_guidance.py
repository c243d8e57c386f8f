"""Tests for diffusion/guidance.py with a toy conditional denoiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion.diffusion import guidance

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
