"""Stage 2: train the U-Net on latents of the frozen stage-1 autoencoder (DDPM, eps-prediction)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jax.experimental import multihost_utils

from latent_diffusion import images as image_io
from latent_diffusion.data import latents
from latent_diffusion.diffusion import process, samplers, schedules
from latent_diffusion.errors import ConfigError
from latent_diffusion.models.autoencoder import latents_from_moments
from latent_diffusion.models.unet import UNetModel
from latent_diffusion.train import autoencoder as stage1
from latent_diffusion.train import common, loop, sharding
from latent_diffusion.train.state import TrainState, ema_decay

STAGE = 'diffusion'
SCALE_FACTOR_KEY = 0xFFFFFFFF  # fold_in data of the scale_by_std posterior sample; no step reaches it


def latent_shape(config) -> tuple[int, int, int]:
  """(h, w, c) of the stage-1 latents for the configured image size."""
  f = 2 ** (len(config.autoencoder.ch_mult) - 1)
  size = config.data.image_size
  if size % f:
    raise ConfigError(f'data.image_size={size} is not divisible by the autoencoder factor f={f}')
  return size // f, size // f, config.autoencoder.embed_dim


def build_unet(config) -> UNetModel:
  c = config.unet
  channels = config.autoencoder.embed_dim
  return UNetModel(in_channels=channels, out_channels=channels, model_channels=c.model_channels,
                   num_res_blocks=c.num_res_blocks, attention_resolutions=tuple(c.attention_resolutions),
                   channel_mult=tuple(c.channel_mult), dropout=c.dropout, conv_resample=c.conv_resample,
                   num_heads=c.num_heads, num_head_channels=c.num_head_channels,
                   num_heads_upsample=c.num_heads_upsample, use_scale_shift_norm=c.use_scale_shift_norm,
                   resblock_updown=c.resblock_updown, remat=config.remat,
                   dtype=common.activation_dtype(config))


def init_params(model: UNetModel, config, rng):
  return model.init(rng, jnp.zeros((1,) + latent_shape(config), jnp.float32),
                    jnp.zeros((1,), jnp.int32))['params']


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW (torch defaults, as the paper) with LambdaLinearScheduler's warm-up from 1e-6 x lr."""
  learning_rate = train_config.learning_rate
  if train_config.warmup_steps:
    learning_rate = optax.warmup_constant_schedule(1e-6 * learning_rate, learning_rate,
                                                   train_config.warmup_steps)
  return common.accumulate_gradients(
      optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=train_config.weight_decay),
      train_config)


def diffusion_loss(model, params, latents, rng, schedule, loss_type, deterministic=True):
  """L_simple for eps-prediction: E_t,eps |eps - eps_theta(x_t, t)|. Returns (loss, metrics)."""
  t_rng, noise_rng, dropout_rng = jax.random.split(rng, 3)
  t = jax.random.randint(t_rng, (latents.shape[0],), 0, schedule.num_timesteps)
  noise = jax.random.normal(noise_rng, latents.shape, jnp.float32)
  x_t = process.q_sample(schedule, latents, t, noise)
  eps = model.apply({'params': params}, x_t, t, deterministic=deterministic, rngs={'dropout': dropout_rng})
  loss = process.simple_loss(eps, noise, loss_type).mean()
  return loss, {'loss': loss}


def train_step(state: TrainState, batch: dict, *, model, tx, schedule, loss_type, base_ema_decay,
               deterministic, autoencoder_kind='kl') -> tuple:
  """One step on batch['moments'] (the stage-1 encoding); z is sampled (kl) and scaled here."""
  posterior_rng, loss_rng = jax.random.split(state.step_rng())
  latents = latents_from_moments(autoencoder_kind, batch['moments'], posterior_rng) * state.extras['scale_factor']
  grad_fn = jax.value_and_grad(
      lambda p: diffusion_loss(model, p, latents, loss_rng, schedule, loss_type, deterministic),
      has_aux=True)
  (loss, metrics), grads = grad_fn(state.params)
  decay = ema_decay(base_ema_decay, state.step + 1)
  state, skipped = state.apply_gradients_if_finite(grads, tx, loss, ema_decay_value=decay)
  metrics.update(grad_norm=optax.global_norm(grads), ema_decay=decay,
                 nonfinite=skipped.astype(jnp.float32))
  return state, metrics


def create_state(model, config, rng, tx) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  return TrainState.create(init_params(model, config, init_rng), tx,
                           state_rng, ema=True, extras={'scale_factor': jnp.ones((), jnp.float32)})


def scale_factor_from_moments(moments, rng, autoencoder_kind='kl') -> jax.Array:
  """The paper's scale_by_std: 1 / std of the first batch's latents (posterior samples for kl)."""
  return 1.0 / jnp.std(latents_from_moments(autoencoder_kind, moments, rng))


def make_sampler(unet: UNetModel, autoencoder, config, schedule, num_samples: int):
  """A jitted fn(unet_params, ae_params, scale_factor, rng) -> images (N,H,W,3) in [-1, 1]."""
  sampling = config.sampling
  shape = (num_samples,) + latent_shape(config)

  def sample(unet_params, ae_params, scale_factor, rng):
    model_fn = lambda x, t: unet.apply({'params': unet_params}, x, t)
    noise_rng, ddim_rng = jax.random.split(rng)
    latents = samplers.ddim_sample(model_fn, jax.random.normal(noise_rng, shape), ddim_rng, schedule,
                                   sampling.num_steps, sampling.eta, sampling.spacing)
    decoded = autoencoder.apply({'params': ae_params}, latents / scale_factor,
                                method=autoencoder.decode)
    return jnp.clip(decoded, -1.0, 1.0)

  return jax.jit(sample)


