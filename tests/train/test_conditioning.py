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


def concat_config(key='low_res', in_channels=7):
  config = base.get_config()
  config.diffusion.conditioning_key = 'concat'
  config.unet.in_channels = in_channels
  config.cond_stage.key = key
  config.cond_stage.kind = {'low_res': 'identity', 'masked_image': 'first_stage',
                            'segmentation': 'spatial_rescaler'}[key]
  config.data.low_res_size = 16
  config.data.inpainting_masks = True
  return config


def test_concat_conditioning_needs_room_in_the_unet_input():
  config = concat_config(in_channels=4)
  with pytest.raises(ConfigError, match='in_channels'):
    conditioning.check(config, needs_data=False)
  conditioning.check(concat_config(in_channels=7), needs_data=False)


@pytest.mark.parametrize('key, in_channels', [('low_res', 4 + 3), ('masked_image', 4 + 4 + 1),
                                              ('segmentation', 4 + 3)])
def test_concat_width_must_equal_latents_plus_the_condition_naming_the_right_value(key, in_channels):
  config = concat_config(key, in_channels)
  config.cond_stage.n_stages = 3  # f = 8 for the default autoencoder
  conditioning.check(config)
  config.unet.in_channels = in_channels + 1
  with pytest.raises(ConfigError, match=f'must be {in_channels}'):
    conditioning.check(config)


def test_concat_key_needs_its_conditioning_model_and_data():
  config = concat_config('low_res')
  config.cond_stage.kind = 'transformer'
  with pytest.raises(ConfigError, match="needs cond_stage.kind='identity'"):
    conditioning.check(config)
  config = concat_config('low_res')
  config.data.low_res_size = 0
  with pytest.raises(ConfigError, match='data.low_res_size'):
    conditioning.check(config)
  config = concat_config('masked_image', 9)
  config.data.inpainting_masks = False
  with pytest.raises(ConfigError, match='data.inpainting_masks'):
    conditioning.check(config)


def test_spatial_rescaler_must_shrink_the_map_to_the_latent_side():
  config = concat_config('segmentation')
  config.cond_stage.n_stages = 2  # 1/4, but the default autoencoder has f = 8
  with pytest.raises(ConfigError, match='f=8'):
    conditioning.check(config)


def text_config():
  config = base.get_config()
  config.diffusion.conditioning_key = 'crossattn'
  config.cond_stage.kind, config.cond_stage.key = 'transformer', 'caption'
  config.cond_stage.n_embed = 32
  config.unet.use_spatial_transformer, config.unet.context_dim = True, 32
  return config


def test_captions_need_the_transformer_and_a_matching_context_width():
  conditioning.check(text_config())
  config = text_config()
  config.cond_stage.kind = 'class'
  with pytest.raises(ConfigError, match='caption or layout \\(transformer\\)'):
    conditioning.check(config)
  config = text_config()
  config.unet.context_dim = 64
  with pytest.raises(ConfigError, match='cond_stage.n_embed \\(32\\)'):
    conditioning.check(config)


def test_guidance_is_allowed_for_text_and_refused_for_super_resolution():
  config = text_config()
  config.sample.guidance_scale = 3.0
  conditioning.check(config)
  config = concat_config('low_res')
  config.sample.guidance_scale = 3.0
  with pytest.raises(ConfigError, match="null version.*'low_res'"):
    conditioning.check(config)


def test_raw_names_follow_the_conditioning_key_and_input():
  assert conditioning.raw_names(base.get_config()) == ()
  assert conditioning.raw_names(class_config('adm')) == ('label',)
  assert conditioning.raw_names(class_config('crossattn')) == ('label',)
  assert conditioning.raw_names(text_config()) == ('tokens',)
  assert conditioning.raw_names(concat_config('segmentation')) == ('segmentation',)
  assert conditioning.raw_names(concat_config('masked_image', 9)) == ('concat',)


def test_dropped_tokens_become_the_empty_condition_row_by_row():
  tokens = jnp.tile(jnp.arange(1, 6, dtype=jnp.int32), (2000, 1))
  empty = np.array([0, 0, 0, 0, 0], np.int32)
  dropped = np.asarray(conditioning.drop_conditions({'tokens': tokens}, jax.random.PRNGKey(1), 0.3,
                                                    {'tokens': empty})['tokens'])
  is_null = (dropped == empty).all(axis=1)
  assert 0.26 < is_null.mean() < 0.34
  np.testing.assert_array_equal(dropped[~is_null], np.asarray(tokens)[~is_null])
  null = conditioning.null_conditions({'tokens': tokens[:3]}, {'tokens': empty})['tokens']
  np.testing.assert_array_equal(null, np.zeros((3, 5)))


def test_host_inputs_name_a_missing_batch_field():
  config = concat_config('segmentation')
  with pytest.raises(ConfigError, match="batch field 'segmentation'"):
    conditioning.host_inputs(config, {'image': np.zeros((2, 8, 8, 3), np.float32)})


def test_sampling_labels_cycle_through_classes_or_repeat_the_chosen_one():
  config = class_config()
  np.testing.assert_array_equal(conditioning.sampling_labels(config, 12), np.arange(12) % 10)
  config.sample.class_label = 3
  np.testing.assert_array_equal(conditioning.sampling_labels(config, 4), [3, 3, 3, 3])
