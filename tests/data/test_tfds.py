"""Tests for the TFDS source on tfds.testing.mock_data: no data, no network."""

import numpy as np
import pytest

from latent_diffusion import errors
from latent_diffusion.data import pipeline
from latent_diffusion.data import tfds as tfds_source

tfds = pytest.importorskip('tensorflow_datasets')


def test_mock_lsun_gives_uint8_rgb_images_of_varied_sizes():
  with tfds.testing.mock_data(num_examples=8):
    source = tfds_source.TfdsSource('lsun/church_outdoor', 'train')
    assert len(source) == 8
    records = [source[i] for i in range(8)]
  assert all(set(r) == {'image'} for r in records)  # lsun has no label
  for record in records:
    assert record['image'].dtype == np.uint8
    assert record['image'].ndim == 3 and record['image'].shape[-1] == 3
  assert len({r['image'].shape for r in records}) > 1


def test_mock_cifar10_label_is_int32_scalar():
  with tfds.testing.mock_data(num_examples=4):
    record = tfds_source.TfdsSource('cifar10', 'test')[2]
  assert record['label'].dtype == np.int32 and record['label'].shape == ()
  assert 0 <= record['label'] < 10


def test_grey_images_are_repeated_to_three_channels():
  with tfds.testing.mock_data(num_examples=2):
    image = tfds_source.TfdsSource('mnist', 'test')[0]['image']
  assert image.shape == (28, 28, 3)
  np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_mock_pipeline_gives_64px_batches(make_data_config):
  config = make_data_config(source='tfds', tfds_name='lsun/church_outdoor',
                            crop='random')
  with tfds.testing.mock_data(num_examples=12):
    iterator = pipeline.make_iterator(config, batch_size=4, seed=0)
    batches = [next(iterator) for _ in range(4)]  # Crosses an epoch.
  for batch in batches:
    assert set(batch) == {'image'}
    assert batch['image'].shape == (4, 64, 64, 3)
    assert batch['image'].dtype == np.float32
    assert -1 <= batch['image'].min() and batch['image'].max() <= 1


def test_describe_names_dataset_split_and_size(make_data_config):
  config = make_data_config(source='tfds', tfds_name='cifar10',
                            tfds_split='test')
  with tfds.testing.mock_data(num_examples=5):
    assert pipeline.describe(config) == 'tfds cifar10 split test, 5 examples'


def test_unprepared_dataset_raises_data_error_naming_dataset_and_dir(tmp_path):
  data_dir = tmp_path / 'tfds_data'
  with pytest.raises(errors.DataError) as raised:
    tfds_source.TfdsSource('lsun/church_outdoor', 'train', str(data_dir))
  message = str(raised.value)
  assert 'lsun/church_outdoor' in message and str(data_dir) in message
  assert 'tfds build' in message and '\n' not in message
  assert not data_dir.exists() or not any(data_dir.rglob('*.array_record*'))


def test_unknown_dataset_raises_data_error_naming_field(tmp_path):
  with pytest.raises(errors.DataError, match='data.tfds_name.*no_such_set'):
    tfds_source.TfdsSource('no_such_set', 'train', str(tmp_path))


def test_data_source_is_opened_without_download(monkeypatch):
  calls = []

  def fake_data_source(name, **kwargs):
    calls.append((name, kwargs))
    return [{'image': np.zeros((3, 5, 3), np.uint8), 'label': np.int64(2)}]

  monkeypatch.setattr(tfds, 'data_source', fake_data_source)
  source = tfds_source.TfdsSource('cifar10', 'train', '/some/dir')
  assert calls == [('cifar10', {'split': 'train', 'data_dir': '/some/dir',
                                'download': False})]
  assert source[0]['label'] == 2


def fake_source(monkeypatch, images):
  """Makes tfds.data_source return records holding `images`."""
  records = [{'image': image} for image in images]
  monkeypatch.setattr(tfds, 'data_source', lambda name, **kwargs: records)
  return tfds_source.TfdsSource('cifar10', 'train', '/some/dir')


def test_one_channel_images_are_tiled_to_three(monkeypatch):
  grey = np.arange(15, dtype=np.uint8).reshape(3, 5, 1)
  image = fake_source(monkeypatch, [grey])[0]['image']
  assert image.shape == (3, 5, 3) and image.dtype == np.uint8
  for channel in range(3):
    np.testing.assert_array_equal(image[..., channel], grey[..., 0])


def test_alpha_channel_is_dropped(monkeypatch):
  rgba = np.arange(60, dtype=np.uint8).reshape(3, 5, 4)
  image = fake_source(monkeypatch, [rgba])[0]['image']
  np.testing.assert_array_equal(image, rgba[..., :3])


def test_uint16_images_are_scaled_to_255(monkeypatch):
  deep = np.array([[[0], [65535], [257 * 100], [1000]]], np.uint16)
  image = fake_source(monkeypatch, [deep])[0]['image']
  assert image.dtype == np.uint8
  np.testing.assert_array_equal(image[0, :, 1], [0, 255, 100, 4])


@pytest.mark.parametrize('shape', [
    (3, 5, 2), (3, 5, 5), (15,), (2, 3, 5, 3), (0, 5, 3)])
def test_bad_image_shape_raises_data_error_naming_dataset_split_index(
    monkeypatch, shape):
  good = np.zeros((3, 5, 3), np.uint8)
  source = fake_source(monkeypatch, [good, np.zeros(shape, np.uint8)])
  assert source[0]['image'].shape == (3, 5, 3)
  with pytest.raises(errors.DataError) as raised:
    source[1]
  message = str(raised.value)
  assert "'cifar10'" in message and "'train'" in message
  assert 'record 1' in message and str(shape) in message
  assert '\n' not in message
