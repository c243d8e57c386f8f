"""kl-f4 on 64x64 faces (UTKFace, ../shared/data/utkface64), sized for a 2-core CPU.

The paper's kl-f4 architecture (ch_mult 1,2,4; 2 ResnetBlocks per level; z 3; mid attention) at
half width (ch 64), 64x64x3 -> 16x16x3. Objective as the paper's LPIPSWithDiscriminator: L1 + KL
(1e-6) + PatchGAN (hinge, 3 layers, adaptive weight x 0.5), with the GAN switched on halfway
through this short run (the paper: after 50k of its steps). LPIPS is off by default because no
ImageNet VGG16 weights can be downloaded here; with them, add
--config.autoencoder_loss.perceptual_weight=1.0 --config.autoencoder_loss.lpips_vgg_path=...
--config.autoencoder_loss.lpips_heads_path=... . The learning rate is raised from the paper's
4.5e-6 x batch for the short budget. Data root: $LDM_DATA (default ../shared/data, relative to
the working directory).
"""

import os

from configs.autoencoder.first_stage import first_stage_config

DATA_ROOT = os.environ.get('LDM_DATA', '../shared/data')


def get_config():
  config = first_stage_config(kind='kl', ch_mult=(1, 2, 4), z_channels=3, embed_dim=3, batch_size=8,
                              disc_start=250, disc_weight=0.5)
  config.data.path = os.path.join(DATA_ROOT, 'utkface64', 'train')
  config.data.eval_path = os.path.join(DATA_ROOT, 'utkface64', 'val')
  config.data.image_size = 64
  config.data.crop = 'center'
  config.data.flip = True
  config.data.label_column = ''
  config.autoencoder.ch = 64
  config.autoencoder_loss.perceptual_weight = 0.0
  train = config.autoencoder_train
  train.num_steps = 500
  train.learning_rate = 2e-4
  train.warmup_steps = 50
  train.checkpoint_every_steps = 100
  train.sample_every_steps = 100
  train.eval_every_steps = 100
  config.eval.num_images = 250     # periodic validation; eval_autoencoder: --config.eval.num_images=0 for all
  config.eval.batch_size = 50
  config.log_every_steps = 10
  return config
