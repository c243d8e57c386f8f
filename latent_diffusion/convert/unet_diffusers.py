"""diffusers UNet2DModel / UNet2DConditionModel -> our UNetModel (the paper's openaimodel, NHWC).

diffusers lays the paper's U-Net out by resolution level; ours keeps the paper's flat block list:

  ours (paper state dict)               diffusers
  time_embed_0, time_embed_2            time_embedding.linear_1, time_embedding.linear_2
  label_emb                             class_embedding
  input_blocks_0_layers_0               conv_in
  input_blocks_{k}_layers_0 / _1        down_blocks.{level}.resnets.{j} / attentions.{j}
  input_blocks_{k}_layers_0 (resample)  down_blocks.{level}.downsamplers.0 (a conv: .conv)
  middle_block_layers_{0,1,2}           mid_block.resnets.0, mid_block.attentions.0, mid_block.resnets.1
  output_blocks_{k}_layers_*            up_blocks.{L-1-level}.resnets.{i}, attentions.{i}, upsamplers.0
  out_norm, out_conv                    conv_norm_out, conv_out

UNet2DModel's self-attention keeps q, k and v apart (`to_q`, ... or, in older files, `query`, ...);
our AttentionBlock has the paper's one fused `qkv`, in the legacy channel order (heads, [q|k|v],
head_dim), so the three are fused per layer with the layer's head count. UNet2DConditionModel's
Transformer2DModel is the paper's SpatialTransformer with the same child names.
"""

import json
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.convert.autoencoder import StateDict, _convert
from latent_diffusion.errors import CheckpointError, ConfigError
from latent_diffusion.models.unet import UNetModel, attention_layer_heads

UNET_2D, UNET_2D_CONDITION = 'UNet2DModel', 'UNet2DConditionModel'
_DIFFUSERS_FILES = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')

# Settings that change the architecture away from the paper's U-Net: the values we can represent
# (the first is diffusers' default, used when a config leaves the setting out).
_COMMON_SETTINGS = {
    'center_input_sample': (False,),
    'time_embedding_type': ('positional',),
    'flip_sin_to_cos': (True,),   # the paper's embedding is [cos, sin]
    'freq_shift': (0,),           # and its frequencies exp(-log(10000) i / half)
    'act_fn': ('silu', 'swish'),
    'norm_num_groups': (32,),     # GroupNorm32 everywhere
    'norm_eps': (1e-5,),
    'downsample_padding': (1,),   # 0 pads asymmetrically
    'mid_block_scale_factor': (1,),
    'class_embed_type': (None,),  # num_class_embeds alone is the paper's label_emb
}
_SETTINGS = {
    UNET_2D: {**_COMMON_SETTINGS, 'mid_block_type': ('UNetMidBlock2D',), 'add_attention': (True,),
              'downsample_type': ('conv', 'resnet'), 'upsample_type': ('conv', 'resnet'),
              'resnet_time_scale_shift': ('default', 'scale_shift')},
    UNET_2D_CONDITION: {
        **_COMMON_SETTINGS, 'mid_block_type': ('UNetMidBlock2DCrossAttn',),
        'resnet_time_scale_shift': ('default', 'scale_shift'),
        'use_linear_projection': (False,), 'dual_cross_attention': (False,),
        'mid_block_only_cross_attention': (None, False), 'addition_embed_type': (None,),
        'encoder_hid_dim': (None,), 'encoder_hid_dim_type': (None,), 'time_embedding_act_fn': (None,),
        'timestep_post_act': (None,), 'time_cond_proj_dim': (None,), 'conv_in_kernel': (3,),
        'conv_out_kernel': (3,), 'attention_type': ('default',), 'class_embeddings_concat': (False,),
        'cross_attention_norm': (None,), 'resnet_skip_time_act': (False,),
        'resnet_out_scale_factor': (1,)},
}
# Structural settings left out of a config take diffusers' defaults.
_DEFAULTS = {
    UNET_2D: dict(in_channels=3, out_channels=3, block_out_channels=(224, 448, 672, 896),
                  layers_per_block=2, attention_head_dim=8, dropout=0.0,
                  down_block_types=('DownBlock2D',) + ('AttnDownBlock2D',) * 3,
                  up_block_types=('AttnUpBlock2D',) * 3 + ('UpBlock2D',)),
    UNET_2D_CONDITION: dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                            layers_per_block=2, attention_head_dim=8, dropout=0.0,
                            cross_attention_dim=1280, transformer_layers_per_block=1,
                            only_cross_attention=False,
                            down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
                            up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3),
}
# Block type -> (has attention, how it resamples: 'conv', 'resnet' or per down/upsample_type).
_DOWN_BLOCKS = {
    UNET_2D: {'DownBlock2D': (False, 'conv'), 'AttnDownBlock2D': (True, 'downsample_type'),
              'ResnetDownsampleBlock2D': (False, 'resnet')},
    UNET_2D_CONDITION: {'DownBlock2D': (False, 'conv'), 'CrossAttnDownBlock2D': (True, 'conv'),
                        'ResnetDownsampleBlock2D': (False, 'resnet')},
}
_UP_BLOCKS = {
    UNET_2D: {'UpBlock2D': (False, 'conv'), 'AttnUpBlock2D': (True, 'upsample_type'),
              'ResnetUpsampleBlock2D': (False, 'resnet')},
    UNET_2D_CONDITION: {'UpBlock2D': (False, 'conv'), 'CrossAttnUpBlock2D': (True, 'conv'),
                        'ResnetUpsampleBlock2D': (False, 'resnet')},
}


