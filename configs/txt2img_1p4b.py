"""The paper's 1.45B text-to-image LDM-8 (configs/latent-diffusion/txt2img-1p4B-eval.yaml): KL-f8
(32x32x4 latents, scale_factor 0.18215), a U-Net of width 320 with cross-attention to a 32-layer
BERTEmbedder of width 1280 (WordPiece, bert-base-uncased), no EMA; sampled with guidance scale ~5.

`--config.cond_stage.vocab_path` names bert-base-uncased's vocab.txt; convert the released
checkpoint with `--config.mode=convert --config.convert.stage=diffusion`.
"""

from configs.paper_ldm import KL_F8, paper_ldm, transformer_conditioning, unet_of_paper


def get_config():
  config = paper_ldm(
      first_stage=KL_F8, batch_size=4, base_learning_rate=5e-5, linear_start=0.00085, linear_end=0.012,
      unet=unet_of_paper(model_channels=320, attention_resolutions=(4, 2, 1), num_res_blocks=2,
                         channel_mult=(1, 2, 4, 4), num_heads=8, use_spatial_transformer=True,
                         transformer_depth=1, context_dim=1280, legacy=False))
  transformer_conditioning(config, key='caption', n_embed=1280, n_layer=32)
  config.cond_stage.tokenizer = 'wordpiece'
  config.diffusion.scale_factor = 0.18215
  config.sample.use_ema = False
  config.sample.guidance_scale = 5.0
  config.sample.sampler = 'plms'
  config.diffusion.cond_drop_prob = 0.1
  return config
