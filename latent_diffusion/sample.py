"""Sample mode: restore both stages, draw latents with the configured sampler, decode once, write a grid."""


import jax
import numpy as np
from absl import logging

from latent_diffusion import images as image_io
from latent_diffusion.errors import CheckpointError
from latent_diffusion.train import autoencoder as stage1
from latent_diffusion.train import common, diffusion, loop, sharding


def sample(config, workdir):
  """Write config.sample.num_samples images as a grid to <workdir>/diffusion/samples/."""
  mesh = sharding.make_mesh(config.mesh)
  autoencoder, ae_params = stage1.load_params(config, workdir, mesh)
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

  sampling = config.sample
  sampler = diffusion.make_sampler(model, autoencoder, config, diffusion.schedule_from_config(config))
  conditions = diffusion.sample_conditions(config, sampling.num_samples)
  rng = jax.random.PRNGKey(sampling.seed)
  batches = []
  for index, start in enumerate(range(0, sampling.num_samples, sampling.batch_size)):
    # The last batch is padded to the full batch size: one compiled shape for the whole grid.
    batch_conditions = jax.tree.map(lambda c: np.resize(np.asarray(c[start:start + sampling.batch_size]),
                                                        (sampling.batch_size,) + c.shape[1:]), conditions)
    batches.append(np.asarray(sampler(params, ae_params, state.extras['scale_factor'],
                                      jax.random.fold_in(rng, index), batch_conditions,
                                      num_samples=sampling.batch_size, num_steps=sampling.num_steps)))
  samples = np.concatenate(batches)[:sampling.num_samples]
  name = f'sample_step{step}_{diffusion.sampler_tag(config)}_seed{sampling.seed}'
  if config.sample.class_label >= 0:
    name += f'_class{config.sample.class_label}'
  path = image_io.save_grid(common.stage_dir(workdir, diffusion.STAGE) / 'samples' / f'{name}.png', samples)
  logging.info('sample: wrote %d images to %s', len(samples), path)
  print(f'wrote {path}')
  return samples
