"""Conditions for stage 2 from batches and configs: which raw inputs a model needs, their null
versions for classifier-free guidance, and condition dropout during training.

Class labels are the condition this version feeds (through `adm` or a `class` cond_stage); a null
class is the last row of the label embedding, so guidance and dropout need one more row than the data
has classes (the paper's cin256-v2: 1001 for ImageNet's 1000).
"""

import jax
import jax.numpy as jnp

from latent_diffusion.errors import ConfigError


def uses_labels(config) -> bool:
  return config.diffusion.conditioning_key in ('crossattn', 'hybrid', 'adm')


def label_rows(config) -> int:
  """Rows of the embedding that labels index: the U-Net's (adm) or the cond_stage's."""
  if config.diffusion.conditioning_key == 'adm':
    return config.unet.num_classes
  return config.cond_stage.n_classes


def null_label(config) -> int | None:
  """The label of the null condition (the last embedding row), or None without one."""
  if not uses_labels(config):
    return None
  rows = label_rows(config)
  return rows - 1 if rows > config.data.num_classes else None


def check(config, needs_data: bool = True) -> None:
  """Consistency of the conditioning fields; raises ConfigError naming the field. needs_data=False
  (summary) checks only what building the networks needs."""
  key = config.diffusion.conditioning_key
  if key in ('concat', 'hybrid') and config.unet.in_channels <= config.autoencoder.embed_dim:
    raise ConfigError(f'diffusion.conditioning_key={key!r} needs unet.in_channels > the latent channels '
                      f'({config.autoencoder.embed_dim}) for the concatenated condition')
  if key in ('concat', 'hybrid') and needs_data:
    raise ConfigError(f'diffusion.conditioning_key={key!r} needs a concat condition (low-resolution '
                      'image, masked image or semantic map) and no data source here provides one yet')
  if key == 'adm' and config.unet.num_classes <= 0:
    raise ConfigError("diffusion.conditioning_key='adm' needs unet.num_classes > 0 (label embedding rows)")
  if key in ('crossattn', 'hybrid'):
    if config.cond_stage.kind != 'class':
      raise ConfigError("diffusion.conditioning_key='crossattn' needs cond_stage.kind='class'")
    if not config.unet.use_spatial_transformer or config.unet.context_dim != config.cond_stage.embed_dim:
      raise ConfigError('diffusion.conditioning_key=\'crossattn\' needs unet.use_spatial_transformer and '
                        f'unet.context_dim = cond_stage.embed_dim ({config.cond_stage.embed_dim}), got '
                        f'{config.unet.use_spatial_transformer} and {config.unet.context_dim}')
  if uses_labels(config) and needs_data:
    if config.data.num_classes <= 0:
      raise ConfigError(f'diffusion.conditioning_key={key!r} needs class labels: set data.num_classes')
    if label_rows(config) < config.data.num_classes:
      raise ConfigError(f'{"unet.num_classes" if key == "adm" else "cond_stage.n_classes"}='
                        f'{label_rows(config)} is smaller than data.num_classes={config.data.num_classes}')
  needs_null = config.diffusion.cond_drop_prob > 0 or config.sample.guidance_scale != 1.0
  if needs_null and uses_labels(config) and needs_data and null_label(config) is None:
    raise ConfigError('diffusion.cond_drop_prob / sampling.guidance_scale need a null class: give the label '
                      f'embedding data.num_classes + 1 = {config.data.num_classes + 1} rows')
  if needs_null and not uses_labels(config):
    raise ConfigError('diffusion.cond_drop_prob / sampling.guidance_scale need a conditional model '
                      '(diffusion.conditioning_key)')
  if not 0.0 <= config.diffusion.cond_drop_prob < 1.0:
    raise ConfigError(f'diffusion.cond_drop_prob: must be in [0, 1), got {config.diffusion.cond_drop_prob}')


def null_conditions(raw: dict, null: int | None) -> dict:
  """The unconditional version of raw conditions: every label the null class."""
  return {name: jnp.full_like(value, null) if name == 'label' else value for name, value in raw.items()}


def drop_conditions(raw: dict, rng, probability: float, null: int | None) -> dict:
  """Each example's condition replaced by the null condition with `probability` (training)."""
  if not probability or not raw:
    return raw
  first = jax.tree.leaves(raw)[0]
  dropped = jax.random.bernoulli(rng, probability, (first.shape[0],))
  return {name: jnp.where(dropped, null, value) if name == 'label' else value
          for name, value in raw.items()}


def sampling_labels(config, num_samples: int) -> jax.Array:
  """Labels of a sample grid: sampling.class_label for all, or cycling through the data's classes."""
  if config.sample.class_label >= 0:
    return jnp.full((num_samples,), config.sample.class_label, jnp.int32)
  return jnp.arange(num_samples, dtype=jnp.int32) % max(config.data.num_classes, 1)
