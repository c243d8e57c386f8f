"""The paper's first-stage autoencoder: Encoder, Decoder and AutoencoderKL (NHWC).

Parameter names mirror the paper's state dict with '.' turned into '_':
`down.1.block.0.conv1` is `down_1_block_0/conv1`, `mid.attn_1` is `mid_attn_1`.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_diffusion.models.distributions import DiagonalGaussian
from latent_diffusion.models.layers import (AttnBlock, Downsample, ResnetBlock, Upsample, conv,
                                            group_norm, remat_block)

Dtype = Any


class Encoder(nn.Module):
  """Image (B,H,W,in) -> moments (B,H/f,W/f,2*z_channels if double_z else z_channels)."""
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  resolution: int
  z_channels: int
  double_z: bool = True
  dropout: float = 0.0
  resamp_with_conv: bool = True
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  remat: str = 'none'  # none | full | dots: rematerialisation of each ResnetBlock and AttnBlock

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    resnet_block, attn_block = remat_block(ResnetBlock, self.remat), remat_block(AttnBlock, self.remat)
    h = conv(self.ch, dtype=self.dtype, name='conv_in')(x.astype(self.dtype))
    current_resolution = self.resolution
    for level, mult in enumerate(self.ch_mult):
      for block in range(self.num_res_blocks):
        h = resnet_block(self.ch * mult, self.dropout, norm_num_groups=self.norm_num_groups,
                         dtype=self.dtype, name=f'down_{level}_block_{block}')(h, deterministic=deterministic)
        if current_resolution in self.attn_resolutions:
          h = attn_block(self.norm_num_groups, self.dtype, name=f'down_{level}_attn_{block}')(h)
      if level != len(self.ch_mult) - 1:
        h = Downsample(self.resamp_with_conv, self.dtype, name=f'down_{level}_downsample')(h)
        current_resolution //= 2
    h = _mid_block(h, self.dropout, self.norm_num_groups, self.dtype, self.remat, deterministic)
    h = nn.swish(group_norm(h, 'norm_out', num_groups=self.norm_num_groups))
    out_channels = 2 * self.z_channels if self.double_z else self.z_channels
    return conv(out_channels, dtype=self.dtype, name='conv_out')(h)


class Decoder(nn.Module):
  """Latent (B,h,w,z_channels) -> image (B,h*f,w*f,out_ch)."""
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  resolution: int
  out_ch: int = 3
  dropout: float = 0.0
  resamp_with_conv: bool = True
  tanh_out: bool = False
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  remat: str = 'none'  # none | full | dots: rematerialisation of each ResnetBlock and AttnBlock

  @nn.compact
  def __call__(self, z, deterministic: bool = True):
    resnet_block, attn_block = remat_block(ResnetBlock, self.remat), remat_block(AttnBlock, self.remat)
    current_resolution = self.resolution // 2 ** (len(self.ch_mult) - 1)
    h = conv(self.ch * self.ch_mult[-1], dtype=self.dtype, name='conv_in')(z.astype(self.dtype))
    h = _mid_block(h, self.dropout, self.norm_num_groups, self.dtype, self.remat, deterministic)
    for level in reversed(range(len(self.ch_mult))):
      for block in range(self.num_res_blocks + 1):
        h = resnet_block(self.ch * self.ch_mult[level], self.dropout, norm_num_groups=self.norm_num_groups,
                         dtype=self.dtype, name=f'up_{level}_block_{block}')(h, deterministic=deterministic)
        if current_resolution in self.attn_resolutions:
          h = attn_block(self.norm_num_groups, self.dtype, name=f'up_{level}_attn_{block}')(h)
      if level != 0:
        h = Upsample(self.resamp_with_conv, self.dtype, name=f'up_{level}_upsample')(h)
        current_resolution *= 2
    h = nn.swish(group_norm(h, 'norm_out', num_groups=self.norm_num_groups))
    h = conv(self.out_ch, dtype=self.dtype, name='conv_out')(h)
    return jnp.tanh(h) if self.tanh_out else h


def _mid_block(h, dropout, norm_num_groups, dtype, remat, deterministic):
  """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution; shared by both halves."""
  channels = h.shape[-1]
  block = functools.partial(remat_block(ResnetBlock, remat), channels, dropout,
                            norm_num_groups=norm_num_groups, dtype=dtype)
  h = block(name='mid_block_1')(h, deterministic=deterministic)
  h = remat_block(AttnBlock, remat)(norm_num_groups, dtype, name='mid_attn_1')(h)
  return block(name='mid_block_2')(h, deterministic=deterministic)


class AutoencoderKL(nn.Module):
  """Encoder -> quant_conv -> DiagonalGaussian -> post_quant_conv -> Decoder.

  `ch_mult` has one entry per resolution; the downsampling factor is f = 2**(len(ch_mult)-1).
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  resolution: int = 256
  in_channels: int = 3
  out_ch: int = 3
  z_channels: int = 4
  double_z: bool = True
  embed_dim: int = 4
  dropout: float = 0.0
  resamp_with_conv: bool = True
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32
  remat: str = 'none'  # none | full | dots, passed to Encoder and Decoder

  def setup(self):
    common = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                  attn_resolutions=tuple(self.attn_resolutions), resolution=self.resolution,
                  dropout=self.dropout, resamp_with_conv=self.resamp_with_conv,
                  norm_num_groups=self.norm_num_groups, dtype=self.dtype, remat=self.remat)
    self.encoder = Encoder(z_channels=self.z_channels, double_z=self.double_z, **common)
    self.decoder = Decoder(out_ch=self.out_ch, **common)
    moment_channels = 2 * self.embed_dim if self.double_z else self.embed_dim
    self.quant_conv = conv(moment_channels, 1, dtype=self.dtype)
    self.post_quant_conv = conv(self.z_channels, 1, dtype=self.dtype)

  def encode_moments(self, x, deterministic: bool = True) -> jax.Array:
    """Posterior mean and log-variance stacked on channels. (B,h,w,2*embed_dim)"""
    return self.quant_conv(self.encoder(x, deterministic)).astype(jnp.float32)

  def encode(self, x, deterministic: bool = True) -> DiagonalGaussian:
    return DiagonalGaussian(self.encode_moments(x, deterministic))

  def decode(self, z, deterministic: bool = True) -> jax.Array:
    return self.decoder(self.post_quant_conv(z.astype(self.dtype)), deterministic).astype(jnp.float32)

  def __call__(self, x, rng=None, deterministic: bool = True):
    """Returns (reconstruction, posterior). Samples the posterior when rng is given."""
    posterior = self.encode(x, deterministic)
    z = posterior.sample(rng) if rng is not None else posterior.mode()
    return self.decode(z, deterministic), posterior

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)
