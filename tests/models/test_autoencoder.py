"""Tests for models/autoencoder.py: numerical parity with diffusers' AutoencoderKL (PyTorch, random
weights) and parameter counts of the paper's first-stage models."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from flax import traverse_util

from latent_diffusion.models.autoencoder import AutoencoderKL, VQModel


def count(params):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def abstract_params(model, size):
  image = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), image)['params']


def diffusers_model(block_out_channels, layers_per_block, attention_levels=(), latent_channels=4,
                    sample_size=32):
  levels = range(len(block_out_channels))
  return DiffusersAutoencoderKL(
      in_channels=3, out_channels=3,
      down_block_types=tuple('AttnDownEncoderBlock2D' if i in attention_levels else 'DownEncoderBlock2D'
                             for i in levels),
      # diffusers lists decoder blocks from the lowest resolution up: reversed levels.
      up_block_types=tuple('AttnUpDecoderBlock2D' if i in attention_levels else 'UpDecoderBlock2D'
                           for i in reversed(levels)),
      block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
      latent_channels=latent_channels, norm_num_groups=32, sample_size=sample_size).eval()


def diffusers_key(path, num_levels):
  """Our parameter path ('encoder/down_1_block_0/conv1/kernel') -> the diffusers state-dict key of
  the tensor it is copied from, plus the leaf kind ('weight' or 'bias')."""
  *module, leaf = path
  name = '.'.join(module)
  renames = [
      (r'^(encoder|decoder)\.mid_block_(\d)', lambda m: f'{m[1]}.mid_block.resnets.{int(m[2]) - 1}'),
      (r'^(encoder|decoder)\.mid_attn_1', r'\1.mid_block.attentions.0'),
      (r'^encoder\.down_(\d+)_block_(\d+)', r'encoder.down_blocks.\1.resnets.\2'),
      (r'^encoder\.down_(\d+)_attn_(\d+)', r'encoder.down_blocks.\1.attentions.\2'),
      (r'^encoder\.down_(\d+)_downsample\.conv', r'encoder.down_blocks.\1.downsamplers.0.conv'),
      # Ours number decoder levels as the paper (up_0 = highest resolution); diffusers reverses.
      (r'^decoder\.up_(\d+)_block_(\d+)',
       lambda m: f'decoder.up_blocks.{num_levels - 1 - int(m[1])}.resnets.{m[2]}'),
      (r'^decoder\.up_(\d+)_attn_(\d+)',
       lambda m: f'decoder.up_blocks.{num_levels - 1 - int(m[1])}.attentions.{m[2]}'),
      (r'^decoder\.up_(\d+)_upsample\.conv',
       lambda m: f'decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.conv'),
      (r'\.norm_out$', '.conv_norm_out'),
      (r'\.nin_shortcut$', '.conv_shortcut'),
      (r'(attentions\.\d+)\.norm$', r'\1.group_norm'),
      (r'(attentions\.\d+)\.(q|k|v)$', r'\1.to_\2'),
      (r'(attentions\.\d+)\.proj_out$', r'\1.to_out.0'),
  ]
  for pattern, replacement in renames:
    name = re.sub(pattern, replacement, name)
  return name + ('.bias' if leaf == 'bias' else '.weight')


def params_from_diffusers(model, reference, size):
  """A flax param tree for `model` filled from the diffusers `reference` state dict."""
  state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
  flat = traverse_util.flatten_dict(abstract_params(model, size))
  used, out = set(), {}
  for path, leaf in flat.items():
    key = diffusers_key(path, len(model.ch_mult))
    tensor = state[key]
    used.add(key)
    if tensor.ndim == 4:    # conv OIHW -> HWIO
      tensor = tensor.transpose(2, 3, 1, 0)
    elif tensor.ndim == 2:  # linear (out, in) -> (in, out)
      tensor = tensor.T
    assert tensor.shape == leaf.shape, (path, key, tensor.shape, leaf.shape)
    out[path] = jnp.asarray(tensor)
  assert used == set(state), f'diffusers tensors not copied: {sorted(set(state) - used)}'
  return traverse_util.unflatten_dict(out)


def randomize_(module, seed):
  """Non-trivial values for every tensor, GroupNorm affine included, so nothing is vacuous."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, parameter in module.named_parameters():
      noise = torch.randn(parameter.shape, generator=generator)
      if 'norm' in name and name.endswith('weight'):
        parameter.copy_(1.0 + 0.1 * noise)
      elif 'norm' in name:
        parameter.copy_(0.1 * noise)
      else:
        parameter.mul_(1.0 + 0.1 * noise)


PARITY_CASES = {
    # name: (ours, diffusers block_out_channels, layers_per_block, attention levels)
    'mid_attention_only': (dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=()),
                           (32, 64), 1, ()),
    'attention_at_16px': (dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,)),
                          (32, 64), 1, (1,)),
}


@pytest.fixture(scope='module', params=sorted(PARITY_CASES))
def parity_pair(request):
  settings, block_out_channels, layers_per_block, attention_levels = PARITY_CASES[request.param]
  torch.manual_seed(0)
  reference = diffusers_model(block_out_channels, layers_per_block, attention_levels)
  randomize_(reference, seed=1)
  model = AutoencoderKL(z_channels=4, embed_dim=4, resolution=32, **settings)
  return model, params_from_diffusers(model, reference, 32), reference


