"""The Inception-v3 of FID and IS: pytorch-fid's `fid_inception_v3` (the TensorFlow 2015-12-05 graph,
ported), in Flax, reading pytorch-fid's weight file `pt_inception-2015-12-05-6726825d.pth`.

It is torchvision's Inception3 (num_classes=1008, no aux head) with the blocks the TF graph differs in:
the pool branches of Mixed_5b..5d, 6b..6e and 7b average over the window's valid pixels only
(count_include_pad=False), and Mixed_7c's pool branch is a 3x3 max-pool. Module and parameter names
are torch's (Conv2d_1a_3x3, Mixed_5b, branch1x1, conv, bn, fc), so the converter is a table of renames.

Images reach the net at 299x299, resized by one of two rules (RESIZE_MODES):
  'pytorch_fid': pytorch-fid's InceptionV3(resize_input=True): bilinear, align_corners=False and no
                 antialiasing (torch's F.interpolate), on the device;
  'clean':       clean-fid's (Parmar et al. 2022): PIL bicubic per channel on float images in [0, 255],
                 clipped to [0, 255], on the host. PIL antialiases when it shrinks.

Variables are {'params', 'batch_stats'}; BatchNorm always uses the stored running statistics.
"""

import functools
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image

from latent_diffusion import torch_files
from latent_diffusion.errors import CheckpointError, ConfigError
from latent_diffusion.evaluate import batching

INPUT_SIDE = 299
NUM_CLASSES = 1008  # the TF graph's outputs: background, the 1000 ImageNet classes, 7 unused
FEATURES = 2048  # pool3
FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
RESIZE_MODES = ('pytorch_fid', 'clean')
BN_EPS = 1e-3
# Features are compared across machines: no TF32/bf16 passes in convolutions and the fc on GPU/TPU.
PRECISION = jax.lax.Precision.HIGHEST

Pair = tuple[int, int]


def _pair(value: int | Pair) -> Pair:
  return (value, value) if isinstance(value, int) else value


class BasicConv2d(nn.Module):
  """Conv without bias, BatchNorm (running statistics, eps 1e-3), ReLU: torchvision's BasicConv2d."""
  features: int
  kernel: int | Pair
  stride: int = 1
  padding: int | Pair = 0

  @nn.compact
  def __call__(self, x):
    pad_h, pad_w = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), strides=_pair(self.stride),
                padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False, precision=PRECISION,
                name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name='bn')(x)
    return nn.relu(x)


