"""LPIPS perceptual distance (Zhang et al. 2018, v0.1, VGG16 trunk), the paper's autoencoder loss term.

Its parameters are pretrained and frozen: torchvision's ImageNet VGG16 and the lpips package's
linear heads, converted from their torch files by `load_lpips_params`. Pass them to `apply` as a
constant, never to the optimiser. The distance is differentiable w.r.t. both image batches.

Parameter tree: {'vgg': {'conv1_1' .. 'conv5_3': {'kernel', 'bias'}}, 'lin0' .. 'lin4': {'kernel'}}.
"""

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion import torch_files
from latent_diffusion.errors import CheckpointError, ConfigError
from latent_diffusion.models.layers import conv

Dtype = Any

# torchvision vgg16().features up to relu5_3: five blocks of 3x3 conv + ReLU, as (channels, the
# `features` index of each conv), with a 2x2 max-pool between blocks. Block b's i-th conv is our
# `conv{b}_{i}`. LPIPS taps each block's last ReLU (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3).
VGG16_BLOCKS = ((64, (0, 2)), (128, (5, 7)), (256, (10, 12, 14)), (512, (17, 19, 21)),
                (512, (24, 26, 28)))

# lpips' ScalingLayer: maps [-1, 1] images to roughly the ImageNet normalisation VGG16 was trained on.
SHIFT = (-.030, -.088, -.188)
SCALE = (.458, .448, .450)
NORM_EPS = 1e-10  # lpips.normalize_tensor


class VGG16Features(nn.Module):
  """torchvision's VGG16 conv stack up to relu5_3. (B,H,W,3) -> the five ReLU taps, H/1 .. H/16."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    taps = []
    for block, (channels, indices) in enumerate(VGG16_BLOCKS, 1):
      if taps:
        x = nn.max_pool(x, (2, 2), (2, 2))
      for i in range(1, len(indices) + 1):
        x = nn.relu(conv(channels, 3, dtype=self.dtype, name=f'conv{block}_{i}')(x))
      taps.append(x)
    return taps


def _unit_normalise(features: jax.Array) -> jax.Array:
  """features / (L2 norm over channels + eps), as lpips. Where all channels are zero the gradient of
  the norm is taken as 0 (the plain sqrt would give NaN there); values are unchanged."""
  squared_norm = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
  positive = squared_norm > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, squared_norm, 1.0)), 0.0)
  return features / (norm + NORM_EPS)


class LPIPS(nn.Module):
  """LPIPS distance between two NHWC image batches in [-1, 1]: (B,H,W,3), (B,H,W,3) -> (B,) float32.

  Per image, as a loss wants it to average; the paper adds it to the per-pixel L1 loss, which in
  NHWC is `l1 + weight * lpips[:, None, None, None]`. Convolutions run in `dtype`; the unit
  normalisation, differences and heads in float32.
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images0, images1):
    batch = images0.shape[0]
    shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
    x = (jnp.concatenate([images0, images1]).astype(jnp.float32) - shift) / scale  # one VGG pass
    taps = VGG16Features(self.dtype, name='vgg')(x.astype(self.dtype))
    distance = jnp.zeros((batch,), jnp.float32)
    for i, tap in enumerate(taps):
      features = _unit_normalise(tap.astype(jnp.float32))
      squared_difference = jnp.square(features[:batch] - features[batch:])  # (B,h,w,C)
      head = nn.Dense(1, use_bias=False, param_dtype=jnp.float32, name=f'lin{i}')
      distance = distance + jnp.mean(head(squared_difference), axis=(1, 2, 3))
    return distance


def lpips_params_from_state_dicts(vgg_state_dict: Mapping[str, np.ndarray],
                                  heads_state_dict: Mapping[str, np.ndarray]) -> dict:
  """LPIPS params from torchvision's vgg16 state dict (`features.N.weight/bias`; `classifier.*`
  unused) and the lpips heads (`lin{i}.model.1.weight`)."""
  return _params(vgg_state_dict, heads_state_dict, 'VGG16 state dict', 'LPIPS heads state dict')


def load_lpips_params(vgg_path: str | os.PathLike, heads_path: str | os.PathLike) -> dict:
  """LPIPS params from torchvision's vgg16-397923af.pth and the lpips package's weights/v0.1/vgg.pth."""
  if not os.path.isfile(vgg_path):
    raise ConfigError(f'LPIPS VGG16 weights not found at {vgg_path} and nothing here can download '
                      "them: put torchvision's vgg16 ImageNet state dict (vgg16-397923af.pth) there")
  if not os.path.isfile(heads_path):
    raise ConfigError(f'LPIPS heads not found at {heads_path} and nothing here can download them: put '
                      "the lpips package's linear heads for VGG (lpips/weights/v0.1/vgg.pth) there")
  return _params(torch_files.load_state_dict(vgg_path), torch_files.load_state_dict(heads_path),
                 os.fspath(vgg_path), os.fspath(heads_path))


def _params(vgg_state_dict, heads_state_dict, vgg_source: str, heads_source: str) -> dict:
  vgg, in_channels = {}, 3
  for block, (channels, indices) in enumerate(VGG16_BLOCKS, 1):
    for i, index in enumerate(indices, 1):
      weight = _take(vgg_state_dict, f'features.{index}.weight', (channels, in_channels, 3, 3), vgg_source)
      bias = _take(vgg_state_dict, f'features.{index}.bias', (channels,), vgg_source)
      vgg[f'conv{block}_{i}'] = {'kernel': weight.transpose(2, 3, 1, 0), 'bias': bias}  # OIHW -> HWIO
      in_channels = channels
  params = {'vgg': vgg}
  for i, (channels, _) in enumerate(VGG16_BLOCKS):
    weight = _take(heads_state_dict, f'lin{i}.model.1.weight', (1, channels, 1, 1), heads_source)
    params[f'lin{i}'] = {'kernel': weight.reshape(1, channels).T}  # 1x1 conv -> Dense (C, 1)
  return params


def _take(state_dict, key: str, shape: tuple[int, ...], source: str) -> np.ndarray:
  if key not in state_dict:
    raise CheckpointError(f'{source}: missing {key}')
  value = np.asarray(state_dict[key], np.float32)
  if value.shape != shape:
    raise CheckpointError(f'{source}: {key} has shape {value.shape}, expected {shape}')
  return value
