"""Tests for train/diffusion.py: latent shape, scale_by_std, the objective (eps/x0/v, learned logvar,
ELBO term, conditioning with dropout), EMA in the step, every sampler, guidance, compile counts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tiny_config as two_stage_config
from configs import base
from latent_diffusion.diffusion import schedules
from latent_diffusion.errors import ConfigError
from latent_diffusion.models.autoencoder import AutoencoderKL
from latent_diffusion.train import autoencoder as stage1
from latent_diffusion.train import common, conditioning, diffusion
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
  config.sample.num_steps = 4
  return config


def micro_config():
  """tiny_config with a one-level U-Net (attention only in the middle block): compiles in seconds,
  for tests of the objective and the samplers' wiring rather than of the architecture."""
  config = tiny_config()
  config.unet.channel_mult = (1,)
  config.unet.attention_resolutions = ()
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


def test_learning_rate_warms_up_holds_then_cools_down_to_zero_at_num_steps():
  train_config = base.get_config().diffusion_train
  train_config.learning_rate, train_config.warmup_steps, train_config.num_steps = 1e-3, 10, 100
  rate = diffusion.learning_rate_schedule(train_config)
  np.testing.assert_allclose([rate(0), rate(10), rate(99)], [1e-9, 1e-3, 1e-3], rtol=1e-4, atol=1e-10)
  train_config.cooldown_steps = 40
  rate = diffusion.learning_rate_schedule(train_config)
  np.testing.assert_allclose([rate(5), rate(60), rate(70), rate(80), rate(100)],
                             [1e-9 + 0.5 * (1e-3 - 1e-9), 1e-3, 0.75e-3, 0.5e-3, 0.0], rtol=1e-5, atol=1e-12)
  train_config.accumulate_grad_batches = 2  # the schedule counts updates: 2 batches each
  np.testing.assert_allclose([float(diffusion.learning_rate_schedule(train_config)(count)) for count in (30, 40)],
                             [1e-3, 0.5e-3], rtol=1e-5)


def test_cooldown_longer_than_the_run_is_a_config_error():
  train_config = base.get_config().diffusion_train
  train_config.num_steps, train_config.cooldown_steps = 100, 101
  with pytest.raises(ConfigError, match=r'cooldown_steps.*\[0, num_steps=100\], got 101'):
    diffusion.make_optimizer(train_config)


def test_a_warmed_up_constant_rate_run_resumes_into_a_cooldown_with_the_same_optimizer_state():
  train_config = base.get_config().diffusion_train
  train_config.warmup_steps, train_config.num_steps = 10, 100
  params = {'w': jnp.ones((3,))}
  structure = lambda: jax.tree.structure(diffusion.make_optimizer(train_config).init(params))
  constant = structure()
  train_config.num_steps, train_config.cooldown_steps = 200, 50
  assert structure() == constant
  # Without a warm-up the constant rate is the bare float, as before the cooldown existed: its state
  # has no schedule count, so such a run cannot take a cooldown later (README, Stage 2).
  train_config.warmup_steps, train_config.cooldown_steps = 0, 0
  assert structure() == jax.tree.structure(optax.adamw(1e-3).init(params))
  train_config.cooldown_steps = 50
  assert structure() != jax.tree.structure(optax.adamw(1e-3).init(params))


def make_step(config, make_random_params, seed=0):
  """(jitted train_step, initial state) of config's denoiser with random non-zero parameters."""
  model = diffusion.build_denoiser(config)
  tx = diffusion.make_optimizer(config.diffusion_train)
  abstract = jax.eval_shape(functools.partial(diffusion.create_state, model, config, tx=tx),
                            jax.random.PRNGKey(0))
  params = jax.tree.map(jnp.asarray, make_random_params(abstract.params, seed))
  if config.diffusion.learn_logvar:
    params['logvar'] = jnp.full_like(params['logvar'], config.diffusion.logvar_init)
  state = diffusion.state_from_params(params, tx, jax.random.PRNGKey(0))
  step = jax.jit(functools.partial(
      diffusion.train_step, model=model, tx=tx, schedule=diffusion.schedule_from_config(config),
      objective=diffusion.Objective.from_config(config), base_ema_decay=config.diffusion_train.ema_decay,
      deterministic=True, uses_labels=conditioning.uses_labels(config)))
  # Without backend optimisation: about half the compile time on CPU, and these tests run few steps.
  batch = pattern_batch(jnp.zeros((4,), jnp.int32) if conditioning.uses_labels(config) else None)
  return step.lower(state, batch).compile({'xla_backend_optimization_level': 0}), state