def unet_kwargs_from_diffusers_config(config: dict) -> dict:
  """Keyword arguments of our UNetModel for a diffusers UNet2DModel or UNet2DConditionModel config
  (its config.json as a dict). ConfigError names the first setting our U-Net cannot represent."""
  kind = _model_class(config)
  where = f'diffusers {kind} config'
  setting = lambda name: config.get(name, _DEFAULTS[kind].get(name))

  for name, allowed in _SETTINGS[kind].items():
    value = config.get(name, allowed[0])
    if value not in allowed:
      raise ConfigError(f'{where}: {name}={value!r} has no counterpart in the paper\'s U-Net '
                        f'(supported: {", ".join(map(repr, allowed))})')

  channels = [int(c) for c in setting('block_out_channels')]
  levels = len(channels)
  down_types = [_strip(t) for t in setting('down_block_types')]
  up_types = [_strip(t) for t in setting('up_block_types')]
  if len(down_types) != levels or len(up_types) != levels:
    raise ConfigError(f'{where}: block_out_channels has {levels} levels, down_block_types '
                      f'{len(down_types)} and up_block_types {len(up_types)}')
  if any(c % channels[0] for c in channels):
    raise ConfigError(f'{where}: block_out_channels={tuple(channels)} are not multiples of the '
                      'first (the paper\'s channel_mult are integers)')
  time_embedding_dim = config.get('time_embedding_dim')
  if time_embedding_dim not in (None, 4 * channels[0]):
    raise ConfigError(f'{where}: time_embedding_dim={time_embedding_dim}; the paper\'s is 4 * '
                      f'block_out_channels[0] = {4 * channels[0]}')

  down = [_block(kind, where, 'down_block_types', _DOWN_BLOCKS, t, config.get('downsample_type', 'conv'))
          for t in down_types]
  up = [_block(kind, where, 'up_block_types', _UP_BLOCKS, t, config.get('upsample_type', 'conv'))
        for t in up_types]
  attention_levels = [level for level in range(levels) if down[level][0]]
  for level in range(levels):
    if down[level][0] != up[levels - 1 - level][0]:
      raise ConfigError(f'{where}: down_block_types[{level}]={down_types[level]!r} and '
                        f'up_block_types[{levels - 1 - level}]={up_types[levels - 1 - level]!r} '
                        'differ in attention; the paper attends at the same resolutions on both paths')
  # Only blocks that resample count: the last down block and the last up block do not.
  resamplers = {down[level][1] for level in range(levels - 1)} | {up[i][1] for i in range(levels - 1)}
  if len(resamplers) > 1:
    raise ConfigError(f'{where}: down_block_types {tuple(down_types)} and up_block_types '
                      f'{tuple(up_types)} mix conv and ResNet resampling; the paper\'s '
                      'resblock_updown uses one kind throughout')

  kwargs = dict(
      in_channels=int(setting('in_channels')), out_channels=int(setting('out_channels')),
      model_channels=channels[0], channel_mult=tuple(c // channels[0] for c in channels),
      num_res_blocks=_uniform(where, 'layers_per_block', setting('layers_per_block'), range(levels)),
      attention_resolutions=tuple(2 ** level for level in attention_levels),
      dropout=float(setting('dropout')), conv_resample=True,
      use_scale_shift_norm=config.get('resnet_time_scale_shift', 'default') == 'scale_shift',
      resblock_updown=resamplers == {'resnet'}, num_heads_upsample=-1)
  if config.get('num_class_embeds') is not None:
    kwargs['num_classes'] = int(config['num_class_embeds'])
  # The middle block always attends (mid_block_type and add_attention are checked above).
  attending = attention_levels + [levels - 1]
  if kind == UNET_2D:
    kwargs.update(_unet_2d_heads(config, where, channels, attending))
  else:
    kwargs.update(_condition_heads(config, where, channels, attending))
    kwargs.update(_transformer_settings(config, where, setting, attending, levels))
  return kwargs


def params_from_diffusers_unet_state_dict(state_dict: StateDict, abstract_params: Any,
                                          unet_kwargs: dict) -> Any:
  """Our params (numpy, the structure of `abstract_params`) from a diffusers UNet2DModel or
  UNet2DConditionModel state dict.

  `abstract_params` is the 'params' collection of `UNetModel(**unet_kwargs)` (e.g. from
  jax.eval_shape of its init); `unet_kwargs` says where each block sits and, for fusing q, k and v,
  how many heads each attention layer has (diffusers' state dict does not). CheckpointError names
  the first missing, unexpected or misshapen tensor.
  """
  model = UNetModel(**unet_kwargs)
  layers = _layer_prefixes(model)
  state_dict = _fuse_attention_qkv(state_dict, layers, model)
  return _convert(state_dict, abstract_params, 'diffusers U-Net',
                  lambda path: _diffusers_keys(path, layers), ignored=lambda key: False, model='U-Net')


def load_diffusers_unet(path: str | Path) -> tuple[dict, Any]:
  """(UNetModel kwargs, params) from a diffusers model folder: config.json beside
  diffusion_pytorch_model.safetensors or .bin, directly or under unet/ (a pipeline folder)."""
  from latent_diffusion import torch_files  # pylint: disable=g-import-not-at-top

  folder = _model_folder(Path(path))
  try:
    config = json.loads((folder / 'config.json').read_text())
  except (OSError, ValueError) as error:
    raise CheckpointError(f'{folder / "config.json"} cannot be read as JSON: {error}') from None
  try:
    kwargs = unet_kwargs_from_diffusers_config(config)
  except ConfigError as error:
    raise ConfigError(f'{folder / "config.json"}: {error}') from None
  file = next(folder / name for name in _DIFFUSERS_FILES if (folder / name).is_file())
  state_dict = torch_files.load_state_dict(file)
  try:
    params = params_from_diffusers_unet_state_dict(state_dict, abstract_unet_params(kwargs), kwargs)
  except CheckpointError as error:
    raise CheckpointError(f'{file}: {error}') from None
  return kwargs, params


def abstract_unet_params(unet_kwargs: dict) -> Any:
  """ShapeDtypeStructs of UNetModel(**unet_kwargs)'s params, built without computing anything."""
  model = UNetModel(**unet_kwargs)
  size = 2 ** (len(model.channel_mult) - 1)
  inputs = dict(x=jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32),
                timesteps=jax.ShapeDtypeStruct((1,), jnp.int32))
  if model.use_spatial_transformer:
    inputs['context'] = jax.ShapeDtypeStruct((1, 1, model.context_dim), jnp.float32)
  if model.num_classes > 0:
    inputs['y'] = jax.ShapeDtypeStruct((1,), jnp.int32)
  return jax.eval_shape(lambda inputs: model.init(jax.random.PRNGKey(0), **inputs), inputs)['params']


