"""Tests for models/attention.py: the attention kernels against jax.nn.dot_product_attention and each
other, the AttentionBlock against numpy transcriptions of the paper's QKVAttentionLegacy and
QKVAttention, and the SpatialTransformer against the paper's own (the `ldm` package, PyTorch)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

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


# Kernels per backend (attention_impl).


@pytest.mark.parametrize('query_tokens, key_tokens', [(16, 16), (16, 7)])
@pytest.mark.parametrize('impl', ['xla', 'sliced', 'auto'])
def test_attention_kernels_agree_with_the_einsum_kernel(impl, query_tokens, key_tokens):
  rng = np.random.default_rng(query_tokens + key_tokens)
  q = rng.normal(size=(2, query_tokens, 3, 8)).astype(np.float32)
  k, v = rng.normal(size=(2, 2, key_tokens, 3, 8)).astype(np.float32)
  expected = jax.jit(attention.einsum_attention)(q, k, v)
  out = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, impl))(q, k, v)
  assert out.shape == (2, query_tokens, 3, 8)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_auto_attention_is_the_cpu_choice_on_cpu_and_jax_default_elsewhere():
  assert attention.resolve_attention_impl('auto', 'cpu') == attention.CPU_ATTENTION_IMPL
  assert attention.resolve_attention_impl('auto', 'cpu', logits=1024 * 1024) == 'sliced'
  assert attention.resolve_attention_impl('auto', 'gpu', logits=1024 * 1024) == 'default'
  assert attention.resolve_attention_impl('auto', 'gpu') == 'default'
  assert attention.resolve_attention_impl('xla', 'gpu') == 'xla'
  assert attention.resolve_attention_impl('cudnn', 'gpu') == 'cudnn'
  q = np.random.default_rng(5).normal(size=(1, 6, 2, 4)).astype(np.float32)
  chosen = attention.dot_product_attention(q, q[:, ::-1], q, attention.CPU_ATTENTION_IMPL)
  np.testing.assert_array_equal(attention.dot_product_attention(q, q[:, ::-1], q, 'auto'), chosen)


def test_unknown_attention_impl_is_a_clear_error():
  with pytest.raises(ValueError, match="attention_impl must be one of auto, einsum, sliced, xla, cudnn; got 'flash'"):
    attention.dot_product_attention(*np.zeros((3, 1, 2, 1, 4), np.float32), impl='flash')


def test_attention_block_new_attention_order_matches_papers_qkv_attention(make_random_params):
  x = np.random.default_rng(2).normal(size=(2, 4, 4, 64)).astype(np.float32)
  block = attention.AttentionBlock(num_heads=4, use_new_attention_order=True)
  params = make_random_params(jax.eval_shape(block.init, jax.random.PRNGKey(0), x)['params'])
  ours = jax.jit(block.apply)({'params': params}, x)
  np.testing.assert_allclose(ours, _modern_layout_block(x, params, 4), atol=1e-4)


@pytest.mark.parametrize('use_new_attention_order', [False, True])
def test_attention_block_kernels_agree(use_new_attention_order, make_random_params):
  x = np.random.default_rng(3).normal(size=(1, 4, 4, 64)).astype(np.float32)
  outs = []
  for impl in ('einsum', 'xla'):
    block = attention.AttentionBlock(num_heads=2, use_new_attention_order=use_new_attention_order,
                                     attention_impl=impl)
    params = make_random_params(jax.eval_shape(block.init, jax.random.PRNGKey(0), x)['params'])
    outs.append(jax.jit(block.apply)({'params': params}, x))
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


# SpatialTransformer, against the paper's (ldm.modules.attention, PyTorch).


def _torch_name(path):
  """Our SpatialTransformer parameter path -> the paper's state-dict key."""
  *modules, leaf = path
  name = '.'.join(modules)
  name = re.sub(r'transformer_blocks_(\d+)', r'transformer_blocks.\1', name)
  name = name.replace('to_out_0', 'to_out.0').replace('net_0_proj', 'net.0.proj').replace('net_2', 'net.2')
  return f'{name}.{"bias" if leaf == "bias" else "weight"}'


