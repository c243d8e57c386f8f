"""Tests for convert/unet_diffusers.py: diffusers UNet2DModel and UNet2DConditionModel with random
weights, converted and run in our UNetModel beside the PyTorch originals; config mapping; errors."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from latent_diffusion.convert import unet_diffusers as convert
from latent_diffusion.errors import CheckpointError, ConfigError
from latent_diffusion.models.unet import UNetModel
from tests.convert.test_autoencoder import random_module, state_dict_of, to_nchw, to_nhwc

TOLERANCE = 1e-4  # max abs difference, float32 on CPU
TIMESTEPS = np.array([0, 999])  # both ends of the schedule, so the embedding is checked at each

# Small UNet2DModel layouts (block widths 32-64), each with its input side.
UNET_2D_CONFIGS = {
    'scale_shift_resnet_resampling': (8, dict(
        block_out_channels=(32, 32, 64), layers_per_block=1, resnet_time_scale_shift='scale_shift',
        down_block_types=('ResnetDownsampleBlock2D', 'AttnDownBlock2D', 'ResnetDownsampleBlock2D'),
        up_block_types=('ResnetUpsampleBlock2D', 'AttnUpBlock2D', 'ResnetUpsampleBlock2D'),
        downsample_type='resnet', upsample_type='resnet', attention_head_dim=8, attn_norm_num_groups=32)),
    'conv_resampling_head_width': (16, dict(
        block_out_channels=(32, 64), layers_per_block=2, in_channels=3, out_channels=5,
        down_block_types=('DownBlock2D', 'AttnDownBlock2D'), up_block_types=('AttnUpBlock2D', 'UpBlock2D'),
        attention_head_dim=16)),
    'class_conditional_one_head': (8, dict(
        block_out_channels=(32, 64), layers_per_block=1, num_class_embeds=7,
        down_block_types=('AttnDownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'AttnUpBlock2D'),
        attention_head_dim=None)),
}
CONTEXT_LENGTH = 5
UNET_2D_CONDITION_CONFIGS = {
    'cross_attention_heads': (8, dict(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=24, attention_head_dim=2,
        down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'))),
    'two_transformer_layers_head_width': (8, dict(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16, attention_head_dim=(2, 4),
        transformer_layers_per_block=2,
        down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
        up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'))),
    'class_conditional_scale_shift': (8, dict(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=8, attention_head_dim=4,
        num_class_embeds=3, resnet_time_scale_shift='scale_shift',
        down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
        up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'))),
}


pytestmark = pytest.mark.usefixtures('single_torch_thread')


def diffusers_config(module):
  return {'_class_name': type(module).__name__, **module.config}


def converted(module):
  """(our UNetModel kwargs, params) for a live diffusers model."""
  kwargs = convert.unet_kwargs_from_diffusers_config(diffusers_config(module))
  params = convert.params_from_diffusers_unet_state_dict(
      state_dict_of(module), convert.abstract_unet_params(kwargs), kwargs)
  return kwargs, params


def inputs(size, channels, seed, num_classes=None, context_dim=None):
  """x (2, size, size, channels), timesteps and, where the model takes them, labels and context."""
  rng = np.random.default_rng(seed)
  batch = {'x': rng.normal(size=(2, size, size, channels)).astype(np.float32), 'timesteps': TIMESTEPS}
  if num_classes:
    batch['y'] = rng.integers(0, num_classes, 2)
  if context_dim:
    batch['context'] = rng.normal(size=(2, CONTEXT_LENGTH, context_dim)).astype(np.float32)
  return batch


def run_diffusers(module, batch):
  with torch.no_grad():
    out = module(to_nchw(batch['x']), torch.from_numpy(batch['timesteps']),
                 **({'encoder_hidden_states': torch.from_numpy(batch['context'])} if 'context' in batch else {}),
                 class_labels=torch.from_numpy(batch['y']) if 'y' in batch else None).sample
  return to_nhwc(out)


def run_ours(kwargs, params, batch):
  apply = jax.jit(UNetModel(**kwargs).apply)
  return np.asarray(apply({'params': params}, **jax.tree.map(jnp.asarray, batch)))


def max_abs_difference(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope='module')
def unet_2d():
  """A multi-head UNet2DModel (random weights), its converted kwargs/params and inputs."""
  size, config = UNET_2D_CONFIGS['conv_resampling_head_width']
  module = random_module(lambda: UNet2DModel(**config), seed=0)
  return module, converted(module), inputs(size, config['in_channels'], seed=0)


@pytest.mark.parametrize('name', UNET_2D_CONFIGS)
def test_unet_2d_model_converted_gives_diffusers_output(name):
  size, config = UNET_2D_CONFIGS[name]
  module = random_module(lambda: UNet2DModel(**config), seed=1)
  kwargs, params = converted(module)
  batch = inputs(size, module.config.in_channels, seed=1, num_classes=config.get('num_class_embeds'))
  expected = run_diffusers(module, batch)
  assert np.abs(expected).max() > 0.1  # random weights everywhere: no output is trivially zero
  assert max_abs_difference(run_ours(kwargs, params, batch), expected) < TOLERANCE


@pytest.mark.parametrize('name', UNET_2D_CONDITION_CONFIGS)
def test_unet_2d_condition_model_converted_gives_diffusers_output(name):
  size, config = UNET_2D_CONDITION_CONFIGS[name]
  module = random_module(lambda: UNet2DConditionModel(**config), seed=2)
  kwargs, params = converted(module)
  assert kwargs['use_spatial_transformer'] and kwargs['context_dim'] == config['cross_attention_dim']
  batch = inputs(size, module.config.in_channels, seed=2, num_classes=config.get('num_class_embeds'),
                 context_dim=config['cross_attention_dim'])
  expected = run_diffusers(module, batch)
  assert np.abs(expected).max() > 0.1
  assert max_abs_difference(run_ours(kwargs, params, batch), expected) < TOLERANCE
  # Not vacuous: the output follows the cross-attention context.
  other_context = {**batch, 'context': np.ascontiguousarray(batch['context'][::-1])}
  assert max_abs_difference(run_diffusers(module, other_context), expected) > 100 * TOLERANCE


def test_qkv_fused_in_the_new_attention_order_also_matches(unet_2d):
  """Fusion follows the model's qkv layout: with use_new_attention_order the same weights give the
  same output, while the legacy fusion run under the new order does not."""
  module, (kwargs, params), batch = unet_2d
  expected = run_diffusers(module, batch)
  new_kwargs = {**kwargs, 'use_new_attention_order': True}
  new_params = convert.params_from_diffusers_unet_state_dict(
      state_dict_of(module), convert.abstract_unet_params(new_kwargs), new_kwargs)
  assert max_abs_difference(run_ours(new_kwargs, new_params, batch), expected) < TOLERANCE
  assert max_abs_difference(run_ours(new_kwargs, params, batch), expected) > 100 * TOLERANCE


def test_attention_named_as_before_diffusers_0_14_converts_the_same(unet_2d):
  """Older UNet2DModel files (CompVis/ldm-celebahq-256) call the attention layers query, key, value
  and proj_attn."""
  module, (kwargs, params), _ = unet_2d
  old_names = {'.to_q.': '.query.', '.to_k.': '.key.', '.to_v.': '.value.', '.to_out.0.': '.proj_attn.'}
  state_dict = {}
  for key, value in state_dict_of(module).items():
    for new, old in old_names.items():
      key = key.replace(new, old) if 'attentions.' in key else key
    state_dict[key] = value
  assert any('.query.' in key for key in state_dict)
  old = convert.params_from_diffusers_unet_state_dict(state_dict, convert.abstract_unet_params(kwargs),
                                                      kwargs)
  jax.tree.map(np.testing.assert_array_equal, old, params)


def test_celebahq_ldm_config_gives_the_papers_unet():
  """CompVis/ldm-celebahq-256's unet/config.json (diffusers' UNet2DModel defaults were taken from it)
  is the paper's configs/latent-diffusion/celebahq-ldm-vq-4.yaml unet_config."""
  config = {'_class_name': 'UNet2DModel', 'act_fn': 'silu', 'attention_head_dim': 32,
            'block_out_channels': [224, 448, 672, 896], 'center_input_sample': False,
            'down_block_types': ['DownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D', 'AttnDownBlock2D'],
            'downsample_padding': 1, 'flip_sin_to_cos': True, 'freq_shift': 0, 'in_channels': 3,
            'layers_per_block': 2, 'mid_block_scale_factor': 1, 'norm_eps': 1e-05, 'norm_num_groups': 32,
            'out_channels': 3, 'sample_size': 64, 'time_embedding_type': 'positional',
            'up_block_types': ['AttnUpBlock2D', 'AttnUpBlock2D', 'AttnUpBlock2D', 'UpBlock2D']}
  kwargs = convert.unet_kwargs_from_diffusers_config(config)
  paper = dict(in_channels=3, out_channels=3, model_channels=224, attention_resolutions=(2, 4, 8),
               num_res_blocks=2, channel_mult=(1, 2, 3, 4), num_head_channels=32, num_heads=-1,
               use_scale_shift_norm=False, resblock_updown=False, dropout=0.0, conv_resample=True)
  assert {name: kwargs[name] for name in paper} == paper


