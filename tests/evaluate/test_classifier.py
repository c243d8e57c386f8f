"""Tests for evaluate/classifier.py: a short run on generated folders of two colours proves the path
(pipeline -> training -> held-out accuracy -> predict / features -> save / load) without the shared
data; the measured CIFAR-10 and UTKFace runs are the module's CLI."""

import types

import jax
import numpy as np
import pytest
from PIL import Image

from configs import base
from latent_diffusion.errors import CheckpointError, ConfigError
from latent_diffusion.evaluate import classifier, shapes_parser
from tests.conftest import CLASS_COLOURS, write_folder


def folder_config(path, num_classes=2, size=32):
  data_config = base.get_config().data
  with data_config.unlocked():
    data_config.source, data_config.path, data_config.image_size = 'folder', str(path), size
    data_config.num_classes, data_config.label_column = num_classes, 'label'
  return data_config


def read_images(root):
  images, labels = [], []
  for label, name in enumerate(sorted(CLASS_COLOURS)):
    for file in sorted((root / name).iterdir()):
      images.append(np.asarray(Image.open(file), np.float32) / 127.5 - 1.0)
      labels.append(label)
  return np.stack(images), np.array(labels)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('colours')
  train, test = write_folder(root / 'train', 24, seed=0), write_folder(root / 'test', 10, seed=1)
  variables, metrics = classifier.train_classifier(folder_config(train), str(test), steps=30, batch_size=16,
                                                   seed=0, learning_rate=0.05)
  return types.SimpleNamespace(root=root, train=train, test=test, variables=variables, metrics=metrics)


def test_training_on_two_colour_folders_reaches_high_held_out_accuracy(trained):
  assert trained.metrics['num_eval_images'] == 2 * 10
  assert trained.metrics['accuracy'] >= 0.95
  assert trained.metrics['steps'] == 30 and trained.metrics['train_seconds'] > 0


def test_predict_gives_the_folder_labels_and_features_are_penultimate_vectors(trained):
  images, labels = read_images(trained.test)
  predicted = classifier.predict(trained.variables, images)
  assert predicted.dtype == np.int32
  assert np.mean(predicted == labels) == pytest.approx(trained.metrics['accuracy'])
  feats = classifier.features(trained.variables, images)
  assert feats.shape == (len(images), classifier.WIDTHS[-1]) and feats.dtype == np.float32
  # The features of the two classes lie apart: each image is nearer its own class mean.
  means = np.stack([feats[labels == k].mean(0) for k in (0, 1)])
  nearest = np.argmin(np.linalg.norm(feats[:, None] - means[None], axis=-1), axis=1)
  assert np.mean(nearest == labels) >= 0.95


def test_untrained_classifier_is_at_chance_on_the_same_images(trained):
  # The accuracy above comes from training: fresh variables call one class for (nearly) everything.
  images, labels = read_images(trained.test)
  fresh = jax.jit(classifier.Classifier(2).init)(jax.random.key(1), images[:1])
  assert np.mean(classifier.predict(fresh, images) == labels) <= 0.75


def test_long_inputs_run_in_padded_chunks_with_the_same_results(trained, monkeypatch):
  images, _ = read_images(trained.test)
  whole = classifier.features(trained.variables, images)
  monkeypatch.setattr(classifier, '_EVAL_BATCH', 6)
  np.testing.assert_allclose(classifier.features(trained.variables, images), whole, rtol=1e-4, atol=1e-5)


def test_save_and_load_round_trip(trained, tmp_path):
  path = classifier.save_classifier(tmp_path / 'sub' / 'classifier.msgpack', trained.variables)
  loaded = classifier.load_classifier(path)
  images, _ = read_images(trained.test)
  np.testing.assert_array_equal(classifier.predict(loaded, images),
                                classifier.predict(trained.variables, images))
  np.testing.assert_allclose(classifier.features(loaded, images),
                             classifier.features(trained.variables, images))


def test_load_classifier_names_a_missing_or_foreign_file(tmp_path):
  with pytest.raises(CheckpointError, match='no file at .*absent.msgpack'):
    classifier.load_classifier(tmp_path / 'absent.msgpack')
  (tmp_path / 'junk.msgpack').write_bytes(b'\x00not msgpack at all')
  with pytest.raises(CheckpointError, match='junk.msgpack'):
    classifier.load_classifier(tmp_path / 'junk.msgpack')
  parser_params = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes_parser.abstract_params())
  parser_path = shapes_parser.save_parser(tmp_path / 'parser.msgpack', parser_params)
  with pytest.raises(CheckpointError, match='parser.msgpack does not match'):
    classifier.load_classifier(parser_path)


def test_larger_images_are_averaged_down_to_the_trained_size(trained):
  # A 64 px image made of 2x2 copies of each pixel of a 32 px one has the same features.
  images, _ = read_images(trained.test)
  doubled = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)
  np.testing.assert_allclose(classifier.features(trained.variables, doubled),
                             classifier.features(trained.variables, images), rtol=1e-4, atol=1e-5)


def test_bad_label_configs_raise_config_errors(trained):
  synthetic_config = folder_config(trained.train)
  with synthetic_config.unlocked():
    synthetic_config.source = 'synthetic'
  with pytest.raises(ConfigError, match="data.source must be 'folder'"):
    classifier.train_classifier(synthetic_config, str(trained.test), 1, 4, 0)
  with pytest.raises(ConfigError, match='data.num_classes must be positive'):
    classifier.train_classifier(folder_config(trained.train, num_classes=0), str(trained.test), 1, 4, 0)
  with pytest.raises(ConfigError, match='data.num_classes=1, but .* has label 1'):
    classifier.train_classifier(folder_config(trained.train, num_classes=1), str(trained.test), 20, 16, 0)


def test_command_line_trains_saves_and_reports(trained, tmp_path, capsys, monkeypatch):
  data_root = tmp_path / 'data'
  (data_root / 'cifar10').mkdir(parents=True)
  (data_root / 'cifar10' / 'train').symlink_to(trained.train)
  (data_root / 'cifar10' / 'test').symlink_to(trained.test)
  monkeypatch.setitem(classifier.DATASETS, 'cifar10', ('cifar10/train', 'cifar10/test', 32, 2))
  flag_values = types.SimpleNamespace(data='cifar10', data_root=str(data_root),
                                      out=str(tmp_path / 'c.msgpack'), steps=3, batch_size=16, seed=0,
                                      learning_rate=0.05, log_every=0)
  classifier._main(flag_values)  # pylint: disable=protected-access
  printed = capsys.readouterr().out
  assert 'held-out accuracy' in printed and f'wrote {tmp_path / "c.msgpack"}' in printed
  assert classifier.num_classes_of(classifier.load_classifier(tmp_path / 'c.msgpack')) == 2
