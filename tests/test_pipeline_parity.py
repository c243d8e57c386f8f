"""End to end against diffusers: an LDM of the CompVis/ldm-celebahq-256 architecture (diffusers'
LDMPipeline: VQModel f=4 with 3 latent channels, UNet2DModel, DDIMScheduler), random weights,
converted into our VQModel and UNetModel, samples the same image from the same initial noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LDMPipeline, UNet2DModel
from diffusers import VQModel as DiffusersVQModel

from latent_diffusion.convert import autoencoder as convert_autoencoder
from latent_diffusion.convert import unet_diffusers as convert_unet
from latent_diffusion.diffusion.samplers import ddim_sample
from latent_diffusion.diffusion.schedules import make_betas, make_schedule
from latent_diffusion.models.autoencoder import VQModel
from latent_diffusion.models.unet import UNetModel
from tests.convert.test_autoencoder import random_module, state_dict_of, to_nhwc

TOLERANCE = 1e-3  # max abs difference of the [0, 1] images

# CompVis/ldm-celebahq-256's DDIMScheduler: the paper's celebahq-ldm-vq-4 schedule (linear in sqrt(beta),
# 0.0015-0.0195, which diffusers calls scaled_linear), no clipping; diffusers' defaults otherwise
# ('leading' spacing without offset, set_alpha_to_one).
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule='scaled_linear', beta_start=0.0015,
                 beta_end=0.0195, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                 timestep_spacing='leading', prediction_type='epsilon')
# Its unet: UNet2DModel's defaults were taken from it.
UNET_BLOCKS = dict(layers_per_block=2, attention_head_dim=32,
                   down_block_types=('DownBlock2D',) + ('AttnDownBlock2D',) * 3,
                   up_block_types=('AttnUpBlock2D',) * 3 + ('UpBlock2D',))
# Its vqvae: the paper's vq-f4 (ch 128, ch_mult 1, 2, 4, no attention but in the middle).
VQ_BLOCKS = dict(layers_per_block=2, latent_channels=3, vq_embed_dim=3, num_vq_embeddings=8192,
                 down_block_types=('DownEncoderBlock2D',) * 3, up_block_types=('UpDecoderBlock2D',) * 3)


pytestmark = pytest.mark.usefixtures('single_torch_thread')


def random_pipeline(unet_channels, vq_channels, image_size, seed):
  """LDMPipeline with random weights everywhere (the codebook is set when sampling)."""
  unet = random_module(lambda: UNet2DModel(
      sample_size=image_size // 4, in_channels=3, out_channels=3, block_out_channels=unet_channels,
      **UNET_BLOCKS), seed)
  vqvae = random_module(lambda: DiffusersVQModel(
      in_channels=3, out_channels=3, block_out_channels=vq_channels, sample_size=image_size,
      norm_num_groups=32, scaling_factor=1.0, **VQ_BLOCKS), seed + 1)  # the paper's scale_factor
  return LDMPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler(**SCHEDULER))


def diffusers_sample(pipeline, batch, steps, seed):
  """(images (B,H,W,3) in [0, 1], the latents handed to the decoder (B,h,w,3)).

  The sampled latents do not depend on the VQ model, so its codebook is set once they are known
  (before decoding): spread like them, so that they pick among many codes.
  """
  decoded_latents = []
  decode = pipeline.vqvae.decode

  def recording_decode(latents, *args, **kwargs):
    decoded_latents.append(to_nhwc(latents))
    mean, std = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
    codebook = pipeline.vqvae.quantize.embedding.weight
    codebook.copy_(mean + std * torch.randn(codebook.shape, generator=torch.Generator().manual_seed(seed)))
    return decode(latents, *args, **kwargs)

  pipeline.vqvae.decode = recording_decode
  with torch.no_grad():
    images = pipeline(batch_size=batch, generator=torch.Generator().manual_seed(seed), eta=0.0,
                      num_inference_steps=steps, output_type='np').images
  return images, decoded_latents[0]


def initial_noise(pipeline, batch, seed):
  """The x_T LDMPipeline draws (randn_tensor with a CPU generator), NHWC."""
  side, channels = pipeline.unet.config.sample_size, pipeline.unet.config.in_channels
  return to_nhwc(torch.randn((batch, channels, side, side), generator=torch.Generator().manual_seed(seed)))


def our_vq_model(vqvae):
  config = vqvae.config
  channels = config.block_out_channels
  return VQModel(n_embed=config.num_vq_embeddings, embed_dim=config.vq_embed_dim,
                 z_channels=config.latent_channels, ch=channels[0],
                 ch_mult=tuple(c // channels[0] for c in channels),
                 num_res_blocks=config.layers_per_block, attn_resolutions=(),
                 resolution=config.sample_size)


def our_sample(pipeline, x_T, steps):
  """Our pipeline: both networks converted from diffusers, our DDIM with the scheduler's settings,
  our VQ decoder (quantising first). (images in [0, 1], latents decoded)."""
  unet_kwargs = convert_unet.unet_kwargs_from_diffusers_config(
      {'_class_name': 'UNet2DModel', **pipeline.unet.config})
  unet_params = convert_unet.params_from_diffusers_unet_state_dict(
      state_dict_of(pipeline.unet), convert_unet.abstract_unet_params(unet_kwargs), unet_kwargs)
  unet = UNetModel(**unet_kwargs)
  vq_model = our_vq_model(pipeline.vqvae)
  side = pipeline.vqvae.config.sample_size
  vq_params = convert_autoencoder.params_from_diffusers_state_dict(
      state_dict_of(pipeline.vqvae),
      jax.eval_shape(vq_model.init, jax.random.PRNGKey(0),
                     jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32))['params'])
  scheduler = pipeline.scheduler.config
  assert scheduler.beta_schedule == 'scaled_linear'  # the paper's 'linear': linear in sqrt(beta)
  schedule = make_schedule(make_betas('linear', scheduler.num_train_timesteps, scheduler.beta_start,
                                      scheduler.beta_end))
  scaling_factor = pipeline.vqvae.config.scaling_factor

  @jax.jit
  def sample(unet_params, vq_params, x_T):
    model_fn = lambda x, t: unet.apply({'params': unet_params}, x, t)
    latents = ddim_sample(model_fn, x_T, jax.random.PRNGKey(0), schedule, len(pipeline.scheduler.timesteps),
                          eta=0.0, spacing=scheduler.timestep_spacing, offset=scheduler.steps_offset,
                          final_alpha_cumprod=1.0 if scheduler.set_alpha_to_one else None)
    latents = latents / scaling_factor
    decoded = vq_model.apply({'params': vq_params}, latents, method=vq_model.decode)
    return jnp.clip(decoded / 2 + 0.5, 0.0, 1.0), latents

  images, latents = sample(unet_params, vq_params, jnp.asarray(x_T))
  return np.asarray(images), np.asarray(latents)


def nearest_two_codes(codebook, latents):
  """Per position (N, 3): indices of the nearest and second nearest code, and the gap between
  their squared distances."""
  distances = ((latents.reshape(-1, 1, codebook.shape[-1]) - codebook[None]) ** 2).sum(-1)
  order = np.argsort(distances, axis=-1)[:, :2]
  gaps = np.take_along_axis(distances, order, -1) @ np.array([-1.0, 1.0])
  return order[:, 0], order[:, 1], gaps


def check_same_sample(unet_channels, vq_channels, image_size, steps, batch, seed):
  pipeline = random_pipeline(unet_channels, vq_channels, image_size, seed)
  expected, expected_latents = diffusers_sample(pipeline, batch, steps, seed)
  assert len(pipeline.scheduler.timesteps) == steps
  images, latents = our_sample(pipeline, initial_noise(pipeline, batch, seed), steps)
  assert images.shape == expected.shape == (batch, image_size, image_size, 3)
  np.testing.assert_allclose(latents, expected_latents, atol=1e-4, rtol=0)
  # The latents' disagreement e cannot change a code: moving z by e changes the gap between the
  # squared distances to the nearest codes c1, c2 by 2 e.(c1 - c2), less than the gap everywhere.
  codebook = state_dict_of(pipeline.vqvae)['quantize.embedding.weight']
  first, second, gaps = nearest_two_codes(codebook, expected_latents)
  disagreement = np.linalg.norm((latents - expected_latents).reshape(-1, 3), axis=-1)
  assert np.all(gaps > 2 * disagreement * np.linalg.norm(codebook[first] - codebook[second], axis=-1))
  # Not trivially equal: many codes in use and a spread of pixel values.
  assert len(np.unique(first)) > first.size // 2 and expected.std() > 0.05
  assert float(np.abs(images - expected).max()) < TOLERANCE


def test_reduced_width_celebahq_ldm_samples_the_diffusers_image():
  """The celebahq block structure (4 U-Net levels, 2 ResBlocks each, attention at ds 2, 4, 8 with
  32-wide heads; VQ f4) at a quarter of the width."""
  check_same_sample(unet_channels=(32, 64, 96, 128), vq_channels=(32, 64, 128), image_size=32, steps=4,
                    batch=2, seed=0)


@pytest.mark.slow
def test_celebahq_ldm_samples_the_diffusers_image():
  """The full CompVis/ldm-celebahq-256 widths (U-Net 224-896, VQ 128-512) at a 64x64 image."""
  check_same_sample(unet_channels=(224, 448, 672, 896), vq_channels=(128, 256, 512), image_size=64,
                    steps=3, batch=1, seed=0)
