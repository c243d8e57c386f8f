"""The paper's diffusion U-Net (ldm/modules/diffusionmodules/openaimodel.py), NHWC.

Block names mirror the paper's state dict: `input_blocks_{i}`, `middle_block`, `output_blocks_{i}`,
each a sequence of layers named `layers_{j}` as nn.Sequential/TimestepEmbedSequential indices.
`attention_resolutions` holds downsampling rates (ds = 1, 2, 4, ...), as in the paper's configs.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_diffusion.models.attention import AttentionBlock
from latent_diffusion.models.layers import (conv, dense, group_norm, remat_block, timestep_embedding,
                                            upsample_nearest)

Dtype = Any


class ResBlock(nn.Module):
  """openaimodel ResBlock: timestep-conditioned, optional scale-shift norm and up/down sampling."""
  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  up: bool = False
  down: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, emb, deterministic: bool = True):
    h = nn.silu(group_norm(x, 'in_norm', epsilon=1e-5))
    if self.up or self.down:
      resample = upsample_nearest if self.up else (lambda a: nn.avg_pool(a, (2, 2), (2, 2)))
      h, x = resample(h), resample(x)
    h = conv(self.out_channels, dtype=self.dtype, name='in_conv')(h)
    emb_width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
    emb_out = dense(emb_width, self.dtype, name='emb_dense')(nn.silu(emb))[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = group_norm(h, 'out_norm', epsilon=1e-5) * (1 + scale) + shift
    else:
      h = group_norm(h + emb_out, 'out_norm', epsilon=1e-5)
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
    h = conv(self.out_channels, dtype=self.dtype, zero_init=True, name='out_conv')(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, dtype=self.dtype, name='skip_connection')(x)
    return x + h


class UNetModel(nn.Module):
  """eps/x0/v predictor: (B,H,W,in_channels), timesteps (B,) -> (B,H,W,out_channels)."""
  in_channels: int = 4
  out_channels: int = 4
  model_channels: int = 192
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (1, 2, 4, 8)
  channel_mult: Sequence[int] = (1, 2, 2, 4, 4)
  dropout: float = 0.0
  conv_resample: bool = True
  num_heads: int = 8
  num_head_channels: int = -1
  num_heads_upsample: int = -1
  use_scale_shift_norm: bool = True
  resblock_updown: bool = True
  dtype: Dtype = jnp.float32
  remat: str = 'none'  # none | full | dots: rematerialisation of each ResBlock and AttentionBlock

  @nn.compact
  def __call__(self, x, timesteps, deterministic: bool = True):
    temb_channels = 4 * self.model_channels
    emb = timestep_embedding(timesteps, self.model_channels)
    emb = dense(temb_channels, self.dtype, name='time_embed_0')(emb)
    emb = dense(temb_channels, self.dtype, name='time_embed_2')(nn.silu(emb))

    res_block_cls = remat_block(ResBlock, self.remat)
    attention_cls = remat_block(AttentionBlock, self.remat)

    def res_block(out_channels, name, **updown):
      return res_block_cls(out_channels, self.dropout, self.use_scale_shift_norm, dtype=self.dtype,
                           name=name, **updown)

    def attention(name, num_heads):
      return attention_cls(num_heads, self.num_head_channels, self.dtype, name=name)

    def downsample(name, channels):
      if self.resblock_updown:
        return lambda h: res_block(channels, name, down=True)(h, emb, deterministic)
      if self.conv_resample:
        return conv(channels, 3, 2, dtype=self.dtype, name=name)
      return lambda h: nn.avg_pool(h, (2, 2), (2, 2))

    def upsample(name, channels):
      if self.resblock_updown:
        return lambda h: res_block(channels, name, up=True)(h, emb, deterministic)
      if self.conv_resample:
        return lambda h: conv(channels, dtype=self.dtype, name=name)(upsample_nearest(h))
      return upsample_nearest

    h = conv(self.model_channels, dtype=self.dtype, name='input_blocks_0_layers_0')(x.astype(self.dtype))
    skips, ds, block_index = [h], 1, 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        prefix = f'input_blocks_{block_index}'
        h = res_block(mult * self.model_channels, f'{prefix}_layers_0')(h, emb, deterministic)
        if ds in self.attention_resolutions:
          h = attention(f'{prefix}_layers_1', self.num_heads)(h)
        skips.append(h)
        block_index += 1
      if level != len(self.channel_mult) - 1:
        h = downsample(f'input_blocks_{block_index}_layers_0', h.shape[-1])(h)
        skips.append(h)
        block_index += 1
        ds *= 2

    h = res_block(h.shape[-1], 'middle_block_layers_0')(h, emb, deterministic)
    h = attention('middle_block_layers_1', self.num_heads)(h)
    h = res_block(h.shape[-1], 'middle_block_layers_2')(h, emb, deterministic)

    num_heads_upsample = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
    block_index = 0
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        prefix, layer = f'output_blocks_{block_index}', 0
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res_block(mult * self.model_channels, f'{prefix}_layers_{layer}')(h, emb, deterministic)
        if ds in self.attention_resolutions:
          layer += 1
          h = attention(f'{prefix}_layers_{layer}', num_heads_upsample)(h)
        if level and i == self.num_res_blocks:
          layer += 1
          h = upsample(f'{prefix}_layers_{layer}', h.shape[-1])(h)
          ds //= 2
        block_index += 1

    h = nn.silu(group_norm(h, 'out_norm', epsilon=1e-5))
    return conv(self.out_channels, dtype=self.dtype, zero_init=True, name='out_conv')(h).astype(jnp.float32)
