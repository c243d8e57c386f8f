"""The paper's first-stage autoencoders: Encoder, Decoder, AutoencoderKL and VQModel (NHWC).

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
from latent_diffusion.models.quantize import VectorQuantizer

ATTN_TYPES = ('vanilla', 'none')  # 'none': no self-attention anywhere (the paper's vq-f4-noattn)

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
  attn_type: str = 'vanilla'  # vanilla | none

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    resnet_block, attn_block = remat_block(ResnetBlock, self.remat), _attention(self.attn_type, self.remat)
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
    h = _mid_block(h, self.dropout, self.norm_num_groups, self.dtype, self.remat, self.attn_type,
                   deterministic)
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
  attn_type: str = 'vanilla'  # vanilla | none

  @nn.compact
  def __call__(self, z, deterministic: bool = True):
    resnet_block, attn_block = remat_block(ResnetBlock, self.remat), _attention(self.attn_type, self.remat)
    current_resolution = self.resolution // 2 ** (len(self.ch_mult) - 1)
    h = conv(self.ch * self.ch_mult[-1], dtype=self.dtype, name='conv_in')(z.astype(self.dtype))
    h = _mid_block(h, self.dropout, self.norm_num_groups, self.dtype, self.remat, self.attn_type,
                   deterministic)
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
    # The adaptive GAN weight needs gradients at conv_out's kernel: they follow from its input.
    self.sow('intermediates', 'conv_out_input', h)
    h = conv(self.out_ch, dtype=self.dtype, name='conv_out')(h)
    return jnp.tanh(h) if self.tanh_out else h


class _NoAttention(nn.Module):
  """attn_type 'none': the identity where the paper puts nn.Identity instead of an AttnBlock."""
  norm_num_groups: int = 32
  dtype: Dtype = jnp.float32

  def __call__(self, x):
    return x


def _attention(attn_type: str, remat: str) -> type[nn.Module]:
  if attn_type not in ATTN_TYPES:
    raise ValueError(f'attn_type must be one of {ATTN_TYPES}, got {attn_type!r}')
  return remat_block(AttnBlock, remat) if attn_type == 'vanilla' else _NoAttention


def _mid_block(h, dropout, norm_num_groups, dtype, remat, attn_type, deterministic):
  """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution; shared by both halves."""
  channels = h.shape[-1]
  block = functools.partial(remat_block(ResnetBlock, remat), channels, dropout,
                            norm_num_groups=norm_num_groups, dtype=dtype)
  h = block(name='mid_block_1')(h, deterministic=deterministic)
  h = _attention(attn_type, remat)(norm_num_groups, dtype, name='mid_attn_1')(h)
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
  attn_type: str = 'vanilla'  # vanilla | none

  def setup(self):
    self.encoder, self.decoder = _encoder_decoder(self)
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


def factor_of(autoencoder_config) -> int:
  """The downsampling factor f of the first stage a config's `autoencoder` section builds."""
  if autoencoder_config.kind == 'identity':
    return 1
  return 2 ** (len(autoencoder_config.ch_mult) - 1)


def latent_channels_of(autoencoder_config) -> int:
  """Channels of what stage 2 diffuses: embed_dim, or the image channels without a first stage."""
  return autoencoder_config.in_channels if autoencoder_config.kind == 'identity' else autoencoder_config.embed_dim


class IdentityFirstStage(nn.Module):
  """No first stage: stage 2 diffuses the pixels (the paper's LDM-1, its IdentityFirstStage). No
  parameters, nothing to train; encode_moments and decode return their input."""
  in_channels: int = 3

  def encode_moments(self, x, deterministic: bool = True) -> jax.Array:
    del deterministic
    return x.astype(jnp.float32)

  def decode(self, z, deterministic: bool = True) -> jax.Array:
    del deterministic
    return z.astype(jnp.float32)

  def __call__(self, x, rng=None, deterministic: bool = True):
    """Returns (reconstruction, None): the input."""
    del rng, deterministic
    return x.astype(jnp.float32), None

  @property
  def downsampling_factor(self) -> int:
    return 1


