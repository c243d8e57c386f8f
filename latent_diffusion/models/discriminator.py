"""The PatchGAN discriminator that trains the paper's first-stage autoencoder (NHWC).

A Flax port of taming-transformers' `NLayerDiscriminator` (taming/modules/discriminator/model.py),
which the paper's `LPIPSWithDiscriminator` builds as `NLayerDiscriminator(3, 64, 3, use_actnorm=False)`
and initialises with `weights_init`. Layers are named after the torch `nn.Sequential` indices
(`main.2.weight` is `main_2/kernel`), so `discriminator_params_from_state_dict` maps the paper's
`loss.discriminator.*` weights directly.

Batch statistics. With BatchNorm (the default) the model has a `batch_stats` collection
(running `mean` and `var` per norm layer, starting at 0 and 1 as in torch):

  variables = model.init(key, images, train=False)
  logits = model.apply(variables, images, train=False)               # running averages (torch .eval())
  logits, updates = model.apply(variables, images, train=True,
                                mutable=['batch_stats'])             # batch statistics (torch .train())
  variables = {**variables, **updates}

ActNorm. With `use_actnorm=True` the norm layers are initialised from data, as torch does on the
first training forward: `init` sets each layer's loc/scale from the activations of the batch passed
to `init`, so init with a real batch (e.g. the first training batch), not zeros (zeros give
scale 1e6).
"""

import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.errors import CheckpointError

Dtype = Any

KERNEL_SIZE = 4  # With padding 1: stride 2 halves H and W, stride 1 takes 1 off each.
LEAKY_SLOPE = 0.2

# taming's weights_init: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02), bias 0. It leaves conv
# biases at torch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and ActNorm to its data init.
conv_kernel_init = nn.initializers.normal(0.02)