# ---------------------------------------------------------------------------------------------
# Config


def _model_class(config: dict) -> str:
  kind = config.get('_class_name')
  if kind is None:  # a hand-written config: tell the two apart by cross-attention
    down_types = config.get('down_block_types', ())
    return UNET_2D_CONDITION if ('cross_attention_dim' in config or
                                 any('CrossAttn' in t for t in down_types)) else UNET_2D
  if kind not in (UNET_2D, UNET_2D_CONDITION):
    raise ConfigError(f'diffusers config: _class_name={kind!r} is not a U-Net we convert '
                      f'({UNET_2D} or {UNET_2D_CONDITION})')
  return kind


def _strip(block_type: str) -> str:
  return block_type[len('UNetRes'):] if block_type.startswith('UNetRes') else block_type


def _block(kind, where, field, table, block_type, resample_setting) -> tuple[bool, str]:
  """(attends, resampling kind) of one diffusers block type."""
  if block_type not in table[kind]:
    raise ConfigError(f'{where}: {field} holds {block_type!r}, which has no counterpart in the paper\'s '
                      f'U-Net (supported: {", ".join(table[kind])})')
  attends, resample = table[kind][block_type]
  return attends, resample_setting if resample in ('downsample_type', 'upsample_type') else resample


def _per_level(value, levels: int) -> list:
  return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _uniform(where: str, name: str, value, levels) -> Any:
  """The one value a per-level setting takes at `levels`; ConfigError when they differ."""
  levels = list(levels)
  values = _per_level(value, max(levels, default=0) + 1)
  chosen = {_hashable(values[level]) for level in levels}
  if len(chosen) != 1:
    raise ConfigError(f'{where}: {name}={value!r} differs between levels; the paper\'s U-Net uses one '
                      'value throughout')
  return values[levels[0]]


