"""Unconditional LDM-4 on 64x64 faces (UTKFace), sized for a 2-core CPU.

Stage 1 is configs/autoencoder/kl_f4_utkface64.py (kl-f4 at half width, 64x64x3 -> 16x16x3); stage 2
an openaimodel U-Net on its scaled latents (scale_by_std), attention at 8x8 and 4x4, eps-prediction
with the paper's linear schedule 0.0015-0.0195. Train both with `train`, or stage 2 alone in a workdir
whose stage 1 is already trained (`train` skips a complete stage). Data root: $LDM_DATA.
"""

from configs.autoencoder import kl_f4_utkface64


def get_config():
  config = kl_f4_utkface64.get_config()
  config.mode = 'train'

  unet = config.unet
  unet.model_channels = 64
  unet.channel_mult = (1, 2, 2)
  unet.num_res_blocks = 2
  unet.attention_resolutions = (2, 4)  # 8x8 and 4x4 latents
  unet.num_heads = 4
  unet.use_scale_shift_norm = True
  unet.resblock_updown = True
  d = config.diffusion
  d.loss_type = 'l2'
  d.linear_start, d.linear_end = 0.0015, 0.0195
  d.scale_by_std = True
  dt = config.diffusion_train
  dt.batch_size = 32
  dt.num_steps = 3000
  dt.learning_rate = 5e-4
  dt.warmup_steps = 100
  dt.ema_decay = 0.999
  dt.checkpoint_every_steps = 500
  dt.sample_every_steps = 1000
  dt.precompute_latents = True
  config.data.flip = False  # the latent cache then holds each face once: encoding is the slow part here

  s = config.sample
  s.num_samples = 36
  s.batch_size = 36
  s.num_steps = 50
  return config
