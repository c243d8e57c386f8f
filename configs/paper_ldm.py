"""The paper's released LDMs (configs/latent-diffusion/*.yaml, models/ldm/*/config.yaml), as configs.

Each LDM takes the first stage it was trained on (configs/autoencoder/) and the paper's unet_config,
schedule and batch. Learning rate: the paper's base_learning_rate times the batch size (its main.py
scales by batch x GPUs x accumulation; one device here), AdamW, EMA 0.9999. The first stages were
trained on OpenImages; `train` first trains that first stage on the LDM's own data unless a converted
checkpoint is in the workdir (`--config.mode=convert --config.convert.stage=diffusion` of a paper .ckpt).
"""

from configs.autoencoder.first_stage import first_stage_config


def paper_ldm(*, first_stage: dict, unet: dict, batch_size: int, base_learning_rate: float,
              linear_start: float = 0.0015, linear_end: float = 0.0195, warmup_steps: int = 0,
              scale_lr: bool = True):
  """A two-stage config: first_stage_config(**first_stage), then the paper's LatentDiffusion params."""
  config = first_stage_config(**first_stage)
  config.mode = 'train'
  config.data.crop = 'center'
  config.data.flip = True

  for name, value in unet.items():
    config.unet[name] = tuple(value) if isinstance(value, list) else value
  config.diffusion.timesteps = 1000
  config.diffusion.beta_schedule = 'linear'
  config.diffusion.linear_start = linear_start
  config.diffusion.linear_end = linear_end
  config.diffusion.parameterization = 'eps'
  config.diffusion.loss_type = 'l2'
  config.diffusion.scale_by_std = False  # the paper's default; its churches model sets it
  config.diffusion.scale_factor = 1.0

  train = config.diffusion_train
  train.batch_size = batch_size
  train.learning_rate = base_learning_rate * batch_size if scale_lr else base_learning_rate
  train.warmup_steps = warmup_steps
  train.ema_decay = 0.9999
  return config


# The paper's VQ-f4 (models/first_stage_models/vq-f4) under the CelebA-HQ, FFHQ and LSUN-Bedrooms LDMs.
VQ_F4 = dict(kind='vq', ch_mult=(1, 2, 4), z_channels=3, embed_dim=3, n_embed=8192, batch_size=8,
             disc_start=0, disc_weight=0.75)
# ... and VQ-f8 (vq-f8) under the ImageNet LDM.
VQ_F8 = dict(kind='vq', ch_mult=(1, 2, 2, 4), z_channels=4, embed_dim=4, n_embed=16384,
             attn_resolutions=(32,), batch_size=10, disc_start=1, disc_weight=0.6, disc_num_layers=2)

# LDM-4 of CelebA-HQ, FFHQ and LSUN-Bedrooms: 274M parameters.
UNET_VQ_F4 = dict(model_channels=224, attention_resolutions=(8, 4, 2), num_res_blocks=2,
                  channel_mult=(1, 2, 3, 4), num_heads=8, num_head_channels=32,
                  use_scale_shift_norm=False, resblock_updown=False)


def imagenet_class_conditional(config, n_classes: int):
  """ImageNet (TFDS imagenet2012, prepared beforehand) and the paper's ClassEmbedder (512-d) under
  cross-attention; n_classes rows (1001 = 1000 classes + the null class of guidance)."""
  config.data.source = 'tfds'
  config.data.tfds_name = 'imagenet2012'
  config.data.tfds_split = 'train'
  config.data.tfds_eval_split = 'validation'
  config.data.num_classes = 1000
  config.diffusion.conditioning_key = 'crossattn'
  config.cond_stage.kind = 'class'
  config.cond_stage.n_classes = n_classes
  config.cond_stage.embed_dim = 512
  return config


# The paper's VQ-f4 without attention (models/first_stage_models/vq-f4-noattn) under inpainting_big.
VQ_F4_NOATTN = dict(VQ_F4, attn_type='none')
# ... and KL-f8 (kl-f8) under txt2img-1p4B.
KL_F8 = dict(kind='kl', ch_mult=(1, 2, 4, 4), z_channels=4, embed_dim=4, batch_size=4, disc_start=50001,
             disc_weight=0.5)


def unet_of_paper(**fields) -> dict:
  """A unet_config with the paper's UNetModel defaults for what it leaves out."""
  return dict(dict(use_scale_shift_norm=False, resblock_updown=False, num_heads=-1, num_head_channels=-1),
              **fields)


def transformer_conditioning(config, *, key: str, n_embed: int, n_layer: int, vocab_size: int = 30522,
                             max_seq_len: int = 77):
  """The paper's BERTEmbedder / TransformerEmbedder under cross-attention (cond_stage_trainable)."""
  config.diffusion.conditioning_key = 'crossattn'
  c = config.cond_stage
  c.kind = 'transformer'
  c.key = key
  c.trainable = True
  c.n_embed, c.n_layer, c.vocab_size, c.max_seq_len = n_embed, n_layer, vocab_size, max_seq_len
  return config
