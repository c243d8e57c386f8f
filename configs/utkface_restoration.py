"""The shared base of utkface_sr and utkface_inpaint: a KL-f2 stage 1 on UTKFace-64 (64x64x3 ->
32x32x4, ch 64, ch_mult 1,2: f = 2 keeps the detail that restoration is judged on) and a U-Net on its
latents with attention at 8x8. 2-core CPU budget: stage 1 800 steps, stage 2 3000 steps of batch 16.
"""

import os

from configs import base

DATA_ROOT = os.environ.get('LDM_DATA', '../shared/data')


def restoration_config():
  config = base.get_config()
  config.data.source = 'folder'
  config.data.path = os.path.join(DATA_ROOT, 'utkface64', 'train')
  config.data.eval_path = os.path.join(DATA_ROOT, 'utkface64', 'val')
  config.data.label_column = ''
  config.data.image_size = 64
  config.data.crop = 'center'
  config.data.flip = True
  config.log_every_steps = 25

  ae = config.autoencoder
  ae.kind, ae.ch, ae.ch_mult, ae.num_res_blocks = 'kl', 64, (1, 2), 1
  ae.z_channels, ae.embed_dim = 4, 4
  loss = config.autoencoder_loss
  loss.pixel_loss, loss.kl_weight, loss.perceptual_weight = 'l1', 1e-6, 0.0
  loss.disc_start = 10**9  # pixel + KL only in this short run (no VGG16 weights here for LPIPS)
  train = config.autoencoder_train
  train.batch_size, train.num_steps, train.learning_rate, train.warmup_steps = 16, 800, 4e-4, 50
  train.checkpoint_every_steps = train.sample_every_steps = 400
  train.eval_every_steps = 800
  config.eval.num_images, config.eval.batch_size = 500, 50

  unet = config.unet
  unet.model_channels, unet.channel_mult, unet.num_res_blocks = 64, (1, 2, 2), 2
  unet.attention_resolutions, unet.num_heads = (4,), 4  # 8x8
  d = config.diffusion
  d.conditioning_key = 'concat'
  d.loss_type = 'l2'
  d.linear_start, d.linear_end = 0.0015, 0.0195
  d.scale_by_std = True
  dt = config.diffusion_train
  dt.batch_size, dt.num_steps, dt.learning_rate, dt.warmup_steps = 16, 3000, 5e-4, 100
  dt.ema_decay = 0.999
  dt.checkpoint_every_steps, dt.sample_every_steps = 500, 1000
  s = config.sample
  s.num_samples = s.batch_size = 16
  s.num_steps = 50
  return config
