"""Class-conditional LDM-2 on CIFAR-10 (class = folder), with classifier-free guidance; 2-core CPU sized.

Stage 1: the paper's kl autoencoder at f = 2 (ch 64, ch_mult 1,2), 32x32x3 -> 16x16x4, L1 + KL, no
PatchGAN in this short run and no LPIPS (no ImageNet VGG16 weights here). Stage 2: an openaimodel
U-Net on the 16x16x4 latents with the class label added to its time embedding (conditioning_key
'adm', the label embedding has an 11th row: the null class); 10% of the labels are dropped to the null
class during training, so the one model samples conditionally, unconditionally and with guidance
(sample.guidance_scale). Data root: $LDM_DATA (default ../shared/data).
"""

import os

from configs import base

DATA_ROOT = os.environ.get('LDM_DATA', '../shared/data')


def get_config():
  config = base.get_config()
  config.data.source = 'folder'
  config.data.path = os.path.join(DATA_ROOT, 'cifar10', 'train')
  config.data.eval_path = os.path.join(DATA_ROOT, 'cifar10', 'test')
  config.data.image_size = 32
  config.data.crop = 'center'
  config.data.flip = True
  config.data.num_classes = 10
  config.log_every_steps = 25

  ae = config.autoencoder
  ae.kind = 'kl'
  ae.ch = 64
  ae.ch_mult = (1, 2)
  ae.num_res_blocks = 1
  ae.attn_resolutions = ()
  ae.z_channels = 4
  ae.embed_dim = 4
  loss = config.autoencoder_loss
  loss.pixel_loss = 'l1'
  loss.kl_weight = 1e-6
  loss.perceptual_weight = 0.0
  loss.disc_start = 10**9  # no PatchGAN in this short run
  train = config.autoencoder_train
  train.batch_size = 16
  train.num_steps = 600
  train.learning_rate = 4e-4
  train.warmup_steps = 50
  train.checkpoint_every_steps = 200
  train.sample_every_steps = 200
  train.eval_every_steps = 600
  config.eval.num_images = 500
  config.eval.batch_size = 50

  unet = config.unet
  unet.model_channels = 64
  unet.channel_mult = (1, 2, 2)
  unet.num_res_blocks = 2
  unet.attention_resolutions = (2, 4)  # 8x8 and 4x4
  unet.num_heads = 4
  unet.use_scale_shift_norm = True
  unet.resblock_updown = True
  unet.num_classes = 11                # 10 classes + the null class
  d = config.diffusion
  d.conditioning_key = 'adm'
  d.cond_drop_prob = 0.1
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

  s = config.sample
  s.num_samples = 40                   # 4 per class
  s.batch_size = 40
  s.num_steps = 50
  s.guidance_scale = 2.0
  return config
