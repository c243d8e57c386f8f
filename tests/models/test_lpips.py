"""Tests for models/lpips.py: parity with the lpips package's LPIPS(net='vgg') (random VGG16 trunk,
shipped v0.1 heads), loaded through the same torch files a user supplies; gradients; load errors."""

import importlib.util
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import lpips
import numpy as np
import pytest
import torch

from latent_diffusion.errors import CheckpointError, ConfigError
from latent_diffusion.models.lpips import LPIPS, load_lpips_params, lpips_params_from_state_dicts

SHIPPED_HEADS = Path(importlib.util.find_spec('lpips').origin).parent / 'weights' / 'v0.1' / 'vgg.pth'


def torchvision_vgg16_state_dict(reference):
  """The reference's trunk as torchvision's vgg16 state dict: lpips splits vgg16().features into
  slices whose child names keep the `features` indices (net.slice2.5.weight is features.5.weight).
  A stand-in classifier entry shows that classifier.* is ignored."""
  state = {re.sub(r'^slice\d\.', 'features.', name): tensor.detach().clone()
           for name, tensor in reference.net.state_dict().items()}
  return {**state, 'classifier.0.weight': torch.zeros(8, 4)}


@pytest.fixture(scope='module')
def reference_and_params(tmp_path_factory):
  """The reference LPIPS and our params, read from a legacy-format VGG16 file (as torchvision's
  vgg16-397923af.pth) and the lpips package's shipped heads file."""
  torch.manual_seed(0)
  with warnings.catch_warnings():  # torchvision's deprecation of the `pretrained` argument lpips passes
    warnings.simplefilter('ignore', UserWarning)
    reference = lpips.LPIPS(net='vgg', pnet_rand=True, verbose=False)
  vgg_path = tmp_path_factory.mktemp('weights') / 'vgg16-397923af.pth'
  torch.save(torchvision_vgg16_state_dict(reference), vgg_path, _use_new_zipfile_serialization=False)
  return reference, load_lpips_params(vgg_path, SHIPPED_HEADS)


def images(seed, batch=3, size=64):
  """Random [-1, 1] NHWC pairs; the last pair nearly equal (a reconstruction-like distance)."""
  rng = np.random.default_rng(seed)
  first = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  second = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  second[-1] = np.clip(first[-1] + 0.05 * rng.standard_normal(first[-1].shape), -1, 1)
  return first, second


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@jax.jit
def distance(params, images0, images1):
  return LPIPS().apply({'params': params}, images0, images1)


def test_matches_reference_lpips_vgg(reference_and_params):
  reference, params = reference_and_params
  x, y = images(0)
  ours = distance(params, x, y)
  with torch.no_grad():
    expected = reference(nchw(x), nchw(y)).numpy()  # (B,1,1,1)
  assert ours.shape == (3,) and ours.dtype == jnp.float32
  assert expected[-1].item() < 0.5 * expected[:-1].min()  # the near pair is measurably nearer
  np.testing.assert_allclose(ours, expected.reshape(3), rtol=1e-5)


def test_identical_images_are_at_distance_zero(reference_and_params):
  _, params = reference_and_params
  x, _ = images(1)
  np.testing.assert_array_equal(distance(params, x, x), np.zeros(3, np.float32))


def test_gradient_wrt_images_is_finite_nonzero_and_matches_reference_autograd(reference_and_params):
  reference, params = reference_and_params
  x, y = images(2, batch=2)
  ours = jax.jit(jax.grad(lambda x, p: jnp.sum(distance(p, x, y))))(x, params)
  x_torch = nchw(x).requires_grad_()
  reference(x_torch, nchw(y)).sum().backward()
  expected = x_torch.grad.numpy().transpose(0, 2, 3, 1)
  assert np.isfinite(ours).all() and np.abs(ours).max() > 0
  # Compared per image as a whole: where a ReLU input rounds to the other side of 0 in one framework,
  # a patch of gradients differs by ~1e-3 of the largest (typically 1e-5 overall); a wrong
  # derivative anywhere would be off by order 1.
  for image_ours, image_expected in zip(ours, expected):
    error = np.linalg.norm(image_ours - image_expected) / np.linalg.norm(image_expected)
    assert error < 5e-3, error


def test_loaded_params_fill_exactly_the_model_tree(reference_and_params):
  _, params = reference_and_params
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  abstract = jax.eval_shape(LPIPS().init, jax.random.PRNGKey(0), x, x)['params']
  assert sorted(params) == ['lin0', 'lin1', 'lin2', 'lin3', 'lin4', 'vgg']
  assert jax.tree.structure(params) == jax.tree.structure(abstract)
  assert jax.tree.map(np.shape, params) == jax.tree.map(lambda leaf: leaf.shape, abstract)


def test_bfloat16_activations_stay_close_to_float32(reference_and_params):
  _, params = reference_and_params
  x, y = images(3, batch=2)
  low = jax.jit(lambda p, a, b: LPIPS(dtype=jnp.bfloat16).apply({'params': p}, a, b))(params, x, y)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, distance(params, x, y), rtol=0.05)


@pytest.mark.parametrize('missing', ['vgg', 'heads'])
def test_missing_weight_file_error_names_the_path_and_what_belongs_there(tmp_path, missing):
  vgg_path = tmp_path / 'absent' / 'vgg16-397923af.pth' if missing == 'vgg' else SHIPPED_HEADS
  heads_path = tmp_path / 'absent' / 'vgg.pth' if missing == 'heads' else SHIPPED_HEADS
  if missing == 'heads':
    vgg_path = tmp_path / 'vgg16.pth'
    torch.save({}, vgg_path)
  with pytest.raises(ConfigError) as error:
    load_lpips_params(vgg_path, heads_path)
  message = str(error.value)
  assert str(vgg_path if missing == 'vgg' else heads_path) in message
  assert 'download' in message and '\n' not in message
  assert ('vgg16-397923af.pth' if missing == 'vgg' else 'weights/v0.1/vgg.pth') in message


def small_state_dicts():
  """Zero-valued state dicts of the right shapes; the converter only checks names and shapes."""
  vgg, in_channels = {}, 3
  for index, channels in zip((0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
                             (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)):
    vgg[f'features.{index}.weight'] = np.zeros((channels, in_channels, 3, 3), np.float32)
    vgg[f'features.{index}.bias'] = np.zeros((channels,), np.float32)
    in_channels = channels
  heads = {f'lin{i}.model.1.weight': np.zeros((1, c, 1, 1), np.float32)
           for i, c in enumerate((64, 128, 256, 512, 512))}
  return vgg, heads


def test_state_dict_without_a_key_error_names_it():
  vgg, heads = small_state_dicts()
  del vgg['features.19.bias']
  with pytest.raises(CheckpointError, match=r'missing features\.19\.bias$'):
    lpips_params_from_state_dicts(vgg, heads)
  vgg, heads = small_state_dicts()
  del heads['lin3.model.1.weight']
  with pytest.raises(CheckpointError, match=r'missing lin3\.model\.1\.weight$'):
    lpips_params_from_state_dicts(vgg, heads)


def test_state_dict_with_a_wrong_shape_error_names_the_key_and_both_shapes():
  vgg, heads = small_state_dicts()
  vgg['features.5.weight'] = np.zeros((128, 32, 3, 3), np.float32)  # e.g. another VGG's layout
  message = 'features.5.weight has shape (128, 32, 3, 3), expected (128, 64, 3, 3)'
  with pytest.raises(CheckpointError, match=re.escape(message)):
    lpips_params_from_state_dicts(vgg, heads)