def pattern_batch(labels=None):
  """Latents with structure (a fixed ramp, per-label sign when labelled) the model can learn."""
  ramp = jnp.tile(jnp.linspace(-2, 2, 8)[None, :, None, None], (4, 1, 8, 4))
  if labels is not None:
    ramp = ramp * jnp.where(labels % 2 == 0, 1.0, -1.0)[:, None, None, None]
  batch = {'moments': jnp.concatenate([ramp, jnp.full_like(ramp, -30.0)], axis=-1)}
  if labels is not None:
    batch['label'] = labels
  return batch


def train_losses(step, state, batch, steps, metric='loss'):
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics[metric]))
  return state, losses


def test_train_step_updates_ema_with_warmup_decay_and_learns(make_random_params):
  config = micro_config()
  step, state = make_step(config, make_random_params)
  batch = pattern_batch()
  previous = state
  state, metrics = step(state, batch)
  decay = min(0.9, 2 / 11)  # n = 1 update
  np.testing.assert_allclose(metrics['ema_decay'], decay, rtol=1e-6)
  expected = jax.tree.map(lambda e, p: e - (1 - decay) * (e - p), previous.params, state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               state.ema_params, expected)
  _, losses = train_losses(step, state, batch, 20)
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


@pytest.mark.parametrize('parameterization', ['x0', 'v'])
def test_x0_and_v_parameterisations_train(parameterization, make_random_params):
  config = micro_config()
  config.diffusion.parameterization = parameterization
  step, state = make_step(config, make_random_params)
  _, losses = train_losses(step, state, pattern_batch(), 16, 'loss_simple')
  assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses


def test_learned_logvar_is_trained_and_the_elbo_term_is_reported(make_random_params):
  config = micro_config()
  config.diffusion.learn_logvar = True
  config.diffusion.logvar_init = 0.5
  config.diffusion.original_elbo_weight = 1e-3
  step, state = make_step(config, make_random_params)
  assert state.params['logvar'].shape == (config.diffusion.timesteps,)
  state, metrics = step(state, pattern_batch())
  # loss = mean(simple / e^0.5 + 0.5) + 1e-3 * vlb at init.
  expected = float(metrics['loss_simple']) / np.exp(0.5) + 0.5 + 1e-3 * float(metrics['loss_vlb'])
  np.testing.assert_allclose(float(metrics['loss']), expected, rtol=1e-5)
  assert not np.allclose(state.params['logvar'], 0.5)


def test_frozen_logvar_is_not_a_parameter():
  config = micro_config()
  params = jax.eval_shape(functools.partial(diffusion.init_params, diffusion.build_denoiser(config), config),
                          jax.random.PRNGKey(0))
  assert set(params) == {'unet'}
  config.diffusion.learn_logvar = True
  params = jax.eval_shape(functools.partial(diffusion.init_params, diffusion.build_denoiser(config), config),
                          jax.random.PRNGKey(0))
  assert set(params) == {'unet', 'logvar'}


