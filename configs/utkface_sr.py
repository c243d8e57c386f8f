"""4x super-resolution on UTKFace, 16 -> 64 px: the low-resolution face (antialiased bicubic, or
`--config.data.degradation=bsrgan_light` for the paper's light BSRGAN degradation) brought to the
32x32 latent side and concatenated to the KL-f2 latents (concat_mode, cond_stage identity, in_channels
4 + 3), as the paper's bsr_sr.

  python -m latent_diffusion.main --config=configs/utkface_sr.py --workdir=workdir/utkface_sr \
      --config.mode=sample --config.sample.image=face16.png   # a 16x16 input gives 64x64

--config.sample.image_guidance_scale=1 samples with the image-space guider (each step's eps pushed
towards latents whose decoded x0, downsampled, matches the input; experiments/results/conditional).
"""

from configs.utkface_restoration import restoration_config


def get_config():
  config = restoration_config()
  config.data.low_res_size = 16
  config.data.degradation = 'bicubic'
  config.unet.in_channels = 4 + 3
  config.cond_stage.kind, config.cond_stage.key, config.cond_stage.trainable = 'identity', 'low_res', False
  return config
