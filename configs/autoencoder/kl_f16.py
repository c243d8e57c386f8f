"""kl-f16: 256x256x3 -> 16x16x16, KL-regularised, attention at 16x16 (first_stage_models/kl-f16)."""

from configs.autoencoder.first_stage import first_stage_config


def get_config():
  return first_stage_config(kind='kl', ch_mult=(1, 1, 2, 2, 4), z_channels=16, embed_dim=16,
                            attn_resolutions=(16,), batch_size=6, disc_start=50001, disc_weight=0.5)
