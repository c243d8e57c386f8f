"""Sample mode: restore both stages, draw latents with DDIM, decode once, write a grid."""


import jax
import numpy as np
from absl import logging

from latent_diffusion import images as image_io
from latent_diffusion.diffusion import schedules
from latent_diffusion.errors import CheckpointError
from latent_diffusion.train import autoencoder as stage1
from latent_diffusion.train import common, diffusion, loop, sharding


def sample(config, workdir):
  """Write config.sampling.num_samples images as a grid to <workdir>/diffusion/samples/."""
  mesh = sharding.make_mesh(config.mesh)
  autoencoder, ae_params = stage1.load_params(config, workdir, mesh)
  unet = diffusion.build_unet(config)
  checkpoints = common.stage_checkpoints(workdir, diffusion.STAGE)
  step = checkpoints.latest_step()
  if step is None:
    raise CheckpointError(f'no diffusion checkpoint in {checkpoints.directory}; '
                          'train stage 2 first (--config.mode=train_diffusion)')
  abstract, shardings = diffusion.abstract_state(unet, config, mesh)
  state = checkpoints.restore(loop.abstract_with_shardings(abstract, shardings))
  checkpoints.close()
  params = state.ema_params if config.sampling.use_ema else state.params

  sampling = config.sampling
  sampler = diffusion.make_sampler(unet, autoencoder, config, schedules.schedule_from_config(config.diffusion),
                                   sampling.batch_size)
  rng = jax.random.PRNGKey(sampling.seed)
  batches = []
  for index in range(-(-sampling.num_samples // sampling.batch_size)):
    batches.append(np.asarray(sampler(params, ae_params, state.extras['scale_factor'],
                                      jax.random.fold_in(rng, index))))
  samples = np.concatenate(batches)[:sampling.num_samples]
  name = f'sample_step{step}_ddim{sampling.num_steps}_eta{sampling.eta:g}_seed{sampling.seed}.png'
  path = image_io.save_grid(common.stage_dir(workdir, diffusion.STAGE) / 'samples' / name, samples)
  logging.info('sample: wrote %d images to %s', len(samples), path)
  print(f'wrote {path}')
  return samples
