"""Tests for models/layers.py against PyTorch (convs, GroupNorm), diffusers (ResnetBlock2D) and
numpy transcriptions of the paper's formulas (timestep embedding, attention)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from flax import linen as nn

from latent_diffusion.models import layers


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def conv_params(weight, bias):
  """torch OIHW conv weight -> flax {'kernel': HWIO, 'bias'}."""
  return {'kernel': jnp.asarray(weight.detach().numpy().transpose(2, 3, 1, 0)),
          'bias': jnp.asarray(bias.detach().numpy())}


def paper_timestep_embedding(timesteps, dim, max_period=10000):
  """numpy transcription of the paper's util.timestep_embedding (repeat_only=False)."""
  half = dim // 2
  freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half)
  args = np.asarray(timesteps, np.float64)[:, None] * freqs[None]
  embedding = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
  if dim % 2:
    embedding = np.concatenate([embedding, np.zeros_like(embedding[:, :1])], axis=-1)
  return embedding


# Timestep embedding.


@pytest.mark.parametrize('dim', [8, 64, 7])
def test_timestep_embedding_matches_paper_formula(dim):
  timesteps = np.array([0, 1, 17, 500, 999])
  ours = layers.timestep_embedding(jnp.asarray(timesteps), dim)
  assert ours.shape == (5, dim) and ours.dtype == jnp.float32
  # float32 arguments up to 999 rad: cos/sin agree to ~1e-4 absolute.
  np.testing.assert_allclose(ours, paper_timestep_embedding(timesteps, dim), atol=2e-4)


def test_timestep_embedding_puts_cos_first_and_is_one_at_t0():
  embedding = np.asarray(layers.timestep_embedding(jnp.zeros((1,), jnp.int32), 16))
  np.testing.assert_array_equal(embedding[0, :8], np.ones(8))   # cos(0)
  np.testing.assert_array_equal(embedding[0, 8:], np.zeros(8))  # sin(0)


# Convolutions: compare the 'same'-padded conv with torch's conv2d on the same weights.


@pytest.mark.parametrize('size, in_ch, out_ch, kernel', [
    (8, 4, 6, 3),     # ordinary map
    (2, 64, 64, 3),   # tiny map with many channels
    (4, 32, 16, 3),
    (5, 3, 8, 1),     # 1x1, odd size
])
def test_conv_matches_torch_conv2d_with_same_padding(size, in_ch, out_ch, kernel):
  torch.manual_seed(0)
  reference = torch.nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2)
  x = np.random.default_rng(0).normal(size=(2, size, size, in_ch)).astype(np.float32)
  module = layers.conv(out_ch, kernel)
  ours = module.apply({'params': conv_params(reference.weight, reference.bias)}, jnp.asarray(x))
  with torch.no_grad():
    expected = nhwc(reference(nchw(x)))
  assert ours.shape == (2, size, size, out_ch)
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)


def test_conv_init_draws_torch_default_uniform_bound():
  """PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for a conv kernel."""
  params = layers.conv(64, 3).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 32)))['params']
  kernel = np.asarray(params['kernel']).ravel()
  bound = 1 / math.sqrt(3 * 3 * 32)
  assert np.all(np.abs(kernel) <= bound)
  assert np.abs(kernel).max() > 0.95 * bound
  np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3), rtol=0.05)


def test_zero_init_conv_outputs_its_bias_only():
  module = layers.conv(5, 3, zero_init=True)
  params = module.init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 3)))
  out = module.apply(params, np.random.default_rng(1).normal(size=(1, 4, 4, 3)).astype(np.float32))
  np.testing.assert_array_equal(out, np.zeros((1, 4, 4, 5)))


