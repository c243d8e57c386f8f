"""Stage 1: train AutoencoderKL with a pixel loss and a KL regulariser.

The loss is composed of named terms (`autoencoder_loss`) so perceptual and adversarial terms can
join as further entries; each term's weight comes from `config.autoencoder_loss`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from latent_diffusion import images as image_io
from latent_diffusion.diffusion.process import elementwise_loss
from latent_diffusion.errors import CheckpointError
from latent_diffusion.models.autoencoder import AutoencoderKL
from latent_diffusion.train import common, loop, sharding
from latent_diffusion.train.state import TrainState

STAGE = 'autoencoder'


def build_autoencoder(config) -> AutoencoderKL:
  c = config.autoencoder
  return AutoencoderKL(ch=c.ch, ch_mult=tuple(c.ch_mult), num_res_blocks=c.num_res_blocks,
                       attn_resolutions=tuple(c.attn_resolutions), resolution=config.data.image_size,
                       in_channels=c.in_channels, out_ch=c.out_ch, z_channels=c.z_channels,
                       double_z=c.double_z, embed_dim=c.embed_dim, dropout=c.dropout,
                       norm_num_groups=c.norm_num_groups, remat=config.remat,
                       dtype=common.activation_dtype(config))


def init_params(model: AutoencoderKL, config, rng):
  size = config.data.image_size
  return model.init(rng, jnp.zeros((1, size, size, model.in_channels), jnp.float32))['params']


def make_optimizer(train_config) -> optax.GradientTransformation:
  """Adam(b1, b2) as the paper's first stage, with an optional linear warm-up."""
  learning_rate = train_config.learning_rate
  if train_config.warmup_steps:
    learning_rate = optax.linear_schedule(0.0, learning_rate, train_config.warmup_steps)
  return common.accumulate_gradients(
      optax.adam(learning_rate, b1=train_config.adam_b1, b2=train_config.adam_b2), train_config)


def autoencoder_loss(model, params, images, rng, loss_config, deterministic=True):
  """Sum-per-image pixel loss plus kl_weight * KL, as the paper's LPIPSWithDiscriminator without
  its perceptual and adversarial terms. Returns (loss, metrics)."""
  posterior_rng, dropout_rng = jax.random.split(rng)
  reconstructions, posterior = model.apply({'params': params}, images, rng=posterior_rng,
                                           deterministic=deterministic, rngs={'dropout': dropout_rng})
  pixel = elementwise_loss(reconstructions, images, loss_config.pixel_loss)
  batch = images.shape[0]
  terms = {
      'rec_loss': jnp.sum(pixel) / batch,
      'kl_loss': jnp.sum(posterior.kl()) / batch,
  }
  loss = terms['rec_loss'] + loss_config.kl_weight * terms['kl_loss']
  mse = jnp.mean(jnp.square(reconstructions - images))
  metrics = {'loss': loss, **terms, 'l1': jnp.mean(jnp.abs(reconstructions - images)),
             'psnr': 10.0 * jnp.log10(4.0 / jnp.maximum(mse, 1e-10))}
  return loss, metrics


def train_step(state: TrainState, batch: dict, *, model, tx, loss_config, deterministic) -> tuple:
  """One optimizer step on batch['image']. Pure: randomness from fold_in(rng, step)."""
  grad_fn = jax.value_and_grad(
      lambda p: autoencoder_loss(model, p, batch['image'], state.step_rng(), loss_config,
                                 deterministic), has_aux=True)
  (loss, metrics), grads = grad_fn(state.params)
  state, skipped = state.apply_gradients_if_finite(grads, tx, loss)
  metrics.update(grad_norm=optax.global_norm(grads), nonfinite=skipped.astype(jnp.float32))
  return state, metrics


def create_state(model, config, rng, tx) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  return TrainState.create(init_params(model, config, init_rng), tx,
                           state_rng)


def abstract_state(model, config, mesh):
  tx = make_optimizer(config.autoencoder_train)
  abstract = jax.eval_shape(functools.partial(create_state, model, config, tx=tx), jax.random.PRNGKey(0))
  return abstract, sharding.state_shardings(abstract, mesh, config.mesh.fsdp_min_size)


def load_params(config, workdir, mesh=None):
  """The latest stage-1 parameters in <workdir>/autoencoder, for stage 2 and sampling."""
  mesh = mesh or sharding.make_mesh(config.mesh)
  model = build_autoencoder(config)
  checkpoints = common.stage_checkpoints(workdir, STAGE)
  if checkpoints.latest_step() is None:
    raise CheckpointError(f'no autoencoder checkpoint in {checkpoints.directory}; '
                          'train stage 1 first (--config.mode=train_autoencoder)')
  abstract, shardings = abstract_state(model, config, mesh)
  state = checkpoints.restore(loop.abstract_with_shardings(abstract, shardings))
  checkpoints.close()
  return model, state.params


def is_complete(config, workdir) -> bool:
  return common.is_stage_complete(workdir, STAGE, config.autoencoder_train.num_steps)


def train(config, workdir) -> TrainState:
  """Train stage 1, resuming from the latest checkpoint in <workdir>/autoencoder."""
  directory = common.stage_dir(workdir, STAGE)
  loop.write_config(directory, config)
  train_config = config.autoencoder_train
  mesh = sharding.make_mesh(config.mesh)
  model = build_autoencoder(config)
  iterator, batches = common.make_batches(config, train_config.batch_size, mesh)
  checkpoints = common.stage_checkpoints(workdir, STAGE, train_config)
  tx = make_optimizer(train_config)
  abstract, shardings = abstract_state(model, config, mesh)
  state, resumed = loop.restore_or_create(checkpoints, abstract, shardings,
                                          functools.partial(create_state, model, config, tx=tx),
                                          jax.random.PRNGKey(config.seed), iterator)
  if resumed:
    logging.info('autoencoder: resumed from step %d', int(state.step))
  logging.info('autoencoder: mesh %s, %s', dict(mesh.shape),
               sharding.describe_param_sharding(abstract.params, shardings.params))
  logging.info('autoencoder: %d parameters, f=%d', sum(np.size(x) for x in jax.tree.leaves(abstract.params)),
               model.downsampling_factor)

  step_fn = jax.jit(
      functools.partial(train_step, model=model, tx=tx, loss_config=config.autoencoder_loss,
                        deterministic=config.autoencoder.dropout == 0.0),
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)

  sample_images = common.preview_images(config, train_config.num_sample_images)
  reconstruct = jax.jit(lambda params, x: model.apply({'params': params}, x)[0])

  def write_reconstructions(state, step):
    reconstructions = np.asarray(reconstruct(state.params, sample_images))  # every process
    if jax.process_index() == 0:
      path = image_io.save_grid(directory / 'samples' / f'reconstructions_{step:07d}.png',
                                np.concatenate([sample_images, reconstructions]),
                                columns=len(sample_images))
      logging.info('autoencoder: wrote %s', path)

  try:
    return loop.run_steps(
        name='autoencoder', state=state, train_step=step_fn, batches=batches, iterator=iterator,
        checkpoints=checkpoints, writer=loop.make_writer(directory),
        total_steps=train_config.num_steps, log_every=config.log_every_steps,
        max_nonfinite_steps=config.max_nonfinite_steps, metrics_path=directory / 'metrics.jsonl',
        periodic=[(train_config.sample_every_steps, write_reconstructions)])
  finally:
    checkpoints.close()

