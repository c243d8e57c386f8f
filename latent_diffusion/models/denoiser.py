"""The paper's DiffusionWrapper: the U-Net plus the conditioning model, routed by conditioning_key.

Conditions arrive raw (`label` (B,) int32, `tokens` (B, L) int32, `segmentation` (B, S, S) int32,
`concat` (B, h, w, c) at latent resolution; see train/conditioning.py); `condition` encodes them once
into the U-Net's inputs and `denoise` runs the U-Net on (x_t, t) with them, so a sampler encodes once
and denoises many times:

  ''         unconditional
  concat     x_t and `concat` stacked along channels (the U-Net's in_channels holds both); with a
             cond_stage (the SpatialRescaler of semantic synthesis) concat = cond_stage(one-hot map)
  crossattn  cross-attention on `context` = cond_stage(label or tokens)
  hybrid     concat and crossattn together
  adm        the label embedding of the U-Net added to its time embedding (`y`)
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_diffusion.models.unet import UNetModel

CONDITIONING_KEYS = ('', 'concat', 'crossattn', 'hybrid', 'adm')


class LatentDenoiser(nn.Module):
  """eps/x0/v prediction from (x_t (B,h,w,c), t (B,), raw conditions) -> (B,h,w,c)."""
  unet: UNetModel
  cond_stage: nn.Module | None = None
  conditioning_key: str = ''
  cond_input: str = 'label'  # the raw condition the cond_stage reads: label | tokens | segmentation

  def setup(self):
    if self.conditioning_key not in CONDITIONING_KEYS:
      raise ValueError(f'conditioning_key {self.conditioning_key!r} is not one of {CONDITIONING_KEYS}')

  def condition(self, raw: dict[str, Any], deterministic: bool = True) -> dict[str, jax.Array]:
    """The U-Net inputs of raw conditions: a dict with `concat`, `context` and/or `y`."""
    key, encoded = self.conditioning_key, {}
    if key == 'concat' and self.cond_stage is not None:
      segmentation = _required(raw, self.cond_input, key)  # (B, S, S) class indices
      encoded['concat'] = self.cond_stage(jax.nn.one_hot(segmentation, self.cond_stage.in_channels))
    elif key in ('concat', 'hybrid'):
      encoded['concat'] = _required(raw, 'concat', key)
    if key in ('crossattn', 'hybrid'):
      condition = _required(raw, self.cond_input, key)
      if self.cond_stage is None:
        raise ValueError(f'conditioning_key {key!r} needs a cond_stage model for the context')
      encoded['context'] = (self.cond_stage(condition, deterministic=deterministic)
                            if self.cond_input == 'tokens' else self.cond_stage(condition))
    if key == 'adm':
      encoded['y'] = _required(raw, 'label', key)
    return encoded

  def denoise(self, x_t, t, encoded: dict[str, jax.Array], deterministic: bool = True) -> jax.Array:
    if 'concat' in encoded:
      x_t = jnp.concatenate([x_t, encoded['concat'].astype(x_t.dtype)], axis=-1)
    return self.unet(x_t, t, context=encoded.get('context'), y=encoded.get('y'),
                     deterministic=deterministic)

  def __call__(self, x_t, t, raw: dict[str, Any] | None = None, deterministic: bool = True):
    return self.denoise(x_t, t, self.condition(raw or {}, deterministic), deterministic)


def _required(raw, name, key):
  if raw.get(name) is None:
    raise ValueError(f'conditioning_key {key!r} needs the condition {name!r} in the batch')
  return raw[name]
