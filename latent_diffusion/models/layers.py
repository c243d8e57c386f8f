"""Building blocks of the paper's autoencoder (ldm/modules/diffusionmodules/model.py).

All arrays are NHWC. Parameters are float32; computation runs in `dtype`. Normalisation
always runs in float32 (the paper's GroupNorm32 does the same), then casts back.
"""

import functools
import inspect
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# PyTorch's default init for conv/linear weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


# XLA's CPU convolution costs 10-20x a matmul of the same work on maps of a few pixels with many
# channels (2-core CPU, jax 0.10.2: 3x3, 768 -> 768 channels on 2x2 maps, batch 4: 88 ms forward vs
# 5 ms as patches times kernel). At or below this many output pixels a CPU conv runs as that matmul.
SMALL_MAP_PIXELS = 16


def conv_as_matmul(lhs: jax.Array, rhs: jax.Array, window_strides, padding) -> jax.Array:
  """An NHWC x HWIO convolution (explicit padding pairs) as one matmul of its patches: the
  kh*kw shifted views of the padded input, concatenated on channels, times the flattened kernel."""
  kh, kw, cin, cout = rhs.shape
  (top, bottom), (left, right) = padding
  sh, sw = window_strides
  x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
  out_h, out_w = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  patches = jnp.concatenate(
      [x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw] for i in range(kh) for j in range(kw)],
      axis=-1)  # (B, out_h, out_w, kh*kw*cin), in the kernel's (i, j, c) order
  return jnp.einsum('bhwk,kd->bhwd', patches, rhs.reshape(kh * kw * cin, cout))


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, **kwargs):
  """lax.conv_general_dilated, except that on CPU a plain NHWC conv with few output pixels runs as
  conv_as_matmul (same numbers, same parameters, far less time)."""
  plain = (jax.default_backend() == 'cpu' and lhs.ndim == 4 and feature_group_count == 1
           and not isinstance(padding, str) and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1)))
           and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if plain:
    (top, bottom), (left, right) = padding
    out_h = (lhs.shape[1] + top + bottom - rhs.shape[0]) // window_strides[0] + 1
    out_w = (lhs.shape[2] + left + right - rhs.shape[1]) // window_strides[1] + 1
    if out_h * out_w <= SMALL_MAP_PIXELS:
      return conv_as_matmul(lhs, rhs, window_strides, padding)
  return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                      dimension_numbers, feature_group_count, **kwargs)


def conv(features: int, kernel: int = 3, stride: int = 1, padding: Any = None,
         dtype: Dtype = jnp.float32, zero_init: bool = False, name: str | None = None) -> nn.Conv:
  """A square conv with the paper's 'same' padding (kernel // 2) unless given."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=nn.initializers.zeros if zero_init else torch_default_init,
                 conv_general_dilated=conv_general_dilated, name=name)


def dense(features: int, dtype: Dtype = jnp.float32, zero_init: bool = False,
          name: str | None = None) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.zeros if zero_init else torch_default_init,
                  name=name)


class GroupNorm(nn.Module):
  """GroupNorm over (..., C) arrays with batch first, in float32; params `scale` and `bias` (C,) as
  flax's nn.GroupNorm (the same numbers: variance as E[x^2] - E[x]^2, as its fast variance).

  Statistics come from per-channel sums over the positions (channels stay the contiguous axis),
  summed per group afterwards, and the normalisation is one fused multiply-add per element: on CPU
  forward and backward take about half of nn.GroupNorm's time (1x256x256x128: 30 vs 51 ms forward,
  40 vs 82 ms forward+backward with the swish after it; benchmarks/, kl_codec).
  """
  num_groups: int = 32
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f'GroupNorm: {channels} channels are not divisible into {self.num_groups} groups')
    scale = self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    x32 = x.astype(jnp.float32)
    positions = tuple(range(1, x.ndim - 1))
    count = math.prod(x.shape[1:-1]) * (channels // self.num_groups)
    per_group = lambda sums: sums.reshape(x.shape[0], self.num_groups, -1).sum(-1) / count  # (B, G)
    mean = per_group(jnp.sum(x32, axis=positions))
    variance = jnp.maximum(per_group(jnp.sum(x32 * x32, axis=positions)) - mean * mean, 0.0)
    to_channels = lambda g: jnp.repeat(g, channels // self.num_groups, axis=1).reshape(
        (x.shape[0],) + (1,) * len(positions) + (channels,))
    multiplier = to_channels(jax.lax.rsqrt(variance + self.epsilon)) * scale
    return x32 * multiplier + (bias - to_channels(mean) * multiplier)


def group_norm(x: jax.Array, name: str, epsilon: float = 1e-6, num_groups: int = 32) -> jax.Array:
  """GroupNorm(32) computed in float32, cast back to x's dtype. Call inside a compact method."""
  return GroupNorm(num_groups=num_groups, epsilon=epsilon, name=name)(x).astype(x.dtype)