def test_class_conditional_step_learns_the_label_dependence(make_random_params):
  config = micro_config()
  config.data.num_classes = 4
  config.unet.num_classes = 5  # + null class
  config.diffusion.conditioning_key = 'adm'
  config.diffusion.cond_drop_prob = 0.2
  step, state = make_step(config, make_random_params)
  assert state.params['unet']['label_emb']['embedding'].shape == (5, 4 * 32)  # rows x time-embedding width
  _, losses = train_losses(step, state, pattern_batch(jnp.array([0, 1, 2, 3], jnp.int32)), 20)
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_scale_first_stage_feeds_the_masked_image_encoding_in_latent_units(make_random_params):
  config = micro_config()
  config.diffusion.conditioning_key = 'concat'
  config.cond_stage.kind, config.cond_stage.key, config.cond_stage.trainable = 'first_stage', 'masked_image', False
  config.unet.in_channels = 4 + 4 + 1
  assert not diffusion.Objective.from_config(config).scale_encoded_concat  # the paper: unscaled
  config.cond_stage.scale_first_stage = True
  assert diffusion.Objective.from_config(config).scale_encoded_concat
  concat = jax.random.normal(jax.random.PRNGKey(3), (4, 8, 8, 5)) * 5.0
  scaled = diffusion.scale_encoded_concat({'concat': concat}, 0.25)['concat']
  np.testing.assert_allclose(scaled[..., :4], concat[..., :4] * 0.25, rtol=1e-6)
  np.testing.assert_array_equal(scaled[..., 4], concat[..., 4])  # the mask stays in {-1, 1}

  model = diffusion.build_denoiser(config)
  tx = diffusion.make_optimizer(config.diffusion_train)
  abstract = jax.eval_shape(functools.partial(diffusion.create_state, model, config, tx=tx),
                            jax.random.PRNGKey(0))
  params = jax.tree.map(jnp.asarray, make_random_params(abstract.params, 0))
  state = TrainState.create(params, tx, jax.random.PRNGKey(0), ema=True,
                            extras={'scale_factor': jnp.asarray(0.25, jnp.float32)})

  def loss_fn(objective):
    step = jax.jit(functools.partial(diffusion.train_step, model=model, tx=tx,
                                     schedule=diffusion.schedule_from_config(config), objective=objective,
                                     base_ema_decay=0.9, deterministic=True, cond_names=('concat',)))
    return lambda concat: float(step(state, dict(pattern_batch(), concat=concat))[1]['loss'])

  scaling = loss_fn(diffusion.Objective.from_config(config))
  config.cond_stage.scale_first_stage = False
  plain = loss_fn(diffusion.Objective.from_config(config))
  np.testing.assert_allclose(scaling(concat), plain(scaled), rtol=1e-5)
  assert abs(plain(concat) - plain(scaled)) > 1e-4


def test_known_latents_keep_only_latents_whose_cell_and_neighbours_are_known():
  concat = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 5))  # encoding (4) + mask channel
  mask = np.zeros((2, 16, 16, 1), np.float32)
  mask[0, 7, 9] = 1.0               # one hidden pixel: latent (3, 4) and its 8 neighbours are not kept
  keep, x0_known = diffusion.known_latents(concat, jnp.asarray(mask), 0.5)
  expected = np.ones((2, 8, 8, 1), np.float32)
  expected[0, 2:5, 3:6] = 0.0
  np.testing.assert_array_equal(keep, expected)
  np.testing.assert_allclose(x0_known, concat[..., :4] * 0.5, rtol=1e-6)
  with pytest.raises(ValueError, match='multiple of the latent size'):
    diffusion.known_latents(concat, jnp.zeros((2, 15, 16, 1)), 0.5)


