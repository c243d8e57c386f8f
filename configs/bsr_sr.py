"""4x super-resolution LDM-4 (models/ldm/bsr_sr): the low-resolution image (64x64, the latent side)
concatenated to the VQ-f4 latents (concat_mode, cond_stage identity), trained on 256 px crops degraded
on the fly by the paper's light BSRGAN pipeline (blur, resize, noise, JPEG); l2 loss.

Convolutional: `--config.sample.image=<png>` of any size gives a 4x larger sample.
"""

from configs.paper_ldm import VQ_F4, paper_ldm, unet_of_paper


def get_config():
  config = paper_ldm(
      first_stage=VQ_F4, batch_size=64, base_learning_rate=1e-6, linear_end=0.0155,
      unet=unet_of_paper(in_channels=6, model_channels=160, attention_resolutions=(16, 8), num_res_blocks=2,
                         channel_mult=(1, 2, 2, 4), num_head_channels=32))
  config.data.image_size = 256
  config.data.crop = 'random'
  config.data.low_res_size = 64
  config.data.degradation = 'bsrgan_light'
  config.diffusion.conditioning_key = 'concat'
  config.cond_stage.kind, config.cond_stage.key = 'identity', 'low_res'
  config.cond_stage.trainable = False
  return config
