"""Inpainting LDM-4 (models/ldm/inpainting_big): the VQ-f4 (no attention) latents of the image,
concatenated with the first-stage encoding of the masked image and the mask at latent size
(in_channels 3 + 3 + 1 = 7); a U-Net of width 256 with resblock_updown; l1 loss. Masks are drawn on
the fly (thick strokes and boxes); sample with `--config.sample.image=<png> --config.sample.mask=<png>`.
"""

from configs.paper_ldm import VQ_F4_NOATTN, paper_ldm, unet_of_paper


def get_config():
  config = paper_ldm(
      first_stage=VQ_F4_NOATTN, batch_size=8, base_learning_rate=1e-6, linear_end=0.0205,
      unet=unet_of_paper(in_channels=7, model_channels=256, attention_resolutions=(8, 4, 2), num_res_blocks=2,
                         channel_mult=(1, 2, 3, 4), num_heads=8, resblock_updown=True))
  config.data.inpainting_masks = True
  config.diffusion.conditioning_key = 'concat'
  config.diffusion.loss_type = 'l1'
  config.cond_stage.kind, config.cond_stage.key = 'first_stage', 'masked_image'
  config.cond_stage.trainable = False
  return config
