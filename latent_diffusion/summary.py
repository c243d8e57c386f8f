"""Summary mode: build every network with jax.eval_shape, print a table, write summary.json."""

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp

from latent_diffusion.train import autoencoder as stage1
from latent_diffusion.train import diffusion


def count_parameters(params) -> int:
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def unet_fits(config) -> bool:
  """Whether the U-Net's levels divide the latent side (a stage-1-only config may not care)."""
  latent_side = diffusion.latent_shape(config)[0]
  return latent_side % 2 ** (len(config.unet.channel_mult) - 1) == 0


def network_parameters(config) -> dict[str, dict]:
  """{name: {'parameters': int, 'input': shape, 'parts': {child: int}}} without allocating weights:
  the autoencoder, the PatchGAN discriminator of its loss, the U-Net (left out when its levels do not
  divide the latent side, as in stage-1-only configs) and the conditioning model, if any."""
  autoencoder, discriminator = stage1.build_autoencoder(config), stage1.build_discriminator(config)
  size = config.data.image_size
  image = jax.ShapeDtypeStruct((1, size, size, config.autoencoder.in_channels), jnp.float32)
  rng = jax.random.PRNGKey(0)
  shapes = {
      'autoencoder': (jax.eval_shape(autoencoder.init, rng, image)['params'], image.shape),
      'discriminator': (jax.eval_shape(functools.partial(discriminator.init, train=False), rng,
                                       image)['params'], image.shape),
  }
  if unet_fits(config):
    latent_shape = (1,) + diffusion.latent_shape(config)
    params = jax.eval_shape(functools.partial(diffusion.init_params, diffusion.build_denoiser(config), config),
                            rng)
    unet_input = latent_shape[:-1] + (config.unet.in_channels or latent_shape[-1],)
    shapes['unet'] = (params['unet'], unet_input)
    if 'cond_stage' in params:
      raw = diffusion.example_conditions(config, 1)
      name = diffusion.build_denoiser(config).cond_input
      shapes['cond_stage'] = (params['cond_stage'], raw[name].shape if name in raw else (1,))
  return {name: {'parameters': count_parameters(params), 'input': list(input_shape),
                 'parts': {child: count_parameters(sub) for child, sub in params.items()}}
          for name, (params, input_shape) in shapes.items()}


def summarize(config, workdir) -> dict[str, int]:
  networks = network_parameters(config)
  lines = [f'{"network":<14}{"input (NHWC)":<22}{"parameters":>16}']
  for name, info in networks.items():
    lines.append(f'{name:<14}{str(tuple(info["input"])):<22}{info["parameters"]:>16,}')
  print('\n'.join(lines))
  counts = {name: info['parameters'] for name, info in networks.items()}
  if jax.process_index() == 0:
    path = Path(workdir).absolute() / 'summary.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(counts, indent=2) + '\n')
    print(f'wrote {path}')
  return counts
