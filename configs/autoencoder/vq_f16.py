"""vq-f16: 256x256x3 -> 16x16x8, 16384 codes, attention at 16x16, 2-layer PatchGAN (first_stage_models/vq-f16)."""

from configs.autoencoder.first_stage import first_stage_config


def get_config():
  return first_stage_config(kind='vq', ch_mult=(1, 1, 2, 2, 4), z_channels=8, embed_dim=8, n_embed=16384,
                            attn_resolutions=(16,), batch_size=14, disc_start=250001, disc_weight=0.75,
                            disc_num_layers=2)
