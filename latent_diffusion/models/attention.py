"""Attention for the diffusion U-Net: the attention kernel per backend, the paper's AttentionBlock
(openaimodel) and its SpatialTransformer (ldm/modules/attention.py) with cross-attention.

Layouts: images NHWC, token sequences (B, T, C), per-head arrays (B, T, heads, head_dim).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_diffusion.models.layers import conv, dense, group_norm
from latent_diffusion.models.sliced_attention import sliced_attention

Dtype = Any

# 'einsum': two einsums around a float32 softmax. 'sliced': one (batch, head) slice at a time with a
# recomputing backward (models/sliced_attention.py). 'xla' / 'cudnn': jax.nn.dot_product_attention with
# that implementation ('cudnn' needs a GPU and float16/bfloat16, and rejected 77 context tokens on an
# H200 with jax 0.11.2). 'auto': the measured winner on CPU (per size, below), elsewhere
# implementation=None (jax's choice; XLA in jax 0.10.2 and 0.11.2, where cuDNN is used only when asked for).
ATTENTION_IMPLS = ('auto', 'einsum', 'sliced', 'xla', 'cudnn')
# benchmarks/attention.py on the shared 2-core CPU (jax 0.10.2, float32, B=4, 8 heads of 24 and 32,
# 1024/256/64 query tokens, self- and 77-key cross-attention), median ms einsum vs xla: self 1024
# forward 252 vs 525 and 234 vs 511, forward+backward 973 vs 982 and 919 vs 970; cross 1024x77
# forward+backward 29 vs 35 and 40 vs 51; at 256 and 64 tokens forward within noise, forward+backward
# einsum as fast or up to 25% faster. 'sliced' beat einsum at 1024x1024 (forward 87 vs 160 ms,
# forward+backward 404 vs 669) but not at 256x256 or 1024x77 (forward+backward 34 vs 31, 39 vs 33 ms):
# on CPU 'auto' slices from this many logits per (batch, head) on.
CPU_ATTENTION_IMPL = 'einsum'
CPU_SLICED_MIN_LOGITS = 512 * 512


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Softmax attention written as two einsums; logits and softmax in float32.

  q (B,Tq,heads,d), k and v (B,Tk,heads,d) -> (B,Tq,heads,d) in v's dtype.
  """
  # Scaling q rather than the (B,heads,Tq,Tk) logits: measured faster forward+backward on CPU
  # (1024x77 cross-attention about 1.8x, 1024x1024 self-attention about 1.1x).
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


def resolve_attention_impl(impl: str, backend: str | None = None, logits: int = 0) -> str:
  """The kernel `impl` names on `backend` (default: jax's) for `logits` = Tq * Tk: 'einsum',
  'sliced', 'xla', 'cudnn' or 'default'.

  'auto' is the measured winner on CPU ('sliced' from CPU_SLICED_MIN_LOGITS on, else 'einsum'), and
  elsewhere 'default': jax.nn.dot_product_attention with implementation=None, jax's own choice for
  the backend.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'attention_impl must be one of {", ".join(ATTENTION_IMPLS)}; got {impl!r}')
  if impl != 'auto':
    return impl
  if (backend or jax.default_backend()) != 'cpu':
    return 'default'
  return 'sliced' if logits >= CPU_SLICED_MIN_LOGITS else CPU_ATTENTION_IMPL


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = 'auto') -> jax.Array:
  """Softmax(q k^T / sqrt(d)) v with the kernel `impl` names; the softmax runs in float32.

  q (B,Tq,heads,d), k and v (B,Tk,heads,d) -> (B,Tq,heads,d).
  """
  kernel = resolve_attention_impl(impl, logits=q.shape[1] * k.shape[1])
  if kernel == 'einsum':
    return einsum_attention(q, k, v)
  if kernel == 'sliced':
    return sliced_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=None if kernel == 'default' else kernel)


def attention_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
  """The paper's rule: a fixed head width when num_head_channels != -1, else num_heads."""
  if num_head_channels == -1:
    if num_heads < 1 or channels % num_heads:
      raise ValueError(f'{channels} channels cannot be split into num_heads={num_heads} heads')
    return num_heads
  if num_head_channels < 1 or channels % num_head_channels:
    raise ValueError(f'{channels} channels are not divisible by num_head_channels={num_head_channels}')
  return channels // num_head_channels