def test_downsample_conv_matches_torch_pad_right_bottom_then_stride_two():
  torch.manual_seed(1)
  reference = torch.nn.Conv2d(8, 8, 3, stride=2, padding=0)
  x = np.random.default_rng(1).normal(size=(1, 8, 8, 8)).astype(np.float32)
  module = layers.Downsample(with_conv=True)
  ours = module.apply({'params': {'conv': conv_params(reference.weight, reference.bias)}},
                      jnp.asarray(x))
  with torch.no_grad():
    expected = nhwc(reference(F.pad(nchw(x), (0, 1, 0, 1))))
  assert ours.shape == (1, 4, 4, 8)
  np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_downsample_without_conv_averages_two_by_two_blocks():
  x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)
  module = layers.Downsample(with_conv=False)
  ours = module.apply({}, jnp.asarray(x))
  expected = x.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(ours, expected)


def test_upsample_nearest_repeats_each_pixel_two_by_two():
  x = np.arange(2 * 3 * 2 * 1, dtype=np.float32).reshape(2, 3, 2, 1)
  ours = np.asarray(layers.upsample_nearest(jnp.asarray(x)))
  assert ours.shape == (2, 6, 4, 1)
  np.testing.assert_array_equal(ours, x.repeat(2, axis=1).repeat(2, axis=2))


def test_upsample_with_conv_matches_torch_interpolate_then_conv():
  torch.manual_seed(2)
  reference = torch.nn.Conv2d(4, 4, 3, padding=1)
  x = np.random.default_rng(2).normal(size=(1, 3, 3, 4)).astype(np.float32)
  ours = layers.Upsample(with_conv=True).apply(
      {'params': {'conv': conv_params(reference.weight, reference.bias)}}, jnp.asarray(x))
  with torch.no_grad():
    expected = nhwc(reference(F.interpolate(nchw(x), scale_factor=2.0, mode='nearest')))
  np.testing.assert_allclose(ours, expected, atol=1e-5)


# GroupNorm.


class _GroupNorm(nn.Module):
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    return layers.group_norm(x, 'norm', epsilon=self.epsilon)


@pytest.mark.parametrize('epsilon', [1e-6, 1e-5])
def test_group_norm_matches_torch_group_norm_32(epsilon):
  rng = np.random.default_rng(3)
  x = (3.0 + 2.0 * rng.normal(size=(2, 4, 4, 64))).astype(np.float32)
  scale, bias = rng.normal(size=64).astype(np.float32), rng.normal(size=64).astype(np.float32)
  reference = torch.nn.GroupNorm(32, 64, eps=epsilon)
  with torch.no_grad():
    reference.weight.copy_(torch.from_numpy(scale))
    reference.bias.copy_(torch.from_numpy(bias))
    expected = nhwc(reference(nchw(x)))
  ours = _GroupNorm(epsilon).apply({'params': {'norm': {'scale': scale, 'bias': bias}}},
                                   jnp.asarray(x))
  np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_group_norm_keeps_input_dtype_for_bfloat16():
  x = jnp.ones((1, 2, 2, 32), jnp.bfloat16) * jnp.arange(32, dtype=jnp.bfloat16)
  params = _GroupNorm().init(jax.random.PRNGKey(0), x)
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  out = _GroupNorm().apply(params, x)
  assert out.dtype == jnp.bfloat16
  # One channel per group, constant over space: normalised to zero.
  np.testing.assert_allclose(np.asarray(out, np.float32), 0.0, atol=1e-2)


# ResnetBlock: parity with diffusers' ResnetBlock2D (the same block as the paper's model.py).


def resnet_params(block):
  params = {
      'norm1': {'scale': jnp.asarray(block.norm1.weight.detach().numpy()),
                'bias': jnp.asarray(block.norm1.bias.detach().numpy())},
      'conv1': conv_params(block.conv1.weight, block.conv1.bias),
      'norm2': {'scale': jnp.asarray(block.norm2.weight.detach().numpy()),
                'bias': jnp.asarray(block.norm2.bias.detach().numpy())},
      'conv2': conv_params(block.conv2.weight, block.conv2.bias),
  }
  if block.time_emb_proj is not None:
    params['temb_proj'] = {'kernel': jnp.asarray(block.time_emb_proj.weight.detach().numpy().T),
                           'bias': jnp.asarray(block.time_emb_proj.bias.detach().numpy())}
  if block.conv_shortcut is not None:
    params['nin_shortcut'] = conv_params(block.conv_shortcut.weight, block.conv_shortcut.bias)
  return params


