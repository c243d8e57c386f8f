"""Tests for train/autoencoder.py: the stage-1 loss and a pure, learning train step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from latent_diffusion.train import autoencoder as stage1
from latent_diffusion.train import common


def tiny_config():
  config = base.get_config()
  config.data.image_size = 16
  config.autoencoder.ch = 32
  config.autoencoder.ch_mult = (1, 2)
  config.autoencoder.num_res_blocks = 1
  config.autoencoder_train.learning_rate = 1e-3
  return config


def images(seed=0, batch=2):
  return jax.random.uniform(jax.random.PRNGKey(seed), (batch, 16, 16, 3), minval=-1, maxval=1)


def test_loss_is_summed_pixel_loss_per_image_plus_weighted_kl(make_random_params):
  config = tiny_config()
  model = stage1.build_autoencoder(config)
  params = make_random_params(jax.eval_shape(functools.partial(stage1.init_params, model, config),
                                             jax.random.PRNGKey(0)))
  x, rng = images(), jax.random.PRNGKey(1)
  loss, metrics = jax.jit(lambda p: stage1.autoencoder_loss(model, p, x, rng, config.autoencoder_loss))(params)

  @jax.jit
  def reference(p):
    reconstruction, posterior = model.apply({'params': p}, x, rng=jax.random.split(rng)[0])
    return reconstruction, posterior.kl()

  reconstruction, kl = reference(params)
  expected_rec = np.abs(np.asarray(reconstruction) - np.asarray(x)).sum() / 2
  expected_kl = np.asarray(kl).sum() / 2
  np.testing.assert_allclose(metrics['rec_loss'], expected_rec, rtol=1e-5)
  np.testing.assert_allclose(metrics['kl_loss'], expected_kl, rtol=1e-5)
  np.testing.assert_allclose(loss, expected_rec + 1e-6 * expected_kl, rtol=1e-5)


def initial_state_and_step(config, tx=None):
  """(model, fresh train state, jitted train step) for a config; tx defaults to the stage's own."""
  model = stage1.build_autoencoder(config)
  tx = tx or stage1.make_optimizer(config.autoencoder_train)
  state = stage1.create_state(model, config, jax.random.PRNGKey(0), tx)
  step = jax.jit(functools.partial(stage1.train_step, model=model, tx=tx,
                                   loss_config=config.autoencoder_loss, deterministic=True))
  return model, state, step


@pytest.fixture(scope='module')
def tiny_state_and_step():
  """One compiled step of tiny_config() shared by the tests that use the stage's own optimizer."""
  return initial_state_and_step(tiny_config())[1:]


def test_train_step_is_pure_and_reduces_the_loss_on_a_fixed_batch(tiny_state_and_step):
  state, step = tiny_state_and_step
  batch = {'image': images(batch=4)}
  again, first_metrics = step(state, batch)
  repeat, repeat_metrics = step(state, batch)  # same inputs, same outputs: no hidden state
  np.testing.assert_array_equal(first_metrics['loss'], repeat_metrics['loss'])
  jax.tree.map(np.testing.assert_array_equal, again.params, repeat.params)
  state, losses = again, [float(first_metrics['loss'])]
  for _ in range(11):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert int(state.step) == 12
  assert losses[-1] < 0.85 * losses[0], losses


def test_a_nan_in_the_batch_skips_the_update_and_training_goes_on(tiny_state_and_step):
  state, step = tiny_state_and_step
  poisoned = images(batch=4).at[1, 3, 5, 0].set(jnp.nan)
  skipped, metrics = step(state, {'image': poisoned})
  assert float(metrics['nonfinite']) == 1.0 and not np.isfinite(float(metrics['loss']))
  assert int(skipped.step) == 1
  for before, after in ((state.params, skipped.params), (state.opt_state, skipped.opt_state)):
    jax.tree.map(np.testing.assert_array_equal, after, before)
  recovered, metrics = step(skipped, {'image': images(batch=4)})
  assert float(metrics['nonfinite']) == 0.0
  assert not np.array_equal(recovered.params['decoder']['conv_out']['kernel'],
                            state.params['decoder']['conv_out']['kernel'])


def test_accumulating_two_steps_applies_one_update_of_the_averaged_gradients():
  """With SGD, so that the comparison is linear: Adam would turn float noise in the ~zero gradients
  of biases before a GroupNorm into +-lr updates."""
  config = tiny_config()
  with config.unlocked():
    config.autoencoder_train.accumulate_grad_batches = 2
  assert isinstance(stage1.make_optimizer(config.autoencoder_train).init({'w': jnp.zeros(2)}),
                    optax.MultiStepsState)  # the stage's Adam is wrapped too
  model, state, step = initial_state_and_step(
      config, common.accumulate_gradients(optax.sgd(0.1), config.autoencoder_train))
  first, _ = step(state, {'image': images(seed=1, batch=2)})
  jax.tree.map(np.testing.assert_array_equal, first.params, state.params)  # only accumulated
  second, _ = step(first, {'image': images(seed=2, batch=2)})

  @jax.jit
  def grads(params):  # the two micro-batches with the keys of steps 0 and 1
    loss = lambda p, seed, index: stage1.autoencoder_loss(
        model, p, images(seed=seed, batch=2), jax.random.fold_in(state.rng, index),
        config.autoencoder_loss)[0]
    return jax.grad(lambda p: (loss(p, 1, 0) + loss(p, 2, 1)) / 2)(params)

  expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads(state.params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               second.params, expected)
  assert int(second.step) == 2
