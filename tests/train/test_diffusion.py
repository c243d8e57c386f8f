"""Tests for train/diffusion.py: latent shape, scale_by_std, the eps loss, EMA in the step, sampling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_config as two_stage_config
from configs import base
from latent_diffusion.diffusion import schedules
from latent_diffusion.errors import ConfigError
from latent_diffusion.models.autoencoder import AutoencoderKL
from latent_diffusion.train import autoencoder as stage1
from latent_diffusion.train import common, diffusion
from latent_diffusion.train.state import TrainState


def tiny_config():
  config = base.get_config()
  config.data.image_size = 16
  config.autoencoder.ch_mult = (1, 2)      # f = 2 -> latents 8x8x4
  config.unet.model_channels = 32
  config.unet.channel_mult = (1, 2)
  config.unet.num_res_blocks = 1
  config.unet.attention_resolutions = (2,)
  config.unet.num_heads = 2
  config.diffusion.timesteps = 100
  config.diffusion.loss_type = 'l2'
  config.diffusion_train.learning_rate = 1e-3
  config.diffusion_train.warmup_steps = 0
  config.diffusion_train.ema_decay = 0.9
  config.sampling.num_steps = 4
  return config


def test_latent_shape_follows_image_size_and_factor():
  config = tiny_config()
  assert diffusion.latent_shape(config) == (8, 8, 4)
  config.data.image_size = 15
  with pytest.raises(ConfigError, match='image_size'):
    diffusion.latent_shape(config)


def test_scale_factor_is_inverse_std_of_posterior_samples():
  moments = jnp.concatenate([3.0 * jax.random.normal(jax.random.PRNGKey(0), (8, 8, 8, 4)),
                             jnp.full((8, 8, 8, 4), -30.0)], axis=-1)  # ~zero variance
  scale = diffusion.scale_factor_from_moments(moments, jax.random.PRNGKey(1))
  np.testing.assert_allclose(scale, 1.0 / np.std(np.asarray(moments[..., :4])), rtol=1e-4)


def test_train_step_updates_ema_with_warmup_decay_and_learns(make_random_params):
  config = tiny_config()
  unet = diffusion.build_unet(config)
  tx = diffusion.make_optimizer(config.diffusion_train)
  abstract = jax.eval_shape(functools.partial(diffusion.create_state, unet, config, tx=tx),
                            jax.random.PRNGKey(0))
  params = jax.tree.map(jnp.asarray, make_random_params(abstract.params))
  state = TrainState.create(params, tx, jax.random.PRNGKey(0), ema=True,
                            extras={'scale_factor': jnp.ones((), jnp.float32)})
  step = jax.jit(functools.partial(
      diffusion.train_step, model=unet, tx=tx, schedule=schedules.schedule_from_config(config.diffusion),
      loss_type='l2', base_ema_decay=0.9, deterministic=True))
  # Latents with structure: a fixed pattern the model can learn to denoise toward.
  pattern = jnp.tile(jnp.linspace(-2, 2, 8)[None, :, None, None], (4, 1, 8, 4))
  batch = {'moments': jnp.concatenate([pattern, jnp.full_like(pattern, -30.0)], axis=-1)}
  previous = state
  state, metrics = step(state, batch)
  decay = min(0.9, 2 / 11)  # n = 1 update
  np.testing.assert_allclose(metrics['ema_decay'], decay, rtol=1e-6)
  expected = jax.tree.map(lambda e, p: e - (1 - decay) * (e - p), previous.params, state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               state.ema_params, expected)
  losses = [float(metrics['loss'])]
  for _ in range(20):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_sampler_decodes_ddim_latents_to_clipped_images_of_the_data_size(make_random_params):
  config = tiny_config()
  unet = diffusion.build_unet(config)
  autoencoder = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16)
  unet_params = make_random_params(jax.eval_shape(
      unet.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32))['params'])
  ae_params = make_random_params(jax.eval_shape(
      autoencoder.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))['params'])
  sampler = diffusion.make_sampler(unet, autoencoder, config,
                                   schedules.schedule_from_config(config.diffusion), num_samples=3)
  samples = np.asarray(sampler(unet_params, ae_params, jnp.float32(0.5), jax.random.PRNGKey(2)))
  assert samples.shape == (3, 16, 16, 3)
  assert samples.min() >= -1 and samples.max() <= 1
  assert np.std(samples) > 0
  again = np.asarray(sampler(unet_params, ae_params, jnp.float32(0.5), jax.random.PRNGKey(2)))
  np.testing.assert_array_equal(samples, again)


def test_training_from_precomputed_latents_encodes_the_dataset_once(tmp_path):
  config = two_stage_config.get_config()
  config.autoencoder_train.num_steps = 1
  config.diffusion_train.num_steps = 2
  config.diffusion_train.precompute_latents = True
  stage1.train(config, tmp_path)
  state = diffusion.train(config, tmp_path)
  assert int(state.step) == 2
  cache = tmp_path / 'diffusion' / 'latents' / 'moments-00000-of-00001.npy'
  moments = np.load(cache)
  assert moments.shape == (16, 2, 8, 8, 8)  # every image, unflipped and mirrored, (8, 8, 2 x 4)
  # The cache holds the frozen encoder's moments of the images in source order.
  model, params = stage1.load_params(config, tmp_path)
  expected = model.apply({'params': params}, jnp.asarray(common.preview_images(config, 2)),
                         method=model.encode_moments)
  np.testing.assert_allclose(moments[:2, 0], expected, rtol=1e-4, atol=1e-5)

  # Training on resumes from the cache without encoding again.
  written = cache.stat().st_mtime_ns
  config.diffusion_train.num_steps = 3
  assert int(diffusion.train(config, tmp_path).step) == 3
  assert cache.stat().st_mtime_ns == written
