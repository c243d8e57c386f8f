"""Layout-to-image LDM-4 (models/ldm/layout2img-openimages256): VQ-f4, a U-Net of width 128 with
3-deep SpatialTransformers cross-attending to the paper's BERTEmbedder over layout tokens
(use_tokenizer false: each box is its class token and two quantised corner tokens, 30 boxes and the
crop: 92 tokens, 8192-token vocabulary), 16 layers of width 512, trained jointly; l1 loss.

Training data needs boxes (the paper: OpenImages); the synthetic source has them
(`--config.data.source=synthetic`).
"""

from configs.paper_ldm import VQ_F4, paper_ldm, transformer_conditioning, unet_of_paper


def get_config():
  config = paper_ldm(
      first_stage=VQ_F4, batch_size=24, base_learning_rate=2e-6, linear_end=0.0205,
      unet=unet_of_paper(model_channels=128, attention_resolutions=(8, 4, 2), num_res_blocks=2,
                         channel_mult=(1, 2, 3, 4), num_head_channels=32, use_spatial_transformer=True,
                         transformer_depth=3, context_dim=512))
  transformer_conditioning(config, key='layout', n_embed=512, n_layer=16, vocab_size=8192, max_seq_len=92)
  config.cond_stage.layout_max_objects = 30
  config.cond_stage.layout_encode_crop = True
  config.diffusion.loss_type = 'l1'
  return config
