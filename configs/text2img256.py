"""Text-to-image LDM-4 (models/ldm/text2img256): VQ-f4 (64x64x3 latents), a SpatialTransformer U-Net
cross-attending to the paper's BERTEmbedder (WordPiece tokens of bert-base-uncased, 32 pre-norm
layers of width 640), trained jointly.

The WordPiece tokenizer reads bert-base-uncased's vocab.txt from `--config.cond_stage.vocab_path`
(nothing is downloaded). Training data needs captions: the synthetic source has them
(`--config.data.source=synthetic`); the paper trained on LAION previews.
"""

from configs.paper_ldm import VQ_F4, paper_ldm, transformer_conditioning, unet_of_paper


def get_config():
  config = paper_ldm(
      first_stage=VQ_F4, batch_size=28, base_learning_rate=2e-6, linear_end=0.0195,
      unet=unet_of_paper(model_channels=192, attention_resolutions=(8, 4, 2), num_res_blocks=2,
                         channel_mult=(1, 2, 3, 5), num_head_channels=32, use_spatial_transformer=True,
                         transformer_depth=1, context_dim=640))
  transformer_conditioning(config, key='caption', n_embed=640, n_layer=32)
  config.cond_stage.tokenizer = 'wordpiece'
  return config