def _ours_from_torch(module, abstract):
  """Our params from a torch module's state dict: OIHW -> HWIO, Linear (out, in) -> (in, out)."""
  state = {key: value.detach().numpy() for key, value in module.state_dict().items()}

  def take(path, leaf):
    tensor = state.pop(_torch_name([str(entry.key) for entry in path]))
    tensor = tensor.transpose(2, 3, 1, 0) if tensor.ndim == 4 else tensor.T if tensor.ndim == 2 else tensor
    assert tensor.shape == leaf.shape
    return tensor

  params = jax.tree_util.tree_map_with_path(take, abstract)
  assert not state, f'torch parameters left over: {sorted(state)}'
  return params


def _randomised(module, seed=0):
  """Every parameter random (the paper zero-initialises proj_out), norm affines near 1 / 0."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in module.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if param.ndim == 1:
        param.copy_(1 + 0.1 * noise if name.endswith('weight') and 'norm' in name else 0.1 * noise)
      else:
        param.copy_(noise / math.sqrt(param[0].numel()))
  return module.eval()


def paper_spatial_transformer(channels, heads, dim_head, depth, context_dim):
  from ldm.modules.attention import SpatialTransformer  # pylint: disable=g-import-not-at-top
  # This ldm (stable-diffusion-sdkit) takes one context width per block.
  return _randomised(SpatialTransformer(channels, heads, dim_head, depth=depth,
                                        context_dim=[context_dim] * depth, use_checkpoint=False))


def run_paper_spatial_transformer(module, x, context, depth):
  with torch.no_grad():
    out = module(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                 context=[None if context is None else torch.from_numpy(context)] * depth)
  return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize('with_context', [True, False])
def test_spatial_transformer_matches_the_papers(with_context):
  """Depth 2, inner width (2 x 24) != channels (64): cross-attention to a 5-token context, or
  self-attention in attn2 when context is None (the paper's module built with context_dim None)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 4, 4, 64)).astype(np.float32)
  context = rng.normal(size=(2, 5, 12)).astype(np.float32) if with_context else None
  reference = paper_spatial_transformer(64, 2, 24, 2, 12 if with_context else None)
  block = attention.SpatialTransformer(heads=2, dim_head=24, depth=2)
  params = _ours_from_torch(reference, jax.eval_shape(block.init, jax.random.PRNGKey(0), x,
                                                      context)['params'])
  ours = jax.jit(block.apply)({'params': params}, x, context)
  expected = run_paper_spatial_transformer(reference, x, context, 2)
  assert np.abs(expected - x).max() > 0.1  # the transformer does change its input
  np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_spatial_transformer_output_depends_on_the_context(make_random_params):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 4, 4, 32)).astype(np.float32)
  contexts = rng.normal(size=(2, 1, 3, 16)).astype(np.float32)
  block = attention.SpatialTransformer(heads=2, dim_head=16)
  params = make_random_params(jax.eval_shape(block.init, jax.random.PRNGKey(0), x, contexts[0])['params'])
  apply = jax.jit(block.apply)
  first, second = (apply({'params': params}, x, context) for context in contexts)
  assert not np.allclose(first, second, atol=1e-3)
  np.testing.assert_array_equal(first, apply({'params': params}, x, contexts[0]))