def latents_from_moments(kind: str, moments, rng=None):
  """What stage 2 diffuses, from `encode_moments`: kl a posterior sample (its mode without rng),
  vq the pre-quantisation latents themselves, identity the pixels. (B,h,w,embed_dim)"""
  if kind in ('vq', 'identity'):
    return moments
  posterior = DiagonalGaussian(moments)
  return posterior.sample(rng) if rng is not None else posterior.mode()


def _encoder_decoder(model) -> tuple[Encoder, Decoder]:
  """The Encoder and Decoder of a first-stage model from its fields (the paper's ddconfig)."""
  common = dict(ch=model.ch, ch_mult=tuple(model.ch_mult), num_res_blocks=model.num_res_blocks,
                attn_resolutions=tuple(model.attn_resolutions), resolution=model.resolution,
                dropout=model.dropout, resamp_with_conv=model.resamp_with_conv,
                norm_num_groups=model.norm_num_groups, dtype=model.dtype, remat=model.remat,
                attn_type=model.attn_type)
  return (Encoder(z_channels=model.z_channels, double_z=model.double_z, **common),
          Decoder(out_ch=model.out_ch, **common))


class VQModel(nn.Module):
  """Encoder -> quant_conv -> VectorQuantizer -> post_quant_conv -> Decoder.

  As the paper's VQModelInterface, `encode_moments` returns the pre-quantisation latents (stage 2
  diffuses those) and `decode` quantises before decoding unless `force_not_quantize`.
  """
  n_embed: int = 8192
  embed_dim: int = 3
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  resolution: int = 256
  in_channels: int = 3
  out_ch: int = 3
  z_channels: int = 3
  double_z: bool = False
  dropout: float = 0.0
  resamp_with_conv: bool = True
  norm_num_groups: int = 32
  beta: float = 0.25            # commitment weight (the paper's VQModel fixes 0.25)
  legacy: bool = True           # beta on the paper's (legacy) term
  remap: str | None = None      # .npy of used code indices, or None
  unknown_index: Any = 'random'
  dtype: Dtype = jnp.float32
  remat: str = 'none'
  attn_type: str = 'vanilla'

  def setup(self):
    self.encoder, self.decoder = _encoder_decoder(self)
    self.quant_conv = conv(self.embed_dim, 1, dtype=self.dtype)
    self.quantize = VectorQuantizer(self.n_embed, self.embed_dim, self.beta, self.legacy,
                                    self.remap, self.unknown_index)
    self.post_quant_conv = conv(self.z_channels, 1, dtype=self.dtype)

  def encode_moments(self, x, deterministic: bool = True) -> jax.Array:
    """Pre-quantisation latents. (B,h,w,embed_dim)"""
    return self.quant_conv(self.encoder(x, deterministic)).astype(jnp.float32)

  def encode(self, x, deterministic: bool = True):
    """(quantised latents, codebook loss, indices (B,h,w))."""
    return self.quantize(self.encode_moments(x, deterministic))

  def decode(self, z, deterministic: bool = True, force_not_quantize: bool = False) -> jax.Array:
    if not force_not_quantize:
      z = self.quantize(z)[0]
    return self.decoder(self.post_quant_conv(z.astype(self.dtype)), deterministic).astype(jnp.float32)

  def decode_code(self, indices, deterministic: bool = True) -> jax.Array:
    """Indices (B,h,w) -> images."""
    return self.decode(self.quantize.lookup(indices), deterministic, force_not_quantize=True)

  def __call__(self, x, rng=None, deterministic: bool = True):
    """Returns (reconstruction, codebook loss, indices). `rng` is unused (for KL interface parity)."""
    del rng
    quantized, codebook_loss, indices = self.encode(x, deterministic)
    return self.decode(quantized, deterministic, force_not_quantize=True), codebook_loss, indices

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)
