"""LDM-4 on FFHQ 256 (configs/latent-diffusion/ffhq-ldm-vq-4.yaml): VQ-f4, 64x64x3 latents.

Point --config.data.path at a folder of FFHQ images (resized to 256 on the fly).
"""

from configs.paper_ldm import UNET_VQ_F4, VQ_F4, paper_ldm


def get_config():
  config = paper_ldm(first_stage=VQ_F4, unet=UNET_VQ_F4, batch_size=42, base_learning_rate=2e-6)
  config.data.source = 'folder'
  return config