def test_encoder_moments_match_diffusers_autoencoder_kl(parity_pair):
  model, params, reference = parity_pair
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)
  ours = jax.jit(lambda p, x: model.apply({'params': p}, x, method=model.encode_moments))(params, x)
  with torch.no_grad():
    expected = reference.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist.parameters
  assert ours.shape == (2, 16, 16, 8)
  np.testing.assert_allclose(ours, expected.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)


def test_decoder_output_matches_diffusers_autoencoder_kl(parity_pair):
  model, params, reference = parity_pair
  z = np.random.default_rng(1).normal(size=(2, 16, 16, 4)).astype(np.float32)
  ours = jax.jit(lambda p, z: model.apply({'params': p}, z, method=model.decode))(params, z)
  with torch.no_grad():
    expected = reference.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample
  assert ours.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(ours, expected.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4)


def test_posterior_mean_logvar_and_kl_match_diffusers_latent_dist(parity_pair):
  model, params, reference = parity_pair
  x = np.random.default_rng(2).uniform(-1, 1, size=(1, 32, 32, 3)).astype(np.float32)

  def posterior_arrays(m, x):
    posterior = m.encode(x)
    return posterior.mean, posterior.logvar, posterior.kl()

  mean, logvar, kl = jax.jit(lambda p, x: model.apply({'params': p}, x, method=posterior_arrays))(
      params, x)
  with torch.no_grad():
    dist = reference.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
  to_nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(mean, to_nhwc(dist.mean), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(logvar, to_nhwc(dist.logvar), atol=1e-4, rtol=1e-4)
  # diffusers' kl() sums over C, H, W as the paper's; ours does the same over H, W, C.
  np.testing.assert_allclose(kl, dist.kl().numpy(), rtol=1e-4)


# Call semantics, on a small model with random parameters.

SMALL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=3, resolution=16)


@pytest.fixture(scope='module')
def small_model(make_random_params):
  """(model, params, x, outputs(key) -> dict) with one compiled function for every call form."""
  model = AutoencoderKL(**SMALL)
  params = make_random_params(abstract_params(model, 16))
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32))

  def forms(m, x, key):
    sampled, _ = m(x, rng=key)
    reconstruction, posterior = m(x)
    return {'sampled': sampled, 'reconstruction': reconstruction, 'mean': posterior.mean,
            'decoded_mode': m.decode(posterior.mode())}

  compiled = jax.jit(lambda p, x, key: model.apply({'params': p}, x, key, method=forms))
  return model, params, x, lambda key: compiled(params, x, key)


def test_call_without_rng_decodes_the_posterior_mode(small_model):
  _, _, x, outputs = small_model
  out = outputs(jax.random.PRNGKey(0))
  assert out['reconstruction'].shape == x.shape
  assert out['mean'].shape == (2, 8, 8, 3)  # embed_dim channels at f = 2
  np.testing.assert_allclose(out['reconstruction'], out['decoded_mode'], atol=1e-6)


def test_call_with_rng_samples_the_posterior_deterministically_per_key(small_model):
  *_, outputs = small_model
  first, again, other = (outputs(jax.random.PRNGKey(k))['sampled'] for k in (5, 5, 6))
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other)
  assert not np.allclose(first, outputs(jax.random.PRNGKey(5))['reconstruction'])


@pytest.mark.parametrize('ch_mult, factor', [((1,), 1), ((1, 2), 2), ((1, 2, 4, 4), 8)])
def test_downsampling_factor_is_two_to_the_number_of_downsamples(ch_mult, factor):
  model = AutoencoderKL(ch=32, ch_mult=ch_mult, num_res_blocks=1, resolution=32)
  assert model.downsampling_factor == factor
  moments = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.PRNGKey(0), x, method=model.encode_moments)[0],
      jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert moments.shape == (1, 32 // factor, 32 // factor, 8)


def test_bfloat16_compute_keeps_float32_params_and_outputs(small_model):
  _, params, x, _ = small_model
  model = AutoencoderKL(**SMALL, dtype=jnp.bfloat16)
  abstract = abstract_params(model, 16)
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
  reconstruction = jax.eval_shape(lambda p, x: model.apply({'params': p}, x)[0], params, x)
  assert reconstruction.dtype == jnp.float32
  encode = lambda m: jax.jit(lambda p, x: m.apply({'params': p}, x, method=m.encode_moments))
  half, full = encode(model)(params, x), encode(AutoencoderKL(**SMALL))(params, x)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, full, atol=0.05 * float(np.abs(full).max()))


# Parameter counts.