class AttentionBlock(nn.Module):
  """Self-attention over H*W positions with a residual; output projection zero-initialised.

  The fused qkv projection (the paper's Conv1d, here a Dense) is split per the paper's
  QKVAttentionLegacy, channels ordered (heads, [q|k|v], head_dim), or with use_new_attention_order
  per QKVAttention, ([q|k|v], heads, head_dim).
  """
  num_heads: int = 1
  num_head_channels: int = -1
  dtype: Dtype = jnp.float32
  use_new_attention_order: bool = False
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    b, height, width, c = x.shape
    tokens = height * width
    heads = attention_heads(c, self.num_heads, self.num_head_channels)
    h = group_norm(x, 'norm', epsilon=1e-5).reshape(b, tokens, c)
    qkv = dense(3 * c, self.dtype, name='qkv')(h)                           # (B, T, 3C)
    if self.use_new_attention_order:
      qkv = qkv.reshape(b, tokens, 3, heads, c // heads)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      qkv = qkv.reshape(b, tokens, heads, 3, c // heads)
      q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    h = dot_product_attention(q, k, v, self.attention_impl).reshape(b, tokens, c)
    h = dense(c, self.dtype, zero_init=True, name='proj_out')(h)
    return x + h.reshape(b, height, width, c)


def layer_norm(x: jax.Array, name: str) -> jax.Array:
  """torch.nn.LayerNorm (eps 1e-5) computed in float32, cast back to x's dtype."""
  y = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                   name=name)(x.astype(jnp.float32))
  return y.astype(x.dtype)


class CrossAttention(nn.Module):
  """Multi-head attention of x (B,T,C) over context (B,L,Cc), or over x itself when context is None.

  q/k/v projections without bias, output projection `to_out_0` with bias (the paper's to_out[0]).
  """
  heads: int = 8
  dim_head: int = 64
  dtype: Dtype = jnp.float32
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, context=None):
    context = x if context is None else context
    inner = self.heads * self.dim_head

    def project(inputs, name):  # (B, T, C) -> (B, T, heads, dim_head)
      out = nn.Dense(inner, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name=name)(inputs)
      return out.reshape(*out.shape[:2], self.heads, self.dim_head)

    q, k, v = project(x, 'to_q'), project(context, 'to_k'), project(context, 'to_v')
    h = dot_product_attention(q, k, v, self.attention_impl).reshape(*x.shape[:2], inner)
    return dense(x.shape[-1], self.dtype, name='to_out_0')(h)


class FeedForward(nn.Module):
  """The paper's gated FeedForward (GEGLU): Dense to 2 x 4C, value * gelu(gate) with the exact erf
  gelu, Dense back to C. Names follow its Sequential: net.0.proj and net.2."""
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    hidden = self.mult * x.shape[-1]
    value, gate = jnp.split(dense(2 * hidden, self.dtype, name='net_0_proj')(x), 2, axis=-1)
    h = value * jax.nn.gelu(gate, approximate=False)
    return dense(x.shape[-1], self.dtype, name='net_2')(h)


class BasicTransformerBlock(nn.Module):
  """Pre-norm self-attention, cross-attention (self-attention when context is None), feed-forward."""
  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, context=None):
    attention = lambda name: CrossAttention(self.heads, self.dim_head, self.dtype, self.attention_impl,
                                            name=name)
    x = attention('attn1')(layer_norm(x, 'norm1')) + x
    x = attention('attn2')(layer_norm(x, 'norm2'), context) + x
    return FeedForward(dtype=self.dtype, name='ff')(layer_norm(x, 'norm3')) + x


class SpatialTransformer(nn.Module):
  """The paper's SpatialTransformer on NHWC x: GroupNorm(32, eps 1e-6), 1x1 conv to heads*dim_head,
  `depth` BasicTransformerBlocks over the H*W tokens, zero-initialised 1x1 conv back, residual.

  context (B, L, context_dim) is attended to by each block's attn2; None makes attn2 self-attention.
  """
  heads: int
  dim_head: int
  depth: int = 1
  dtype: Dtype = jnp.float32
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, context=None):
    b, height, width, c = x.shape
    inner = self.heads * self.dim_head
    h = group_norm(x, 'norm', epsilon=1e-6)
    h = conv(inner, 1, dtype=self.dtype, name='proj_in')(h).reshape(b, height * width, inner)
    if context is not None:
      context = context.astype(self.dtype)
    for d in range(self.depth):
      h = BasicTransformerBlock(self.heads, self.dim_head, self.dtype, self.attention_impl,
                                name=f'transformer_blocks_{d}')(h, context)
    h = conv(c, 1, dtype=self.dtype, zero_init=True, name='proj_out')(h.reshape(b, height, width, inner))
    return x + h