def _hashable(value):
  return tuple(value) if isinstance(value, list) else value


def _unet_2d_heads(config, where, channels, attending) -> dict:
  """UNet2DModel: attention_head_dim is the width of a head (None: one head per layer)."""
  attn_groups = config.get('attn_norm_num_groups')
  if attn_groups is None and config.get('resnet_time_scale_shift', 'default') != 'default':
    raise ConfigError(f'{where}: attn_norm_num_groups=None with resnet_time_scale_shift='
                      f'{config["resnet_time_scale_shift"]!r} leaves the middle attention without its '
                      'GroupNorm, which the paper\'s AttentionBlock always has (set 32)')
  if attn_groups not in (None, 32):
    raise ConfigError(f'{where}: attn_norm_num_groups={attn_groups}; the paper\'s AttentionBlock '
                      'normalises with 32 groups')
  head_dim = config.get('attention_head_dim', _DEFAULTS[UNET_2D]['attention_head_dim'])
  if head_dim is None:
    return dict(num_heads=1, num_head_channels=-1)
  for level in attending:
    if channels[level] % head_dim:
      raise ConfigError(f'{where}: attention_head_dim={head_dim} does not divide the '
                        f'{channels[level]} channels of level {level}')
  return dict(num_heads=-1, num_head_channels=int(head_dim))


