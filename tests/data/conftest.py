"""Fixtures shared by the data tests."""

import ml_collections
import pytest


def data_config(**overrides):
  """A `config.data` ConfigDict with the fields and defaults of base.py."""
  config = ml_collections.ConfigDict({
      'source': 'synthetic',
      'path': '',
      'label_column': 'label',
      'tfds_name': 'lsun/church_outdoor',
      'tfds_split': 'train',
      'tfds_data_dir': '',
      'image_size': 64,
      'crop': 'center',
      'flip': True,
      'synthetic_size': 10000,
      'synthetic_seed': 0,
      'num_classes': 0,
      'worker_count': 0,
      'shuffle_buffer': 0,
      'max_bad_fraction': 0.01,
  })
  config.lock()  # A misspelt override fails, as with --config.data.x.
  config.update(overrides)
  return config


@pytest.fixture
def make_data_config():
  """Builds a data ConfigDict: make_data_config(source='folder', path=...)."""
  return data_config
