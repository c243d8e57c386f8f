"""Class-conditional LDM-4 on ImageNet, the paper's cin256-v2 (configs/latent-diffusion/cin256-v2.yaml).

VQ-f4 (64x64x3 latents); a ClassEmbedder with 1001 rows, the last the null class of classifier-free
guidance (the released model samples with guidance scale ~1.5-3); no EMA; lr 1e-4 as given (the paper
runs it with scale_lr false). Data: TFDS imagenet2012 (manual download, prepared beforehand).
"""

from configs.paper_ldm import VQ_F4, imagenet_class_conditional, paper_ldm


def get_config():
  config = paper_ldm(
      first_stage=VQ_F4, batch_size=64, base_learning_rate=1e-4, scale_lr=False,
      unet=dict(model_channels=192, attention_resolutions=(8, 4, 2), num_res_blocks=2, channel_mult=(1, 2, 3, 5),
                num_heads=1, use_spatial_transformer=True, transformer_depth=1, context_dim=512,
                use_scale_shift_norm=False, resblock_updown=False))
  imagenet_class_conditional(config, n_classes=1001)
  config.sample.use_ema = False
  return config
