"""The PyTorch side of the benchmarks: diffusers models with our models' architecture.

`diffusers_unet` builds the UNet2DModel that our UNetModel of the same settings equals (the layout
convert/unet_diffusers.py reads back), and `diffusers_autoencoder` the AutoencoderKL of our KL
autoencoder. `unet_output_difference` converts the torch weights into ours and runs both: the
benchmark records it, so every timed pair is shown to compute the same function.
"""

import sys
import types

# The torchvision beside the CPU torch fails at its C++ op registrations, which diffusers' imports
# reach through transformers; its Python code needs none of them (as tests/conftest.py does).
sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('torchvision._meta_registrations'))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
from diffusers import AutoencoderKL, UNet2DModel  # pylint: disable=g-import-not-at-top,wrong-import-position

from latent_diffusion.convert import autoencoder as convert_autoencoder  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion.convert import unet_diffusers  # pylint: disable=g-import-not-at-top,wrong-import-position
from latent_diffusion.models.unet import UNetModel, attention_layer_heads  # pylint: disable=g-import-not-at-top,wrong-import-position


def diffusers_unet(unet_kwargs: dict) -> UNet2DModel:
  """UNet2DModel (float32, eval mode) with the architecture of UNetModel(**unet_kwargs): plain
  self-attention U-Nets (no spatial transformer, no class labels)."""
  model = UNetModel(**unet_kwargs)
  if model.use_spatial_transformer or model.num_classes or model.n_embed:
    raise ValueError('diffusers_unet: only plain self-attention U-Nets are benchmarked')
  channels = [model.model_channels * m for m in model.channel_mult]
  levels = len(channels)
  attends = [2 ** level in model.attention_resolutions for level in range(levels)]
  resample = 'resnet' if model.resblock_updown else 'conv'
  plain_down = 'ResnetDownsampleBlock2D' if model.resblock_updown else 'DownBlock2D'
  plain_up = 'ResnetUpsampleBlock2D' if model.resblock_updown else 'UpBlock2D'
  module = UNet2DModel(
      in_channels=model.in_channels, out_channels=model.out_channels, block_out_channels=tuple(channels),
      layers_per_block=model.num_res_blocks,
      down_block_types=tuple('AttnDownBlock2D' if a else plain_down for a in attends),
      up_block_types=tuple('AttnUpBlock2D' if a else plain_up for a in reversed(attends)),
      downsample_type=resample, upsample_type=resample,
      resnet_time_scale_shift='scale_shift' if model.use_scale_shift_norm else 'default',
      attention_head_dim=channels[0], attn_norm_num_groups=32, dropout=model.dropout)
  # UNet2DModel takes one head width for all levels; ours may fix the head count instead. The
  # projections do not depend on it, so each attention layer gets our head count afterwards.
  for name, layer in module.named_modules():
    if type(layer).__name__ == 'Attention':
      block_heads = model.num_heads_upsample if name.startswith('up_blocks') else model.num_heads
      heads, width = attention_layer_heads(layer.inner_dim, model.num_heads, model.num_head_channels,
                                           model.legacy, False,
                                           model.num_heads if block_heads == -1 else block_heads)
      layer.heads, layer.scale = heads, width ** -0.5
  return module.eval()


def diffusers_autoencoder(autoencoder_config) -> AutoencoderKL:
  """AutoencoderKL (float32, eval mode) with the architecture of our KL autoencoder config."""
  c = autoencoder_config
  if tuple(c.attn_resolutions):
    raise ValueError('diffusers_autoencoder: AutoencoderKL attends only in the middle block')
  levels = len(c.ch_mult)
  return AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=c.embed_dim, layers_per_block=c.num_res_blocks,
      block_out_channels=tuple(c.ch * m for m in c.ch_mult),
      down_block_types=('DownEncoderBlock2D',) * levels, up_block_types=('UpDecoderBlock2D',) * levels,
      norm_num_groups=32).eval()


def state_dict_numpy(module: torch.nn.Module) -> dict:
  return {name: tensor.detach().numpy() for name, tensor in module.state_dict().items()}


def unet_params_from(module: UNet2DModel, unet_kwargs: dict):
  abstract = unet_diffusers.abstract_unet_params(unet_kwargs)
  return unet_diffusers.params_from_diffusers_unet_state_dict(state_dict_numpy(module), abstract, unet_kwargs)


def autoencoder_params_from(module: AutoencoderKL, abstract_params):
  return convert_autoencoder.params_from_diffusers_state_dict(state_dict_numpy(module), abstract_params)


def unet_output_difference(module: UNet2DModel, unet_kwargs: dict, size: int) -> float:
  """Max |ours - diffusers| of one forward (batch 1, float32) with the torch weights in ours."""
  params = unet_params_from(module, unet_kwargs)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, size, size, unet_kwargs['in_channels'])).astype(np.float32)
  t = np.array([500], np.int32)
  ours = UNetModel(**unet_kwargs).apply({'params': params}, jnp.asarray(x), jnp.asarray(t))
  with torch.no_grad():
    theirs = module(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t)).sample
  return float(np.abs(np.asarray(jax.device_get(ours)) - theirs.permute(0, 2, 3, 1).numpy()).max())
