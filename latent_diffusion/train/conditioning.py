"""Conditions for stage 2 from batches and configs: which raw inputs a model needs, their null
versions for classifier-free guidance, and condition dropout during training.

Raw conditions (what the denoiser's `condition` reads), from the data batch by `cond_stage.key`:

  key            batch field(s)        raw condition
  label          label (B,)            label (B,) int32 (adm, or a class cond_stage)
  caption        caption (B,) str      tokens (B, L) int32, tokenized on the host
  layout         boxes (B, N, 5)       tokens (B, L) int32, the paper's layout tokens
  segmentation   segmentation (B,S,S)  segmentation (B, S, S) int32 (one-hot + SpatialRescaler in the model)
  low_res        low_res (B,s,s,3)     concat (B, s, s, 3): the low-resolution image (concat_mode)
  masked_image   image, mask           concat (B, h, w, c+1): first-stage encoding of the masked image and
                                       the mask at latent size (computed with the autoencoder)

A null class is the last row of the label embedding, so guidance and dropout on labels need one more
row than the data has classes (the paper's cin256-v2: 1001 for ImageNet's 1000); the null of tokens
is the empty caption / empty layout.
"""

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.errors import ConfigError
from latent_diffusion.models import autoencoder as autoencoder_model

COND_KEYS = ('label', 'caption', 'layout', 'segmentation', 'low_res', 'masked_image')
RESTORATION_KEYS = ('low_res', 'masked_image')  # super-resolution, inpainting: conditions made from the image
COND_STAGES = ('', 'class', 'transformer', 'spatial_rescaler', 'first_stage', 'identity')
# The raw condition each cond_stage.key becomes, and the batch fields it is made from.
RAW_NAME = {'label': 'label', 'caption': 'tokens', 'layout': 'tokens', 'segmentation': 'segmentation',
            'low_res': 'concat', 'masked_image': 'concat'}
BATCH_FIELDS = {'label': ('label',), 'caption': ('caption',), 'layout': ('boxes',),
                'segmentation': ('segmentation',), 'low_res': ('low_res',), 'masked_image': ('image', 'mask')}


def is_conditional(config) -> bool:
  return config.diffusion.conditioning_key != ''


def condition_key(config) -> str:
  """The condition a config's model reads, as cond_stage.key ('' unconditional; adm reads labels)."""
  key = config.diffusion.conditioning_key
  if not key:
    return ''
  return 'label' if key == 'adm' else config.cond_stage.key


def uses_labels(config) -> bool:
  key = config.diffusion.conditioning_key
  return key == 'adm' or (key in ('crossattn', 'hybrid') and config.cond_stage.key == 'label')


def uses_tokens(config) -> bool:
  return is_conditional(config) and config.cond_stage.key in ('caption', 'layout')


def raw_names(config) -> tuple[str, ...]:
  """The raw conditions the denoiser of this config reads."""
  key = config.diffusion.conditioning_key
  if not key:
    return ()
  if key == 'adm':
    return ('label',)
  names = [RAW_NAME[config.cond_stage.key]]
  if key == 'hybrid' and 'concat' not in names:
    names.append('concat')
  return tuple(names)


