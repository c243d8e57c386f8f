"""vq-f8: 256x256x3 -> 32x32x4, 16384 codes, attention at 32x32, 2-layer PatchGAN (first_stage_models/vq-f8)."""

from configs.autoencoder.first_stage import first_stage_config


def get_config():
  return first_stage_config(kind='vq', ch_mult=(1, 2, 2, 4), z_channels=4, embed_dim=4, n_embed=16384,
                            attn_resolutions=(32,), batch_size=10, disc_start=1, disc_weight=0.6,
                            disc_num_layers=2)