def test_stable_diffusion_2_heads_per_level_become_one_head_width():
  """SD 2's attention_head_dim (5, 10, 20, 20) are head counts of 64-wide heads."""
  config = {'_class_name': 'UNet2DConditionModel', 'block_out_channels': [320, 640, 1280, 1280],
            'attention_head_dim': [5, 10, 20, 20], 'cross_attention_dim': 1024}
  kwargs = convert.unet_kwargs_from_diffusers_config(config)
  assert (kwargs['num_heads'], kwargs['num_head_channels']) == (-1, 64)
  assert kwargs['attention_resolutions'] == (1, 2, 4) and kwargs['context_dim'] == 1024


@pytest.mark.parametrize('kind, change, named', [
    ('UNet2DModel', {'flip_sin_to_cos': False}, 'flip_sin_to_cos'),
    ('UNet2DModel', {'freq_shift': 1}, 'freq_shift'),
    ('UNet2DModel', {'norm_num_groups': 16}, 'norm_num_groups'),
    ('UNet2DModel', {'time_embedding_type': 'fourier'}, 'time_embedding_type'),
    ('UNet2DModel', {'class_embed_type': 'timestep'}, 'class_embed_type'),
    ('UNet2DModel', {'resnet_time_scale_shift': 'scale_shift'}, 'attn_norm_num_groups'),
    ('UNet2DModel', {'down_block_types': ['DownBlock2D', 'SkipDownBlock2D']}, 'SkipDownBlock2D'),
    ('UNet2DModel', {'up_block_types': ['UpBlock2D', 'UpBlock2D']}, 'up_block_types[0]'),
    ('UNet2DModel', {'downsample_type': 'resnet', 'down_block_types': ['AttnDownBlock2D', 'DownBlock2D'],
                     'up_block_types': ['UpBlock2D', 'AttnUpBlock2D']}, 'mix conv and ResNet'),
    ('UNet2DModel', {'attention_head_dim': 24}, 'attention_head_dim=24'),
    ('UNet2DConditionModel', {'use_linear_projection': True}, 'use_linear_projection'),
    ('UNet2DConditionModel', {'only_cross_attention': True}, 'only_cross_attention'),
    ('UNet2DConditionModel', {'attention_head_dim': [2, 3]}, 'attention_head_dim'),
    ('UNet2DConditionModel', {'transformer_layers_per_block': [1, 2]}, 'transformer_layers_per_block'),
    ('UNet2DConditionModel', {'cross_attention_dim': [8, 16]}, 'cross_attention_dim'),
    ('UNet2DConditionModel', {'addition_embed_type': 'text_time'}, 'addition_embed_type'),
    ('VQModel', {}, '_class_name'),
])
def test_unrepresentable_setting_is_a_config_error_naming_it(kind, change, named):
  if kind == 'UNet2DConditionModel':
    base = {'block_out_channels': [32, 64], 'cross_attention_dim': 8, 'attention_head_dim': 2,
            'down_block_types': ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'],
            'up_block_types': ['CrossAttnUpBlock2D', 'CrossAttnUpBlock2D']}
  else:
    base = {'block_out_channels': [32, 64], 'attention_head_dim': 8,
            'down_block_types': ['DownBlock2D', 'AttnDownBlock2D'],
            'up_block_types': ['AttnUpBlock2D', 'UpBlock2D']}
  if kind != 'VQModel':  # the base config converts: the error is the change's
    convert.unet_kwargs_from_diffusers_config({'_class_name': kind, **base})
  with pytest.raises(ConfigError, match=re.escape(named)):
    convert.unet_kwargs_from_diffusers_config({'_class_name': kind, **base, **change})


