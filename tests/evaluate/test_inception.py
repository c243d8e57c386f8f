"""Tests for evaluate/inception.py: parity with pytorch-fid's InceptionV3 (its FID Inception built with random
weights and random BatchNorm statistics instead of the downloaded ones), both resize rules, loading errors."""

import copy

import jax
import numpy as np
import pytest
import pytorch_fid.inception as pytorch_fid_inception
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from latent_diffusion.errors import CheckpointError, ConfigError
from latent_diffusion.evaluate import inception
from latent_diffusion.evaluate.inception import (load_fid_inception_params, make_feature_fn, resize_clean,
                                                 resize_for_inception, resize_pytorch_fid,
                                                 variables_from_state_dict)

BATCH_SIZE = 2  # 3 images: a full batch and a padded one
# pytorch-fid's FID blocks with average pools -> the torchvision blocks they patch (same parameters, pools
# that count the padding). FIDInceptionE_2 (Mixed_7c, max-pool) is swapped on its own.
TORCHVISION_BLOCKS = {pytorch_fid_inception.FIDInceptionA: torchvision.models.inception.InceptionA,
                      pytorch_fid_inception.FIDInceptionC: torchvision.models.inception.InceptionC,
                      pytorch_fid_inception.FIDInceptionE_1: torchvision.models.inception.InceptionE}
TOLERANCE = 1e-4  # absolute, on pool3 features larger than real ones (see random_state_dict): strict


def random_state_dict(seed=0):
  """A state dict of the FID Inception's layout (torchvision's Inception3, 1008 classes, no aux head: the
  FID blocks subclass torchvision's and add no parameters), all random: He-scaled conv weights, BatchNorm
  scales, offsets and running statistics.

  The running statistics are not those of the activations, so features grow with depth (pool3 averages
  ~5, up to ~50); statistics measured on images make the net ill-conditioned instead (float32 torch then
  differs from float64 torch by 1e-3 on pool3), which would hide real differences below float noise.
  """
  generator = torch.Generator().manual_seed(seed)
  model = torchvision.models.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
  state = {}
  for name, tensor in model.state_dict().items():
    if name.endswith('num_batches_tracked'):
      state[name] = tensor.clone()
      continue
    uniform = torch.rand(tensor.shape, generator=generator)
    normal = torch.randn(tensor.shape, generator=generator)
    if name.endswith('conv.weight') or name == 'fc.weight':
      state[name] = normal * np.sqrt(2 / tensor[0].numel())
    elif name.endswith(('bn.weight', 'running_var')):
      state[name] = 0.5 + uniform
    else:  # bn.bias, running_mean, fc.bias
      state[name] = 0.2 * normal
  return state


def random_images(seed, count=3, height=32, width=32):
  return np.random.default_rng(seed).uniform(-1, 1, (count, height, width, 3)).astype(np.float32)


def nchw(images):
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


@pytest.fixture(scope='module')
def state_dict():
  return random_state_dict()


@pytest.fixture(scope='module')
def reference(state_dict):
  """pytorch-fid's InceptionV3([3], resize_input=True, normalize_input=True), its weights `state_dict`
  (served by a stand-in for the download), and the FID Inception it wraps (for its fc)."""
  built = []

  def fid_inception_v3():
    built.append(build_fid_inception_v3())
    return built[-1]

  build_fid_inception_v3 = pytorch_fid_inception.fid_inception_v3
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pytorch_fid_inception, 'load_state_dict_from_url', lambda url, **unused: state_dict)
    patch.setattr(pytorch_fid_inception, 'fid_inception_v3', fid_inception_v3)
    wrapper = pytorch_fid_inception.InceptionV3([3], resize_input=True, normalize_input=True)
  return wrapper.eval(), built[0].eval()


def reference_pool3(wrapper, images):
  """pytorch-fid's pool3 of NHWC [-1, 1] images (it takes NCHW in [0, 1]), (N, 2048) numpy."""
  with torch.no_grad():
    return wrapper(nchw((images + 1) / 2))[0].flatten(1).numpy()


@pytest.fixture(scope='module')
def feature_fn(state_dict):
  return make_feature_fn(variables_from_state_dict(state_dict), batch_size=BATCH_SIZE)


@pytest.fixture(scope='module')
def features_and_compiles(feature_fn):
  """Our features of random_images(0) (3 images in batches of 2) and how many times the net compiled.

  The jit cache is emptied first: another test file on the same xdist worker may have compiled the
  net for this shape already, and then this one would count no compile.
  """
  inception._features.clear_cache()  # pylint: disable=protected-access
  features = feature_fn(random_images(0))
  return features, inception._features._cache_size()  # pylint: disable=protected-access


