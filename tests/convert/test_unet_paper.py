"""Tests for convert/unet_paper.py: the paper's openaimodel.UNetModel (the `ldm` package, PyTorch) with
random weights, converted and run beside ours for small configurations covering every option; the
LitEma copy; errors; and agreement with diffusers' own single-file conversion of the same checkpoint."""

import re

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint,
                                                create_unet_diffusers_config_from_ldm)
from ldm.modules.diffusionmodules.openaimodel import UNetModel as PaperUNet

from latent_diffusion.convert.unet_paper import paper_unet_key, params_from_paper_unet_state_dict
from latent_diffusion.errors import CheckpointError
from latent_diffusion.models.unet import UNetModel
from tests.convert.test_autoencoder import random_module

SIZE, BATCH, CONTEXT_LENGTH = 8, 2, 5
SMALL = dict(in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1, attention_resolutions=(1, 2),
             channel_mult=(1, 2))
# Settings in the paper's keyword names; ours take the same, with 0 for its None.
CONFIGS = {
    'head channels, scale-shift norm, resblock up/down, dropout in eval': dict(
        SMALL, num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True, dropout=0.3),
    'num heads, no conv resampling, upsample heads, in > out channels': dict(
        SMALL, in_channels=7, out_channels=3, num_heads=2, conv_resample=False, num_heads_upsample=1),
    'spatial transformer depth 2 with context, classes': dict(
        SMALL, num_head_channels=16, use_spatial_transformer=True, context_dim=24, transformer_depth=2,
        num_classes=5),
    'not legacy, new attention order, upsample heads, codebook head': dict(
        SMALL, num_heads=2, num_heads_upsample=1, legacy=False, use_new_attention_order=True, n_embed=10),
    'transformer not legacy, head width not dividing channels': dict(
        SMALL, channel_mult=(1, 3), attention_resolutions=(2,), num_head_channels=64,
        use_spatial_transformer=True, context_dim=24, legacy=False),
}


pytestmark = pytest.mark.usefixtures('single_torch_thread')


def paper_unet(settings, seed=0):
  """The paper's UNetModel with every tensor random (it zero-initialises the out convs and proj_out)."""
  settings = dict(settings)
  depth = settings.get('transformer_depth', 1)
  if settings.get('context_dim'):  # this ldm (stable-diffusion-sdkit) takes one context width per block
    settings['context_dim'] = [settings['context_dim']] * depth
  return random_module(lambda: PaperUNet(image_size=SIZE, **{'num_heads': -1, **settings}), seed)


def ours(settings):
  return UNetModel(**{'use_scale_shift_norm': False, 'resblock_updown': False, 'num_heads': -1, **settings})


