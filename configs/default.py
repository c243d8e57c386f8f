"""The embedded default: both stages on the built-in synthetic shapes, sized for 2 CPU cores.

The whole `train` mode (stage 1, then stage 2, then a DDIM sample grid) takes about 14 min on
2 CPU cores (AMD EPYC, jax 0.10.2). Same architecture as the paper's models, at small width: a KL-f4
autoencoder (64x64x3 -> 16x16x4) and an openaimodel U-Net with attention at 8x8 and 4x4.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.data.source = 'synthetic'
  config.data.image_size = 64
  config.data.flip = True

  config.autoencoder.ch = 32
  config.autoencoder.ch_mult = (1, 1, 2)          # f = 4
  config.autoencoder.num_res_blocks = 1
  config.autoencoder.z_channels = 4
  config.autoencoder.embed_dim = 4
  # Stronger than the paper's 1e-6: a posterior with real variance trains a decoder that tolerates
  # the small latent errors of a briefly trained U-Net (clean backgrounds instead of speckle).
  config.autoencoder_loss.kl_weight = 1e-3
  config.autoencoder_loss.pixel_loss = 'l2'       # converges faster than l1 on colours in few steps
  # No LPIPS (it needs ImageNet VGG16 weights, which nothing here can download) and the PatchGAN
  # starts after these 450 steps, as the paper's disc_start 50001 does after 50k: pixel loss + KL.
  config.autoencoder_loss.perceptual_weight = 0.0
  config.autoencoder_train.batch_size = 8
  config.autoencoder_train.num_steps = 450
  config.autoencoder_train.learning_rate = 1e-3
  config.autoencoder_train.warmup_steps = 50
  config.autoencoder_train.checkpoint_every_steps = 225
  config.autoencoder_train.sample_every_steps = 225
  config.autoencoder_train.eval_every_steps = 450  # PSNR/SSIM on 256 held-out synthetic images
  config.eval.num_images = 256

  config.unet.model_channels = 32
  config.unet.channel_mult = (1, 2, 4)
  config.unet.num_res_blocks = 2
  config.unet.attention_resolutions = (2, 4)      # 8x8 and 4x4 latents
  config.unet.num_heads = 4

  config.diffusion.loss_type = 'l2'
  config.diffusion_train.batch_size = 16
  config.diffusion_train.num_steps = 1000
  config.diffusion_train.learning_rate = 1e-3
  config.diffusion_train.warmup_steps = 100
  config.diffusion_train.ema_decay = 0.995
  config.diffusion_train.checkpoint_every_steps = 250
  config.diffusion_train.sample_every_steps = 1000

  config.sample.num_samples = 16
  config.sample.batch_size = 16
  config.sample.num_steps = 50
  # eta = 1 (DDPM-like ancestral noise) gives clean backgrounds after this short training; eta = 0
  # accumulates the young U-Net's errors into speckle.
  config.sample.eta = 1.0
  return config