@pytest.fixture(scope='module')
def reference_features(reference):
  wrapper, fid_inception = reference
  pool3 = reference_pool3(wrapper, random_images(0))
  with torch.no_grad():
    logits = fid_inception.fc(torch.from_numpy(pool3)).numpy()
  return {'pool3': pool3, 'logits': logits}


def test_pool3_and_logits_match_pytorch_fid_inception(features_and_compiles, reference_features):
  features, _ = features_and_compiles
  expected = reference_features
  assert features['pool3'].shape == (3, 2048) and features['logits'].shape == (3, 1008)
  assert features['pool3'].dtype == np.float32 and features['logits'].dtype == np.float32
  assert 1 < np.abs(expected['pool3']).mean() and np.abs(expected['pool3']).max() < 100  # neither 0 nor inf
  assert np.abs(expected['pool3'][0] - expected['pool3'][1]).max() > 100 * TOLERANCE  # images differ
  np.testing.assert_allclose(features['pool3'], expected['pool3'], rtol=0, atol=TOLERANCE)
  np.testing.assert_allclose(features['logits'], expected['logits'], rtol=0, atol=TOLERANCE)


def test_fid_blocks_are_what_we_match_not_torchvisions(reference, reference_features):
  """The same weights in torchvision's own blocks (average pools counting the padding; Mixed_7c pooling
  by average, not max) give other features: the parity above holds for the FID variant only."""
  wrapper, _ = reference
  blocks = [*wrapper.blocks[2], *wrapper.blocks[3]]
  fid_classes = [type(block) for block in blocks]
  averaging_7c = {pytorch_fid_inception.FIDInceptionE_2: pytorch_fid_inception.FIDInceptionE_1}
  swaps = {'counting the padding': TORCHVISION_BLOCKS, 'averaging in Mixed_7c': averaging_7c}
  try:
    for what, classes in swaps.items():
      for block, fid_class in zip(blocks, fid_classes):  # the same modules and weights, another forward
        block.__class__ = classes.get(fid_class, fid_class)
      pool3 = reference_pool3(wrapper, random_images(0)[:1])  # one image is enough to differ
      difference = np.abs(pool3 - reference_features['pool3'][:1]).max()
      assert difference > 100 * TOLERANCE, what
  finally:
    for block, fid_class in zip(blocks, fid_classes):
      block.__class__ = fid_class


def test_last_batch_is_padded_and_the_net_compiles_once(features_and_compiles, feature_fn):
  features, compiles = features_and_compiles
  assert compiles == 1  # batches [0, 1] and [2, pad]
  compiled_before = inception._features._cache_size()  # pylint: disable=protected-access
  alone = feature_fn(random_images(0)[2:])  # the third image alone, padded the same way
  assert inception._features._cache_size() == compiled_before  # pylint: disable=protected-access
  np.testing.assert_allclose(alone['pool3'], features['pool3'][2:], rtol=0, atol=1e-6)
  empty = feature_fn(np.zeros((0, 32, 32, 3), np.float32))
  assert empty['pool3'].shape == (0, 2048) and empty['logits'].shape == (0, 1008)


@pytest.mark.parametrize('size', [(32, 32), (400, 317), (299, 299)], ids=['up', 'down', 'same'])
def test_pytorch_fid_resize_is_torch_bilinear_without_antialias(size):
  images = random_images(1, count=2, height=size[0], width=size[1])
  expected = F.interpolate(nchw(images), size=(299, 299), mode='bilinear', align_corners=False)
  ours = np.asarray(resize_pytorch_fid(images))
  assert ours.shape == (2, 299, 299, 3)
  np.testing.assert_allclose(ours, expected.numpy().transpose(0, 2, 3, 1), rtol=0, atol=2e-6)