def inputs(settings, seed=0):
  """x (B,H,W,C), timesteps, context or None, labels or None (numpy)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(BATCH, SIZE, SIZE, settings['in_channels'])).astype(np.float32)
  context = (rng.normal(size=(BATCH, CONTEXT_LENGTH, settings['context_dim'])).astype(np.float32)
             if settings.get('context_dim') else None)
  labels = np.array([1, settings['num_classes'] - 1]) if settings.get('num_classes') else None
  return x, np.array([3, 700]), context, labels


def run_paper(module, settings, x, timesteps, context, labels):
  depth = settings.get('transformer_depth', 1)
  with torch.no_grad():
    out = module(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(timesteps),
                 context=None if context is None else [torch.from_numpy(context)] * depth,
                 y=None if labels is None else torch.from_numpy(labels))
  return out.numpy().transpose(0, 2, 3, 1)


def abstract_params(model, x, timesteps, context, labels):
  return jax.eval_shape(model.init, jax.random.key(0, impl='rbg'), x, timesteps, context, labels)['params']


def state_dict_of(module):
  return {key: value.detach().numpy() for key, value in module.state_dict().items()}


@pytest.mark.parametrize('name', CONFIGS)
def test_converted_paper_unet_gives_the_papers_output(name):
  settings = CONFIGS[name]
  module, model = paper_unet(settings), ours(settings)
  arrays = inputs(settings)
  expected = run_paper(module, settings, *arrays)
  params = params_from_paper_unet_state_dict(state_dict_of(module), abstract_params(model, *arrays), prefix='')
  out = jax.jit(lambda p, *arrays: model.apply({'params': p}, *arrays))(params, *arrays)
  channels = settings.get('n_embed') or settings['out_channels']
  assert out.shape == (BATCH, SIZE, SIZE, channels) == expected.shape
  assert 0.5 < np.abs(expected).max() < 50  # O(1) outputs: the tolerance below means something
  np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


@pytest.fixture(scope='module')
def checkpoint():
  """(paper state dict, abstract params) of the first configuration."""
  settings = CONFIGS['head channels, scale-shift norm, resblock up/down, dropout in eval']
  return state_dict_of(paper_unet(settings)), abstract_params(ours(settings), *inputs(settings))


def lightning_checkpoint(state_dict, ema_state_dict):
  """A full LDM Lightning state dict: the U-Net, its LitEma copy (keys without dots, plus decay and
  num_updates), and the other networks."""
  full = {f'model.diffusion_model.{key}': value for key, value in state_dict.items()}
  full.update({'model_ema.diffusion_model' + key.replace('.', ''): value
               for key, value in ema_state_dict.items()})
  full.update({'model_ema.decay': np.array(0.9999, np.float32), 'model_ema.num_updates': np.array(7),
               'first_stage_model.encoder.conv_in.weight': np.zeros((8, 3, 3, 3), np.float32),
               'cond_stage_model.embedding.weight': np.zeros((5, 4), np.float32),
               'betas': np.zeros((1000,), np.float32)})
  return full


def assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


def test_ema_and_model_weights_are_read_from_a_lightning_checkpoint(checkpoint):
  state_dict, abstract = checkpoint
  ema_state_dict = {key: value + 1 for key, value in state_dict.items()}
  full = lightning_checkpoint(state_dict, ema_state_dict)
  assert 'model_ema.diffusion_modelinput_blocks10in_layers0weight' in full
  bare = params_from_paper_unet_state_dict(state_dict, abstract, prefix='')
  assert_trees_equal(params_from_paper_unet_state_dict(full, abstract), bare)
  assert_trees_equal(params_from_paper_unet_state_dict(full, abstract, ema=True),
                     params_from_paper_unet_state_dict(ema_state_dict, abstract, prefix=''))


def test_conversion_fills_every_parameter_in_our_layout(checkpoint):
  state_dict, abstract = checkpoint
  params = params_from_paper_unet_state_dict(state_dict, abstract, prefix='')
  assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == jax.tree.map(lambda a: (a.shape, a.dtype),
                                                                             abstract)
  assert sum(leaf.size for leaf in jax.tree.leaves(params)) == sum(v.size for v in state_dict.values())
  # Conv OIHW -> HWIO, Conv1d (out, in, 1) -> Dense (in, out).
  np.testing.assert_array_equal(params['input_blocks_0_layers_0']['kernel'],
                                state_dict['input_blocks.0.0.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params['middle_block_layers_1']['qkv']['kernel'],
                                state_dict['middle_block.1.qkv.weight'][:, :, 0].T)


@pytest.mark.parametrize('path, key', [
    (('input_blocks_0_layers_0', 'kernel'), 'input_blocks.0.0.weight'),
    (('input_blocks_3_layers_0', 'bias'), 'input_blocks.3.0.op.bias'),                   # Downsample
    (('output_blocks_2_layers_2', 'kernel'), 'output_blocks.2.2.conv.weight'),           # Upsample
    (('input_blocks_1_layers_0', 'out_norm', 'scale'), 'input_blocks.1.0.out_layers.0.weight'),
    (('middle_block_layers_0', 'emb_dense', 'kernel'), 'middle_block.0.emb_layers.1.weight'),
    (('out_norm', 'scale'), 'out.0.weight'),
    (('out_conv', 'kernel'), 'out.2.weight'),
    (('label_emb', 'embedding'), 'label_emb.weight'),
    (('id_predictor_1', 'bias'), 'id_predictor.1.bias'),
    (('output_blocks_3_layers_1', 'transformer_blocks_1', 'attn2', 'to_out_0', 'kernel'),
     'output_blocks.3.1.transformer_blocks.1.attn2.to_out.0.weight'),
    (('middle_block_layers_1', 'transformer_blocks_0', 'ff', 'net_0_proj', 'bias'),
     'middle_block.1.transformer_blocks.0.ff.net.0.proj.bias'),
    (('middle_block_layers_1', 'transformer_blocks_0', 'norm3', 'scale'),
     'middle_block.1.transformer_blocks.0.norm3.weight'),
])
def test_paper_key_of_each_kind_of_parameter(path, key):
  assert paper_unet_key(path) == key


def test_missing_key_is_a_checkpoint_error_naming_it(checkpoint):
  state_dict, abstract = checkpoint
  broken = {key: value for key, value in state_dict.items() if key != 'input_blocks.1.0.in_layers.2.weight'}
  with pytest.raises(CheckpointError, match=r'lacks model\.diffusion_model\.input_blocks\.1\.0\.in_layers\.2'
                                            r'\.weight \(for input_blocks_1_layers_0/in_conv/kernel\)'):
    params_from_paper_unet_state_dict({f'model.diffusion_model.{k}': v for k, v in broken.items()}, abstract)


def test_missing_ema_copy_is_a_checkpoint_error(checkpoint):
  state_dict, abstract = checkpoint
  with pytest.raises(CheckpointError, match=r'lacks model_ema\.diffusion_modelinput_blocks00bias '
                                            r'\(for input_blocks_0_layers_0/bias\) and \d+ more'):
    params_from_paper_unet_state_dict(lightning_checkpoint(state_dict, {}), abstract, ema=True)


def test_unexpected_unet_key_is_a_checkpoint_error(checkpoint):
  state_dict, abstract = checkpoint
  full = lightning_checkpoint(state_dict, state_dict)
  full['model.diffusion_model.input_blocks.1.1.extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(CheckpointError, match=r'has model\.diffusion_model\.input_blocks\.1\.1\.extra\.weight, '
                                            'which the model does not use'):
    params_from_paper_unet_state_dict(full, abstract)
  # A bare U-Net state dict (prefix ''): every key belongs to the U-Net.
  with pytest.raises(CheckpointError, match='has betas, which the model does not use'):
    params_from_paper_unet_state_dict({**state_dict, 'betas': full['betas']}, abstract, prefix='')


@pytest.mark.parametrize('key, shape, expected', [
    ('input_blocks.0.0.weight', (32, 5, 3, 3), (32, 4, 3, 3)),       # conv in/out channels
    ('middle_block.1.qkv.weight', (192, 64), (192, 64, 1)),          # a Linear where a Conv1d belongs
    ('time_embed.0.weight', (32, 128), (128, 32)),                    # a transposed Linear
])
def test_wrong_shape_is_a_checkpoint_error_naming_key_and_both_shapes(checkpoint, key, shape, expected):
  state_dict, abstract = checkpoint
  assert state_dict[key].shape == expected
  broken = {**state_dict, key: np.zeros(shape, np.float32)}
  message = f'{key} has shape {shape}, the model needs {expected}'
  with pytest.raises(CheckpointError, match=re.escape(message)):
    params_from_paper_unet_state_dict(broken, abstract, prefix='')


# --- Cross-check against diffusers' own single-file conversion (independent of our key mapping) ---
# diffusers.loaders.single_file_utils is what UNet2DConditionModel.from_single_file runs on a paper /
# Stable Diffusion .ckpt: create_unet_diffusers_config_from_ldm derives the diffusers config from the
# original (OmegaConf-style) config, convert_ldm_unet_checkpoint renames model.diffusion_model.* (or,
# with extract_ema, the LitEma copy). It handles only SpatialTransformer U-Nets (attention blocks are
# renamed verbatim into Transformer2DModel's names), so both configurations below use one.
SINGLE_FILE_CONFIGS = {
    'SD-1 style: cross-attention at two of three levels, two res blocks': dict(
        in_channels=4, out_channels=4, model_channels=32, num_res_blocks=2, attention_resolutions=(1, 2),
        channel_mult=(1, 2, 2), num_heads=2, use_spatial_transformer=True, context_dim=24),
    'class-conditional, transformer depth 2 at the low level only, in != out channels': dict(
        in_channels=3, out_channels=6, model_channels=32, num_res_blocks=1, attention_resolutions=(2,),
        channel_mult=(1, 2), num_heads=4, use_spatial_transformer=True, context_dim=16, transformer_depth=2,
        num_classes=5),
}


def original_config(settings):
  """The paper's YAML config as the plain nested dict diffusers' helper reads (no OmegaConf needed: it
  indexes model.params.unet_config.params, and first_stage_config.params.ddconfig.ch_mult only for
  sample_size, which the forward pass does not use)."""
  unet_params = {'transformer_depth': 1, 'context_dim': None, **settings}
  return {'model': {'params': {
      'unet_config': {'target': 'ldm.modules.diffusionmodules.openaimodel.UNetModel', 'params': unet_params},
      'first_stage_config': {'params': {'ddconfig': {'ch_mult': [1, 2, 4, 4]}}}}}}


def diffusers_unet_from_single_file(checkpoint, settings, extract_ema=False):
  """diffusers' UNet2DConditionModel for a Lightning checkpoint, built and filled by its single-file
  utilities; strict loading: every diffusers parameter comes from the checkpoint."""
  torch_checkpoint = {key: torch.from_numpy(np.asarray(value)) for key, value in checkpoint.items()}
  config = create_unet_diffusers_config_from_ldm(original_config(settings), torch_checkpoint)
  converted = convert_ldm_unet_checkpoint(torch_checkpoint, config, extract_ema=extract_ema)
  module = UNet2DConditionModel(**config)
  module.load_state_dict(converted, strict=True)
  return module.eval(), converted


def run_diffusers(module, x, timesteps, context, labels):
  with torch.no_grad():
    out = module(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(timesteps),
                 encoder_hidden_states=torch.from_numpy(context),
                 class_labels=None if labels is None else torch.from_numpy(labels)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def run_ours_from_checkpoint(checkpoint, settings, arrays, ema=False):
  model = ours(settings)
  params = params_from_paper_unet_state_dict(checkpoint, abstract_params(model, *arrays), ema=ema)
  return np.asarray(jax.jit(lambda p, *a: model.apply({'params': p}, *a))(params, *arrays))


@pytest.mark.parametrize('name', SINGLE_FILE_CONFIGS)
def test_paper_keys_agree_with_diffusers_single_file_conversion(name):
  settings = SINGLE_FILE_CONFIGS[name]
  state_dict = state_dict_of(paper_unet(settings))
  checkpoint = {f'model.diffusion_model.{key}': value for key, value in state_dict.items()}
  module, converted = diffusers_unet_from_single_file(checkpoint, settings)
  # diffusers used every paper tensor (strict load covered the other direction).
  assert sum(v.numel() for v in converted.values()) == sum(v.size for v in state_dict.values())
  if settings.get('num_classes'):
    assert module.config.num_class_embeds == settings['num_classes']
  arrays = inputs(settings)
  expected = run_diffusers(module, *arrays)
  out = run_ours_from_checkpoint(checkpoint, settings, arrays)
  assert out.shape == (BATCH, SIZE, SIZE, settings['out_channels']) == expected.shape
  assert 0.5 < np.abs(expected).max() < 50  # O(1) outputs: the tolerance below means something
  np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


def test_ema_copy_agrees_with_diffusers_single_file_extract_ema():
  """Our ema=True and diffusers' extract_ema=True read the same LitEma tensors (the model weights,
  from another seed, would give a different output)."""
  settings = SINGLE_FILE_CONFIGS['SD-1 style: cross-attention at two of three levels, two res blocks']
  checkpoint = lightning_checkpoint(state_dict_of(paper_unet(settings, seed=0)),
                                    state_dict_of(paper_unet(settings, seed=1)))
  assert sum(key.startswith('model_ema') for key in checkpoint) > 100  # diffusers' test for an EMA copy
  module, _ = diffusers_unet_from_single_file(checkpoint, settings, extract_ema=True)
  arrays = inputs(settings)
  expected = run_diffusers(module, *arrays)
  assert np.abs(expected - run_ours_from_checkpoint(checkpoint, settings, arrays)).max() > 0.1
  np.testing.assert_allclose(run_ours_from_checkpoint(checkpoint, settings, arrays, ema=True), expected,
                             atol=1e-4, rtol=0)
