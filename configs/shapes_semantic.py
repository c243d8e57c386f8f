"""Semantic synthesis on the synthetic shapes: the segmentation map (background + 6 shape classes,
one-hot) brought to the 16x16 latent side by the paper's SpatialRescaler (2 bilinear halvings, 1x1
conv to 3 channels) and concatenated to the latents (U-Net in_channels 4 + 3).

  python -m latent_diffusion.main --config=configs/shapes_semantic.py --workdir=workdir/shapes_semantic \
      --config.mode=sample --config.sample.segmentation=map.png   # any size divisible by 16
"""

from configs.shapes_conditional import shapes_config


def get_config():
  config = shapes_config()
  config.unet.in_channels = 4 + 3
  config.diffusion.conditioning_key = 'concat'
  c = config.cond_stage
  c.kind, c.key, c.trainable = 'spatial_rescaler', 'segmentation', True
  c.n_stages, c.multiplier, c.method = 2, 0.5, 'bilinear'
  c.in_channels, c.out_channels, c.bias = 7, 3, False
  return config