def moment_batches(config, workdir, autoencoder, ae_params, mesh):
  """(iterator, generator of global batches {'moments'}): the stage-1 posterior of each image,
  encoded on the fly, or read from a cache encoded once (diffusion_train.precompute_latents)."""
  train_config = config.diffusion_train
  encode = jax.jit(lambda params, x: autoencoder.apply({'params': params}, x,
                                                         method=autoencoder.encode_moments))
  if not train_config.precompute_latents:
    iterator, images = common.make_batches(config, train_config.batch_size, mesh, seed_offset=1)
    return iterator, ({'moments': encode(ae_params, batch['image'])} for batch in images)

  # Each process encodes its own slice on its own devices: slices differ in length, so no
  # computation may span processes here.
  local_mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ('data',))
  local_params = jax.device_put(multihost_utils.process_allgather(ae_params, tiled=True),
                                jax.sharding.NamedSharding(local_mesh, jax.sharding.PartitionSpec()))
  local_batch = jax.sharding.NamedSharding(local_mesh, jax.sharding.PartitionSpec('data'))
  local_batch_size = common.local_batch_size(train_config.batch_size, mesh)
  cache = common.stage_dir(workdir, STAGE) / 'latents'
  latents.write_cache(
      cache, config.data, lambda images: np.asarray(encode(local_params, jax.device_put(images, local_batch))),
      batch_size=local_batch_size,
      fingerprint={'autoencoder_step': common.latest_step(workdir, stage1.STAGE),
                   'autoencoder': config.autoencoder.to_dict()})
  iterator = latents.make_iterator(cache, batch_size=local_batch_size, seed=config.seed + 1,
                                   flip=config.data.flip)
  return iterator, (sharding.global_batch(batch, mesh) for batch in iterator)


def abstract_state(model, config, mesh):
  tx = make_optimizer(config.diffusion_train)
  abstract = jax.eval_shape(functools.partial(create_state, model, config, tx=tx), jax.random.PRNGKey(0))
  return abstract, sharding.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)


def is_complete(config, workdir) -> bool:
  return common.is_stage_complete(workdir, STAGE, config.diffusion_train.num_steps)


def train(config, workdir) -> TrainState:
  """Train stage 2 on the latents of the trained stage 1, resuming from <workdir>/diffusion."""
  directory = common.stage_dir(workdir, STAGE)
  loop.write_config(directory, config)
  train_config = config.diffusion_train
  mesh = sharding.make_mesh(config.mesh)
  autoencoder, ae_params = stage1.load_params(config, workdir, mesh)
  unet = build_unet(config)
  schedule = schedules.schedule_from_config(config.diffusion)
  iterator, batches = moment_batches(config, workdir, autoencoder, ae_params, mesh)
  checkpoints = common.stage_checkpoints(workdir, STAGE, train_config)
  tx = make_optimizer(train_config)
  abstract, shardings = abstract_state(unet, config, mesh)
  state, resumed = loop.restore_or_create(checkpoints, abstract, shardings,
                                          functools.partial(create_state, unet, config, tx=tx),
                                          jax.random.PRNGKey(config.seed + 1), iterator)
  if resumed:
    logging.info('diffusion: resumed from step %d (scale_factor %.5f)', int(state.step),
                 float(state.extras['scale_factor']))
  else:
    scale_factor = config.diffusion.scale_factor
    if config.diffusion.scale_by_std:
      # Uses the first batch only to measure the latent std; training starts from the next one.
      first = next(batches)
      scale_factor = scale_factor_from_moments(first['moments'],
                                               jax.random.fold_in(state.rng, SCALE_FACTOR_KEY),
                                               config.autoencoder.kind)
      logging.info('diffusion: scale_by_std, scale_factor = 1/std(z) = %.5f', float(scale_factor))
    state = state.replace(extras={'scale_factor': jax.device_put(
        jnp.asarray(scale_factor, jnp.float32), sharding.replicated(mesh))})
  logging.info('diffusion: mesh %s, %s', dict(mesh.shape),
               sharding.describe_param_sharding(abstract.params, shardings.params))
  logging.info('diffusion: %d U-Net parameters, latents %s',
               sum(np.size(x) for x in jax.tree.leaves(abstract.params)), latent_shape(config))

  step_fn = jax.jit(
      functools.partial(train_step, model=unet, tx=tx, schedule=schedule,
                        loss_type=config.diffusion.loss_type, base_ema_decay=train_config.ema_decay,
                        deterministic=config.unet.dropout == 0.0,
                        autoencoder_kind=config.autoencoder.kind),
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  sampler = make_sampler(unet, autoencoder, config, schedule, config.sampling.batch_size)

  def write_samples(state, step):
    params = state.ema_params if config.sampling.use_ema else state.params
    samples = sampler(params, ae_params, state.extras['scale_factor'],
                      jax.random.PRNGKey(config.sampling.seed))
    if jax.process_index() == 0:
      path = image_io.save_grid(directory / 'samples' / f'ddim{config.sampling.num_steps}_{step:07d}.png',
                                np.asarray(samples))
      logging.info('diffusion: wrote %s', path)

  try:
    return loop.run_steps(
        name='diffusion', state=state, train_step=step_fn, batches=batches, iterator=iterator,
        checkpoints=checkpoints, writer=loop.make_writer(directory),
        total_steps=train_config.num_steps, log_every=config.log_every_steps,
        max_nonfinite_steps=config.max_nonfinite_steps, metrics_path=directory / 'metrics.jsonl',
        periodic=[(train_config.sample_every_steps, write_samples)])
  finally:
    checkpoints.close()
