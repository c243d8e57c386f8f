"""vq-f4: 256x256x3 -> 64x64x3, 8192 codes (first_stage_models/vq-f4)."""

from configs.autoencoder.first_stage import first_stage_config


def get_config():
  return first_stage_config(kind='vq', ch_mult=(1, 2, 4), z_channels=3, embed_dim=3, n_embed=8192,
                            batch_size=8, disc_start=0, disc_weight=0.75)
