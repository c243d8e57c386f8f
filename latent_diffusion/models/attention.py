"""Attention for the diffusion U-Net: the paper's AttentionBlock (openaimodel, legacy qkv order)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_diffusion.models.layers import dense, group_norm

Dtype = Any


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Softmax attention, (B,T,heads,d) each -> (B,T,heads,d); softmax in float32.

  An einsum formulation: on CPU it beat jax.nn.dot_product_attention (xla) at 1024 tokens.
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * scale
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


def attention_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
  """The paper's rule: a fixed head width when num_head_channels != -1, else num_heads."""
  if num_head_channels == -1:
    return num_heads
  if channels % num_head_channels:
    raise ValueError(f'{channels} channels are not divisible by num_head_channels={num_head_channels}')
  return channels // num_head_channels


class AttentionBlock(nn.Module):
  """Self-attention over H*W positions with a residual; output projection zero-initialised.

  The fused qkv projection uses the paper's legacy channel order: (heads, [q|k|v], head_dim).
  """
  num_heads: int = 1
  num_head_channels: int = -1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    heads = attention_heads(c, self.num_heads, self.num_head_channels)
    h = group_norm(x, 'norm', epsilon=1e-5).reshape(b, height * width, c)
    qkv = dense(3 * c, self.dtype, name='qkv')(h).reshape(b, height * width, heads, 3, c // heads)
    h = dot_product_attention(qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2])
    h = dense(c, self.dtype, zero_init=True, name='proj_out')(h.reshape(b, height * width, c))
    return x + h.reshape(b, height, width, c)
