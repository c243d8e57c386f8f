"""Class-conditional LDM-4 on UTKFace-64 (labels.csv `label`: race, 5 classes), with classifier-free
guidance: configs/utkface64_f4.py (its stage 1 and U-Net) with the label added to the time embedding
(`adm`, 5 classes + the null class) and 10% of the labels dropped during training.
"""

from configs import utkface64_f4


def get_config():
  config = utkface64_f4.get_config()
  config.data.label_column = 'label'
  config.data.num_classes = 5
  config.unet.num_classes = 6          # 5 classes + the null class
  config.diffusion.conditioning_key = 'adm'
  config.diffusion.cond_drop_prob = 0.1
  config.sample.num_samples = 30       # 6 per class
  config.sample.batch_size = 30
  config.sample.guidance_scale = 3.0
  return config