def test_misshapen_tensor_is_a_checkpoint_error_naming_it_and_both_shapes(unet_2d):
  module, (kwargs, _), _ = unet_2d
  state_dict = state_dict_of(module)
  state_dict['down_blocks.1.resnets.0.conv1.weight'] = np.zeros((64, 32, 1, 1), np.float32)
  with pytest.raises(CheckpointError, match=r'input_blocks_\d+_layers_0/in_conv/kernel '
                     r'\(down_blocks\.1\.resnets\.0\.conv1\.weight\) has shape \(64, 32, 1, 1\) in the '
                     r'checkpoint, the model needs \(64, 32, 3, 3\)'):
    convert.params_from_diffusers_unet_state_dict(state_dict, convert.abstract_unet_params(kwargs), kwargs)


@pytest.mark.parametrize('edit, message', [
    (lambda sd: sd.pop('mid_block.resnets.1.norm2.bias'), r'lacks mid_block\.resnets\.1\.norm2\.bias '
     r'\(for middle_block_layers_2/out_norm/bias\).*U-Net config'),
    (lambda sd: sd.update({'up_blocks.0.extra.weight': np.zeros(3, np.float32)}),
     r'has up_blocks\.0\.extra\.weight, which the model does not use'),
    (lambda sd: sd.pop('up_blocks.0.attentions.1.to_v.bias'),
     r'has up_blocks\.0\.attentions\.1\.to_q\.weight but lacks up_blocks\.0\.attentions\.1\.to_v\.bias'),
])
def test_missing_or_unexpected_tensor_is_a_checkpoint_error_naming_it(unet_2d, edit, message):
  module, (kwargs, _), _ = unet_2d
  state_dict = state_dict_of(module)
  edit(state_dict)
  with pytest.raises(CheckpointError, match=message):
    convert.params_from_diffusers_unet_state_dict(state_dict, convert.abstract_unet_params(kwargs), kwargs)


