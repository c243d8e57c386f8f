"""The paper's released first-stage models (models/first_stage_models/*/config.yaml), as configs.

Every model: ch 128, num_res_blocks 2, 256x256 crops, Adam(0.5, 0.9) at the paper's base learning
rate 4.5e-6 times the batch size (its main.py scales by batch x GPUs x accumulation; one device
here), LPIPS weight 1, PatchGAN of 3 layers (2 where noted) with hinge loss. The paper trained on
OpenImages; point `--config.data.path` (and `data.eval_path`) at an image folder, and
`autoencoder_loss.lpips_vgg_path` / `lpips_heads_path` at the VGG16 and LPIPS-head weights.
"""

from configs import base

BASE_LEARNING_RATE = 4.5e-6


def first_stage_config(*, kind: str, ch_mult, z_channels: int, embed_dim: int, batch_size: int,
                       disc_start: int, disc_weight: float, attn_resolutions=(), n_embed: int = 0,
                       attn_type: str = 'vanilla', disc_num_layers: int = 3):
  config = base.get_config()
  config.mode = 'train_autoencoder'
  config.data.source = 'folder'
  config.data.image_size = 256
  config.data.crop = 'random'
  config.data.flip = False  # the paper's OpenImages loader does not flip

  c = config.autoencoder
  c.kind = kind
  c.ch = 128
  c.ch_mult = tuple(ch_mult)
  c.num_res_blocks = 2
  c.attn_resolutions = tuple(attn_resolutions)
  c.attn_type = attn_type
  c.z_channels = z_channels
  c.double_z = kind == 'kl'
  c.embed_dim = embed_dim
  c.dropout = 0.0
  if kind == 'vq':
    c.n_embed = n_embed

  loss = config.autoencoder_loss
  loss.pixel_loss = 'l1'
  loss.perceptual_weight = 1.0
  loss.kl_weight = 1e-6
  loss.codebook_weight = 1.0
  loss.disc_start = disc_start
  loss.disc_weight = disc_weight
  loss.disc_num_layers = disc_num_layers
  loss.disc_loss = 'hinge'

  train = config.autoencoder_train
  train.batch_size = batch_size
  train.learning_rate = BASE_LEARNING_RATE * batch_size
  train.adam_b1, train.adam_b2 = 0.5, 0.9
  return config
