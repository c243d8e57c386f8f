"""Semantic synthesis LDM-4 (models/ldm/semantic_synthesis256): VQ-f4 latents concatenated with the
segmentation map (182 COCO-Stuff/landscape classes, one-hot) brought to latent size by the paper's
SpatialRescaler (two bilinear halvings, 1x1 conv to 3 channels), a U-Net of width 128 (ch_mult
1,4,8); l1 loss. Convolutional: sample larger maps than the training crops (the paper's 512 model
samples 1024 px landscapes) with a larger `--config.sample.segmentation` PNG.
"""

from configs.paper_ldm import VQ_F4, paper_ldm, unet_of_paper


def semantic_config(image_size: int, batch_size: int):
  config = paper_ldm(
      first_stage=VQ_F4, batch_size=batch_size, base_learning_rate=1e-6, linear_end=0.0205,
      unet=unet_of_paper(in_channels=6, model_channels=128, attention_resolutions=(32, 16, 8), num_res_blocks=2,
                         channel_mult=(1, 4, 8), num_heads=8))
  config.data.image_size = image_size
  config.diffusion.conditioning_key = 'concat'
  config.diffusion.loss_type = 'l1'
  c = config.cond_stage
  c.kind, c.key = 'spatial_rescaler', 'segmentation'
  c.n_stages, c.multiplier, c.method = 2, 0.5, 'bilinear'
  c.in_channels, c.out_channels, c.bias = 182, 3, False
  return config


def get_config():
  return semantic_config(image_size=256, batch_size=8)