@pytest.mark.parametrize('safe_serialization, subfolder', [(True, ''), (False, 'unet')])
def test_diffusers_folder_loads_as_the_live_model_converts(unet_2d, tmp_path, safe_serialization,
                                                           subfolder):
  """A model folder (safetensors) or a pipeline folder holding unet/ (.bin)."""
  module, (kwargs, params), _ = unet_2d
  module.save_pretrained(tmp_path / subfolder, safe_serialization=safe_serialization)
  assert json.loads((tmp_path / subfolder / 'config.json').read_text())['_class_name'] == 'UNet2DModel'
  loaded_kwargs, loaded = convert.load_diffusers_unet(tmp_path)
  assert loaded_kwargs == kwargs
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_folder_config_we_cannot_represent_is_a_config_error_naming_the_file(unet_2d, tmp_path):
  module, _, _ = unet_2d
  module.save_pretrained(tmp_path)
  config = json.loads((tmp_path / 'config.json').read_text())
  (tmp_path / 'config.json').write_text(json.dumps({**config, 'flip_sin_to_cos': False}))
  with pytest.raises(ConfigError, match=re.escape(f'{tmp_path / "config.json"}: ') + '.*flip_sin_to_cos'):
    convert.load_diffusers_unet(tmp_path)


def test_folder_without_weights_is_a_checkpoint_error(tmp_path):
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(CheckpointError, match='not a diffusers U-Net folder'):
    convert.load_diffusers_unet(tmp_path)
  with pytest.raises(CheckpointError, match='does not exist'):
    convert.load_diffusers_unet(tmp_path / 'absent')
