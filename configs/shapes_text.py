"""Text-to-image on the synthetic shapes: captions such as "a red circle left of a blue square",
word-level tokens (the caption grammar's vocabulary), a 2-layer TransformerEmbedder (width 128) trained
with the U-Net, cross-attention, 10% empty captions for classifier-free guidance (sampled at scale 3).

  python -m latent_diffusion.main --config=configs/shapes_text.py --workdir=workdir/shapes_text
  python -m latent_diffusion.main --config=configs/shapes_text.py --workdir=workdir/shapes_text \
      --config.mode=sample --config.sample.prompt="a red circle left of a blue square|a green star"
"""

from configs.shapes_conditional import shapes_config, text_like


def get_config():
  config = text_like(shapes_config(), key='caption', vocab_size=64, max_seq_len=24)
  config.cond_stage.tokenizer = 'word'
  return config
