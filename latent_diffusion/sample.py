"""Sample mode: restore both stages, draw latents with the configured sampler under the requested
conditions (from noise, or img2img from sample.init_image), decode once, write a grid with each
condition beside its sample, and the single PNGs."""

import jax
import numpy as np
from absl import logging

from latent_diffusion import sample_inputs
from latent_diffusion.errors import CheckpointError
from latent_diffusion.train import autoencoder as stage1
from latent_diffusion.train import common, conditioning, diffusion, loop, sharding


def restore_denoiser(config, workdir, mesh):
  """(model, params to sample with, scale_factor, step) of the latest stage-2 checkpoint."""
  model = diffusion.build_denoiser(config)
  checkpoints = common.stage_checkpoints(workdir, diffusion.STAGE)
  step = checkpoints.latest_step()
  if step is None:
    raise CheckpointError(f'no diffusion checkpoint in {checkpoints.directory}; '
                          'train stage 2 first (--config.mode=train_diffusion)')
  abstract, shardings = diffusion.abstract_state(model, config, mesh)
  state = checkpoints.restore(loop.abstract_with_shardings(abstract, shardings))
  checkpoints.close()
  params = state.ema_params if config.sample.use_ema else state.params
  return model, params, state.extras['scale_factor'], step


def batch_of_inputs(inputs: dict, start: int, batch_size: int) -> dict:
  """The host inputs of samples start .. start + batch_size; a short last batch repeats its rows so
  every call has one shape (one compilation)."""
  return {name: np.resize(np.asarray(value[start:start + batch_size]), (batch_size,) + np.shape(value)[1:])
          for name, value in inputs.items()}


def draw_samples(config, sampler, params, ae_params, scale_factor, inputs: dict, count: int,
                 seed: int) -> np.ndarray:
  """`count` samples in compiled batches of sample.batch_size (the last one padded: one shape)."""
  batch_size = config.sample.batch_size
  rng = jax.random.PRNGKey(seed)
  batches = []
  for index, start in enumerate(range(0, count, batch_size)):
    batch_inputs = batch_of_inputs(inputs, start, batch_size)
    batches.append(np.asarray(sampler(params, ae_params, scale_factor, jax.random.fold_in(rng, index),
                                      batch_inputs, num_samples=batch_size,
                                      num_steps=config.sample.num_steps)))
  return np.concatenate(batches)[:count]


def sample(config, workdir):
  """Write config.sample.num_samples images, as a grid and one by one, to <workdir>/diffusion/samples/."""
  mesh = sharding.make_mesh(config.mesh)
  autoencoder, ae_params = stage1.load_params(config, workdir, mesh)
  model, params, scale_factor, step = restore_denoiser(config, workdir, mesh)
  s = config.sample
  tokenizer = diffusion.make_tokenizer(config)
  inputs, display = sample_inputs.grid_inputs(config, s.num_samples, tokenizer)
  init = sample_inputs.read_init_image(config, s.num_samples)
  if init is not None:  # img2img: the sampler starts from its encoding, the grid shows it
    inputs, display = dict(inputs, init_image=init), dict(display, init_image=init)
  key = conditioning.condition_key(config)
  height, width = sample_inputs.pixel_size(config, key, display)
  shape = diffusion.latent_shape(config, height, width)
  sampler = diffusion.make_sampler(model, autoencoder, config, diffusion.schedule_from_config(config), shape,
                                   tokenizer)
  samples = draw_samples(config, sampler, params, ae_params, scale_factor, inputs, s.num_samples, s.seed)
  samples = sample_inputs.composite(config, samples, display)

  name = f'sample_step{step}_{diffusion.sampler_tag(config)}_seed{s.seed}'
  if key == 'label' and s.class_label >= 0:
    name += f'_class{s.class_label}'
  if init is not None:
    name += f'_img2img{s.strength:g}'
  if (height, width) != (config.data.image_size,) * 2:
    name += f'_{height}x{width}'
  directory = common.stage_dir(workdir, diffusion.STAGE) / 'samples'
  path = sample_inputs.save_grid(config, directory / f'{name}.png', samples, display)
  sample_inputs.save_individual(directory / name, samples)
  logging.info('sample: wrote %d images to %s and %s/', len(samples), path, directory / name)
  print(f'wrote {path}')
  return samples