def norm_scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def torch_default_bias_init(fan_in: int):
  """PyTorch's conv bias init, which needs the fan-in a flax bias initialiser is not given."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d over NHWC, computed in float32.

  Unlike flax's nn.BatchNorm, the running variance is updated with the unbiased batch variance
  (as torch does), so running stats track torch's exactly. `momentum` is flax's convention, the
  weight of the old value: torch's momentum 0.1 is 0.9 here.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool):
    features = x.shape[-1]
    scale = self.param('scale', norm_scale_init, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    h = x.astype(jnp.float32)
    if train:
      mean = h.mean(axis=(0, 1, 2))
      var = jnp.square(h - mean).mean(axis=(0, 1, 2))  # biased: what normalises the batch
      if not self.is_initializing():  # torch's running stats start at 0 and 1, untouched by init.
        count = h.size // features
        unbiased_var = var * (count / max(count - 1, 1))
        running_mean.value = self.momentum * running_mean.value + (1 - self.momentum) * mean
        running_var.value = self.momentum * running_var.value + (1 - self.momentum) * unbiased_var
    else:
      mean, var = running_mean.value, running_var.value
    h = (h - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return h.astype(x.dtype)


class ActNorm(nn.Module):
  """Per-channel affine `scale * (x + loc)` (taming's ActNorm), computed in float32.

  Data-dependent init: `init` sets loc = -mean and scale = 1 / (std + 1e-6) per channel from the
  batch it is given (std unbiased, as torch.std), so the layer's first outputs have zero mean and
  unit variance. `apply` uses the stored values and never re-initialises.
  """

  @nn.compact
  def __call__(self, x):
    h = x.astype(jnp.float32)
    loc = self.param('loc', lambda _: -h.mean(axis=(0, 1, 2)))  # (C,)
    scale = self.param('scale', lambda _: 1.0 / (jnp.std(h, axis=(0, 1, 2), ddof=1) + 1e-6))  # (C,)
    return (scale * (h + loc)).astype(x.dtype)


class NLayerDiscriminator(nn.Module):
  """PatchGAN: images (B,H,W,C) -> real/fake logits per patch (B,h,w,1), float32.

  n_layers stride-2 4x4 convs (the first without norm), one stride-1 conv, then a stride-1 conv to
  one channel; LeakyReLU(0.2) between. Widths ndf * min(2**n, 8). Convs followed by BatchNorm have
  no bias (the norm's offset replaces it); with ActNorm every conv has one. 64x64 in -> 6x6 out for
  the default 3 layers. `train` selects batch statistics (and running-stat updates) over running
  averages; it does not matter with ActNorm.
  """
  ndf: int = 64
  n_layers: int = 3
  use_actnorm: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    index = 0  # position in torch's nn.Sequential: conv, [norm], LeakyReLU, ...

    def conv(h, features, stride, use_bias):
      nonlocal index
      fan_in = h.shape[-1] * KERNEL_SIZE * KERNEL_SIZE
      h = nn.Conv(features, (KERNEL_SIZE, KERNEL_SIZE), strides=(stride, stride),
                  padding=((1, 1), (1, 1)), use_bias=use_bias, dtype=self.dtype,
                  param_dtype=jnp.float32, kernel_init=conv_kernel_init,
                  bias_init=torch_default_bias_init(fan_in), name=f'main_{index}')(h)
      index += 1
      return h

    def norm_and_activation(h):
      nonlocal index
      if self.use_actnorm:
        h = ActNorm(name=f'main_{index}')(h)
      else:
        h = BatchNorm(name=f'main_{index}')(h, train)
      index += 2  # the norm, then the LeakyReLU
      return nn.leaky_relu(h, LEAKY_SLOPE)

    h = conv(x.astype(self.dtype), self.ndf, 2, use_bias=True)  # (B,H/2,W/2,ndf)
    h = nn.leaky_relu(h, LEAKY_SLOPE)
    index += 1
    for n in range(1, self.n_layers):
      h = conv(h, self.ndf * min(2 ** n, 8), 2, use_bias=self.use_actnorm)
      h = norm_and_activation(h)
    h = conv(h, self.ndf * min(2 ** self.n_layers, 8), 1, use_bias=self.use_actnorm)
    h = norm_and_activation(h)
    return conv(h, 1, 1, use_bias=True).astype(jnp.float32)  # (B,h,w,1)


def _to_numpy(value) -> np.ndarray:
  """A torch tensor (without importing torch) or array-like as a float32 numpy array."""
  if hasattr(value, 'detach'):
    value = value.detach().cpu().numpy()
  return np.asarray(value, np.float32)


def discriminator_params_from_state_dict(state_dict: Mapping[str, Any], use_actnorm: bool,
                                         ndf: int = 64, n_layers: int = 3, input_nc: int = 3,
                                         prefix: str = '') -> tuple[dict, dict]:
  """A torch NLayerDiscriminator state dict -> (params, batch_stats) for NLayerDiscriminator.

  Keys are `{prefix}main.<i>.weight|bias|running_mean|running_var|loc|scale`; pass
  prefix='loss.discriminator.' for a whole checkpoint of the paper's autoencoder. Conv weights
  go OIHW -> HWIO, ActNorm's (1,C,1,1) loc/scale -> (C,). batch_stats is {} with ActNorm.
  `num_batches_tracked` (unused with a fixed momentum) and ActNorm's `initialized` flag are
  ignored. Raises CheckpointError for the other kind of norm layer, a missing key, a shape that
  differs from this configuration's, or an unexpected layer key (e.g. another n_layers).
  """
  model = NLayerDiscriminator(ndf=ndf, n_layers=n_layers, use_actnorm=use_actnorm)
  size = 2 ** (n_layers + 2)  # big enough that every layer has a non-empty output
  abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, size, size, input_nc), jnp.float32))
  config = f'NLayerDiscriminator(input_nc={input_nc}, ndf={ndf}, n_layers={n_layers}, use_actnorm={use_actnorm})'
  layer_keys = [key for key in state_dict if key.startswith(prefix + 'main.')]
  other_norm = '.running_mean' if use_actnorm else '.loc'
  for key in layer_keys:
    if key.endswith(other_norm):
      raise CheckpointError(f'discriminator checkpoint has {"BatchNorm" if use_actnorm else "ActNorm"} '
                            f'layers ({key}); set use_actnorm={not use_actnorm}')
  used = set()

  def take(key, torch_shape, to_flax):
    key = prefix + key
    if key not in state_dict:
      raise CheckpointError(f'discriminator checkpoint has no {key} (shape {torch_shape}) that {config} needs')
    value = _to_numpy(state_dict[key])
    if value.shape != torch_shape:
      raise CheckpointError(f'discriminator checkpoint: {key} has shape {value.shape} but {config} '
                            f'expects {torch_shape}')
    used.add(key)
    return to_flax(value)

  def convert(collection, layer, name, leaf):
    """One flax leaf from the torch entry it mirrors."""
    index = layer.removeprefix('main_')
    shape = tuple(leaf.shape)
    if name == 'kernel':  # conv weight, (h,w,in,out) here, (out,in,h,w) in torch
      return take(f'main.{index}.weight', (shape[3], shape[2], shape[0], shape[1]),
                  lambda w: w.transpose(2, 3, 1, 0))
    if use_actnorm and name in ('loc', 'scale'):
      return take(f'main.{index}.{name}', (1, shape[0], 1, 1), lambda v: v.reshape(-1))
    torch_name = {('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
                  ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}
    return take(f'main.{index}.{torch_name[collection, name]}', shape, lambda v: v)

  converted = {collection: {layer: {name: jnp.asarray(convert(collection, layer, name, leaf))
                                    for name, leaf in leaves.items()}
                            for layer, leaves in abstract.get(collection, {}).items()}
               for collection in ('params', 'batch_stats')}
  unexpected = sorted(key for key in layer_keys if key not in used
                      and not key.endswith(('.num_batches_tracked', '.initialized')))
  if unexpected:
    raise CheckpointError(f'discriminator checkpoint has entries that {config} does not: '
                          f'{", ".join(unexpected)}')
  return converted['params'], converted['batch_stats']
