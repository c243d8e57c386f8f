"""Tests for train/conditioning.py: null class, condition dropout, config checks, sampling labels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from latent_diffusion.errors import ConfigError
from latent_diffusion.train import conditioning


def class_config(key='adm', rows=11, classes=10):
  config = base.get_config()
  config.data.num_classes = classes
  config.diffusion.conditioning_key = key
  if key == 'adm':
    config.unet.num_classes = rows
  else:
    config.cond_stage.kind = 'class'
    config.cond_stage.n_classes = rows
    config.cond_stage.embed_dim = 16
    config.unet.use_spatial_transformer = True
    config.unet.context_dim = 16
  return config


@pytest.mark.parametrize('key', ['adm', 'crossattn'])
def test_null_label_is_the_extra_last_embedding_row(key):
  assert conditioning.null_label(class_config(key, rows=11, classes=10)) == 10
  assert conditioning.null_label(class_config(key, rows=10, classes=10)) is None
  assert conditioning.null_label(base.get_config()) is None  # unconditional


def test_drop_conditions_replaces_about_the_given_fraction_by_the_null_label():
  labels = jnp.arange(4000, dtype=jnp.int32) % 10
  dropped = conditioning.drop_conditions({'label': labels}, jax.random.PRNGKey(0), 0.25, 10)['label']
  is_null = np.asarray(dropped) == 10
  assert 0.22 < is_null.mean() < 0.28
  np.testing.assert_array_equal(np.asarray(dropped)[~is_null], np.asarray(labels)[~is_null])
  same = conditioning.drop_conditions({'label': labels}, jax.random.PRNGKey(0), 0.0, 10)
  np.testing.assert_array_equal(same['label'], labels)


def test_null_conditions_make_every_label_null():
  null = conditioning.null_conditions({'label': jnp.array([1, 2, 3])}, 10)
  np.testing.assert_array_equal(null['label'], [10, 10, 10])


def test_guidance_without_a_null_class_is_refused_naming_the_rows():
  config = class_config('adm', rows=10, classes=10)
  config.sample.guidance_scale = 3.0
  with pytest.raises(ConfigError, match='null class.*11 rows'):
    conditioning.check(config)
  config.unet.num_classes = 11
  conditioning.check(config)


def test_guidance_or_dropout_on_an_unconditional_model_is_refused():
  config = base.get_config()
  config.diffusion.cond_drop_prob = 0.1
  with pytest.raises(ConfigError, match='conditional model'):
    conditioning.check(config)


def test_crossattn_needs_a_matching_context_width():
  config = class_config('crossattn')
  config.unet.context_dim = 8
  with pytest.raises(ConfigError, match='context_dim'):
    conditioning.check(config)


def test_label_conditioning_needs_labelled_data_but_summary_does_not():
  config = class_config('adm', classes=0)
  with pytest.raises(ConfigError, match='data.num_classes'):
    conditioning.check(config)
  conditioning.check(config, needs_data=False)


def test_concat_conditioning_needs_room_in_the_unet_input():
  config = base.get_config()
  config.diffusion.conditioning_key = 'concat'
  with pytest.raises(ConfigError, match='in_channels'):
    conditioning.check(config, needs_data=False)
  config.unet.in_channels = 7
  conditioning.check(config, needs_data=False)


def test_sampling_labels_cycle_through_classes_or_repeat_the_chosen_one():
  config = class_config()
  np.testing.assert_array_equal(conditioning.sampling_labels(config, 12), np.arange(12) % 10)
  config.sample.class_label = 3
  np.testing.assert_array_equal(conditioning.sampling_labels(config, 4), [3, 3, 3, 3])