# Rematerialisation policy per config.remat. 'dots' saves conv and matmul outputs and recomputes norms,
# activations, softmax, dropout: dots_saveable, as dots_with_no_batch_dims_saveable never saves a conv.
REMAT_POLICIES = {'none': None, 'full': jax.checkpoint_policies.nothing_saveable,
                  'dots': jax.checkpoint_policies.dots_saveable}


@functools.cache
def remat_block(cls: type[nn.Module], remat: str) -> type[nn.Module]:
  """`cls`, or `cls` wrapped in nn.remat with the policy named by `remat` (none | full | dots).

  The wrapped call takes the same arguments; `deterministic` is static however it is passed.
  Parameter names do not change as long as instances get an explicit `name=`.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f'remat must be one of {", ".join(REMAT_POLICIES)}; got {remat!r}')
  if remat == 'none':
    return cls
  signature = inspect.signature(cls.__call__)  # 'self' is argument 0, as nn.remat counts.
  static_argnums = tuple(i for i, name in enumerate(signature.parameters) if name == 'deterministic')
  lifted = nn.remat(cls, static_argnums=static_argnums, policy=REMAT_POLICIES[remat])

  class Remat(lifted):  # pylint: disable=missing-class-docstring
    def __call__(self, *args, **kwargs):
      # jax.checkpoint indexes static arguments by position: pass every argument, defaults included.
      bound = signature.bind(self, *args, **kwargs)
      bound.apply_defaults()
      return super().__call__(*bound.args[1:])

  Remat.__name__ = Remat.__qualname__ = lifted.__name__
  return Remat


def timestep_embedding(timesteps: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding, [cos, sin] order as in the paper's code. (B,) -> (B, dim)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None]
  embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[:, :1])], axis=-1)
  return embedding


class ResnetBlock(nn.Module):
  """norm-swish-conv twice, with an optional timestep projection and a 1x1 (or 3x3) shortcut."""
  out_channels: int
  dropout: float = 0.0
  use_conv_shortcut: bool = False
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None, deterministic: bool = True):
    in_channels = x.shape[-1]
    h = nn.swish(group_norm(x, 'norm1', num_groups=self.norm_num_groups))
    h = conv(self.out_channels, dtype=self.dtype, name='conv1')(h)
    if temb is not None:
      h = h + dense(self.out_channels, self.dtype, name='temb_proj')(nn.swish(temb))[:, None, None]
    h = nn.swish(group_norm(h, 'norm2', num_groups=self.norm_num_groups))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = conv(self.out_channels, dtype=self.dtype, name='conv2')(h)
    if in_channels != self.out_channels:
      if self.use_conv_shortcut:
        x = conv(self.out_channels, dtype=self.dtype, name='conv_shortcut')(x)
      else:
        x = conv(self.out_channels, 1, dtype=self.dtype, name='nin_shortcut')(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head spatial self-attention over all H*W positions (the paper's 'vanilla')."""
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    h = group_norm(x, 'norm', num_groups=self.norm_num_groups).reshape(b, height * width, c)
    q = dense(c, self.dtype, name='q')(h)
    k = dense(c, self.dtype, name='k')(h)
    v = dense(c, self.dtype, name='v')(h)
    weights = jnp.einsum('bqc,bkc->bqk', q, k) * (c ** -0.5)
    weights = jax.nn.softmax(weights.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = jnp.einsum('bqk,bkc->bqc', weights, v)
    h = dense(c, self.dtype, name='proj_out')(h)
    return x + h.reshape(b, height, width, c)


class Downsample(nn.Module):
  """Halves H and W: pad (0,1) bottom/right then 3x3 stride-2 conv, or 2x2 average pooling."""
  with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.with_conv:
      return conv(x.shape[-1], 3, 2, padding=((0, 1), (0, 1)), dtype=self.dtype, name='conv')(x)
    return nn.avg_pool(x, (2, 2), (2, 2))


def upsample_nearest(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 in H and W. (B,H,W,C) -> (B,2H,2W,C)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Upsample(nn.Module):
  """Doubles H and W by nearest-neighbour, then an optional 3x3 conv."""
  with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = upsample_nearest(x)
    if self.with_conv:
      x = conv(x.shape[-1], dtype=self.dtype, name='conv')(x)
    return x
