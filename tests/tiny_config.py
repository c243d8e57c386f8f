"""The smallest two-stage config that still has every part (attention, resampling, EMA, scale_by_std):
16x16 synthetic images, an f=2 autoencoder, a two-level U-Net. Used by tests in-process and as
--config=tests/tiny_config.py by tests that run main in a subprocess."""

from configs import base


def get_config():
  config = base.get_config()
  config.log_every_steps = 1
  config.data.image_size = 16
  config.data.synthetic_size = 16      # 2 batches of 8 per epoch
  config.autoencoder.ch = 32
  config.autoencoder.ch_mult = (1, 2)  # f = 2 -> latents 8x8x4
  config.autoencoder.num_res_blocks = 1
  config.autoencoder.attn_resolutions = (8,)
  config.autoencoder_loss.perceptual_weight = 0.0  # no VGG16 weights here
  config.autoencoder_loss.disc_num_layers = 2  # 16x16 -> 2x2 patch logits
  config.autoencoder_loss.disc_ndf = 16
  config.autoencoder_train.batch_size = 8  # divisible by 8 devices
  config.autoencoder_train.num_steps = 6
  config.autoencoder_train.learning_rate = 1e-3
  config.autoencoder_train.checkpoint_every_steps = 1
  config.autoencoder_train.keep_checkpoints = 2
  config.autoencoder_train.sample_every_steps = 0
  config.unet.model_channels = 32
  config.unet.channel_mult = (1, 2)
  config.unet.num_res_blocks = 1
  config.unet.attention_resolutions = (2,)
  config.unet.num_heads = 2
  config.diffusion.timesteps = 100
  config.diffusion_train.batch_size = 8
  config.diffusion_train.num_steps = 6
  config.diffusion_train.learning_rate = 1e-3
  config.diffusion_train.warmup_steps = 2
  config.diffusion_train.ema_decay = 0.9
  config.diffusion_train.checkpoint_every_steps = 1
  config.diffusion_train.keep_checkpoints = 2
  config.diffusion_train.sample_every_steps = 0
  config.sample.num_samples = 2
  config.sample.batch_size = 2
  config.sample.num_steps = 4
  return config
