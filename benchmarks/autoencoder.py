"""KL autoencoder encode (to the posterior's moments) and decode: ours vs diffusers' AutoencoderKL."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks import timing
from latent_diffusion.train import autoencoder as stage1


def kl_codec(config, batch: int, repeats: int, with_reference: bool = True) -> dict:
  """{'encode': row, 'decode': row} at config.data.image_size."""
  size = config.data.image_size
  model = stage1.build_autoencoder(config)
  images = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  params = timing.random_params(lambda: model.init(jax.random.PRNGKey(0), images[:1])['params'])
  encode = jax.jit(lambda p, x: model.apply({'params': p}, x, method=model.encode_moments))
  decode = jax.jit(lambda p, z: model.apply({'params': p}, z, method=model.decode))
  x = jnp.asarray(images)
  z = encode(params, x)[..., :config.autoencoder.embed_dim]
  rows = {'encode': timing.measure(lambda: jax.block_until_ready(encode(params, x)), repeats),
          'decode': timing.measure(lambda: jax.block_until_ready(decode(params, z)), repeats)}
  theirs = {}
  if with_reference:
    from benchmarks import reference  # pylint: disable=g-import-not-at-top
    torch.manual_seed(0)
    module = reference.diffusers_autoencoder(config.autoencoder)
    x_torch = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    z_torch = torch.from_numpy(np.asarray(z)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
      theirs['encode'] = timing.measure(lambda: module.encode(x_torch).latent_dist.mean, repeats)
      theirs['decode'] = timing.measure(lambda: module.decode(z_torch).sample, repeats)
  return {name: timing.compared(ours, theirs.get(name)) for name, ours in rows.items()}
