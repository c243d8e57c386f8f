"""kl-f32: 256x256x3 -> 8x8x64, KL-regularised, attention at 16x16 and 8x8 (first_stage_models/kl-f32)."""

from configs.autoencoder.first_stage import first_stage_config


def get_config():
  return first_stage_config(kind='kl', ch_mult=(1, 1, 2, 2, 4, 4), z_channels=64, embed_dim=64,
                            attn_resolutions=(16, 8), batch_size=6, disc_start=50001, disc_weight=0.5)
