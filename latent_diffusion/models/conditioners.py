"""Conditioning encoders of the paper's cond_stage_config (ldm/modules/encoders/modules.py): the
ClassEmbedder, the TransformerEmbedder / BERTEmbedder (its vendored x-transformers encoder,
ldm/modules/x_transformer.py) and the SpatialRescaler."""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.models.attention import dot_product_attention, layer_norm
from latent_diffusion.models.layers import torch_default_init

Dtype = Any


class ClassEmbedder(nn.Module):
  """Class labels (B,) int32 -> a one-token context (B, 1, embed_dim), the paper's ClassEmbedder.

  For classifier-free guidance, give it one row more than the data has classes: the last row is the
  null class that dropped conditions map to.
  """
  n_classes: int = 1000
  embed_dim: int = 512

  @nn.compact
  def __call__(self, labels: jax.Array) -> jax.Array:
    # torch's nn.Embedding initialises N(0, 1).
    embedding = nn.Embed(self.n_classes, self.embed_dim, embedding_init=nn.initializers.normal(1.0),
                         param_dtype=jnp.float32, name='embedding')
    return embedding(labels.astype(jnp.int32))[:, None, :]


def _torch_bias_init(fan_in: int):
  """torch.nn.Linear / Conv2d's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _linear(features: int, fan_in: int, dtype: Dtype, use_bias: bool = True,
            name: str | None = None) -> nn.Dense:
  """A Dense with torch.nn.Linear's default initialisation (kernel and bias U(+-1/sqrt(fan_in)))."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=torch_default_init, bias_init=_torch_bias_init(fan_in), name=name)


class EncoderSelfAttention(nn.Module):
  """x-transformers' Attention as the paper's Encoder uses it: `heads` x `dim_head` (8 x 64 whatever
  the width), q/k/v projections without bias, `to_out` with bias, softmax(q k^T / sqrt(dim_head)),
  no mask (padding tokens are attended to, as in the paper)."""
  heads: int = 8
  dim_head: int = 64
  dtype: Dtype = jnp.float32
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, length, dim = x.shape
    inner = self.heads * self.dim_head

    def project(name):  # (B, L, D) -> (B, L, heads, dim_head)
      out = _linear(inner, dim, self.dtype, use_bias=False, name=name)(x)
      return out.reshape(b, length, self.heads, self.dim_head)

    h = dot_product_attention(project('to_q'), project('to_k'), project('to_v'), self.attention_impl)
    return _linear(dim, inner, self.dtype, name='to_out')(h.reshape(b, length, inner))


class EncoderFeedForward(nn.Module):
  """x-transformers' FeedForward (glu=False): Linear to mult x D, GELU (exact erf, torch's nn.GELU),
  Linear back. Names follow its Sequential: net.0.0 and net.2."""
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    hidden = self.mult * dim
    h = jax.nn.gelu(_linear(hidden, dim, self.dtype, name='net_0_0')(x), approximate=False)
    return _linear(dim, hidden, self.dtype, name='net_2')(h)


class TransformerEncoder(nn.Module):
  """x-transformers' Encoder(dim, depth) with its defaults: `depth` pairs of pre-norm residual
  layers, self-attention then feed-forward. Layer j (the paper's attn_layers.layers.j) holds its
  LayerNorm as `layers_{j}_0` and its block as `layers_{j}_1`."""
  depth: int
  dtype: Dtype = jnp.float32
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for j in range(2 * self.depth):
      h = layer_norm(x, f'layers_{j}_0')
      if j % 2 == 0:
        h = EncoderSelfAttention(dtype=self.dtype, attention_impl=self.attention_impl,
                                 name=f'layers_{j}_1')(h)
      else:
        h = EncoderFeedForward(dtype=self.dtype, name=f'layers_{j}_1')(h)
      x = x + h
    return x


