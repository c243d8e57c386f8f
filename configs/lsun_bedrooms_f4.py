"""LDM-4 on LSUN-Bedrooms (configs/latent-diffusion/lsun_bedrooms-ldm-vq-4.yaml): VQ-f4, 64x64x3 latents.

Data: TFDS lsun/bedroom, prepared beforehand (`tfds build lsun/bedroom` or --config.data.tfds_data_dir).
"""

from configs.paper_ldm import UNET_VQ_F4, VQ_F4, paper_ldm


def get_config():
  config = paper_ldm(first_stage=VQ_F4, unet=UNET_VQ_F4, batch_size=48, base_learning_rate=2e-6)
  config.data.source = 'tfds'
  config.data.tfds_name = 'lsun/bedroom'
  config.data.tfds_split = 'train'
  return config
