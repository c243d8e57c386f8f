"""The paper's diffusion U-Net (ldm/modules/diffusionmodules/openaimodel.py), NHWC.

Block names mirror the paper's state dict: `input_blocks_{i}`, `middle_block`, `output_blocks_{i}`,
each a sequence of layers named `layers_{j}` as nn.Sequential/TimestepEmbedSequential indices.
`attention_resolutions` holds downsampling rates (ds = 1, 2, 4, ...), as in the paper's configs.
Every option of the paper's UNetModel is a field: class labels (`label_emb`), the SpatialTransformer
with cross-attention to a context, the legacy head rules, the new qkv order and the codebook-id head.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from latent_diffusion.models.attention import (AttentionBlock, SpatialTransformer, attention_heads,
                                               resolve_attention_impl)
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


def attention_layer_heads(channels: int, num_heads: int, num_head_channels: int, legacy: bool,
                          use_spatial_transformer: bool, block_num_heads: int) -> tuple[int, int]:
  """(heads, head width) of one attention layer with `channels` inputs, by the paper's rules.

  openaimodel.UNetModel derives a head count and width from num_heads / num_head_channels, then
  (legacy) gives a SpatialTransformer width channels // heads and an AttentionBlock the configured
  num_head_channels, or (not legacy) both the derived width. An AttentionBlock without a head width
  uses `block_num_heads`: num_heads, or num_heads_upsample in the output blocks.
  """
  if num_head_channels == -1:
    heads, dim_head = num_heads, channels // num_heads
  else:
    heads, dim_head = channels // num_head_channels, num_head_channels
  if use_spatial_transformer:
    return heads, (channels // heads if legacy else dim_head)
  heads = attention_heads(channels, block_num_heads, num_head_channels if legacy else dim_head)
  return heads, channels // heads


class UNetModel(nn.Module):
  """eps/x0/v predictor: (B,H,W,in_channels), timesteps (B,) -> (B,H,W,out_channels) float32.

  With num_classes > 0, labels y (B,) int32 are embedded and added to the time embedding. With
  use_spatial_transformer, every attention layer is a SpatialTransformer attending to context
  (B, L, context_dim). With n_embed > 0 the output is `id_predictor`'s (B,H,W,n_embed) codebook
  logits instead (the paper's predict_codebook_ids; `out_*` still exist, as in its state dict).
  """
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
  remat: str = 'none'  # none | full | dots: rematerialisation of each ResBlock and attention layer
  num_classes: int = 0  # > 0: class-conditional, y (B,) required
  use_spatial_transformer: bool = False
  transformer_depth: int = 1
  context_dim: int = 0  # required > 0 with use_spatial_transformer
  legacy: bool = True
  use_new_attention_order: bool = False
  n_embed: int = 0  # > 0: predict first-stage codebook ids (n_embed logits per position)
  attention_impl: str = 'auto'  # auto | einsum | xla | cudnn (models/attention.py)

  def check_settings(self, x, context, y):
    """ValueErrors for settings the paper asserts on and for missing or extra conditioning."""
    if self.num_heads == -1 and self.num_head_channels == -1:
      raise ValueError('UNetModel: set num_heads or num_head_channels (both are -1)')
    if self.use_spatial_transformer and self.context_dim <= 0:
      raise ValueError('UNetModel: use_spatial_transformer needs context_dim > 0 (the width of the '
                       'cross-attention context)')
    if self.context_dim > 0 and not self.use_spatial_transformer:
      raise ValueError(f'UNetModel: context_dim={self.context_dim} is only used by the spatial '
                       'transformer; set use_spatial_transformer=True')
    if self.use_spatial_transformer:
      if context is None:
        raise ValueError(f'UNetModel: the spatial transformer needs context (B, L, {self.context_dim})')
      if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != self.context_dim:
        raise ValueError(f'UNetModel: context must be (B={x.shape[0]}, L, context_dim='
                         f'{self.context_dim}); got {tuple(context.shape)}')
    elif context is not None:
      raise ValueError('UNetModel: context given but use_spatial_transformer is False')
    if self.num_classes > 0:
      if y is None:
        raise ValueError(f'UNetModel: class-conditional (num_classes={self.num_classes}) needs labels '
                         'y (B,)')
      if y.shape != (x.shape[0],):
        raise ValueError(f'UNetModel: labels y must be (B,)=({x.shape[0]},); got {tuple(y.shape)}')
    elif y is not None:
      raise ValueError('UNetModel: labels y given but num_classes is 0')
    resolve_attention_impl(self.attention_impl)

  @nn.compact
  def __call__(self, x, timesteps, context=None, y=None, deterministic: bool = True):
    self.check_settings(x, context, y)
    temb_channels = 4 * self.model_channels
    emb = timestep_embedding(timesteps, self.model_channels)
    emb = dense(temb_channels, self.dtype, name='time_embed_0')(emb)
    emb = dense(temb_channels, self.dtype, name='time_embed_2')(nn.silu(emb))
    if self.num_classes > 0:
      emb = emb + nn.Embed(self.num_classes, temb_channels, dtype=self.dtype, param_dtype=jnp.float32,
                           embedding_init=nn.initializers.normal(1.0), name='label_emb')(y)
    if context is not None:
      context = context.astype(self.dtype)

    res_block_cls = remat_block(ResBlock, self.remat)
    attention_cls = remat_block(AttentionBlock, self.remat)
    transformer_cls = remat_block(SpatialTransformer, self.remat)

    def res_block(out_channels, name, **updown):
      return res_block_cls(out_channels, self.dropout, self.use_scale_shift_norm, dtype=self.dtype,
                           name=name, **updown)

    def attention(h, name, block_num_heads):
      heads, dim_head = attention_layer_heads(h.shape[-1], self.num_heads, self.num_head_channels,
                                              self.legacy, self.use_spatial_transformer, block_num_heads)
      if self.use_spatial_transformer:
        return transformer_cls(heads, dim_head, self.transformer_depth, self.dtype, self.attention_impl,
                               name=name)(h, context)
      return attention_cls(heads, -1, self.dtype, self.use_new_attention_order, self.attention_impl,
                           name=name)(h)

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
          h = attention(h, f'{prefix}_layers_1', self.num_heads)
        skips.append(h)
        block_index += 1
      if level != len(self.channel_mult) - 1:
        h = downsample(f'input_blocks_{block_index}_layers_0', h.shape[-1])(h)
        skips.append(h)
        block_index += 1
        ds *= 2

    h = res_block(h.shape[-1], 'middle_block_layers_0')(h, emb, deterministic)
    h = attention(h, 'middle_block_layers_1', self.num_heads)
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
          h = attention(h, f'{prefix}_layers_{layer}', num_heads_upsample)
        if level and i == self.num_res_blocks:
          layer += 1
          h = upsample(f'{prefix}_layers_{layer}', h.shape[-1])(h)
          ds //= 2
        block_index += 1

    out = nn.silu(group_norm(h, 'out_norm', epsilon=1e-5))
    out = conv(self.out_channels, dtype=self.dtype, zero_init=True, name='out_conv')(out)
    if self.n_embed > 0:
      # The paper builds `out` beside `id_predictor` and returns only the logits (jit drops `out`).
      logits = group_norm(h, 'id_predictor_0', epsilon=1e-5)
      return conv(self.n_embed, 1, dtype=self.dtype, name='id_predictor_1')(logits).astype(jnp.float32)
    return out.astype(jnp.float32)
