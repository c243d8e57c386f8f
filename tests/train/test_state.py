"""Tests for train/state.py: the TrainState pytree, per-step keys and the paper's EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from latent_diffusion.train.state import TrainState, ema_decay, update_ema


def params():
  return {'dense': {'kernel': jnp.array([[1.0, -2.0], [3.0, 0.5]]), 'bias': jnp.array([0.1, -0.1])}}


@pytest.mark.parametrize('num_updates, expected', [
    (0, 0.1),            # (1 + 0) / (10 + 0)
    (1, 2 / 11),
    (10, 11 / 20),
    (90, 91 / 100),
    (100_000, 0.9999),   # capped at the base decay
])
def test_ema_decay_follows_papers_warmup(num_updates, expected):
  decay = ema_decay(0.9999, jnp.asarray(num_updates, jnp.int32))
  assert float(decay) == pytest.approx(expected, rel=1e-6)


def test_ema_decay_never_exceeds_base_decay():
  decays = ema_decay(0.99, jnp.arange(0, 5000, 7))
  assert float(decays.max()) == pytest.approx(0.99)
  assert np.all(np.diff(np.asarray(decays)) >= 0)


def test_update_ema_moves_towards_params_by_one_minus_decay():
  ema = {'w': jnp.array([0.0, 10.0]), 'b': jnp.array(4.0)}
  new = {'w': jnp.array([1.0, 0.0]), 'b': jnp.array(2.0)}
  out = update_ema(ema, new, jnp.asarray(0.75))
  # decay * ema + (1 - decay) * params
  np.testing.assert_allclose(out['w'], [0.25, 7.5], rtol=1e-6)
  np.testing.assert_allclose(out['b'], 3.5, rtol=1e-6)


def test_create_starts_at_step_zero_with_optimizer_state_and_optional_ema():
  tx = optax.adam(1e-3)
  state = TrainState.create(params(), tx, jax.random.PRNGKey(0), ema=True,
                            extras={'scale_factor': jnp.ones(())})
  assert int(state.step) == 0 and state.step.dtype == jnp.int32
  jax.tree.map(np.testing.assert_array_equal, state.ema_params, params())
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(tx.init(params()))
  assert set(state.extras) == {'scale_factor'}
  assert TrainState.create(params(), tx, jax.random.PRNGKey(0)).ema_params is None


def test_apply_gradients_with_sgd_gives_expected_params_and_counts_steps():
  tx = optax.sgd(0.5)
  state = TrainState.create(params(), tx, jax.random.PRNGKey(0))
  grads = {'dense': {'kernel': jnp.array([[1.0, 1.0], [0.0, -2.0]]), 'bias': jnp.array([0.2, 0.0])}}
  state = state.apply_gradients(grads, tx)
  np.testing.assert_allclose(state.params['dense']['kernel'], [[0.5, -2.5], [3.0, 1.5]])
  np.testing.assert_allclose(state.params['dense']['bias'], [0.0, -0.1], atol=1e-7)
  state = state.apply_gradients(grads, tx)
  assert int(state.step) == 2
  np.testing.assert_allclose(state.params['dense']['kernel'], [[0.0, -3.0], [3.0, 2.5]])


def test_apply_gradients_compiles_as_a_pure_function_of_the_state():
  tx = optax.sgd(0.1, momentum=0.9)
  state = TrainState.create(params(), tx, jax.random.PRNGKey(0), ema=True)
  grads = jax.tree.map(jnp.ones_like, params())
  step = jax.jit(lambda s: s.apply_gradients(grads, tx))
  eager = state.apply_gradients(grads, tx).apply_gradients(grads, tx)
  compiled = step(step(state))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), compiled, eager)
  # The EMA is not touched by an optimizer step.
  jax.tree.map(np.testing.assert_array_equal, compiled.ema_params, params())


def test_step_rng_is_fold_in_of_step_and_differs_per_step():
  state = TrainState.create(params(), optax.sgd(0.1), jax.random.PRNGKey(42))
  keys = [np.asarray(state.replace(step=jnp.asarray(i, jnp.int32)).step_rng()) for i in range(4)]
  np.testing.assert_array_equal(keys[3], jax.random.fold_in(jax.random.PRNGKey(42), 3))
  assert len({k.tobytes() for k in keys}) == 4
  # The same step of the same state gives the same key.
  np.testing.assert_array_equal(state.step_rng(), state.step_rng())


def test_update_with_a_nan_gradient_leaves_params_optimizer_state_and_ema_unchanged():
  tx = optax.adam(0.1)
  state = TrainState.create(params(), tx, jax.random.PRNGKey(0), ema=True)
  state = state.apply_gradients(jax.tree.map(jnp.ones_like, params()), tx)  # a non-trivial opt state
  grads = jax.tree.map(jnp.ones_like, params())
  grads['dense']['bias'] = jnp.array([jnp.nan, 1.0])
  new, skipped = jax.jit(lambda s, g: s.apply_gradients_if_finite(g, tx, jnp.float32(1.0),
                                                                 jnp.float32(0.5)))(state, grads)
  assert bool(skipped) and int(new.step) == int(state.step) + 1  # the batch is consumed
  for before, after in ((state.params, new.params), (state.opt_state, new.opt_state),
                        (state.ema_params, new.ema_params)):
    jax.tree.map(np.testing.assert_array_equal, after, before)


@pytest.mark.parametrize('bad', ['loss_nan', 'loss_inf', 'grad_inf'])
def test_any_non_finite_loss_or_gradient_skips_the_update(bad):
  tx = optax.sgd(0.1)
  state = TrainState.create(params(), tx, jax.random.PRNGKey(0))
  grads = jax.tree.map(jnp.ones_like, params())
  loss = {'loss_nan': jnp.nan, 'loss_inf': jnp.inf}.get(bad, 1.0)
  if bad == 'grad_inf':
    grads['dense']['kernel'] = grads['dense']['kernel'].at[0, 0].set(jnp.inf)
  new, skipped = state.apply_gradients_if_finite(grads, tx, jnp.float32(loss))
  assert bool(skipped)
  jax.tree.map(np.testing.assert_array_equal, new.params, state.params)


def test_finite_update_is_applied_exactly_as_apply_gradients_with_the_ema_step():
  tx = optax.adam(0.1)
  state = TrainState.create(params(), tx, jax.random.PRNGKey(0), ema=True)
  grads = jax.tree.map(lambda p: 0.5 * p + 1.0, params())
  new, skipped = state.apply_gradients_if_finite(grads, tx, jnp.float32(2.0), jnp.float32(0.75))
  expected = state.apply_gradients(grads, tx)
  assert not bool(skipped)
  jax.tree.map(np.testing.assert_array_equal, new.params, expected.params)
  jax.tree.map(np.testing.assert_array_equal, new.opt_state, expected.opt_state)
  jax.tree.map(np.testing.assert_array_equal, new.ema_params,
               update_ema(state.ema_params, expected.params, jnp.float32(0.75)))
  assert not np.array_equal(new.params['dense']['kernel'], state.params['dense']['kernel'])