def guidable(config) -> bool:
  """Whether the condition has a null version (labels with a null row, tokens)."""
  return uses_tokens(config) or (uses_labels(config) and null_label(config) is not None)


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
  cond = config.cond_stage
  if cond.key not in COND_KEYS:
    raise ConfigError(f'cond_stage.key: {cond.key!r} is not one of {", ".join(COND_KEYS)}')
  if cond.kind not in COND_STAGES:
    raise ConfigError(f'cond_stage.kind: {cond.kind!r} is not one of {", ".join(map(repr, COND_STAGES))}')
  if key in ('concat', 'hybrid'):
    _check_concat(config, needs_data)
  if key == 'adm' and config.unet.num_classes <= 0:
    raise ConfigError("diffusion.conditioning_key='adm' needs unet.num_classes > 0 (label embedding rows)")
  if key in ('crossattn', 'hybrid'):
    allowed = {'label': 'class', 'caption': 'transformer', 'layout': 'transformer'}
    if cond.key not in allowed or cond.kind != allowed[cond.key]:
      raise ConfigError(f'diffusion.conditioning_key={key!r} reads cond_stage.key label (cond_stage.kind '
                        f'class), caption or layout (transformer); got key {cond.key!r}, kind {cond.kind!r}')
    width = cond.embed_dim if cond.kind == 'class' else cond.n_embed
    field = 'cond_stage.embed_dim' if cond.kind == 'class' else 'cond_stage.n_embed'
    if not config.unet.use_spatial_transformer or config.unet.context_dim != width:
      raise ConfigError(f'diffusion.conditioning_key={key!r} needs unet.use_spatial_transformer and '
                        f'unet.context_dim = {field} ({width}), got '
                        f'{config.unet.use_spatial_transformer} and {config.unet.context_dim}')
  if uses_labels(config) and needs_data:
    if config.data.num_classes <= 0:
      raise ConfigError(f'diffusion.conditioning_key={key!r} needs class labels: set data.num_classes')
    if label_rows(config) < config.data.num_classes:
      raise ConfigError(f'{"unet.num_classes" if key == "adm" else "cond_stage.n_classes"}='
                        f'{label_rows(config)} is smaller than data.num_classes={config.data.num_classes}')
  needs_null = config.diffusion.cond_drop_prob > 0 or config.sample.guidance_scale != 1.0
  if needs_null and uses_labels(config) and needs_data and null_label(config) is None:
    raise ConfigError('diffusion.cond_drop_prob / sample.guidance_scale need a null class: give the label '
                      f'embedding data.num_classes + 1 = {config.data.num_classes + 1} rows')
  if needs_null and not (uses_labels(config) or uses_tokens(config)):
    raise ConfigError('diffusion.cond_drop_prob / sample.guidance_scale need a conditional model whose '
                      'condition has a null version (class labels, captions or layouts), got '
                      f'diffusion.conditioning_key {key!r} with cond_stage.key {cond.key!r}')
  if not 0.0 <= config.diffusion.cond_drop_prob < 1.0:
    raise ConfigError(f'diffusion.cond_drop_prob: must be in [0, 1), got {config.diffusion.cond_drop_prob}')


def _check_concat(config, needs_data: bool) -> None:
  key, cond = config.diffusion.conditioning_key, config.cond_stage
  latent_channels = autoencoder_model.latent_channels_of(config.autoencoder)
  extra = config.unet.in_channels - latent_channels
  if extra <= 0:
    raise ConfigError(f'diffusion.conditioning_key={key!r} needs unet.in_channels > the latent channels '
                      f'({latent_channels}) for the concatenated condition')
  expected = {'segmentation': cond.out_channels, 'low_res': 3, 'masked_image': latent_channels + 1}
  stage = {'segmentation': 'spatial_rescaler', 'low_res': 'identity', 'masked_image': 'first_stage'}
  if key == 'hybrid':
    return  # the concat part arrives as is; its width is the U-Net's business
  if cond.key not in expected:
    raise ConfigError(f"diffusion.conditioning_key='concat' reads cond_stage.key segmentation, low_res or "
                      f'masked_image, got {cond.key!r}')
  if cond.kind != stage[cond.key]:
    raise ConfigError(f'cond_stage.key={cond.key!r} needs cond_stage.kind={stage[cond.key]!r}, '
                      f'got {cond.kind!r}')
  if extra != expected[cond.key]:
    raise ConfigError(f'unet.in_channels={config.unet.in_channels}: cond_stage.key={cond.key!r} concatenates '
                      f'{expected[cond.key]} channels to the {latent_channels} latent channels, so it must be '
                      f'{latent_channels + expected[cond.key]}')
  if cond.key == 'low_res' and needs_data and config.data.low_res_size <= 0:
    raise ConfigError("cond_stage.key='low_res' needs data.low_res_size > 0 (the degraded input's side)")
  if cond.key == 'masked_image' and needs_data and not config.data.inpainting_masks:
    raise ConfigError("cond_stage.key='masked_image' needs data.inpainting_masks=True")
  if cond.key == 'segmentation':
    f = autoencoder_model.factor_of(config.autoencoder)
    if round(1 / cond.multiplier ** cond.n_stages) != f:
      raise ConfigError(f'cond_stage: n_stages={cond.n_stages} x multiplier={cond.multiplier} must shrink '
                        f'the map by the autoencoder factor f={f} to reach the latent size')


