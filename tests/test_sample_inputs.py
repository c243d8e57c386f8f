"""Tests for sample_inputs.py: command-line conditions read, checked and sized; held-out conditions."""

import json

import numpy as np
import pytest
from PIL import Image

from configs import base
from latent_diffusion import sample_inputs
from latent_diffusion.errors import ConfigError, DataError


def write_layout(path, boxes):
  path.write_text(json.dumps(boxes))
  return str(path)


def test_layout_json_becomes_class_and_corner_rows_with_shape_names(tmp_path):
  path = write_layout(tmp_path / 'l.json', [{'class': 'square', 'box': [0.1, 0.2, 0.5, 0.6]},
                                            {'class': 4, 'box': [0, 0, 1, 1]}])
  rows = sample_inputs.read_layout(path, 6, ('circle', 'square', 'triangle', 'diamond', 'star', 'ring'))
  np.testing.assert_allclose(rows, [[1, 0.1, 0.2, 0.5, 0.6], [4, 0, 0, 1, 1]])


@pytest.mark.parametrize('box, message', [
    ({'class': 0, 'box': [0.1, 0.2, 1.3, 0.6]}, r'\[0.1, 0.2, 1.3, 0.6\] must be 4 coordinates in \[0, 1\]'),
    ({'class': 7, 'box': [0.1, 0.2, 0.3, 0.6]}, r'class 7 is outside \[0, 5\]'),
    ({'class': 'cloud', 'box': [0.1, 0.2, 0.3, 0.6]}, "unknown class 'cloud'"),
    ({'class': 0, 'box': [0.5, 0.2, 0.3, 0.6]}, 'x1 > x0'),
    ({'box': [0.5, 0.2, 0.3, 0.6]}, 'needs "class" and "box"'),
])
def test_layout_with_a_bad_box_is_refused_naming_the_value(tmp_path, box, message):
  path = write_layout(tmp_path / 'l.json', [box])
  with pytest.raises(DataError, match=message):
    sample_inputs.read_layout(path, 6, ('circle',))


def test_segmentation_with_unknown_labels_is_refused_naming_them_and_the_range(tmp_path):
  labels = np.zeros((8, 8), np.uint8)
  labels[0, 0], labels[1, 1] = 9, 12
  Image.fromarray(labels, 'L').save(tmp_path / 'map.png')
  with pytest.raises(DataError, match=r'labels \[9, 12\] outside.*\[0, 6\]'):
    sample_inputs.read_segmentation(str(tmp_path / 'map.png'), 7)
  labels[0, 0], labels[1, 1] = 6, 2
  Image.fromarray(labels, 'L').save(tmp_path / 'map.png')
  assert sample_inputs.read_segmentation(str(tmp_path / 'map.png'), 7).max() == 6


def test_a_missing_or_unreadable_input_file_is_named(tmp_path):
  with pytest.raises(ConfigError, match='sample.image: no such file'):
    sample_inputs.read_image(str(tmp_path / 'none.png'), 'sample.image')
  (tmp_path / 'bad.png').write_bytes(b'not a png')
  with pytest.raises(DataError, match='sample.mask: .*bad.png.* not a readable image'):
    sample_inputs.read_mask(str(tmp_path / 'bad.png'), 'sample.mask')


def text_config(prompt=''):
  config = base.get_config()
  config.diffusion.conditioning_key = 'crossattn'
  config.cond_stage.kind, config.cond_stage.key, config.cond_stage.tokenizer = 'transformer', 'caption', 'word'
  config.cond_stage.max_seq_len = 16
  config.sample.prompt = prompt
  return config


class RecordingTokenizer:
  def encode(self, texts):
    self.texts = list(texts)
    return np.zeros((len(texts), 16), np.int32)


def test_prompts_separated_by_bars_cycle_over_the_samples():
  tokenizer = RecordingTokenizer()
  inputs, display = sample_inputs.grid_inputs(text_config('a red circle | a blue square'), 5, tokenizer)
  assert tokenizer.texts == ['a red circle', 'a blue square'] * 2 + ['a red circle']
  assert inputs['tokens'].shape == (5, 16) and list(display['caption']) == tokenizer.texts


def test_without_a_prompt_the_captions_of_held_out_synthetic_examples_are_used():
  tokenizer = RecordingTokenizer()
  _, display = sample_inputs.grid_inputs(text_config(), 4, tokenizer)
  assert len(set(display['caption'])) > 1 and all(c.startswith('a') for c in display['caption'])


def test_img2img_start_image_sets_the_sample_size_and_must_agree_with_the_condition_and_config(tmp_path):
  config = base.get_config()
  path = tmp_path / 'start.png'
  Image.fromarray(np.full((96, 128, 3), 255, np.uint8)).save(path)
  config.sample.init_image = str(path)
  start = sample_inputs.read_init_image(config, 3)
  assert start.shape == (3, 96, 128, 3) and np.all(start == 1.0)
  assert sample_inputs.pixel_size(config, '', {'init_image': start}) == (96, 128)
  assert sample_inputs.pixel_size(config, 'caption', {'init_image': start}) == (96, 128)
  config.sample.height = 64
  with pytest.raises(ConfigError, match="64x128 does not match sample.init_image's 96x128"):
    sample_inputs.pixel_size(config, '', {'init_image': start})
  config.sample.height = 0
  with pytest.raises(ConfigError, match='sample.init_image: its size 128x96 does not match the 64x64'):
    sample_inputs.pixel_size(config, 'segmentation', {'init_image': start,
                                                      'segmentation': np.zeros((1, 64, 64))})
  config.sample.init_image = str(tmp_path / 'missing.png')
  with pytest.raises(ConfigError, match="sample.init_image: no such file '.*missing.png'"):
    sample_inputs.read_init_image(config, 1)
  config.sample.init_image = ''
  assert sample_inputs.read_init_image(config, 1) is None


def test_sample_size_follows_the_condition_or_the_config():
  config = base.get_config()
  config.cond_stage.key = 'segmentation'
  assert sample_inputs.pixel_size(config, 'segmentation', {'segmentation': np.zeros((1, 96, 128))}) == (96, 128)
  config.sample.height = 64
  with pytest.raises(ConfigError, match='does not match'):
    sample_inputs.pixel_size(config, 'segmentation', {'segmentation': np.zeros((1, 96, 128))})
  config.data.image_size, config.data.low_res_size = 64, 16
  config.sample.height = 0
  assert sample_inputs.pixel_size(config, 'low_res', {'low_res': np.zeros((1, 24, 32, 3))}) == (96, 128)
  with pytest.raises(ConfigError, match='divisible by the autoencoder factor f=8'):
    sample_inputs.pixel_size(config, 'low_res', {'low_res': np.zeros((1, 5, 5, 3))})