def test_keep_known_latents_holds_the_known_latents_while_sampling(make_random_params):
  config = micro_config()
  config.diffusion.conditioning_key = 'concat'
  config.cond_stage.kind, config.cond_stage.key, config.cond_stage.trainable = 'first_stage', 'masked_image', False
  config.unet.in_channels = 4 + 4 + 1
  model = diffusion.build_denoiser(config)
  params = jax.tree.map(jnp.asarray, make_random_params(
      jax.eval_shape(functools.partial(diffusion.init_params, model, config), jax.random.PRNGKey(0)), 0))
  concat = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 5))
  mask = jnp.zeros((2, 16, 16, 1)).at[:, 4:12, 4:12].set(1.0)
  keep, x0_known = diffusion.known_latents(concat, mask, 1.0)
  schedule = diffusion.schedule_from_config(config)

  def latents(known):
    return diffusion.sample_latents(model, config, schedule, params, jax.random.PRNGKey(0), {'concat': concat},
                                    2, 4, known=known)

  held, free = latents((keep, x0_known)), latents(None)
  kept = np.broadcast_to(np.asarray(keep) > 0, held.shape)
  assert 0 < kept.mean() < 1
  held_error = np.abs(np.asarray(held - x0_known))
  free_error = np.abs(np.asarray(free - x0_known))
  assert held_error[kept].max() < 0.25 < free_error[kept].mean(), (held_error[kept].max(), free_error[kept].mean())
  assert held_error[~kept].mean() > 0.25  # the hole is drawn, not copied
  config.sample.sampler = 'plms'
  with pytest.raises(ConfigError, match='keep_known_latents'):
    latents((keep, x0_known))


def test_crossattn_class_model_trains_its_embedder(make_random_params):
  config = micro_config()
  config.data.num_classes = 4
  config.diffusion.conditioning_key = 'crossattn'
  config.cond_stage.kind = 'class'
  config.cond_stage.n_classes = 5
  config.cond_stage.embed_dim = 16
  config.unet.use_spatial_transformer = True
  config.unet.context_dim = 16
  step, state = make_step(config, make_random_params)
  before = np.asarray(state.params['cond_stage']['embedding']['embedding'])
  state, _ = step(state, pattern_batch(jnp.array([0, 1, 2, 3], jnp.int32)))
  after = np.asarray(state.params['cond_stage']['embedding']['embedding'])
  assert not np.allclose(before[:4], after[:4])


def sampler_parts(config, make_random_params):
  model = diffusion.build_denoiser(config)
  autoencoder = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16)
  params = make_random_params(jax.eval_shape(
      functools.partial(diffusion.init_params, model, config), jax.random.PRNGKey(0)))
  ae_params = make_random_params(jax.eval_shape(
      autoencoder.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))['params'])
  sampler = diffusion.make_sampler(model, autoencoder, config, diffusion.schedule_from_config(config))
  return sampler, params, ae_params


def test_sampler_decodes_latents_to_clipped_images_of_the_data_size(make_random_params):
  config = micro_config()
  sampler, params, ae_params = sampler_parts(config, make_random_params)
  draw = lambda: np.asarray(sampler(params, ae_params, jnp.float32(0.5), jax.random.PRNGKey(2), {},
                                    num_samples=3, num_steps=4))
  samples = draw()
  assert samples.shape == (3, 16, 16, 3)
  assert samples.min() >= -1 and samples.max() <= 1
  assert np.std(samples) > 0
  np.testing.assert_array_equal(samples, draw())


@pytest.mark.parametrize('task', ['sr', 'inpaint'])
def test_image_guidance_brings_samples_closer_to_what_the_input_shows(task, make_random_params):
  """Random networks know nothing of the input; the image-space guider pulls their samples towards it:
  the downsampled sample towards the low-resolution image, or the known pixels towards the image."""
  config = micro_config()
  config.diffusion.conditioning_key = 'concat'
  image = jax.random.uniform(jax.random.PRNGKey(5), (2, 16, 16, 3), minval=-1.0, maxval=1.0)
  if task == 'sr':
    config.unet.in_channels, config.data.low_res_size = 4 + 3, 8
    config.cond_stage.kind, config.cond_stage.key = 'identity', 'low_res'
    inputs = {'low_res': jax.image.resize(image, (2, 8, 8, 3), 'bicubic', antialias=True)}
    error = lambda samples: jax.image.resize(samples, (2, 8, 8, 3), 'bicubic', antialias=True) - inputs['low_res']
  else:
    config.unet.in_channels = 4 + 4 + 1
    config.cond_stage.kind, config.cond_stage.key = 'first_stage', 'masked_image'
    inputs = {'image': image, 'mask': jnp.zeros((2, 16, 16, 1)).at[:, 4:12, 4:12].set(1.0)}
    error = lambda samples: (samples - image) * (1.0 - inputs['mask'])

  def rms_error(scale):
    config.sample.image_guidance_scale = scale
    sampler, params, ae_params = sampler_parts(config, make_random_params)
    samples = sampler(params, ae_params, jnp.float32(0.5), jax.random.PRNGKey(2), inputs, num_samples=2,
                      num_steps=10)
    return float(jnp.sqrt(jnp.mean(jnp.square(error(samples)))))

  unguided, guided = rms_error(0.0), rms_error(20.0)
  assert guided < 0.8 * unguided, (guided, unguided)
  assert diffusion.sampler_tag(config).endswith('_ig20')


