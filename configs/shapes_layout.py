"""Layout-to-image on the synthetic shapes: each box (shape class, corners in [0, 1]) becomes the
paper's layout tokens (class token + two quantised corner tokens), read by a 2-layer
TransformerEmbedder through cross-attention; 10% empty layouts for guidance.

  python -m latent_diffusion.main --config=configs/shapes_layout.py --workdir=workdir/shapes_layout \
      --config.mode=sample --config.sample.layout=layout.json
  layout.json: [{"class": "circle", "box": [0.1, 0.1, 0.45, 0.45]}, {"class": 1, "box": [0.5, 0.5, 0.9, 0.9]}]
"""

from configs.shapes_conditional import shapes_config, text_like


def get_config():
  # 3 objects x 3 tokens + the 2 crop tokens; 1024 tokens: a 32x32 corner grid (class ids share them).
  config = text_like(shapes_config(), key='layout', vocab_size=1024, max_seq_len=11)
  config.cond_stage.layout_max_objects = 3
  config.cond_stage.layout_encode_crop = True
  config.data.flip = True  # boxes are mirrored with the image
  return config
