"""The --quick benchmark config: 16x16 synthetic images, an f=2 KL autoencoder (no attention, as
diffusers' AutoencoderKL outside its middle block) and a two-level U-Net with attention."""

from configs import base


def get_config():
  config = base.get_config()
  config.data.image_size = 16
  config.data.synthetic_size = 16
  config.autoencoder.ch = 32
  config.autoencoder.ch_mult = (1, 2)
  config.autoencoder.num_res_blocks = 1
  config.autoencoder.attn_resolutions = ()
  config.unet.model_channels = 32
  config.unet.channel_mult = (1, 2)
  config.unet.num_res_blocks = 1
  config.unet.attention_resolutions = (2,)
  config.unet.num_heads = 2
  config.diffusion.timesteps = 100
  return config
