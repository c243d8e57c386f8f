"""The shared base of the conditional configs on the synthetic shapes (shapes_text, shapes_layout,
shapes_semantic): configs/default.py's stage 1 (KL-f4, 64x64x3 -> 16x16x4; the same fields, so one
trained stage 1 serves all four workdirs) and its U-Net (width 32, attention at 8x8 and 4x4, where a
condition read as context enters by cross-attention), trained for 2000 steps of batch 16: about
2 steps/s on 2 idle CPU cores, so about 17 min. `--config.unet.model_channels=64` (11M parameters)
learns the conditions faster per step at about 4x the cost (20 steps/s on an H100).
"""

from configs import default


def shapes_config():
  config = default.get_config()
  dt = config.diffusion_train
  dt.batch_size = 16
  dt.num_steps = 2000
  dt.learning_rate = 5e-4
  dt.warmup_steps = 100
  dt.ema_decay = 0.999
  dt.checkpoint_every_steps = 500
  dt.sample_every_steps = 1000
  s = config.sample
  s.num_samples = 16
  s.batch_size = 16
  s.num_steps = 50
  return config


def text_like(config, *, key: str, n_embed: int = 128, n_layer: int = 2, vocab_size: int, max_seq_len: int):
  """Cross-attention to a jointly trained TransformerEmbedder, with condition dropout for guidance."""
  config.unet.use_spatial_transformer = True
  config.unet.transformer_depth = 1
  config.unet.context_dim = n_embed
  config.unet.num_head_channels = 32
  config.diffusion.conditioning_key = 'crossattn'
  config.diffusion.cond_drop_prob = 0.1
  c = config.cond_stage
  c.kind, c.key, c.trainable = 'transformer', key, True
  c.n_embed, c.n_layer, c.vocab_size, c.max_seq_len = n_embed, n_layer, vocab_size, max_seq_len
  config.sample.guidance_scale = 3.0
  return config
