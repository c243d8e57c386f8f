"""Inpainting on UTKFace-64: random masks (thick strokes and boxes) drawn on the fly; the first-stage
encoding of the masked face and the mask at latent size are concatenated to the KL-f2 latents
(in_channels 4 + 4 + 1), as the paper's inpainting_big; known pixels are kept when sampling.

Two departures from the paper's inpainting model, both measured (experiments/results/conditional, one
H100, about 1050 steps of 64 each, masked PSNR on 256 utkface64/val faces): the masked image's encoding
enters in the units of the diffused latents (cond_stage.scale_first_stage; this KL stage 1 has latents
of std ~5), 10.51 -> 11.08 dB; and the known latents are also reset at every DDIM step
(sample.keep_known_latents), 11.08 -> 13.73 dB.

  python -m latent_diffusion.main --config=configs/utkface_inpaint.py --workdir=workdir/utkface_inpaint \
      --config.mode=sample --config.sample.image=face.png --config.sample.mask=mask.png
"""

from configs.utkface_restoration import restoration_config


def get_config():
  config = restoration_config()
  config.data.inpainting_masks = True
  config.unet.in_channels = 4 + 4 + 1
  config.cond_stage.kind, config.cond_stage.key, config.cond_stage.trainable = 'first_stage', 'masked_image', False
  config.cond_stage.scale_first_stage = True
  config.sample.keep_known_latents = True
  return config