def _condition_heads(config, where, channels, attending) -> dict:
  """UNet2DConditionModel: attention_head_dim (a historic misnomer) is the number of heads."""
  name = 'num_attention_heads' if config.get('num_attention_heads') is not None else 'attention_head_dim'
  value = config.get(name, _DEFAULTS[UNET_2D_CONDITION]['attention_head_dim'])
  heads = _per_level(value, len(channels))
  if len(heads) != len(channels):
    raise ConfigError(f'{where}: {name}={value!r} does not have one entry per level')
  used = {int(heads[level]) for level in attending}
  if len(used) == 1:  # one head count: diffusers' and the paper's head width are both C // heads
    return dict(num_heads=used.pop(), num_head_channels=-1)
  widths = {channels[level] // heads[level] for level in attending}
  if len(widths) == 1 and all(channels[level] % heads[level] == 0 for level in attending):
    return dict(num_heads=-1, num_head_channels=widths.pop())
  raise ConfigError(f'{where}: {name}={value!r} (heads per level) gives neither one head count nor one '
                    'head width at the attending levels; the paper\'s U-Net has one of the two')


def _transformer_settings(config, where, setting, attending, levels) -> dict:
  """The SpatialTransformer: depth and context width, each one value throughout."""
  only_cross = _per_level(setting('only_cross_attention'), levels)
  if any(only_cross):
    raise ConfigError(f'{where}: only_cross_attention={setting("only_cross_attention")!r}; the paper\'s '
                      'transformer blocks self-attend before they cross-attend')
  # Per level, then per layer of the level (diffusers allows a depth per layer).
  depths = [_per_level(d, 1) for d in _per_level(setting('transformer_layers_per_block'), levels)]
  used = [d for level in attending for d in depths[level]]
  reverse = config.get('reverse_transformer_layers_per_block')
  if reverse is not None:  # the up blocks' depths, from the lowest resolution up
    used += [d for i in range(levels) if levels - 1 - i in attending for d in _per_level(reverse[i], 1)]
  if len(set(used)) != 1:
    raise ConfigError(f'{where}: transformer_layers_per_block={setting("transformer_layers_per_block")!r}'
                      + (f' / reverse_transformer_layers_per_block={reverse!r}' if reverse else '')
                      + ' differs between blocks; the paper\'s transformer_depth is one number')
  context_dim = _uniform(where, 'cross_attention_dim', setting('cross_attention_dim'), attending)
  return dict(use_spatial_transformer=True, transformer_depth=int(used[0]),
              context_dim=int(context_dim))


# ---------------------------------------------------------------------------------------------
# State dict

_PLAIN, _RESBLOCK, _ATTENTION, _TRANSFORMER = 'plain', 'resblock', 'attention', 'transformer'
_RESBLOCK_CHILDREN = {'in_norm': 'norm1', 'in_conv': 'conv1', 'emb_dense': 'time_emb_proj',
                      'out_norm': 'norm2', 'out_conv': 'conv2', 'skip_connection': 'conv_shortcut'}
# Current diffusers names first, then those of files saved before diffusers 0.14.
_QKV_NAMES = (('to_q', 'to_k', 'to_v'), ('query', 'key', 'value'))
_FUSED_QKV = 'to_q+to_k+to_v'  # the key the fused tensor is filed under (and named by in errors)
_ATTENTION_CHILDREN = {'norm': ('group_norm',), 'qkv': (_FUSED_QKV,), 'proj_out': ('to_out.0', 'proj_attn')}


def _layer_prefixes(model: UNetModel) -> dict[str, tuple[str, str]]:
  """Our top-level module name -> (diffusers module prefix, kind of layer), walking the blocks in
  the order UNetModel builds them."""
  attention = _TRANSFORMER if model.use_spatial_transformer else _ATTENTION
  levels, per_level = len(model.channel_mult), model.num_res_blocks

  def resampler(prefix):
    return (prefix, _RESBLOCK) if model.resblock_updown else (f'{prefix}.conv', _PLAIN)

  layers = {'time_embed_0': ('time_embedding.linear_1', _PLAIN),
            'time_embed_2': ('time_embedding.linear_2', _PLAIN),
            'label_emb': ('class_embedding', _PLAIN), 'input_blocks_0_layers_0': ('conv_in', _PLAIN),
            'out_norm': ('conv_norm_out', _PLAIN), 'out_conv': ('conv_out', _PLAIN),
            'middle_block_layers_0': ('mid_block.resnets.0', _RESBLOCK),
            'middle_block_layers_1': ('mid_block.attentions.0', attention),
            'middle_block_layers_2': ('mid_block.resnets.1', _RESBLOCK)}
  block, ds = 1, 1
  for level in range(levels):
    for j in range(per_level):
      layers[f'input_blocks_{block}_layers_0'] = (f'down_blocks.{level}.resnets.{j}', _RESBLOCK)
      if ds in model.attention_resolutions:
        layers[f'input_blocks_{block}_layers_1'] = (f'down_blocks.{level}.attentions.{j}', attention)
      block += 1
    if level != levels - 1:
      layers[f'input_blocks_{block}_layers_0'] = resampler(f'down_blocks.{level}.downsamplers.0')
      block, ds = block + 1, ds * 2
  block = 0
  for level in reversed(range(levels)):
    up = levels - 1 - level
    for i in range(per_level + 1):
      names = [(f'up_blocks.{up}.resnets.{i}', _RESBLOCK)]
      if ds in model.attention_resolutions:
        names.append((f'up_blocks.{up}.attentions.{i}', attention))
      if level and i == per_level:
        names.append(resampler(f'up_blocks.{up}.upsamplers.0'))
      for layer, name in enumerate(names):
        layers[f'output_blocks_{block}_layers_{layer}'] = name
      block += 1
    ds //= 2
  return layers


def _leaf_suffix(leaf: str) -> str:
  return {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'embedding': 'weight'}[leaf]


def _transformer_child(name: str) -> str:
  """`transformer_blocks_0` -> `transformer_blocks.0`, `to_out_0` -> `to_out.0`, `net_0_proj` ->
  `net.0.proj`; other names are diffusers' own."""
  name = re.sub(r'^transformer_blocks_(\d+)$', r'transformer_blocks.\1', name)
  return {'to_out_0': 'to_out.0', 'net_0_proj': 'net.0.proj', 'net_2': 'net.2'}.get(name, name)


def _diffusers_keys(path: tuple[str, ...], layers: dict[str, tuple[str, str]]) -> list[str]:
  """Our parameter path -> candidate diffusers keys (current names first)."""
  top, *children, leaf = path
  prefix, kind = layers.get(top, (top, _PLAIN))
  if kind == _RESBLOCK:
    choices = [[_RESBLOCK_CHILDREN.get(name, name) for name in children]]
  elif kind == _ATTENTION and children and children[0] in _ATTENTION_CHILDREN:
    choices = [[name] + children[1:] for name in _ATTENTION_CHILDREN[children[0]]]
  elif kind == _TRANSFORMER:
    choices = [[_transformer_child(name) for name in children]]
  else:
    choices = [children]
  return ['.'.join([prefix, *names, _leaf_suffix(leaf)]) for names in choices]


def _attention_heads(model: UNetModel, top: str, channels: int) -> int:
  """Heads of our AttentionBlock `top` with `channels` channels, by the paper's rules."""
  block_heads = model.num_heads
  if top.startswith('output_blocks_') and model.num_heads_upsample != -1:
    block_heads = model.num_heads_upsample
  heads, _ = attention_layer_heads(channels, model.num_heads, model.num_head_channels, model.legacy,
                                   False, block_heads)
  return heads


def _fuse_attention_qkv(state_dict: StateDict, layers, model: UNetModel) -> StateDict:
  """A copy of `state_dict` with each self-attention's q, k and v Linear layers (out, in) fused into
  one (3C, C) tensor in our qkv order, under `<prefix>.to_q+to_k+to_v.{weight,bias}`."""
  state_dict = dict(state_dict)
  for top, (prefix, kind) in layers.items():
    if kind != _ATTENTION:
      continue
    for names in _QKV_NAMES:
      keys = {leaf: [f'{prefix}.{name}.{leaf}' for name in names] for leaf in ('weight', 'bias')}
      present = [key for group in keys.values() for key in group if key in state_dict]
      if not present:
        continue
      absent = [key for group in keys.values() for key in group if key not in state_dict]
      if absent:
        raise CheckpointError(f'diffusers U-Net checkpoint has {present[0]} but lacks {absent[0]}')
      weights = [np.asarray(state_dict.pop(key)) for key in keys['weight']]
      biases = [np.asarray(state_dict.pop(key)) for key in keys['bias']]
      shapes = {w.shape[:2] for w in weights} | {(b.shape[0], weights[0].shape[1]) for b in biases}
      if len(shapes) != 1 or any(w.ndim not in (2, 4) for w in weights):
        raise CheckpointError(
            f'diffusers U-Net checkpoint: {prefix} has q, k, v tensors of shapes '
            f'{[tuple(a.shape) for a in weights + biases]}; they must be (C, C) and (C,) alike')
      channels = weights[0].shape[0]
      heads = _attention_heads(model, top, channels)
      state_dict[f'{prefix}.{_FUSED_QKV}.weight'] = _fuse(
          [w.reshape(channels, -1) for w in weights], heads, model.use_new_attention_order)
      state_dict[f'{prefix}.{_FUSED_QKV}.bias'] = _fuse(biases, heads, model.use_new_attention_order)
      break
  return state_dict


def _fuse(parts: list[np.ndarray], heads: int, new_order: bool) -> np.ndarray:
  """q, k, v tensors (C, ...) -> (3C, ...): ([q|k|v], heads, head_dim) in the new attention order,
  (heads, [q|k|v], head_dim) in the legacy one."""
  stacked = np.stack(parts)                                  # (3, C, ...)
  if new_order:
    return stacked.reshape(-1, *stacked.shape[2:])
  three, channels, *rest = stacked.shape
  per_head = stacked.reshape(three, heads, channels // heads, *rest)
  return np.swapaxes(per_head, 0, 1).reshape(three * channels, *rest)


def _model_folder(path: Path) -> Path:
  if not path.exists():
    raise CheckpointError(f'diffusers U-Net folder {path} does not exist')
  for folder in (path, path / 'unet'):
    if (folder / 'config.json').is_file() and any((folder / n).is_file() for n in _DIFFUSERS_FILES):
      return folder
  raise CheckpointError(f'{path} is not a diffusers U-Net folder: it holds no config.json beside '
                        f'{_DIFFUSERS_FILES[0]} or {_DIFFUSERS_FILES[1]} (nor under unet/)')
