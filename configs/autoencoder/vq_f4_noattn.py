"""vq-f4 without any attention (attn_type none), 8192 codes (first_stage_models/vq-f4-noattn)."""

from configs.autoencoder.first_stage import first_stage_config


def get_config():
  return first_stage_config(kind='vq', ch_mult=(1, 2, 4), z_channels=3, embed_dim=3, n_embed=8192,
                            attn_type='none', batch_size=8, disc_start=11, disc_weight=0.75)