def randomize_(module, seed):
  """Non-trivial values for every parameter (GroupNorm affine included)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for parameter in module.parameters():
      parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize('in_ch, out_ch, temb_ch', [(32, 32, None), (32, 64, None), (32, 64, 16)])
def test_resnet_block_matches_diffusers_resnet_block_2d(in_ch, out_ch, temb_ch):
  reference = ResnetBlock2D(in_channels=in_ch, out_channels=out_ch, temb_channels=temb_ch,
                            groups=32, eps=1e-6, non_linearity='silu').eval()
  randomize_(reference, seed=out_ch + (temb_ch or 0))
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 6, 6, in_ch)).astype(np.float32)
  temb = rng.normal(size=(2, temb_ch)).astype(np.float32) if temb_ch else None
  with torch.no_grad():
    expected = nhwc(reference(nchw(x), torch.from_numpy(temb) if temb_ch else None))
  ours = layers.ResnetBlock(out_ch).apply({'params': resnet_params(reference)}, jnp.asarray(x),
                                          None if temb is None else jnp.asarray(temb))
  assert ours.shape == (2, 6, 6, out_ch)
  np.testing.assert_allclose(ours, expected, atol=1e-4)


def test_resnet_block_dropout_is_random_only_when_not_deterministic(make_random_params):
  block = layers.ResnetBlock(32, dropout=0.5)
  x = np.random.default_rng(0).normal(size=(1, 4, 4, 32)).astype(np.float32)
  params = {'params': make_random_params(jax.eval_shape(block.init, jax.random.PRNGKey(1), x)['params'])}
  run = jax.jit(lambda key: (block.apply(params, x, deterministic=True, rngs={'dropout': key}),
                             block.apply(params, x, deterministic=False, rngs={'dropout': key})))
  (kept, dropped), (kept_again, dropped_again) = run(jax.random.PRNGKey(2)), run(jax.random.PRNGKey(3))
  np.testing.assert_array_equal(kept, kept_again)
  assert not np.allclose(dropped, dropped_again)
  assert not np.allclose(kept, dropped)


# AttnBlock: the paper's single-head 'vanilla' attention, in numpy.


def numpy_group_norm(x, scale, bias, groups=32, epsilon=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h * w, groups, c // groups).astype(np.float64)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = g.var(axis=(1, 3), keepdims=True)
  return ((g - mean) / np.sqrt(var + epsilon)).reshape(b, h, w, c) * scale + bias


def numpy_softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def test_attn_block_matches_numpy_single_head_attention(make_random_params):
  x = np.random.default_rng(5).normal(size=(2, 4, 4, 32)).astype(np.float32)
  block = layers.AttnBlock()
  params = make_random_params(jax.eval_shape(block.init, jax.random.PRNGKey(0), x)['params'])
  ours = jax.jit(block.apply)({'params': params}, x)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = numpy_group_norm(x, p['norm']['scale'], p['norm']['bias']).reshape(2, 16, 32)
  q, k, v = (h @ p[n]['kernel'] + p[n]['bias'] for n in ('q', 'k', 'v'))
  weights = numpy_softmax(np.einsum('bqc,bkc->bqk', q, k) / math.sqrt(32))
  out = np.einsum('bqk,bkc->bqc', weights, v) @ p['proj_out']['kernel'] + p['proj_out']['bias']
  np.testing.assert_allclose(ours, x + out.reshape(2, 4, 4, 32), atol=1e-4)


# remat_block: the rematerialisation policy shared by the autoencoder and the U-Net.


def test_remat_block_none_returns_the_class_itself():
  assert layers.remat_block(layers.ResnetBlock, 'none') is layers.ResnetBlock


def test_remat_block_rejects_an_unknown_value_naming_the_field_and_choices():
  with pytest.raises(ValueError, match=r"remat must be one of none, full, dots; got 'all'"):
    layers.remat_block(layers.AttnBlock, 'all')


@pytest.mark.parametrize('remat, policy', [('full', jax.checkpoint_policies.nothing_saveable),
                                           ('dots', jax.checkpoint_policies.dots_saveable)])
def test_remat_block_wraps_the_call_in_a_checkpoint_with_the_named_policy(remat, policy,
                                                                          remat_policies):
  block = layers.remat_block(layers.AttnBlock, remat)()
  x = jax.ShapeDtypeStruct((1, 2, 2, 32), jnp.float32)
  params = jax.eval_shape(block.init, jax.random.PRNGKey(0), x)
  assert remat_policies(jax.make_jaxpr(block.apply)(params, x)) == [policy]
  plain = jax.make_jaxpr(layers.AttnBlock().apply)(params, x)
  assert remat_policies(plain) == []


def _block_value_and_grads(call, cls, remat, params, x, *args):
  """Loss and gradients (params, x) of remat_block(cls, remat) in training mode (dropout on)."""
  block = layers.remat_block(cls, remat)(*args)
  training = {} if cls is layers.AttnBlock else {'deterministic': False}  # a keyword on purpose

  def loss(params, x):
    out = block.apply({'params': params}, x, **training, rngs={'dropout': jax.random.key(7, impl='rbg')})
    return jnp.sum(out ** 2)

  return call(jax.value_and_grad(loss, argnums=(0, 1)), params, x)


@pytest.mark.parametrize('cls, args', [(layers.ResnetBlock, (64, 0.5)), (layers.AttnBlock, ())])
@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_block_keeps_params_loss_and_gradients(cls, args, remat, make_random_params,
                                                     call_unoptimised, assert_grads_close):
  """Same parameter tree, loss and gradients as the plain block; for ResnetBlock with dropout
  active, so `deterministic` travels as a static argument and the dropout mask is the same."""
  x = np.random.default_rng(6).normal(size=(2, 4, 4, 32)).astype(np.float32)
  abstract = jax.eval_shape(cls(*args).init, jax.random.PRNGKey(0), x)['params']
  wrapped = jax.eval_shape(layers.remat_block(cls, remat)(*args).init, jax.random.PRNGKey(0), x)
  assert jax.tree.structure(wrapped['params']) == jax.tree.structure(abstract)
  assert jax.tree.map(lambda a: a.shape, wrapped['params']) == jax.tree.map(lambda a: a.shape, abstract)
  params = make_random_params(abstract)
  expected_loss, expected_grads = _block_value_and_grads(call_unoptimised, cls, 'none', params, x, *args)
  loss, grads = _block_value_and_grads(call_unoptimised, cls, remat, params, x, *args)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  assert_grads_close(grads, expected_grads)


@pytest.mark.parametrize('shape, groups', [((2, 5, 6, 64), 32), ((3, 7, 12), 4), ((1, 3, 3, 8), 8)])
def test_group_norm_equals_flax_group_norm_with_the_same_parameters(shape, groups):
  rng = np.random.default_rng(0)
  x = (3.0 + rng.normal(size=shape)).astype(np.float32)
  params = {'scale': rng.normal(size=shape[-1]).astype(np.float32),
            'bias': rng.normal(size=shape[-1]).astype(np.float32)}
  ours = layers.GroupNorm(num_groups=groups, epsilon=1e-5).apply({'params': params}, x)
  expected = nn.GroupNorm(num_groups=groups, epsilon=1e-5).apply({'params': params}, x)
  np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize('size, kernel, stride, padding', [
    (2, 3, 1, ((1, 1), (1, 1))), (4, 3, 1, ((1, 1), (1, 1))), (8, 3, 2, ((0, 1), (0, 1))), (3, 1, 1, ((0, 0), (0, 0)))])
def test_small_map_conv_as_matmul_equals_xla_convolution(size, kernel, stride, padding):
  rng = np.random.default_rng(size)
  x = rng.normal(size=(2, size, size, 8)).astype(np.float32)
  w = rng.normal(size=(kernel, kernel, 8, 5)).astype(np.float32)
  expected = jax.lax.conv_general_dilated(x, w, (stride, stride), padding,
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(layers.conv_as_matmul(x, w, (stride, stride), padding), expected,
                             atol=1e-5, rtol=1e-5)
