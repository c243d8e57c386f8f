"""Inpainting on UTKFace-64: random masks (thick strokes and boxes) drawn on the fly; the first-stage
encoding of the masked face and the mask at latent size are concatenated to the KL-f2 latents
(in_channels 4 + 4 + 1), as the paper's inpainting_big; known pixels are kept when sampling.

  python -m latent_diffusion.main --config=configs/utkface_inpaint.py --workdir=workdir/utkface_inpaint \
      --config.mode=sample --config.sample.image=face.png --config.sample.mask=mask.png
"""

from configs.utkface_restoration import restoration_config


def get_config():
  config = restoration_config()
  config.data.inpainting_masks = True
  config.unet.in_channels = 4 + 4 + 1
  config.cond_stage.kind, config.cond_stage.key, config.cond_stage.trainable = 'first_stage', 'masked_image', False
  return config