@pytest.mark.parametrize('settings, resolution, expected', [
    # models/first_stage_models/kl-f8 (LSUN-Churches LDM-8 first stage).
    (dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2), 256, 83_653_863),
    (dict(ch=64, ch_mult=(1, 2, 2), num_res_blocks=1), 64, 3_789_095),
])
def test_parameter_count_equals_papers_autoencoder_kl(settings, resolution, expected):
  """The expected counts were obtained by instantiating the paper's own ldm.models.autoencoder.
  AutoencoderKL (CompVis/latent-diffusion) with these ddconfigs, z_channels 4, embed_dim 4."""
  model = AutoencoderKL(z_channels=4, embed_dim=4, resolution=resolution, **settings)
  assert count(abstract_params(model, resolution)) == expected


def test_parameter_count_equals_diffusers_for_same_settings():
  reference = diffusers_model((64, 128, 128), layers_per_block=1, sample_size=64)
  model = AutoencoderKL(ch=64, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=4, embed_dim=4,
                        resolution=64)
  expected = sum(p.numel() for p in reference.parameters())
  assert count(abstract_params(model, 64)) == expected


# Rematerialisation (config.remat): the same network, recomputed in the backward pass.


def blocks_in(params):
  """Encoder and decoder entries that are a ResnetBlock (conv1) or an AttnBlock (q)."""
  return [f'{half}/{name}' for half in ('encoder', 'decoder')
          for name, tree in params[half].items() if 'conv1' in tree or 'q' in tree]


# Attention at 16 px and in the middle, two levels: every kind of block and a down/upsample.
REMAT_SMALL = {**SMALL, 'attn_resolutions': (16,)}


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_keeps_the_parameter_tree(remat):
  expected = abstract_params(AutoencoderKL(**REMAT_SMALL), 16)
  params = abstract_params(AutoencoderKL(**REMAT_SMALL, remat=remat), 16)
  assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, expected)


@pytest.mark.parametrize('remat, policy', [('none', None),
                                           ('full', jax.checkpoint_policies.nothing_saveable),
                                           ('dots', jax.checkpoint_policies.dots_saveable)])
def test_remat_wraps_every_resnet_and_attention_block(remat, policy, remat_policies):
  """One checkpoint per block in encoder and decoder (10 ResnetBlocks and 5 AttnBlocks)."""
  model = AutoencoderKL(**REMAT_SMALL, remat=remat)
  params = abstract_params(model, 16)
  jaxpr = jax.make_jaxpr(lambda p, x: model.apply({'params': p}, x)[0])(
      params, jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
  expected = [] if policy is None else [policy] * len(blocks_in(params))
  assert len(blocks_in(params)) == 15 and remat_policies(jaxpr) == expected


def test_remat_rejects_an_unknown_value():
  with pytest.raises(ValueError, match='remat must be one of none, full, dots'):
    abstract_params(AutoencoderKL(**SMALL, remat='attention'), 16)


# One level, dropout active: the smallest autoencoder whose gradients cover every block kind.
REMAT_TINY = dict(ch=32, ch_mult=(1,), num_res_blocks=1, z_channels=4, embed_dim=3, resolution=4,
                  dropout=0.5)


def remat_value_and_grads(call, remat, params, x):
  """Reconstruction + KL loss with a sampled posterior, as in training, and its gradients."""
  model = AutoencoderKL(**REMAT_TINY, remat=remat)

  def loss(params):
    reconstruction, posterior = model.apply(
        {'params': params}, x, jax.random.key(1, impl='rbg'), False,
        rngs={'dropout': jax.random.key(2, impl='rbg')})
    return jnp.mean((reconstruction - x) ** 2) + 1e-3 * jnp.mean(posterior.kl())

  return call(jax.value_and_grad(loss), params)


@pytest.fixture(scope='module')
def remat_reference(make_random_params, call_unoptimised):
  """(params, x, loss, grads) of the plain autoencoder in training mode."""
  params = make_random_params(abstract_params(AutoencoderKL(**REMAT_TINY), 4))
  x = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (1, 4, 4, 3)).astype(np.float32))
  return (params, x, *remat_value_and_grads(call_unoptimised, 'none', params, x))


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_keeps_loss_and_gradients(remat, remat_reference, call_unoptimised,
                                        assert_grads_close):
  params, x, expected_loss, expected_grads = remat_reference
  loss, grads = remat_value_and_grads(call_unoptimised, remat, params, x)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  assert_grads_close(grads, expected_grads)


@pytest.mark.parametrize('ch_mult,factor', [((1,), 1), ((1, 2), 2)])
def test_kl_and_vq_models_at_f1_and_f2_build_and_reconstruct_at_the_right_latent_size(ch_mult, factor):
  x = jnp.zeros((1, 8, 8, 3))
  for model in (AutoencoderKL(ch=32, ch_mult=ch_mult, num_res_blocks=1, resolution=8, z_channels=3, embed_dim=3),
                VQModel(n_embed=8, embed_dim=3, ch=32, ch_mult=ch_mult, num_res_blocks=1, resolution=8)):
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
    latents = jax.eval_shape(lambda v, m=model: m.apply(v, x, method=m.encode_moments), variables)
    reconstruction = jax.eval_shape(lambda v, m=model: m.apply(v, x)[0], variables)
    assert model.downsampling_factor == factor
    assert latents.shape[1:3] == (8 // factor, 8 // factor) and reconstruction.shape == x.shape
