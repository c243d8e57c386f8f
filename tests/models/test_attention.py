"""Tests for models/attention.py: the attention kernel against jax.nn.dot_product_attention and the
AttentionBlock against a numpy transcription of the paper's QKVAttentionLegacy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion.models import attention


def numpy_group_norm(x, scale, bias, groups=32, epsilon=1e-5):
  """The paper's GroupNorm32 (eps 1e-5 in openaimodel) on NHWC."""
  b, h, w, c = x.shape
  g = x.reshape(b, h * w, groups, c // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = g.var(axis=(1, 3), keepdims=True)
  return ((g - mean) / np.sqrt(var + epsilon)).reshape(b, h, w, c) * scale + bias


def qkv_attention_legacy(qkv, n_heads):
  """numpy transcription of openaimodel.QKVAttentionLegacy.forward: qkv (N, H*3*C, T) -> (N, H*C, T)."""
  bs, width, length = qkv.shape
  ch = width // (3 * n_heads)
  q, k, v = np.split(qkv.reshape(bs * n_heads, ch * 3, length), 3, axis=1)
  scale = 1 / math.sqrt(math.sqrt(ch))
  weight = np.einsum('bct,bcs->bts', q * scale, k * scale)
  weight = np.exp(weight - weight.max(axis=-1, keepdims=True))
  weight = weight / weight.sum(axis=-1, keepdims=True)
  return np.einsum('bts,bcs->bct', weight, v).reshape(bs, -1, length)


def paper_attention_block(x, params, n_heads):
  """openaimodel.AttentionBlock._forward on NHWC x, with our parameters (float64)."""
  b, h, w, c = x.shape
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  normed = numpy_group_norm(x.astype(np.float64), p['norm']['scale'], p['norm']['bias'])
  normed = normed.reshape(b, h * w, c).transpose(0, 2, 1)                        # (B, C, T)
  qkv = np.einsum('bct,cd->bdt', normed, p['qkv']['kernel']) + p['qkv']['bias'][None, :, None]
  out = qkv_attention_legacy(qkv, n_heads)
  out = np.einsum('bct,cd->bdt', out, p['proj_out']['kernel']) + p['proj_out']['bias'][None, :, None]
  return x + out.transpose(0, 2, 1).reshape(b, h, w, c)


@pytest.mark.parametrize('batch, tokens, heads, dim', [(2, 16, 4, 8), (1, 64, 1, 32), (3, 5, 2, 4)])
def test_dot_product_attention_equals_jax_nn_dot_product_attention(batch, tokens, heads, dim):
  q, k, v = np.random.default_rng(tokens).normal(size=(3, batch, tokens, heads, dim)).astype(np.float32)
  ours = jax.jit(attention.dot_product_attention)(q, k, v)
  expected = jax.jit(jax.nn.dot_product_attention)(q, k, v)
  assert ours.shape == (batch, tokens, heads, dim)
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-5)


def test_dot_product_attention_softmax_is_stable_in_bfloat16():
  q = jnp.full((1, 4, 1, 8), 30.0, jnp.bfloat16)
  v = jnp.arange(32, dtype=jnp.bfloat16).reshape(1, 4, 1, 8)
  out = attention.dot_product_attention(q, q, v)
  assert out.dtype == jnp.bfloat16
  # Equal logits: uniform weights, the mean of v over tokens.
  np.testing.assert_allclose(np.asarray(out, np.float32)[0, 0, 0], np.arange(32).reshape(4, 8).mean(0),
                             rtol=1e-2)


@pytest.mark.parametrize('channels, num_heads, num_head_channels, expected', [
    (256, 8, -1, 8),    # fixed number of heads
    (256, 8, 64, 4),    # fixed head width wins over num_heads
    (192, 4, 32, 6),
])
def test_attention_heads_follows_papers_rule(channels, num_heads, num_head_channels, expected):
  assert attention.attention_heads(channels, num_heads, num_head_channels) == expected


def test_attention_heads_rejects_width_not_divisible_by_head_channels():
  with pytest.raises(ValueError, match='num_head_channels=48'):
    attention.attention_heads(128, 4, 48)


@pytest.mark.parametrize('num_heads, num_head_channels', [(1, -1), (4, -1), (2, 16)])
def test_attention_block_matches_papers_legacy_qkv_layout(num_heads, num_head_channels,
                                                          make_random_params):
  x = np.random.default_rng(0).normal(size=(2, 4, 4, 64)).astype(np.float32)
  block = attention.AttentionBlock(num_heads=num_heads, num_head_channels=num_head_channels)
  params = make_random_params(jax.eval_shape(block.init, jax.random.PRNGKey(0), x)['params'])
  assert params['qkv']['kernel'].shape == (64, 192)
  assert np.abs(params['proj_out']['kernel']).min() > 0  # a non-zero output projection
  heads = attention.attention_heads(64, num_heads, num_head_channels)
  ours = jax.jit(block.apply)({'params': params}, x)
  np.testing.assert_allclose(ours, paper_attention_block(x, params, heads), atol=1e-4)


def test_attention_block_head_count_changes_the_output(make_random_params):
  """Guards the test above: the head split matters, so a wrong layout cannot pass by accident."""
  x = np.random.default_rng(1).normal(size=(1, 4, 4, 64)).astype(np.float32)
  block = attention.AttentionBlock(num_heads=4)
  params = make_random_params(jax.eval_shape(block.init, jax.random.PRNGKey(0), x)['params'])
  four = paper_attention_block(x, params, 4)
  assert not np.allclose(four, paper_attention_block(x, params, 1), atol=1e-3)
  # The same weights read with heads as the outer index of [q|k|v] (a non-legacy layout) differ.
  assert not np.allclose(four, _modern_layout_block(x, params, 4), atol=1e-3)


def _modern_layout_block(x, params, n_heads):
  """qkv channels ordered ([q|k|v], heads, head_dim), as openaimodel's non-legacy QKVAttention."""
  b, h, w, c = x.shape
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  normed = numpy_group_norm(x.astype(np.float64), p['norm']['scale'], p['norm']['bias'])
  qkv = normed.reshape(b, h * w, c) @ p['qkv']['kernel'] + p['qkv']['bias']     # (B, T, 3C)
  q, k, v = (a.reshape(b, h * w, n_heads, c // n_heads) for a in np.split(qkv, 3, axis=-1))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(c // n_heads)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum('bhqk,bkhd->bqhd', weights, v).reshape(b, h * w, c)
  out = out @ p['proj_out']['kernel'] + p['proj_out']['bias']
  return x + out.reshape(b, h, w, c)


def test_fresh_attention_block_is_the_identity():
  """The output projection is zero-initialised, so a new block passes its input through."""
  x = np.random.default_rng(0).normal(size=(1, 4, 4, 32)).astype(np.float32)
  block = attention.AttentionBlock(num_heads=2)
  # An rbg key: the initialisers compile several times faster than with threefry on CPU.
  out, _ = jax.jit(block.init_with_output)(jax.random.key(1, impl='rbg'), x)
  np.testing.assert_allclose(out, x, atol=1e-6)