def test_spatial_transformer_parameter_names_are_the_fixed_ones():
  """The names the converters are written against (paper and diffusers)."""
  block = attention.SpatialTransformer(heads=2, dim_head=8, depth=2)
  params = jax.eval_shape(block.init, jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 32)),
                          jnp.zeros((1, 3, 24)))['params']
  paths = {'/'.join(str(entry.key) for entry in path): leaf.shape
           for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  attention_shapes = {'to_q/kernel': (16, 16), 'to_k/kernel': (24, 16), 'to_v/kernel': (24, 16),
                      'to_out_0/kernel': (16, 16), 'to_out_0/bias': (16,)}
  expected = {'norm/scale': (32,), 'norm/bias': (32,), 'proj_in/kernel': (1, 1, 32, 16),
              'proj_in/bias': (16,), 'proj_out/kernel': (1, 1, 16, 32), 'proj_out/bias': (32,)}
  for d in range(2):
    block_prefix = f'transformer_blocks_{d}'
    for norm in ('norm1', 'norm2', 'norm3'):
      expected.update({f'{block_prefix}/{norm}/scale': (16,), f'{block_prefix}/{norm}/bias': (16,)})
    for name, shape in attention_shapes.items():
      self_shape = (16, 16) if name in ('to_k/kernel', 'to_v/kernel') else shape
      expected[f'{block_prefix}/attn1/{name}'] = self_shape
      expected[f'{block_prefix}/attn2/{name}'] = shape
    expected.update({f'{block_prefix}/ff/net_0_proj/kernel': (16, 128),
                     f'{block_prefix}/ff/net_0_proj/bias': (128,),
                     f'{block_prefix}/ff/net_2/kernel': (64, 16), f'{block_prefix}/ff/net_2/bias': (16,)})
  assert paths == expected


def test_feed_forward_uses_the_exact_erf_gelu():
  from ldm.modules.attention import FeedForward  # pylint: disable=g-import-not-at-top
  reference = _randomised(FeedForward(16, glu=True))
  x = 3 * np.random.default_rng(2).normal(size=(2, 5, 16)).astype(np.float32)
  params = _ours_from_torch(reference, jax.eval_shape(attention.FeedForward().init,
                                                      jax.random.PRNGKey(0), x)['params'])
  with torch.no_grad():
    expected = reference(torch.from_numpy(x)).numpy()
  # float32 rounding of sums of terms up to ~16 differs by a few 1e-6 between CPUs (3e-6 on an AMD EPYC).
  np.testing.assert_allclose(jax.jit(attention.FeedForward().apply)({'params': params}, x), expected,
                             rtol=0, atol=1e-5)
  # The tanh approximation is farther off than that tolerance, so the test can tell them apart.
  with torch.no_grad():
    value, gate = reference.net[0].proj(torch.from_numpy(x)).chunk(2, dim=-1)
    approximate = reference.net[2](value * torch.nn.functional.gelu(gate, approximate='tanh')).numpy()
  assert np.abs(approximate - expected).max() > 1e-5


def test_fresh_spatial_transformer_is_the_identity():
  """proj_out is zero-initialised, as the paper's zero_module."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=(1, 2, 2, 32)).astype(np.float32)
  block = attention.SpatialTransformer(heads=1, dim_head=32)
  out, _ = jax.jit(block.init_with_output)(jax.random.key(0, impl='rbg'), x,
                                           rng.normal(size=(1, 3, 8)).astype(np.float32))
  np.testing.assert_allclose(out, x, atol=1e-6)


def test_spatial_transformer_computes_in_bfloat16_with_float32_params(make_random_params):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(1, 4, 4, 32)).astype(np.float32)
  context = rng.normal(size=(1, 3, 16)).astype(np.float32)
  full = attention.SpatialTransformer(heads=2, dim_head=16)
  half = attention.SpatialTransformer(heads=2, dim_head=16, dtype=jnp.bfloat16)
  abstract = jax.eval_shape(half.init, jax.random.PRNGKey(0), x, context)['params']
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
  params = make_random_params(abstract)
  out = jax.jit(half.apply)({'params': params}, x.astype(jnp.bfloat16), context)
  assert out.dtype == jnp.bfloat16
  expected = jax.jit(full.apply)({'params': params}, x, context)
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=0.1)
  assert np.abs(expected - x).max() > 0.3  # far larger than the bfloat16 tolerance

