"""vq-f8 with 256 codes: 256x256x3 -> 32x32x4, attention at 32x32 (first_stage_models/vq-f8-n256)."""

from configs.autoencoder.first_stage import first_stage_config


def get_config():
  return first_stage_config(kind='vq', ch_mult=(1, 2, 2, 4), z_channels=4, embed_dim=4, n_embed=256,
                            attn_resolutions=(32,), batch_size=10, disc_start=250001, disc_weight=0.75)