def _average_pool_3x3(x):
  """3x3, stride 1, padding 1, averaging only the pixels inside the image (the TF graph's SAME pool)."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride_2(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding='VALID')


class InceptionA(nn.Module):
  """Mixed_5b..5d (FIDInceptionA): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avg-pool-1x1 -> 224 + pool_features."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    branch1x1 = BasicConv2d(64, 1, name='branch1x1')(x)
    branch5x5 = BasicConv2d(48, 1, name='branch5x5_1')(x)
    branch5x5 = BasicConv2d(64, 5, padding=2, name='branch5x5_2')(branch5x5)
    branch3x3dbl = BasicConv2d(64, 1, name='branch3x3dbl_1')(x)
    branch3x3dbl = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_3')(branch3x3dbl)
    branch_pool = BasicConv2d(self.pool_features, 1, name='branch_pool')(_average_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: stride-2 reduction 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | max-pool/2 -> 480 + C_in."""

  @nn.compact
  def __call__(self, x):
    branch3x3 = BasicConv2d(384, 3, stride=2, name='branch3x3')(x)
    branch3x3dbl = BasicConv2d(64, 1, name='branch3x3dbl_1')(x)
    branch3x3dbl = BasicConv2d(96, 3, padding=1, name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = BasicConv2d(96, 3, stride=2, name='branch3x3dbl_3')(branch3x3dbl)
    return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3_stride_2(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (FIDInceptionC): factorised 7x7 convs of `channels_7x7` channels -> 768."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    branch1x1 = BasicConv2d(192, 1, name='branch1x1')(x)
    branch7x7 = BasicConv2d(c7, 1, name='branch7x7_1')(x)
    branch7x7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(branch7x7)
    branch7x7 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7_3')(branch7x7)
    branch7x7dbl = BasicConv2d(c7, 1, name='branch7x7dbl_1')(x)
    branch7x7dbl = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(branch7x7dbl)
    branch7x7dbl = BasicConv2d(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(branch7x7dbl)
    branch7x7dbl = BasicConv2d(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(branch7x7dbl)
    branch7x7dbl = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(branch7x7dbl)
    branch_pool = BasicConv2d(192, 1, name='branch_pool')(_average_pool_3x3(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: stride-2 reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max-pool/2 -> 512 + C_in."""

  @nn.compact
  def __call__(self, x):
    branch3x3 = BasicConv2d(192, 1, name='branch3x3_1')(x)
    branch3x3 = BasicConv2d(320, 3, stride=2, name='branch3x3_2')(branch3x3)
    branch7x7x3 = BasicConv2d(192, 1, name='branch7x7x3_1')(x)
    branch7x7x3 = BasicConv2d(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(branch7x7x3)
    branch7x7x3 = BasicConv2d(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(branch7x7x3)
    branch7x7x3 = BasicConv2d(192, 3, stride=2, name='branch7x7x3_4')(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3_stride_2(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b (FIDInceptionE_1, average pool) and Mixed_7c (FIDInceptionE_2, `max_pool`) -> 2048."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    branch1x1 = BasicConv2d(320, 1, name='branch1x1')(x)
    branch3x3 = BasicConv2d(384, 1, name='branch3x3_1')(x)
    branch3x3 = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(branch3x3),
        BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(branch3x3)], axis=-1)
    branch3x3dbl = BasicConv2d(448, 1, name='branch3x3dbl_1')(x)
    branch3x3dbl = BasicConv2d(384, 3, padding=1, name='branch3x3dbl_2')(branch3x3dbl)
    branch3x3dbl = jnp.concatenate([
        BasicConv2d(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(branch3x3dbl),
        BasicConv2d(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(branch3x3dbl)], axis=-1)
    if self.max_pool:  # the TF graph's quirk in its last block, kept for comparable scores
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _average_pool_3x3(x)
    branch_pool = BasicConv2d(192, 1, name='branch_pool')(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class FIDInception(nn.Module):
  """(N, H, W, 3) images in [-1, 1], normally 299x299 (see resize_for_inception; at least 75x75) ->
  {'pool3': (N, 2048) the global average pool FID uses, 'logits': (N, 1008) fc of pool3, no dropout,
  the class scores of the Inception Score}."""

  @nn.compact
  def __call__(self, x):
    x = BasicConv2d(32, 3, stride=2, name='Conv2d_1a_3x3')(x)  # 149
    x = BasicConv2d(32, 3, name='Conv2d_2a_3x3')(x)  # 147
    x = BasicConv2d(64, 3, padding=1, name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3_stride_2(x)  # 73
    x = BasicConv2d(80, 1, name='Conv2d_3b_1x1')(x)
    x = BasicConv2d(192, 3, name='Conv2d_4a_3x3')(x)  # 71
    x = _max_pool_3x3_stride_2(x)  # 35
    x = InceptionA(32, name='Mixed_5b')(x)  # 256 channels
    x = InceptionA(64, name='Mixed_5c')(x)  # 288
    x = InceptionA(64, name='Mixed_5d')(x)  # 288
    x = InceptionB(name='Mixed_6a')(x)  # 17x17x768
    for name, channels_7x7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(channels_7x7, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)  # 8x8x1280
    x = InceptionE(name='Mixed_7b')(x)  # 2048
    x = InceptionE(max_pool=True, name='Mixed_7c')(x)
    pool3 = jnp.mean(x, axis=(1, 2))  # (N, 2048)
    logits = nn.Dense(NUM_CLASSES, precision=PRECISION, name='fc')(pool3)
    return {'pool3': pool3, 'logits': logits}


# ---------------------------------------------------------------------------------------------------
# Resizing to 299x299.

def _torch_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) weights of 1-D linear interpolation exactly as torch's CPU F.interpolate(mode='bilinear',
  align_corners=False) computes them: source = (i + 0.5) * scale - 0.5 with scale = in/out in float32 and
  one rounding (a fused multiply-add; rounding twice moves weights by up to 3e-5 at 1024 px), clamped at
  0, between floor(source) and the next pixel (the last pixel repeated); no antialiasing when shrinking."""
  scale = np.float64(np.float32(in_size / out_size))
  source = np.maximum(((np.arange(out_size) + 0.5) * scale - 0.5).astype(np.float32), np.float32(0))
  lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  upper_weight = (source - lower).astype(np.float32)
  matrix = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lower), np.float32(1) - upper_weight)
  np.add.at(matrix, (rows, upper), upper_weight)
  return matrix


def resize_pytorch_fid(images: jax.Array, side: int = INPUT_SIDE) -> jax.Array:
  """(N, H, W, C) -> (N, side, side, C): pytorch-fid's bilinear resize (two matmuls, jittable)."""
  rows = jnp.asarray(_torch_bilinear_matrix(images.shape[1], side))
  columns = jnp.asarray(_torch_bilinear_matrix(images.shape[2], side))
  x = jnp.einsum('oh,nhwc->nowc', rows, images, precision=PRECISION)
  return jnp.einsum('pw,nowc->nopc', columns, x, precision=PRECISION)


def resize_clean(images: np.ndarray, side: int = INPUT_SIDE) -> np.ndarray:
  """(N, H, W, C) in [-1, 1] -> (N, side, side, C) float32 in [-1, 1], on the host: clean-fid's resize,
  PIL bicubic of each channel as a float ('F') image of values in [0, 255], clipped to [0, 255]."""
  images = np.asarray(images, np.float32)
  pixels = (images + 1) * np.float32(127.5)
  out = np.empty((images.shape[0], side, side, images.shape[3]), np.float32)
  for n in range(images.shape[0]):
    for c in range(images.shape[3]):
      channel = Image.fromarray(np.ascontiguousarray(pixels[n, :, :, c]))  # float32: mode 'F'
      out[n, :, :, c] = np.asarray(channel.resize((side, side), resample=Image.BICUBIC))
  return np.clip(out, 0, 255) / np.float32(127.5) - 1


def _check_resize(resize: str) -> None:
  if resize not in RESIZE_MODES:
    raise ConfigError(f'FID Inception resize must be one of {RESIZE_MODES}, got {resize!r}')


def resize_for_inception(images: np.ndarray, resize: str = 'pytorch_fid') -> np.ndarray:
  """(N, H, W, 3) in [-1, 1] -> (N, 299, 299, 3) in [-1, 1] by `resize`, one of RESIZE_MODES."""
  _check_resize(resize)
  if resize == 'clean':
    return resize_clean(images)
  return np.asarray(_resize_pytorch_fid_jit(jnp.asarray(images, jnp.float32)))


# ---------------------------------------------------------------------------------------------------
# Weights: pytorch-fid's state dict -> our variables.

_BN_RENAMES = {('params', 'scale'): 'weight', ('params', 'bias'): 'bias',
               ('batch_stats', 'mean'): 'running_mean', ('batch_stats', 'var'): 'running_var'}


@functools.lru_cache(maxsize=1)
def _abstract_variables() -> dict:
  """{(collection, *module path, leaf): ShapeDtypeStruct} of FIDInception's variables (no compile)."""
  images = jax.ShapeDtypeStruct((1, INPUT_SIDE, INPUT_SIDE, 3), jnp.float32)
  tree = jax.eval_shape(FIDInception().init, jax.random.key(0), images)
  return traverse_util.flatten_dict(tree)


def _torch_name(path: tuple[str, ...]) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
  """Our variable path -> (pytorch-fid's state-dict key, the layout change from its tensor to ours)."""
  collection, *modules, leaf = path
  prefix = '.'.join(modules)
  if modules[-1] == 'conv':  # OIHW -> HWIO
    return f'{prefix}.weight', lambda weight: weight.transpose(2, 3, 1, 0)
  if modules[-1] == 'bn':
    return f'{prefix}.{_BN_RENAMES[collection, leaf]}', lambda value: value
  if leaf == 'kernel':  # fc: (out, in) -> (in, out)
    return f'{prefix}.weight', lambda weight: weight.T
  return f'{prefix}.{leaf}', lambda value: value


def variables_from_state_dict(state_dict: Mapping[str, Any],
                              source: str = 'FID Inception state dict') -> dict:
  """{'params', 'batch_stats'} of FIDInception from pytorch-fid's FID Inception state dict (torch tensors
  or numpy arrays). A missing key, a wrong shape or a key the network does not have (other than BatchNorm's
  num_batches_tracked) raises CheckpointError naming it and `source`."""
  flat, used = {}, set()
  for path, leaf in _abstract_variables().items():
    key, to_ours = _torch_name(path)
    if key not in state_dict:
      raise CheckpointError(f'{source}: missing {key}')
    value = to_ours(_numpy(state_dict[key]))
    if value.shape != leaf.shape:
      raise CheckpointError(f'{source}: {key} has shape {_numpy(state_dict[key]).shape}, the FID '
                            f'Inception needs {_torch_shape(path, leaf.shape)}')
    flat[path] = np.ascontiguousarray(value, np.float32)
    used.add(key)
  unexpected = sorted(key for key in state_dict
                      if key not in used and not key.endswith('.num_batches_tracked'))
  if unexpected:
    raise CheckpointError(f'{source}: {unexpected[0]} is not a parameter of the FID Inception '
                          f'({len(unexpected)} unexpected keys)')
  return traverse_util.unflatten_dict(flat)


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape pytorch-fid stores for our variable of `shape`."""
  if path[-2] == 'conv':
    height, width, in_channels, out_channels = shape
    return (out_channels, in_channels, height, width)
  return tuple(reversed(shape))  # fc (in, out) -> (out, in); vectors unchanged


def _numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor, in tests
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def load_fid_inception_params(path: str | os.PathLike) -> dict:
  """FIDInception variables from pytorch-fid's pt_inception-2015-12-05-6726825d.pth (read without torch)."""
  if not os.path.isfile(path):
    raise ConfigError(f'FID Inception weights not found at {os.fspath(path)} and nothing here can '
                      "download them: put pytorch-fid's pt_inception-2015-12-05-6726825d.pth there "
                      f'(from {FID_WEIGHTS_URL})')
  return variables_from_state_dict(torch_files.load_state_dict(path), os.fspath(path))


# ---------------------------------------------------------------------------------------------------
# Features of many images.

_resize_pytorch_fid_jit = jax.jit(resize_pytorch_fid)


@jax.jit
def _features(variables, images):
  """The jitted net on (B, 299, 299, 3) batches: one compile per batch size, whatever the resize."""
  return FIDInception().apply(variables, images)


def make_feature_fn(variables: Mapping[str, Any], resize: str = 'pytorch_fid',
                    batch_size: int = 50) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  """fn(images (N, H, W, 3) in [-1, 1]) -> {'pool3': (N, 2048), 'logits': (N, 1008)} float32 numpy,
  in batches of `batch_size` (the last padded to it, so the net compiles once), each resized to 299x299
  by `resize` (RESIZE_MODES) first."""
  _check_resize(resize)
  if batch_size < 1:
    raise ConfigError(f'FID Inception batch_size must be positive, got {batch_size}')
  variables = jax.device_put(variables)

  def features_of(batch: np.ndarray):
    if resize == 'clean':
      return _features(variables, jax.device_put(resize_clean(batch)))
    return _features(variables, _resize_pytorch_fid_jit(batch))  # a device array either way: jit caches
                                                                  # numpy and device arguments apart

  def feature_fn(images: np.ndarray) -> dict[str, np.ndarray]:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'FID Inception takes (N, H, W, 3) images, got shape {images.shape}')
    outputs = batching.map_in_batches(features_of, images, batch_size)
    return {name: np.asarray(outputs[name], np.float32) for name in ('pool3', 'logits')}

  return feature_fn