def test_sampler_tag_names_steps_spacing_eta_and_guidance():
  config = micro_config()
  config.sample.num_steps = 5
  assert diffusion.sampler_tag(config) == 'ddim5_eta0'
  config.sample.spacing, config.sample.guidance_scale = 'trailing', 3.0
  assert diffusion.sampler_tag(config) == 'ddim5_trailing_eta0_cfg3'
  config.sample.sampler, config.sample.spacing = 'plms', 'uniform'
  assert diffusion.sampler_tag(config) == 'plms5_cfg3'


def test_each_sampler_draws_distinct_deterministic_latents(make_random_params):
  config = micro_config()
  model = diffusion.build_denoiser(config)
  params = make_random_params(jax.eval_shape(
      functools.partial(diffusion.init_params, model, config), jax.random.PRNGKey(0)))
  schedule = diffusion.schedule_from_config(config)
  drawn = {}
  for name in ('ddim', 'ddpm', 'plms', 'dpm_solver'):
    config.sample.sampler = name
    sample = jax.jit(functools.partial(diffusion.sample_latents, model, config.copy_and_resolve_references(),
                                       schedule, num_samples=2, num_steps=4))
    drawn[name] = np.asarray(sample(params, jax.random.PRNGKey(2), {}))
    assert drawn[name].shape == (2, 8, 8, 4) and np.isfinite(drawn[name]).all()
    np.testing.assert_array_equal(drawn[name], np.asarray(sample(params, jax.random.PRNGKey(2), {})))
  # Four different algorithms from the same noise: four different results.
  names = list(drawn)
  for i, first in enumerate(names):
    for second in names[i + 1:]:
      assert not np.allclose(drawn[first], drawn[second], atol=1e-4), (first, second)


def test_sampler_compiles_once_per_number_of_samples_and_steps(make_random_params):
  config = micro_config()
  sampler, params, ae_params = sampler_parts(config, make_random_params)
  call = lambda n, steps: sampler(params, ae_params, jnp.float32(1.0), jax.random.PRNGKey(0), {},
                                  num_samples=n, num_steps=steps)
  call(2, 4)
  call(2, 4)
  assert sampler._cache_size() == 1  # pylint: disable=protected-access
  call(2, 5)
  call(3, 4)
  call(2, 5)
  assert sampler._cache_size() == 3  # pylint: disable=protected-access


def test_guided_class_conditional_samples_depend_on_the_label_and_the_scale(make_random_params):
  config = micro_config()
  config.data.num_classes = 4
  config.unet.num_classes = 5
  config.diffusion.conditioning_key = 'adm'
  config.sample.guidance_scale = 3.0
  sampler, params, ae_params = sampler_parts(config, make_random_params)
  draw = lambda fn, labels: np.asarray(fn(params, ae_params, jnp.float32(1.0), jax.random.PRNGKey(0),
                                          {'label': jnp.asarray(labels, jnp.int32)},
                                          num_samples=2, num_steps=4))
  guided = draw(sampler, [0, 0])
  assert not np.allclose(guided, draw(sampler, [1, 1]), atol=1e-4)
  config.sample.guidance_scale = 1.0
  unguided, _, _ = sampler_parts(config, make_random_params)
  assert not np.allclose(guided, draw(unguided, [0, 0]), atol=1e-4)


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