def test_clean_resize_is_pil_bicubic_on_float_images_clipped():
  """A uint8 image with hard edges (bicubic overshoots them: the clip matters), shrunk and enlarged."""
  rng = np.random.default_rng(2)
  for side in (512, 64):
    pixels = np.where(rng.uniform(size=(2, side, side, 3)) < 0.5, 0, 255).astype(np.uint8)
    pixels[:, : side // 2] = rng.integers(0, 256, (2, side // 2, side, 3), dtype=np.uint8)
    unclipped = np.stack([np.stack([np.asarray(Image.fromarray(pixels[n, :, :, c]).convert('F').resize(
        (299, 299), Image.BICUBIC)) for c in range(3)], axis=-1) for n in range(2)])
    assert unclipped.max() > 255.5 and unclipped.min() < -0.5
    images = pixels / np.float32(127.5) - 1
    ours = resize_clean(images)
    assert ours.shape == (2, 299, 299, 3) and ours.dtype == np.float32
    np.testing.assert_allclose((ours + 1) * 127.5, np.clip(unclipped, 0, 255), rtol=0, atol=1e-3)
    np.testing.assert_array_equal(resize_for_inception(images, 'clean'), ours)
    if side > 299:  # shrinking, PIL antialiases and torch's bilinear does not: the rules differ
      assert np.abs(resize_for_inception(images, 'pytorch_fid') - ours).max() > 0.1


def test_clean_features_are_the_net_on_pil_resized_images(state_dict, reference, features_and_compiles):
  """make_feature_fn(resize='clean') is the FID Inception on resize_clean's images; the net compiled for
  the pytorch_fid rule (features_and_compiles) serves it."""
  wrapper, _ = reference
  images = random_images(3, count=2, height=96, width=96)
  compiled_before = inception._features._cache_size()  # pylint: disable=protected-access
  ours = make_feature_fn(variables_from_state_dict(state_dict), resize='clean', batch_size=BATCH_SIZE)(images)
  assert inception._features._cache_size() == compiled_before  # one net for both resize rules
  resized = resize_clean(images)
  unresized = copy.copy(wrapper)
  unresized.resize_input = False
  np.testing.assert_allclose(ours['pool3'], reference_pool3(unresized, resized), rtol=0, atol=TOLERANCE)
  bilinear = reference_pool3(wrapper, images)
  assert np.abs(ours['pool3'] - bilinear).max() > 100 * TOLERANCE


def test_unknown_resize_is_a_config_error():
  with pytest.raises(ConfigError, match='bicubic'):
    make_feature_fn({}, resize='bicubic')
  with pytest.raises(ConfigError, match='lanczos'):
    resize_for_inception(random_images(0), 'lanczos')


def test_load_reads_the_torch_file_as_variables_from_state_dict(state_dict, tmp_path):
  path = tmp_path / 'pt_inception-2015-12-05-6726825d.pth'
  torch.save(state_dict, path)
  loaded = load_fid_inception_params(path)
  expected = variables_from_state_dict(state_dict)
  assert set(loaded) == {'params', 'batch_stats'}
  assert jax.tree.structure(loaded) == jax.tree.structure(expected)
  for ours, theirs in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(ours, theirs)
  kernel = loaded['params']['Mixed_6b']['branch7x7_2']['conv']['kernel']  # a 1x7 conv: OIHW -> HWIO
  expected_kernel = state_dict['Mixed_6b.branch7x7_2.conv.weight'].numpy().transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(kernel, expected_kernel)
  np.testing.assert_array_equal(loaded['params']['fc']['kernel'], state_dict['fc.weight'].numpy().T)
  np.testing.assert_array_equal(loaded['batch_stats']['Mixed_7c']['branch_pool']['bn']['var'],
                                state_dict['Mixed_7c.branch_pool.bn.running_var'].numpy())


def test_missing_weight_file_is_a_config_error_naming_it(tmp_path):
  path = tmp_path / 'nowhere' / 'pt_inception.pth'
  with pytest.raises(ConfigError, match='download') as error:
    load_fid_inception_params(path)
  assert str(path) in str(error.value) and inception.FID_WEIGHTS_URL in str(error.value)


def test_file_missing_a_key_is_a_checkpoint_error_naming_key_and_path(state_dict, tmp_path):
  path = tmp_path / 'incomplete.pth'
  missing = 'Mixed_5c.branch5x5_2.bn.running_mean'
  torch.save({name: value for name, value in state_dict.items() if name != missing}, path)
  with pytest.raises(CheckpointError, match=r'Mixed_5c\.branch5x5_2\.bn\.running_mean') as error:
    load_fid_inception_params(path)
  assert str(path) in str(error.value)


def test_wrong_shapes_and_foreign_keys_are_checkpoint_errors(state_dict):
  """torchvision's ImageNet Inception (1000 classes, an aux head) is not the FID Inception."""
  with pytest.raises(CheckpointError, match=r'fc\.weight has shape \(1000, 2048\).*\(1008, 2048\)'):
    variables_from_state_dict({**state_dict, 'fc.weight': torch.zeros(1000, 2048)})
  with pytest.raises(CheckpointError, match=r'AuxLogits\.fc\.bias'):
    variables_from_state_dict({**state_dict, 'AuxLogits.fc.bias': torch.zeros(1008)})