class TransformerEmbedder(nn.Module):
  """Tokens (B, L) int -> embeddings (B, L, n_embed): the paper's TransformerEmbedder / BERTEmbedder,
  i.e. x-transformers' TransformerWrapper(num_tokens=vocab_size, max_seq_len, Encoder(dim=n_embed,
  depth=n_layer), emb_dropout) called with return_embeddings=True.

  Token embedding + learned absolute position embedding (both N(0, 0.02^2), no scaling), dropout,
  the encoder, a final LayerNorm (eps 1e-5). L may be shorter than max_seq_len (positions 0..L-1).

  The paper's TransformerWrapper also owns `to_logits`, a Linear(n_embed, vocab_size) that
  return_embeddings never uses. We create the same parameters at init (and read them in `logits`),
  so that our parameter count equals the paper's and its checkpoints convert key for key.
  """
  n_embed: int
  n_layer: int
  vocab_size: int
  max_seq_len: int = 77
  embedding_dropout: float = 0.0
  dtype: Dtype = jnp.float32
  attention_impl: str = 'auto'

  @nn.compact
  def __call__(self, tokens: jax.Array, deterministic: bool = True,
               return_logits: bool = False) -> jax.Array:
    length = tokens.shape[1]
    if length > self.max_seq_len:
      raise ValueError(f'TransformerEmbedder: {length} tokens exceed max_seq_len={self.max_seq_len}')
    embed_init = nn.initializers.normal(0.02)
    x = nn.Embed(self.vocab_size, self.n_embed, embedding_init=embed_init, dtype=self.dtype,
                 param_dtype=jnp.float32, name='token_emb')(tokens.astype(jnp.int32))   # (B, L, D)
    positions = nn.Embed(self.max_seq_len, self.n_embed, embedding_init=embed_init, dtype=self.dtype,
                         param_dtype=jnp.float32, name='pos_emb')(jnp.arange(length))  # (L, D)
    x = x + positions[None]
    if self.embedding_dropout > 0:
      x = nn.Dropout(self.embedding_dropout)(x, deterministic=deterministic)
    x = TransformerEncoder(self.n_layer, dtype=self.dtype, attention_impl=self.attention_impl,
                           name='attn_layers')(x)
    x = layer_norm(x, 'norm')                                                        # (B, L, D)
    if return_logits or self.is_initializing():
      logits = _linear(self.vocab_size, self.n_embed, self.dtype, name='to_logits')(x)
      if return_logits:
        return logits
    return x

  def logits(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
    """(B, L, vocab_size): the TransformerWrapper's output without return_embeddings (unused by the
    LDM; here for completeness, e.g. to check converted checkpoints)."""
    return self(tokens, deterministic, return_logits=True)


# torch.nn.functional.interpolate modes SpatialRescaler supports.
RESCALE_METHODS = ('nearest', 'bilinear')


def _torch_source_indices(in_size: int, scale_factor: float, method: str):
  """Static gather indices and weights of F.interpolate(scale_factor=..., mode=method,
  align_corners=False) along one axis: (out_size,) int arrays i0, i1 and float32 weight of i1."""
  out_size = int(math.floor(in_size * scale_factor))
  if out_size < 1:
    raise ValueError(f'SpatialRescaler: a side of {in_size} scaled by {scale_factor} is empty')
  scale = np.float32(1.0 / scale_factor)  # torch passes 1/scale_factor when scale_factor is given
  dst = np.arange(out_size, dtype=np.float32)
  if method == 'nearest':
    i0 = np.minimum(np.floor(dst * scale).astype(np.int64), in_size - 1)
    return i0, i0, np.zeros(out_size, np.float32)
  src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
  i0 = np.minimum(src.astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  return i0, i1, (src - i0).astype(np.float32)


def torch_interpolate(x: jax.Array, scale_factor: float, method: str) -> jax.Array:
  """torch.nn.functional.interpolate(x, scale_factor=scale_factor, mode=method) on NHWC x
  (align_corners False, no antialias): output side floor(side * scale_factor), source positions
  from 1 / scale_factor (so odd sides keep torch's sampling, unlike a resize to the output size)."""
  if method not in RESCALE_METHODS:
    raise ValueError(f'SpatialRescaler: method {method!r} is not supported; use one of '
                     f'{", ".join(RESCALE_METHODS)}')
  for axis in (2, 1):  # width, then height: torch's bilinear weighting order
    i0, i1, weight = _torch_source_indices(x.shape[axis], scale_factor, method)
    first = jnp.take(x, i0, axis=axis)
    if method == 'nearest':
      x = first
      continue
    shape = [1] * x.ndim
    shape[axis] = weight.shape[0]
    weight = jnp.asarray(weight.reshape(shape), x.dtype)
    x = first * (1 - weight) + jnp.take(x, i1, axis=axis) * weight
  return x


class SpatialRescaler(nn.Module):
  """The paper's SpatialRescaler on NHWC maps: n_stages of F.interpolate(scale_factor=multiplier,
  mode=method), then, when out_channels > 0, a 1x1 conv (`channel_mapper`, a Dense on channels with
  kernel (in_channels, out_channels)) without bias unless `bias`. out_channels=0 is the paper's None."""
  n_stages: int = 1
  method: str = 'bilinear'
  multiplier: float = 0.5
  in_channels: int = 3
  out_channels: int = 0
  bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.n_stages < 0:
      raise ValueError(f'SpatialRescaler: n_stages must be >= 0, got {self.n_stages}')
    if self.method not in RESCALE_METHODS:
      raise ValueError(f'SpatialRescaler: method {self.method!r} is not supported; use one of '
                       f'{", ".join(RESCALE_METHODS)}')
    if x.shape[-1] != self.in_channels:
      raise ValueError(f'SpatialRescaler: input has {x.shape[-1]} channels, in_channels={self.in_channels}')
    x = x.astype(self.dtype)
    for _ in range(self.n_stages):
      x = torch_interpolate(x, self.multiplier, self.method)
    if self.out_channels:
      x = _linear(self.out_channels, self.in_channels, self.dtype, use_bias=self.bias,
                  name='channel_mapper')(x)
    return x
