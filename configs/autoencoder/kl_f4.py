"""kl-f4: 256x256x3 -> 64x64x3, KL-regularised (first_stage_models/kl-f4)."""

from configs.autoencoder.first_stage import first_stage_config


def get_config():
  return first_stage_config(kind='kl', ch_mult=(1, 2, 4), z_channels=3, embed_dim=3, batch_size=10,
                            disc_start=50001, disc_weight=0.5)
