"""Class-conditional LDM-8 on ImageNet (configs/latent-diffusion/cin-ldm-vq-f8.yaml, models/ldm/cin256).

VQ-f8 (32x32x4 latents), a SpatialTransformer U-Net cross-attending to the paper's ClassEmbedder
(1000 classes, 512-d). Data: TFDS imagenet2012 (manual download, prepared beforehand).
"""

from configs.paper_ldm import VQ_F8, imagenet_class_conditional, paper_ldm


def get_config():
  config = paper_ldm(
      first_stage=VQ_F8, batch_size=64, base_learning_rate=1e-6,
      unet=dict(model_channels=256, attention_resolutions=(4, 2, 1), num_res_blocks=2, channel_mult=(1, 2, 4),
                num_head_channels=32, use_spatial_transformer=True, transformer_depth=1, context_dim=512,
                use_scale_shift_norm=False, resblock_updown=False))
  imagenet_class_conditional(config, n_classes=1000)
  return config
