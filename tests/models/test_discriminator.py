"""Tests for models/discriminator.py against the live reference, taming-transformers'
NLayerDiscriminator (with its weights_init), in train and eval mode, with BatchNorm and ActNorm."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from taming.modules.discriminator.model import NLayerDiscriminator as TorchNLayerDiscriminator
from taming.modules.discriminator.model import weights_init

from latent_diffusion.errors import CheckpointError
from latent_diffusion.models.discriminator import (NLayerDiscriminator,
                                                   discriminator_params_from_state_dict)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def images(seed, size=64, batch=4):
  return np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32)


def reference(seed=0, **kwargs):
  """The paper's discriminator as the paper builds it: NLayerDiscriminator(...).apply(weights_init)."""
  torch.manual_seed(seed)
  return TorchNLayerDiscriminator(**kwargs).apply(weights_init)


def abstract_variables(model, size=64):
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def assert_close(actual, expected, tolerance=1e-5):
  """Equal up to float32 summation order, elements near zero compared at the array's scale."""
  expected = np.asarray(expected)
  np.testing.assert_allclose(actual, expected, rtol=tolerance,
                             atol=tolerance * max(np.abs(expected).max(), 1e-3))


# BatchNorm (the paper's setting): train mode, running stats, eval mode.


def randomise_batch_norms(model, seed):
  """Non-trivial norm affine and running stats, so that every converted entry matters."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for layer in model.main:
      if isinstance(layer, torch.nn.BatchNorm2d):
        c = layer.num_features
        layer.weight.copy_(1 + 0.1 * torch.randn(c, generator=generator))
        layer.bias.copy_(0.1 * torch.randn(c, generator=generator))
        layer.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
        layer.running_var.copy_(0.5 + torch.rand(c, generator=generator))


def test_batch_norm_train_step_then_eval_match_torch_outputs_and_running_stats():
  torch_model = reference(seed=1)
  randomise_batch_norms(torch_model, seed=2)
  params, batch_stats = discriminator_params_from_state_dict(torch_model.state_dict(), use_actnorm=False)
  model = NLayerDiscriminator()
  x_train, x_eval = images(3), images(4)

  # Train mode: batch statistics normalise, running stats move (torch momentum 0.1, unbiased var).
  logits, updates = model.apply({'params': params, 'batch_stats': batch_stats}, jnp.asarray(x_train),
                                train=True, mutable=['batch_stats'])
  torch_model.train()
  with torch.no_grad():
    expected = nhwc(torch_model(nchw(x_train)))
  assert logits.shape == expected.shape == (4, 6, 6, 1) and logits.dtype == jnp.float32
  assert_close(logits, expected)
  assert set(updates['batch_stats']) == {'main_3', 'main_6', 'main_9'}
  for name, stats in updates['batch_stats'].items():
    torch_norm = torch_model.main[int(name.removeprefix('main_'))]
    assert not np.allclose(stats['mean'], batch_stats[name]['mean'])  # the step did move them
    assert_close(stats['mean'], torch_norm.running_mean.numpy())
    assert_close(stats['var'], torch_norm.running_var.numpy())

  # Eval mode: the updated running averages normalise; a new batch gives torch's .eval() logits.
  logits = model.apply({'params': params, **updates}, jnp.asarray(x_eval), train=False)
  torch_model.eval()
  with torch.no_grad():
    assert_close(logits, nhwc(torch_model(nchw(x_eval))))


# ActNorm: data-dependent init.


def copy_convs_into_torch(torch_model, params):
  """Our conv kernels and biases into the torch model (its ActNorms stay uninitialised)."""
  with torch.no_grad():
    for name, leaves in params.items():
      layer = torch_model.main[int(name.removeprefix('main_'))]
      if isinstance(layer, torch.nn.Conv2d):
        layer.weight.copy_(torch.from_numpy(np.array(leaves['kernel']).transpose(3, 2, 0, 1)))
        layer.bias.copy_(torch.from_numpy(np.array(leaves['bias'])))


def test_actnorm_init_on_a_batch_gives_torch_first_forward_loc_scale_and_outputs():
  model = NLayerDiscriminator(use_actnorm=True)
  x_first, x_next = images(5), images(6)
  variables = model.init(jax.random.PRNGKey(0), jnp.asarray(x_first), train=True)
  assert 'batch_stats' not in variables
  torch_model = TorchNLayerDiscriminator(use_actnorm=True)
  copy_convs_into_torch(torch_model, variables['params'])
  torch_model.train()
  with torch.no_grad():
    expected_first = nhwc(torch_model(nchw(x_first)))  # initialises each ActNorm from this batch
    expected_next = nhwc(torch_model(nchw(x_next)))    # uses the stored loc/scale

  actnorms = {name: leaves for name, leaves in variables['params'].items() if 'loc' in leaves}
  assert set(actnorms) == {'main_3', 'main_6', 'main_9'}
  for name, leaves in actnorms.items():
    torch_norm = torch_model.main[int(name.removeprefix('main_'))]
    assert torch_norm.initialized.item() == 1
    assert_close(leaves['loc'], torch_norm.loc.detach().numpy().reshape(-1))
    assert_close(leaves['scale'], torch_norm.scale.detach().numpy().reshape(-1))
  assert_close(model.apply(variables, jnp.asarray(x_first), train=True), expected_first)
  assert_close(model.apply(variables, jnp.asarray(x_next), train=False), expected_next)

  # The initialised torch model converts back to the same variables (ActNorm loc/scale (1,C,1,1)).
  params, batch_stats = discriminator_params_from_state_dict(torch_model.state_dict(), use_actnorm=True)
  assert batch_stats == {}
  jax.tree.map(assert_close, params, variables['params'])


# Shapes and sizes.


@pytest.mark.parametrize('size', [64, 256, 70])
def test_patch_logit_shape_matches_torch(size):
  torch_model = reference().eval()
  with torch.no_grad():
    expected = nhwc(torch_model(torch.zeros(1, 3, size, size))).shape
  init = functools.partial(NLayerDiscriminator().init, train=False)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  logits = jax.eval_shape(lambda v, x: NLayerDiscriminator().apply(v, x, train=False),
                          jax.eval_shape(init, jax.random.PRNGKey(0), x), x)
  assert logits.shape == expected


@pytest.mark.parametrize('ndf, n_layers, use_actnorm', [
    (64, 3, False),  # the paper's
    (64, 3, True),
    (32, 2, False),
    (16, 5, True),   # widths capped at 8 * ndf
])
def test_parameter_count_matches_torch(ndf, n_layers, use_actnorm):
  torch_model = TorchNLayerDiscriminator(ndf=ndf, n_layers=n_layers, use_actnorm=use_actnorm)
  variables = abstract_variables(NLayerDiscriminator(ndf=ndf, n_layers=n_layers, use_actnorm=use_actnorm))
  assert count(variables['params']) == sum(p.numel() for p in torch_model.parameters())
  torch_stats = sum(b.numel() for name, b in torch_model.named_buffers()
                    if name.endswith(('running_mean', 'running_var')))
  assert count(variables.get('batch_stats', {})) == torch_stats


# Initialisation.


def test_init_draws_weights_init_distributions_and_torch_start_running_stats():
  torch_model = reference(seed=7)
  variables = NLayerDiscriminator().init(jax.random.PRNGKey(7), jnp.asarray(images(8, size=32, batch=2)),
                                         train=True)  # train: init must still leave the stats alone
  params = variables['params']
  for name, leaves in params.items():
    torch_layer = torch_model.main[int(name.removeprefix('main_'))]
    if 'kernel' in leaves:
      kernel, torch_kernel = np.asarray(leaves['kernel']), torch_layer.weight.detach().numpy()
      assert kernel.shape == torch_kernel.transpose(2, 3, 1, 0).shape
      if kernel.size > 10_000:  # N(0, 0.02) on both sides
        np.testing.assert_allclose(kernel.std(), torch_kernel.std(), rtol=0.05)
        assert abs(kernel.mean()) < 0.1 * torch_kernel.std()
      if 'bias' in leaves:  # weights_init leaves conv biases at torch's U(-1/sqrt(fan_in), ...)
        bound = 1 / np.sqrt(np.prod(torch_kernel.shape[1:]))
        bias, torch_bias = np.asarray(leaves['bias']), torch_layer.bias.detach().numpy()
        assert np.abs(bias).max() <= bound and np.abs(torch_bias).max() <= bound
        if bias.size > 1:
          assert np.abs(bias).max() > 0.5 * bound
    else:  # BatchNorm: weight N(1, 0.02), bias 0, running stats 0 and 1
      np.testing.assert_array_equal(leaves['bias'], torch_layer.bias.detach().numpy())
      stats = variables['batch_stats'][name]
      np.testing.assert_array_equal(stats['mean'], torch_layer.running_mean.numpy())
      np.testing.assert_array_equal(stats['var'], torch_layer.running_var.numpy())

  scales = np.concatenate([np.asarray(leaves['scale']) for leaves in params.values() if 'scale' in leaves])
  torch_scales = np.concatenate([layer.weight.detach().numpy() for layer in torch_model.main
                                 if isinstance(layer, torch.nn.BatchNorm2d)])
  assert scales.shape == torch_scales.shape == (896,)
  assert abs(scales.mean() - 1) < 0.005 and abs(torch_scales.mean() - 1) < 0.005
  np.testing.assert_allclose(scales.std(), torch_scales.std(), rtol=0.15)


# Checkpoint conversion errors.


def test_wrong_shaped_checkpoint_entry_names_key_and_both_shapes():
  state_dict = reference().state_dict()
  state_dict['main.5.weight'] = torch.zeros(256, 128, 3, 3)
  with pytest.raises(CheckpointError, match=r'main\.5\.weight.*\(256, 128, 3, 3\).*\(256, 128, 4, 4\)'):
    discriminator_params_from_state_dict(state_dict, use_actnorm=False)


def test_missing_checkpoint_entry_is_named():
  state_dict = reference().state_dict()
  del state_dict['main.9.running_var']
  with pytest.raises(CheckpointError, match=r'no main\.9\.running_var \(shape \(512,\)\)'):
    discriminator_params_from_state_dict(state_dict, use_actnorm=False)


def test_checkpoint_of_another_configuration_is_refused():
  deeper = reference(n_layers=4).state_dict()
  with pytest.raises(CheckpointError, match=r'main\.11\.'):  # a bias-free 512-channel conv, not the output conv
    discriminator_params_from_state_dict(deeper, use_actnorm=False)
  with pytest.raises(CheckpointError, match=r'BatchNorm layers \(main\.3\.running_mean\); set use_actnorm=False'):
    discriminator_params_from_state_dict(reference().state_dict(), use_actnorm=True)
  with pytest.raises(CheckpointError, match=r'ActNorm layers \(main\.3\.loc\); set use_actnorm=True'):
    discriminator_params_from_state_dict(reference(use_actnorm=True).state_dict(), use_actnorm=False)
  extra = {**reference().state_dict(), 'main.12.weight': torch.zeros(1, 1, 4, 4)}
  with pytest.raises(CheckpointError, match=r'does not: main\.12\.weight$'):
    discriminator_params_from_state_dict(extra, use_actnorm=False)


def test_prefixed_checkpoint_converts_like_the_bare_state_dict():
  state_dict = reference().state_dict()
  whole = {'loss.discriminator.' + key: value for key, value in state_dict.items()}
  whole['encoder.conv_in.weight'] = torch.zeros(1)  # other parts of the checkpoint are left alone
  prefixed = discriminator_params_from_state_dict(whole, use_actnorm=False, prefix='loss.discriminator.')
  bare = discriminator_params_from_state_dict(state_dict, use_actnorm=False)
  jax.tree.map(np.testing.assert_array_equal, prefixed, bare)
