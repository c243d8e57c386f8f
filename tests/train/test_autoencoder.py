"""Tests for train/autoencoder.py and train/autoencoder_loss.py: the paper's stage-1 objective
(checked against plain autodiff of its formula), and a pure, learning train step of both networks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from latent_diffusion.train import autoencoder as stage1
from latent_diffusion.train import autoencoder_loss, common
from latent_diffusion.train.state import TrainState


def tiny_config(kind='kl'):
  config = base.get_config()
  config.data.image_size = 16
  config.autoencoder.kind = kind
  config.autoencoder.ch = 32
  config.autoencoder.ch_mult = (1, 2)
  config.autoencoder.num_res_blocks = 1
  config.autoencoder.n_embed = 32
  config.autoencoder.embed_dim = 4 if kind == 'kl' else 3
  config.autoencoder.z_channels = 4 if kind == 'kl' else 3
  config.autoencoder.double_z = kind == 'kl'
  config.autoencoder_loss.perceptual_weight = 0.0
  config.autoencoder_loss.disc_num_layers = 2
  config.autoencoder_loss.disc_ndf = 16
  config.autoencoder_loss.disc_start = 3
  config.autoencoder_train.learning_rate = 1e-3
  config.autoencoder_train.num_steps = 100
  return config


def images(seed=0, batch=2):
  return jax.random.uniform(jax.random.PRNGKey(seed), (batch, 16, 16, 3), minval=-1, maxval=1)


def fresh_state(config, make_random_params, tx=None):
  """(model, discriminator, tx, state) with random parameters: compiling the initialisers would take
  longer than the tests that use the state. logvar starts at logvar_init, batch statistics at 0 / 1."""
  model, discriminator = stage1.build_autoencoder(config), stage1.build_discriminator(config)
  tx = tx or stage1.make_optimizer(config)
  abstract = jax.eval_shape(functools.partial(stage1.create_state, model, discriminator, config, tx=tx),
                            jax.random.PRNGKey(0))
  params = jax.tree.map(jnp.asarray, make_random_params(abstract.params))
  params['logvar'] = jnp.full((), config.autoencoder_loss.logvar_init, jnp.float32)
  statistics = jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.full(leaf.shape, 1.0 if path[-1].key == 'var' else 0.0, leaf.dtype),
      abstract.extras['discriminator_state'])
  state = TrainState.create(params, tx, jax.random.PRNGKey(0), extras={'discriminator_state': statistics})
  return model, discriminator, tx, state


def fake_perceptual(x, y):
  """A differentiable stand-in for LPIPS (a per-image scalar) to exercise perceptual_weight."""
  return jnp.mean(jnp.square(jnp.tanh(2 * x) - jnp.tanh(2 * y)), axis=(1, 2, 3))


@pytest.fixture(scope='module')
def kl_objective(make_random_params):
  """The kl objective (with a perceptual term and logvar 0.3) compiled once, step as an argument."""
  config = tiny_config('kl')
  loss_config = config.autoencoder_loss
  with config.unlocked():
    loss_config.perceptual_weight = 0.5
    loss_config.logvar_init = 0.3
  model, discriminator, _, state = fresh_state(config, make_random_params)
  x = images(batch=4)
  forward = stage1._forward(model, 'kl', x, jax.random.PRNGKey(5), deterministic=True)  # pylint: disable=protected-access
  disc_apply = stage1._disc_apply(discriminator)  # pylint: disable=protected-access
  objective = jax.jit(lambda step: autoencoder_loss.generator_and_discriminator_grads(
      forward=forward, model_params=state.params['autoencoder'], logvar=state.params['logvar'],
      disc_params=state.params['discriminator'], disc_state=state.extras['discriminator_state'],
      images=x, step=step, kind='kl', loss_config=loss_config, perceptual_fn=fake_perceptual,
      disc_apply=disc_apply))
  return config, state, x, forward, disc_apply, objective


def test_kl_grads_match_autodiff_of_the_papers_objective_with_the_adaptive_gan_weight(kl_objective):
  """The one-backward implementation against jax.grad of the formula written out: nll with logvar
  and a perceptual term, KL, d_weight from the gradients at decoder.conv_out, and the
  discriminator's hinge loss. (The vq objective is compared with the paper's PyTorch loss in
  test_autoencoder_loss.)"""
  config, state, x, forward, disc_apply, objective = kl_objective
  loss_config = config.autoencoder_loss
  params, disc_params, disc_state = (state.params['autoencoder'], state.params['discriminator'],
                                     state.extras['discriminator_state'])
  logvar = state.params['logvar']

  @jax.jit
  def reference():
    def nll(p, lv=logvar):
      rec = forward(p)[0][0]
      per_pixel = jnp.abs(x - rec) + 0.5 * fake_perceptual(x, rec)[:, None, None, None]
      return jnp.sum(per_pixel / jnp.exp(lv) + lv) / x.shape[0]

    def g_loss(p):
      return -jnp.mean(disc_apply(disc_params, disc_state, forward(p)[0][0])[0])

    last = lambda grads: grads['decoder']['conv_out']['kernel']
    d_weight = loss_config.disc_weight * jnp.clip(
        jnp.linalg.norm(last(jax.grad(nll)(params)))
        / (jnp.linalg.norm(last(jax.grad(g_loss)(params))) + 1e-4), 0.0, 1e4)
    total = lambda p: nll(p) + loss_config.kl_weight * forward(p)[0][1] + d_weight * g_loss(p)
    _, state_after_generator = disc_apply(disc_params, disc_state, forward(params)[0][0])

    def d_loss(dp):
      rec = forward(params)[0][0]
      real, new_state = disc_apply(dp, state_after_generator, x)
      fake, new_state = disc_apply(dp, new_state, rec)
      return 0.5 * (jnp.mean(jax.nn.relu(1 - real)) + jnp.mean(jax.nn.relu(1 + fake))), new_state

    (disc_loss, final_state), disc_grads = jax.value_and_grad(d_loss, has_aux=True)(disc_params)
    logvar_grad = jax.grad(lambda lv: nll(params, lv))(logvar)
    return total(params), jax.grad(total)(params), d_weight, disc_loss, disc_grads, final_state, logvar_grad

  grads, new_disc_state, loss, metrics, _, _ = objective(jnp.int32(3))  # step == disc_start: GAN on
  ref_loss, ref_grads, ref_d_weight, ref_disc_loss, ref_disc_grads, ref_state, ref_logvar_grad = reference()
  assert float(metrics['d_weight']) > 0 and float(metrics['disc_factor']) == 1.0
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['d_weight'], ref_d_weight, rtol=1e-4)
  np.testing.assert_allclose(metrics['disc_loss'], ref_disc_loss, rtol=1e-5)
  np.testing.assert_allclose(grads['logvar'], ref_logvar_grad, rtol=1e-4)

  def close(actual, expected):  # biases feeding a GroupNorm have ~0 gradients: tolerance per tree
    scale = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(expected))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5 * scale), actual, expected)

  close(grads['autoencoder'], ref_grads)
  close(grads['discriminator'], ref_disc_grads)
  close(new_disc_state, ref_state)


def test_before_disc_start_the_gan_terms_are_off_and_the_discriminator_gets_no_gradient(kl_objective):
  config, state, x, forward, _, objective = kl_objective
  grads, disc_state, loss, metrics, _, _ = objective(jnp.int32(2))
  (rec, kl), _ = forward(state.params['autoencoder'])
  rec_loss = np.abs(np.asarray(rec) - np.asarray(x)) + 0.5 * np.asarray(fake_perceptual(x, rec))[:, None, None, None]
  logvar = float(state.params['logvar'])
  expected = np.sum(rec_loss / np.exp(logvar) + logvar) / 4 + config.autoencoder_loss.kl_weight * float(kl)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert float(metrics['d_weight']) == 0.0 and float(metrics['disc_loss']) == 0.0
  assert all(not np.any(g) for g in jax.tree.leaves(grads['discriminator']))
  jax.tree.map(np.testing.assert_array_equal, disc_state, state.extras['discriminator_state'])


def compiled_step(config, model, discriminator, tx):
  return jax.jit(functools.partial(stage1.train_step, model=model, discriminator=discriminator,
                                   lpips_fn=None, tx=tx, config=config, deterministic=True))


@pytest.fixture(scope='module')
def vq_state_and_step(make_random_params):
  """One compiled VQ step (GAN from step 3 on) shared by the step tests."""
  config = tiny_config('vq')
  model, discriminator, tx, state = fresh_state(config, make_random_params)
  return state, compiled_step(config, model, discriminator, tx)


def test_train_step_is_pure_learns_and_trains_the_discriminator_after_disc_start(vq_state_and_step):
  state, step = vq_state_and_step
  batch = {'image': images(batch=4)}
  again, first_metrics = step(state, batch)
  repeat, repeat_metrics = step(state, batch)  # same inputs, same outputs: no hidden state
  np.testing.assert_array_equal(first_metrics['loss'], repeat_metrics['loss'])
  jax.tree.map(np.testing.assert_array_equal, again.params, repeat.params)
  state, losses = again, [float(first_metrics['nll_loss'])]
  for _ in range(11):
    previous_disc = state.params['discriminator']
    state, metrics = step(state, batch)
    losses.append(float(metrics['nll_loss']))
  assert int(state.step) == 12
  assert losses[-1] < 0.85 * losses[0], losses
  assert float(metrics['d_weight']) > 0 and float(metrics['disc_grad_norm']) > 0
  assert 1 <= float(metrics['codes_used']) <= 32 and float(metrics['perplexity']) >= 1.0
  assert not np.array_equal(state.params['discriminator']['main_0']['kernel'], previous_disc['main_0']['kernel'])
  assert not np.array_equal(state.extras['discriminator_state']['main_3']['mean'],
                            repeat.extras['discriminator_state']['main_3']['mean'])


def test_a_nan_in_the_batch_skips_the_update_of_both_networks(vq_state_and_step):
  state, step = vq_state_and_step
  poisoned = images(batch=4).at[1, 3, 5, 0].set(jnp.nan)
  skipped, metrics = step(state, {'image': poisoned})
  assert float(metrics['nonfinite']) == 1.0 and not np.isfinite(float(metrics['loss']))
  assert int(skipped.step) == 1
  for before, after in ((state.params, skipped.params), (state.opt_state, skipped.opt_state),
                        (state.extras, skipped.extras)):
    jax.tree.map(np.testing.assert_array_equal, after, before)
  recovered, metrics = step(skipped, {'image': images(batch=4)})
  assert float(metrics['nonfinite']) == 0.0
  assert not np.array_equal(recovered.params['autoencoder']['decoder']['conv_out']['kernel'],
                            state.params['autoencoder']['decoder']['conv_out']['kernel'])


def test_logvar_is_frozen_unless_learn_logvar():
  for learn in (False, True):
    config = tiny_config('kl')
    with config.unlocked():
      config.autoencoder_loss.learn_logvar = learn
    tx = stage1.make_optimizer(config)
    params = {'autoencoder': {'w': jnp.ones(2)}, 'discriminator': {'w': jnp.ones(2)}, 'logvar': jnp.zeros(())}
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert (float(updates['logvar']) != 0.0) == learn
    assert np.all(np.asarray(updates['discriminator']['w']) != 0)


def test_accumulating_two_steps_applies_one_update_of_the_averaged_gradients(make_random_params):
  """With SGD, so that the comparison is linear; before disc_start, so only the autoencoder moves."""
  config = tiny_config('kl')
  with config.unlocked():
    config.autoencoder_train.accumulate_grad_batches = 2
    config.autoencoder_loss.disc_start = 1000  # beyond num_steps: the GAN branch is not compiled
  assert isinstance(stage1.make_optimizer(config).init({'autoencoder': {}, 'discriminator': {},
                                                        'logvar': jnp.zeros(())}),
                    optax.MultiStepsState)  # the stage's Adams are wrapped too
  tx = common.accumulate_gradients(optax.sgd(0.1), config.autoencoder_train)
  model, discriminator, tx, state = fresh_state(config, make_random_params, tx)
  step = compiled_step(config, model, discriminator, tx)
  first, _ = step(state, {'image': images(seed=1, batch=2)})
  jax.tree.map(np.testing.assert_array_equal, first.params, state.params)  # only accumulated
  second, _ = step(first, {'image': images(seed=2, batch=2)})

  @jax.jit
  def grads(params):  # the two micro-batches with the keys of steps 0 and 1
    def loss(p, seed, index):
      x = images(seed=seed, batch=2)
      (rec, kl), _ = stage1._forward(model, 'kl', x, jax.random.fold_in(state.rng, index), True)(p)  # pylint: disable=protected-access
      return jnp.sum(jnp.abs(rec - x)) / 2 + 1e-6 * kl
    return jax.grad(lambda p: (loss(p, 1, 0) + loss(p, 2, 1)) / 2)(params)

  expected = jax.tree.map(lambda p, g: p - 0.1 * g, state.params['autoencoder'],
                          grads(state.params['autoencoder']))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               second.params['autoencoder'], expected)
  assert int(second.step) == 2


def test_train_decoder_only_keeps_the_latent_space_exactly_after_full_steps_built_momentum(make_random_params):
  """A full step first, so that Adam holds momentum for the encoder (zero gradients alone would still
  move it); then decoder-only steps leave encoder and quant_conv bit-identical and train the rest."""
  config = tiny_config('kl')
  with config.unlocked():
    config.autoencoder_loss.disc_start = 1000
  model, discriminator, tx, state = fresh_state(config, make_random_params)
  full_step = compiled_step(config, model, discriminator, tx)
  decoder_only = config.copy_and_resolve_references()
  with decoder_only.unlocked():
    decoder_only.autoencoder_train.train_decoder_only = True
  decoder_step = compiled_step(decoder_only, model, discriminator, tx)
  warmed, _ = full_step(state, {'image': images(seed=1, batch=2)})
  assert not np.array_equal(warmed.params['autoencoder']['encoder']['conv_in']['kernel'],
                            state.params['autoencoder']['encoder']['conv_in']['kernel'])
  tuned = warmed
  for seed in (2, 3):
    tuned, metrics = decoder_step(tuned, {'image': images(seed=seed, batch=2)})
  assert float(metrics['nonfinite']) == 0.0
  before, after = warmed.params['autoencoder'], tuned.params['autoencoder']
  for name in ('encoder', 'quant_conv'):
    jax.tree.map(np.testing.assert_array_equal, after[name], before[name])
  assert not np.array_equal(after['decoder']['conv_out']['kernel'], before['decoder']['conv_out']['kernel'])
  assert not np.array_equal(after['post_quant_conv']['kernel'], before['post_quant_conv']['kernel'])


def test_encoder_side_names_every_parameter_that_shapes_the_latents_of_both_kinds():
  for kind in ('kl', 'vq'):
    config = tiny_config(kind)
    model = stage1.build_autoencoder(config)
    names = set(jax.eval_shape(lambda: stage1.init_params(model, config, jax.random.PRNGKey(0))))
    assert names - set(stage1.ENCODER_SIDE) == {'post_quant_conv', 'decoder'}, (kind, names)


def test_actnorm_discriminator_initialises_from_real_images_and_keeps_no_running_statistics():
  config = tiny_config('kl')
  with config.unlocked():
    config.autoencoder_loss.disc_use_actnorm = True
  model, discriminator = stage1.build_autoencoder(config), stage1.build_discriminator(config)
  real = images(seed=7, batch=4)
  state = stage1.create_state(model, discriminator, config, jax.random.PRNGKey(0),
                              stage1.make_optimizer(config), disc_init_images=real)
  assert state.extras['discriminator_state'] == {}
  first_norm = state.params['discriminator']['main_3']
  assert not np.allclose(first_norm['scale'], 1.0) and not np.allclose(first_norm['loc'], 0.0)
  logits, disc_state = stage1._disc_apply(discriminator)(  # pylint: disable=protected-access
      state.params['discriminator'], state.extras['discriminator_state'], real)
  assert logits.shape == (4, 2, 2, 1) and disc_state == {}


def test_identity_first_stage_diffuses_pixels_and_has_nothing_to_train_or_load(tmp_path):
  from latent_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from latent_diffusion.train import diffusion  # pylint: disable=g-import-not-at-top
  from tests import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config.get_config()
  with config.unlocked():
    config.autoencoder.kind = 'identity'
  model, params = stage1.load_params(config, tmp_path)  # no checkpoint needed
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  assert params == {} and model.downsampling_factor == 1
  np.testing.assert_array_equal(model.apply({'params': params}, images, method=model.encode_moments), images)
  np.testing.assert_array_equal(model.apply({'params': params}, images, method=model.decode), images)
  assert diffusion.latent_shape(config) == (16, 16, 3)  # the pixels, whatever ch_mult and embed_dim say
  unet = diffusion.build_unet(config)
  assert (unet.in_channels, unet.out_channels) == (3, 3)
  assert stage1.is_complete(config, tmp_path)
  with pytest.raises(ConfigError, match="kind='identity' has no first stage to train"):
    stage1.train(config, tmp_path)


def test_train_decoder_only_without_a_stage1_checkpoint_is_one_config_error_that_writes_nothing(tmp_path):
  from latent_diffusion.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from tests import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config.get_config()
  with config.unlocked():
    config.autoencoder_train.train_decoder_only = True
  with pytest.raises(ConfigError, match='train_decoder_only: no stage-1 checkpoint in .*encoder would stay random'):
    stage1.train(config, tmp_path)
  assert not (tmp_path / 'autoencoder' / 'config.json').exists()
