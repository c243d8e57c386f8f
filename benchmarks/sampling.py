"""DDIM sampling, the whole loop: our compiled scan vs diffusers' DDIMScheduler over the torch U-Net."""

import jax
import numpy as np
import torch

from benchmarks import timing, unet
from latent_diffusion.train import diffusion


def our_sampler(config, batch: int, num_steps: int):
  """A blocking fn() drawing `batch` latents with the config's DDIM sampler (no decode)."""
  config = config.copy_and_resolve_references()
  config.sample.sampler, config.sample.eta = 'ddim', 0.0
  model = diffusion.build_denoiser(config)
  schedule = diffusion.schedule_from_config(config)
  params = timing.random_params(lambda: diffusion.init_params(model, config, jax.random.PRNGKey(0)))
  raw = diffusion.sample_conditions(config, batch)
  sample = jax.jit(lambda params, rng: diffusion.sample_latents(model, config, schedule, params, rng, raw,
                                                                batch, num_steps))
  return lambda: jax.block_until_ready(sample(params, jax.random.PRNGKey(1)))


def torch_scheduler(config):
  """diffusers' DDIMScheduler with the config's betas and the paper's uniform spacing (steps_offset 1)."""
  # benchmarks.reference stubs the torchvision ops that diffusers' imports would otherwise fail on.
  from benchmarks import reference  # pylint: disable=g-import-not-at-top,unused-import
  from diffusers import DDIMScheduler  # pylint: disable=g-import-not-at-top
  betas = np.asarray(diffusion.schedule_from_config(config).betas, np.float32)
  return DDIMScheduler(num_train_timesteps=len(betas), trained_betas=betas, clip_sample=False,
                       set_alpha_to_one=False, steps_offset=1, timestep_spacing='leading')


def torch_sampler(config, batch: int, num_steps: int):
  module = unet.torch_unet(config)
  scheduler = torch_scheduler(config)
  h, w, c = diffusion.latent_shape(config)

  def sample():
    scheduler.set_timesteps(num_steps)
    x = torch.randn(batch, c, h, w)
    with torch.no_grad():
      for t in scheduler.timesteps:
        x = scheduler.step(module(x, t).sample, t, x).prev_sample
    return x
  return sample


def ddim(config, batch: int, num_steps: int, repeats: int, with_reference: bool = True) -> dict:
  ours = timing.measure(our_sampler(config, batch, num_steps), repeats)
  theirs = timing.measure(torch_sampler(config, batch, num_steps), repeats) if with_reference else None
  row = timing.compared(ours, theirs)
  row['samples_per_s'] = batch / ours['median_s']
  return row
