"""LDM-8 on LSUN-Churches, as the paper's lsun_churches-ldm-kl-8 with the kl-f8 first stage.

First stage (models/first_stage_models/kl-f8): ch 128, ch_mult 1,2,4,4, 2 res blocks, z 4,
embed_dim 4, kl_weight 1e-6, Adam(0.5, 0.9) lr 4.5e-6. LDM: T 1000, linear 0.0015-0.0155,
L1 loss, latent 32x32x4, scale_by_std, model_channels 192, channel_mult 1,2,2,4,4, attention at
latent resolutions 32/16/8/4 (ds 1,2,4,8), 2 res blocks, 8 heads, scale-shift norm, resblock
up/down, AdamW lr 5e-5 with 10k linear warm-up, batch 96. Data: TFDS lsun/church_outdoor,
which must be prepared beforehand (`tfds build lsun/church_outdoor` or --config.data.tfds_data_dir).
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.source = 'tfds'
  config.data.tfds_name = 'lsun/church_outdoor'
  config.data.tfds_split = 'train'
  config.data.image_size = 256
  config.data.crop = 'center'
  config.data.flip = True

  config.autoencoder.ch = 128
  config.autoencoder.ch_mult = (1, 2, 4, 4)
  config.autoencoder.num_res_blocks = 2
  config.autoencoder.attn_resolutions = ()
  config.autoencoder.z_channels = 4
  config.autoencoder.embed_dim = 4
  config.autoencoder_loss.kl_weight = 1e-6
  config.autoencoder_train.learning_rate = 4.5e-6
  config.autoencoder_train.adam_b1 = 0.5
  config.autoencoder_train.adam_b2 = 0.9

  config.unet.model_channels = 192
  config.unet.channel_mult = (1, 2, 2, 4, 4)
  config.unet.num_res_blocks = 2
  config.unet.attention_resolutions = (1, 2, 4, 8)  # 32, 16, 8, 4
  config.unet.num_heads = 8
  config.unet.use_scale_shift_norm = True
  config.unet.resblock_updown = True

  config.diffusion.timesteps = 1000
  config.diffusion.beta_schedule = 'linear'
  config.diffusion.linear_start = 0.0015
  config.diffusion.linear_end = 0.0155
  config.diffusion.loss_type = 'l1'
  config.diffusion.scale_by_std = True

  config.diffusion_train.batch_size = 96
  config.diffusion_train.learning_rate = 5e-5
  config.diffusion_train.warmup_steps = 10000
  config.diffusion_train.ema_decay = 0.9999
  return config