def test_sampler_with_a_mesh_splits_the_samples_over_eight_devices_and_draws_the_same_images():
  """eval_diffusion's sampler (make_sampler with a mesh), in a fresh process with 8 CPU devices: each
  device holds one slice of the batch, and the images equal the unsharded sampler's."""
  import os, subprocess, sys, textwrap  # pylint: disable=g-import-not-at-top,g-multiple-import
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  repo = Path(__file__).resolve().parents[2]
  script = textwrap.dedent('''
      import os
      os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
      import jax, jax.numpy as jnp, numpy as np
      from tests.conftest import random_params
      from tests.train.test_diffusion import micro_config
      from latent_diffusion.models.autoencoder import AutoencoderKL
      from latent_diffusion.train import diffusion, sharding
      config = micro_config()
      mesh = sharding.make_mesh(config.mesh)
      assert mesh.size == 8, mesh
      model = diffusion.build_denoiser(config)
      autoencoder = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16)
      params = random_params(jax.eval_shape(lambda r: diffusion.init_params(model, config, r), jax.random.PRNGKey(0)))
      ae_params = random_params(jax.eval_shape(autoencoder.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))['params'])
      schedule = diffusion.schedule_from_config(config)
      draw = lambda sampler: sampler(params, ae_params, jnp.float32(0.5), jax.random.PRNGKey(3), {},
                                     num_samples=8, num_steps=4)
      sharded = draw(diffusion.make_sampler(model, autoencoder, config, schedule, mesh=mesh))
      shards = sharded.addressable_shards
      assert len(shards) == 8 and all(s.data.shape == (1, 16, 16, 3) for s in shards), [s.data.shape for s in shards]
      single = draw(diffusion.make_sampler(model, autoencoder, config, schedule))
      np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), atol=1e-4)
      print('ok')
  ''')
  result = subprocess.run([sys.executable, '-c', script], cwd=repo, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'PYTHONPATH': f'{repo}:{repo / "tests"}', 'TF_CPP_MIN_LOG_LEVEL': '2',
                               'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith('ok')


def test_img2img_sampler_starts_from_the_stage1_mode_in_the_units_of_the_diffused_latents(make_random_params):
  """At the least strength (one DDIM step from t = 1) the sample decodes to about the image's stage-1
  reconstruction; scale_factor 4 makes the units matter: the mode itself (not times scale_factor)
  would decode as mode / 4."""
  config = micro_config()
  config.sample.strength = 0.25  # 1 of 4 steps
  model = diffusion.build_denoiser(config)
  autoencoder = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=16)
  params = make_random_params(jax.eval_shape(lambda r: diffusion.init_params(model, config, r),
                                             jax.random.PRNGKey(0)))
  ae_params = make_random_params(jax.eval_shape(autoencoder.init, jax.random.PRNGKey(0),
                                                jnp.zeros((1, 16, 16, 3)))['params'], 1)
  sampler = diffusion.make_sampler(model, autoencoder, config, diffusion.schedule_from_config(config))
  image = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  draw = lambda inputs: np.asarray(sampler(params, ae_params, jnp.float32(4.0), jax.random.PRNGKey(3), inputs,
                                           num_samples=2, num_steps=4))
  mode = autoencoder.apply({'params': ae_params}, image, method=autoencoder.encode).mode()
  decode = lambda z: np.clip(autoencoder.apply({'params': ae_params}, z, method=autoencoder.decode), -1, 1)
  img2img = draw({'init_image': image})
  near = np.abs(img2img - decode(mode)).mean()
  assert near < np.abs(img2img - decode(mode / 4)).mean() / 4
  assert near < np.abs(draw({}) - decode(mode)).mean() / 4
