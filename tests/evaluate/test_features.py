"""Feature networks as the eval modes use them (names, outputs), and the reference statistics files."""

import json

import numpy as np
import pytest

from latent_diffusion.errors import ConfigError
from latent_diffusion.evaluate import features, inception
from tests import tiny_config


def _config(**fields):
  config = tiny_config.get_config()
  with config.unlocked():
    config.mode = 'eval_diffusion'
    for name, value in fields.items():
      config.eval[name] = value
  return config


@pytest.fixture(scope='module')
def inception_file(tmp_path_factory):
  """A pt_inception-shaped torch file of random weights (torchvision's layout with 1008 classes)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision.models.inception import Inception3  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
  path = tmp_path_factory.mktemp('inception') / 'pt_inception-2015-12-05-6726825d.pth'
  torch.save(model.state_dict(), path)
  return path


def test_inception_network_is_named_fid_and_gives_pool3_and_logits(inception_file):
  config = _config(feature_network='inception', inception_path=str(inception_file), batch_size=2)
  network = features.make_feature_network(config)
  assert (network.name, network.distance_name, network.score_name, network.kernel_name) == (
      'fid_inception_v3', 'FID', 'IS', 'KID')
  images = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16, 3)).astype(np.float32)
  pool3, logits = network.extract(images)
  direct = inception.make_feature_fn(inception.load_fid_inception_params(inception_file), batch_size=2)(images)
  assert pool3.shape == (3, network.feature_dim) == (3, 2048) and logits.shape == (3, 1008)
  np.testing.assert_allclose(pool3, direct['pool3'], rtol=1e-6)
  np.testing.assert_allclose(logits, direct['logits'], rtol=1e-6)


def _expected(network_name='fid_inception_v3', resolution=16):
  return {'feature_network': network_name, 'resolution': resolution}


def test_a_pytorch_fid_statistics_file_is_read_for_inception_only(tmp_path):
  path = tmp_path / 'fid_stats.npz'
  np.savez(path, mu=np.zeros(4), sigma=np.eye(4))  # pytorch-fid's format: no record of the network
  loaded = features.load_statistics(path, _expected(), feature_dim=4)
  assert 'features' not in loaded and loaded['mu'].shape == (4,)
  with pytest.raises(ConfigError, match="records no feature network.*'classifier_cifar10'"):
    features.load_statistics(path, _expected('classifier_cifar10'), feature_dim=4)
  with pytest.raises(ConfigError, match='4-dimensional statistics.*2048 dimensions'):
    features.load_statistics(path, _expected(), feature_dim=2048)


def test_statistics_of_another_resolution_are_refused_with_both_values(tmp_path):
  path = tmp_path / 'ours.npz'
  np.savez(path, mu=np.zeros(4), sigma=np.eye(4), meta=np.asarray(json.dumps(_expected(resolution=256))))
  with pytest.raises(ConfigError, match='resolution 256.*uses 16'):
    features.load_statistics(path, _expected(resolution=16), feature_dim=4)
  with pytest.raises(ConfigError, match='no mu and sigma'):
    np.savez(tmp_path / 'empty.npz', other=np.zeros(2))
    features.load_statistics(tmp_path / 'empty.npz', _expected(), feature_dim=4)


def test_sample_quality_without_reference_features_says_what_is_not_measured():
  network = features.FeatureNetwork('classifier_x', 'FD-x', 'IS-x', 'KD-x', '', '', 4, lambda images: None)
  rng = np.random.default_rng(0)
  real, fake = rng.normal(size=(40, 4)), rng.normal(size=(40, 4)) + 1.0
  reference = {'mu': real.mean(0), 'sigma': np.cov(real, rowvar=False)}
  results = features.sample_quality(network, fake, rng.normal(size=(40, 3)), reference, _config())
  assert results['FD-x'] > 0.5 and results['IS-x'] >= 1.0
  assert results['precision'].startswith('not measured') and results['KD-x'].startswith('not measured')
  results = features.sample_quality(network, fake, rng.normal(size=(40, 3)), dict(reference, features=real),
                                    _config(kid_subset_size=20))
  assert results['KD-x'] > 0 and 0 <= results['recall'] <= 1


@pytest.mark.parametrize('fields, message', [
    ({'feature_network': 'vgg'}, 'eval.feature_network: must be one of inception, classifier'),
    ({'feature_network': 'inception', 'inception_path': ''}, "eval.inception_path: no file at ''"),
    ({'feature_network': 'classifier', 'classifier_path': '/no/c'}, "eval.classifier_path: no file at '/no/c'"),
    ({'reference_split': 'test'}, 'eval.reference_split: must be one of train, eval'),
    ({'kid_subset_size': 1}, 'eval.kid_subset_size: must be >= 2'),
    ({'inception_resize': 'lanczos'}, 'eval.inception_resize: must be one of pytorch_fid, clean'),
])
def test_bad_eval_fields_fail_with_their_name(inception_file, fields, message):
  config = _config(**{'feature_network': 'inception', 'inception_path': str(inception_file), **fields})
  with pytest.raises(ConfigError, match=message.replace('.', r'\.')):
    features.check_config(config)
