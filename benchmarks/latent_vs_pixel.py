"""The paper's headline claim, measured: samples/s of one U-Net on f=8 latents vs on pixels.

The same U-Net (the config's channels, levels and blocks) runs on the f=8 latents of a
`image_size` image and on the image's pixels (f=1, 3 channels). Attention stays at the same token
counts: where the latent U-Net attends at feature maps of 32x32 and below, the pixel U-Net attends
at its levels of those sizes (full attention over 256x256 pixels would need a 16 GiB logits matrix
per head). A sample costs `num_steps` U-Net evaluations, plus one decode for the latent model;
samples/s = batch / (num_steps * forward + decode), from the measured forward and decode times.
"""

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from latent_diffusion.models.unet import UNetModel
from latent_diffusion.train import autoencoder as stage1
from latent_diffusion.train import diffusion


def pixel_unet_kwargs(config) -> dict:
  kwargs = diffusion.unet_kwargs(config)
  f = config.data.image_size // diffusion.latent_shape(config)[0]
  levels = len(kwargs['channel_mult'])
  kwargs.update(in_channels=3, out_channels=3,
                attention_resolutions=tuple(ds * f for ds in kwargs['attention_resolutions']
                                            if ds * f <= 2 ** (levels - 1)))
  return kwargs


def forward_seconds(kwargs: dict, shape: tuple, repeats: int) -> dict:
  model = UNetModel(**kwargs)
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
  t = jnp.full((shape[0],), 500, jnp.int32)
  params = timing.random_params(model.init, jax.random.PRNGKey(0), x[:1], t[:1])
  apply = jax.jit(model.apply)
  return timing.measure(lambda: jax.block_until_ready(apply(params, x, t)), repeats)


def decode_seconds(config, batch: int, repeats: int) -> dict:
  model = stage1.build_autoencoder(config)
  size = config.data.image_size
  params = timing.random_params(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))['params'])
  z = jnp.zeros((batch,) + diffusion.latent_shape(config))
  decode = jax.jit(lambda p, z: model.apply({'params': p}, z, method=model.decode))
  return timing.measure(lambda: jax.block_until_ready(decode(params, z)), repeats)


def latent_vs_pixel(config, batch: int, num_steps: int, repeats: int) -> dict:
  size = config.data.image_size
  latent = forward_seconds(diffusion.unet_kwargs(config), (batch,) + diffusion.latent_shape(config), repeats)
  pixel_kwargs = pixel_unet_kwargs(config)
  pixel = forward_seconds(pixel_kwargs, (batch, size, size, 3), repeats)
  decode = decode_seconds(config, batch, repeats)
  latent_rate = batch / (num_steps * latent['median_s'] + decode['median_s'])
  pixel_rate = batch / (num_steps * pixel['median_s'])
  return {'num_steps': num_steps, 'latent_forward': latent, 'pixel_forward': pixel, 'decode': decode,
          'pixel_attention_resolutions': list(pixel_kwargs['attention_resolutions']),
          'latent_samples_per_s': latent_rate, 'pixel_samples_per_s': pixel_rate,
          'speedup': latent_rate / pixel_rate}
