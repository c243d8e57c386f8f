"""kl-f8: 256x256x3 -> 32x32x4, KL-regularised (first_stage_models/kl-f8; also Stable Diffusion's shape)."""

from configs.autoencoder.first_stage import first_stage_config


def get_config():
  return first_stage_config(kind='kl', ch_mult=(1, 2, 4, 4), z_channels=4, embed_dim=4, batch_size=4,
                            disc_start=50001, disc_weight=0.5)