def null_values(config, tokenizer=None) -> dict:
  """{raw name: its null value}: the null class for labels, the empty condition's tokens."""
  nulls = {}
  if uses_labels(config) and null_label(config) is not None:
    nulls['label'] = null_label(config)
  if uses_tokens(config) and tokenizer is not None:
    nulls['tokens'] = np.asarray(tokenizer.null_tokens(), np.int32)
  return nulls


def _as_nulls(nulls) -> dict:
  """Older call sites pass the null label alone."""
  if nulls is None:
    return {}
  return nulls if isinstance(nulls, dict) else {'label': nulls}


def null_conditions(raw: dict, nulls) -> dict:
  """The unconditional version of raw conditions: labels the null class, tokens the empty condition."""
  nulls = _as_nulls(nulls)
  return {name: jnp.broadcast_to(jnp.asarray(nulls[name], value.dtype), value.shape) if name in nulls
          else value for name, value in raw.items()}


def drop_conditions(raw: dict, rng, probability: float, nulls) -> dict:
  """Each example's condition replaced by the null condition with `probability` (training)."""
  nulls = _as_nulls(nulls)
  if not probability or not raw or not nulls:
    return raw
  first = jax.tree.leaves(raw)[0]
  dropped = jax.random.bernoulli(rng, probability, (first.shape[0],))
  out = {}
  for name, value in raw.items():
    if name in nulls:
      where = dropped.reshape((-1,) + (1,) * (value.ndim - 1))
      value = jnp.where(where, jnp.asarray(nulls[name], value.dtype), value)
    out[name] = value
  return out


def sampling_labels(config, num_samples: int) -> jax.Array:
  """Labels of a sample grid: sampling.class_label for all, or cycling through the data's classes."""
  if config.sample.class_label >= 0:
    return jnp.full((num_samples,), config.sample.class_label, jnp.int32)
  return jnp.arange(num_samples, dtype=jnp.int32) % max(config.data.num_classes, 1)


def host_inputs(config, batch: dict, tokenizer=None) -> dict:
  """The numeric inputs of a pipeline batch that stage 2 needs (numpy, before sharding): 'image', and
  the raw conditions, captions and layouts tokenized here; inpainting keeps 'image' and 'mask' (the
  concat is encoded on device)."""
  inputs = {'image': batch['image']} if 'image' in batch else {}
  if not is_conditional(config):
    return inputs
  key = condition_key(config)
  for field in BATCH_FIELDS[key]:
    if field not in batch:
      raise ConfigError(f'cond_stage.key={key!r} needs the batch field {field!r}, which data.source='
                        f'{config.data.source!r} does not provide')
  if key == 'caption':
    inputs['tokens'] = tokenizer.encode([str(c) for c in batch['caption']])
  elif key == 'layout':
    inputs['tokens'] = tokenizer.encode_batch(np.asarray(batch['boxes']))
  elif key == 'segmentation':
    inputs['segmentation'] = np.asarray(batch['segmentation'], np.int32)
  elif key == 'low_res':
    inputs['low_res'] = np.asarray(batch['low_res'], np.float32)
  elif key == 'masked_image':
    inputs['mask'] = np.asarray(batch['mask'], np.float32)
  else:
    inputs['label'] = np.asarray(batch['label'], np.int32)
  return inputs


def sampler_inputs(config, batch: dict, tokenizer=None) -> dict:
  """host_inputs for a sampler: the conditions only (inpainting also keeps its image)."""
  inputs = host_inputs(config, batch, tokenizer)
  if condition_key(config) != 'masked_image':
    inputs.pop('image', None)
  return inputs
