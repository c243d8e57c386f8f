"""Tests for convert/ldm.py and convert mode with convert.stage=diffusion: a whole LDM from a paper
Lightning checkpoint (U-Net, EMA copy, ClassEmbedder, scale_factor) and from a diffusers pipeline
folder (unet/ + vae/), into checkpoints that sample mode uses at once."""

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DModel
from ldm.modules.diffusionmodules.openaimodel import UNetModel as PaperUNet

import tiny_config
from latent_diffusion import main
from latent_diffusion.convert import ldm, unet_diffusers, unet_paper
from latent_diffusion.errors import CheckpointError
from latent_diffusion.train import common, diffusion, loop, sharding
from tests.convert.test_autoencoder import random_module, state_dict_of


def class_conditional_config():
  config = tiny_config.get_config()
  config.data.num_classes = 4
  config.diffusion.conditioning_key = 'crossattn'
  config.cond_stage.kind = 'class'
  config.cond_stage.n_classes = 5
  config.cond_stage.embed_dim = 16
  config.unet.use_spatial_transformer = True
  config.unet.context_dim = 16
  return config


def paper_checkpoint(config, path, scale_factor=0.3):
  """A paper LDM .ckpt with random weights: the U-Net, a different EMA copy, the ClassEmbedder."""
  u = config.unet
  paper = random_module(lambda: PaperUNet(
      image_size=8, in_channels=4, out_channels=4, model_channels=u.model_channels,
      attention_resolutions=list(u.attention_resolutions), num_res_blocks=u.num_res_blocks,
      channel_mult=list(u.channel_mult), num_heads=u.num_heads, use_scale_shift_norm=u.use_scale_shift_norm,
      resblock_updown=u.resblock_updown, use_spatial_transformer=True, transformer_depth=1,
      context_dim=u.context_dim), seed=3)
  unet = state_dict_of(paper)
  state_dict = {f'model.diffusion_model.{k}': torch.from_numpy(v) for k, v in unet.items()}
  state_dict.update({f'model_ema.diffusion_model{k.replace(".", "")}': torch.from_numpy(v + 1.0)
                     for k, v in unet.items()})
  state_dict['cond_stage_model.embedding.weight'] = torch.randn(5, 16)
  state_dict['scale_factor'] = torch.tensor(scale_factor)
  torch.save({'state_dict': state_dict}, path)
  return unet, state_dict


def abstract_denoiser(config):
  return diffusion.model_params(jax.eval_shape(
      lambda rng: diffusion.init_params(diffusion.build_denoiser(config), config, rng), jax.random.PRNGKey(0)))


@pytest.mark.parametrize('use_ema', [True, False])
def test_paper_checkpoint_gives_unet_ema_or_not_class_embedder_and_scale_factor(tmp_path, use_ema):
  config = class_conditional_config()
  _, state_dict = paper_checkpoint(config, tmp_path / 'model.ckpt')
  abstract = abstract_denoiser(config)
  params, scale_factor = ldm.load_denoiser_params(tmp_path / 'model.ckpt', abstract,
                                                  diffusion.unet_kwargs(config), use_ema=use_ema)
  expected = unet_paper.params_from_paper_unet_state_dict(
      {k: v.numpy() for k, v in state_dict.items()}, abstract['unet'], ema=use_ema)
  jax.tree.map(np.testing.assert_array_equal, params['unet'], expected)
  np.testing.assert_array_equal(params['cond_stage']['embedding']['embedding'],
                                state_dict['cond_stage_model.embedding.weight'].numpy())
  assert scale_factor == pytest.approx(0.3)


def test_a_class_embedder_of_the_wrong_size_is_named(tmp_path):
  config = class_conditional_config()
  paper_checkpoint(config, tmp_path / 'model.ckpt')
  config.cond_stage.n_classes = 7
  with pytest.raises(CheckpointError, match=r'cond_stage_model.embedding.weight has shape \(5, 16\).*\(7, 16\)'):
    ldm.load_denoiser_params(tmp_path / 'model.ckpt', abstract_denoiser(config), diffusion.unet_kwargs(config))


def test_a_checkpoint_without_a_unet_is_refused(tmp_path):
  torch.save({'state_dict': {'first_stage_model.encoder.conv_in.weight': torch.zeros(1)}}, tmp_path / 'ae.ckpt')
  config = tiny_config.get_config()
  with pytest.raises(CheckpointError, match='not a paper LDM checkpoint'):
    ldm.load_denoiser_params(tmp_path / 'ae.ckpt', abstract_denoiser(config), diffusion.unet_kwargs(config))


def diffusers_pipeline_folder(path):
  """unet/ and vae/ of a small random-weight diffusers LDM, and our config for it."""
  unet = random_module(lambda: UNet2DModel(
      sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=('DownBlock2D', 'AttnDownBlock2D'), up_block_types=('AttnUpBlock2D', 'UpBlock2D'),
      attention_head_dim=16), seed=4)
  vae = random_module(lambda: DiffusersAutoencoderKL(
      in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
      down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
      scaling_factor=0.5), seed=5)
  unet.save_pretrained(path / 'unet')
  vae.save_pretrained(path / 'vae')
  config = tiny_config.get_config()
  config.autoencoder.attn_resolutions = ()
  kwargs = unet_diffusers.unet_kwargs_from_diffusers_config({'_class_name': 'UNet2DModel', **unet.config})
  for field in ('model_channels', 'channel_mult', 'num_res_blocks', 'attention_resolutions', 'num_heads',
                'num_head_channels', 'use_scale_shift_norm', 'resblock_updown', 'conv_resample'):
    config.unet[field] = kwargs[field]
  return config, unet


def test_convert_mode_turns_a_diffusers_pipeline_into_checkpoints_that_sample(tmp_path):
  config, unet = diffusers_pipeline_folder(tmp_path / 'pipeline')
  config.mode = 'convert'
  config.convert.stage = 'diffusion'
  config.convert.source = str(tmp_path / 'pipeline')
  workdir = tmp_path / 'work'
  main.run(config, str(workdir))

  mesh = sharding.make_mesh(config.mesh)
  model = diffusion.build_denoiser(config)
  abstract, shardings = diffusion.abstract_state(model, config, mesh)
  checkpoints = common.stage_checkpoints(workdir, diffusion.STAGE)
  assert checkpoints.latest_step() == config.diffusion_train.num_steps
  state = checkpoints.restore(loop.abstract_with_shardings(abstract, shardings))
  checkpoints.close()
  assert float(state.extras['scale_factor']) == 0.5  # the vae's scaling_factor
  kwargs = diffusion.unet_kwargs(config)
  expected = unet_diffusers.params_from_diffusers_unet_state_dict(
      state_dict_of(unet), abstract.params['unet'], kwargs)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params['unet'], expected)
  assert common.latest_step(workdir, 'autoencoder') == config.autoencoder_train.num_steps

  config.mode = 'sample'
  main.run(config, str(workdir))
  assert list((workdir / 'diffusion' / 'samples').glob('sample_step*.png'))

  config.mode = 'convert'  # a second conversion into the same workdir changes nothing
  with pytest.raises(CheckpointError, match='already holds stage-2 checkpoints'):
    main.run(config, str(workdir))
