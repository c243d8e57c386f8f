"""Pretrained first-stage weights (AutoencoderKL, VQModel) from PyTorch checkpoints -> our params.

Two layouts are read:
  paper      CompVis/latent-diffusion (and taming-transformers) Lightning checkpoints:
             `encoder.down.1.block.0.conv1.weight`, `decoder.up.2.upsample.conv.weight`, ...
             (a full LDM checkpoint works too: its `first_stage_model.*` part is taken).
  diffusers  diffusers AutoencoderKL / VQModel: `encoder.down_blocks.1.resnets.0.conv1.weight`,
             decoder `up_blocks` listed from the lowest resolution up, attention as Linear layers
             (`to_q`, ... or the older `query`, `key`, `value`, `proj_attn`).
Conv weights OIHW become HWIO kernels, Linear / 1x1-conv attention weights (out, in) become Dense
(in, out) kernels, GroupNorm `weight` is `scale`. Every parameter of the target tree must be filled
from exactly one tensor, with the right shape; anything else is a CheckpointError.
"""

import re
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from latent_diffusion.errors import CheckpointError

PAPER, DIFFUSERS = 'paper', 'diffusers'

# Lightning checkpoints also hold the training loss (LPIPS, discriminator, logvar) and EMA copies;
# `quantize.used` is the remap table, which our VQModel reads from config (`remap`, a .npy path).
_PAPER_IGNORED = ('loss.', 'model_ema.', 'quantize.used')
_LDM_FIRST_STAGE = 'first_stage_model.'
_DIFFUSERS_FILES = ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')

StateDict = dict[str, np.ndarray]


def params_from_paper_state_dict(state_dict: StateDict, abstract_params: Any) -> Any:
  """Our params (numpy, the structure of `abstract_params`) from a paper-layout state dict.

  `abstract_params` is the 'params' collection of the target model, e.g.
  `jax.eval_shape(model.init, rng, image)['params']`; only leaf shapes and dtypes are used.
  """
  state_dict = _first_stage_part(state_dict)
  return _convert(state_dict, abstract_params, PAPER, _paper_keys,
                  ignored=lambda key: key.startswith(_PAPER_IGNORED))


def params_from_diffusers_state_dict(state_dict: StateDict, abstract_params: Any) -> Any:
  """Our params (numpy, the structure of `abstract_params`) from a diffusers AutoencoderKL or
  VQModel state dict."""
  num_levels = _num_levels(abstract_params)
  return _convert(state_dict, abstract_params, DIFFUSERS,
                  lambda path: _diffusers_keys(path, num_levels), ignored=lambda key: False)


def detect_format(state_dict: StateDict) -> str:
  """'paper' or 'diffusers', from the key names; CheckpointError for anything else."""
  keys = list(_first_stage_part(state_dict))
  if any(key.startswith(('encoder.down_blocks.', 'encoder.mid_block.', 'decoder.up_blocks.',
                         'decoder.mid_block.')) for key in keys):
    return DIFFUSERS
  if any(key.startswith(('encoder.down.', 'encoder.mid.', 'decoder.up.', 'decoder.mid.'))
         for key in keys):
    return PAPER
  found = ', '.join(sorted(state_dict)[:3]) if state_dict else 'no tensors'
  raise CheckpointError(
      'not an autoencoder state dict: expected the paper\'s Lightning keys '
      '(encoder.down.0.block.0.conv1.weight, ...) or diffusers keys '
      f'(encoder.down_blocks.0.resnets.0.conv1.weight, ...); found {found}'
      + (f' ({len(state_dict)} keys)' if len(state_dict) > 3 else ''))


def load_autoencoder_params(path: str | Path, abstract_params: Any) -> Any:
  """Our params from a checkpoint file (.ckpt, .pth, .bin, .safetensors) or a diffusers model
  directory (holding diffusion_pytorch_model.safetensors or .bin, directly or under vae/ or vqvae/)."""
  from latent_diffusion import torch_files  # pylint: disable=g-import-not-at-top

  file = _checkpoint_file(Path(path))
  state_dict = torch_files.load_state_dict(file)
  try:
    layout = detect_format(state_dict)
    convert = params_from_paper_state_dict if layout == PAPER else params_from_diffusers_state_dict
    return convert(state_dict, abstract_params)
  except CheckpointError as error:
    raise CheckpointError(f'{file}: {error}') from None


def _checkpoint_file(path: Path) -> Path:
  if not path.exists():
    raise CheckpointError(f'autoencoder checkpoint {path} does not exist')
  if not path.is_dir():
    return path
  for folder in (path, path / 'vae', path / 'vqvae'):
    for name in _DIFFUSERS_FILES:
      if (folder / name).is_file():
        return folder / name
  raise CheckpointError(f'autoencoder checkpoint directory {path} holds no {_DIFFUSERS_FILES[0]} '
                        f'or {_DIFFUSERS_FILES[1]} (nor under vae/ or vqvae/)')


def _first_stage_part(state_dict: StateDict) -> StateDict:
  """The autoencoder of a full LDM checkpoint (keys `first_stage_model.*`); else `state_dict`."""
  if any(key.startswith(('encoder.', 'decoder.')) for key in state_dict):
    return state_dict
  part = {key[len(_LDM_FIRST_STAGE):]: value for key, value in state_dict.items()
          if key.startswith(_LDM_FIRST_STAGE)}
  return part or state_dict


def _num_levels(abstract_params) -> int:
  """Resolution levels of the decoder (diffusers numbers its up_blocks in reverse)."""
  levels = [int(match[1]) for name in abstract_params.get('decoder', {})
            if (match := re.fullmatch(r'up_(\d+)_.*', name))]
  return max(levels, default=-1) + 1


def _leaf_suffix(leaf: str) -> str:
  return {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'embedding': 'embedding.weight'}[leaf]


def _paper_keys(path: tuple[str, ...]) -> list[str]:
  """Our path -> the paper key: `down_1_block_0` is `down.1.block.0`, `mid_attn_1` is `mid.attn_1`."""
  *modules, leaf = path
  renamed = []
  for name in modules:
    name = re.sub(r'^(down|up)_(\d+)_(block|attn)_(\d+)$', r'\1.\2.\3.\4', name)
    name = re.sub(r'^(down|up)_(\d+)_(downsample|upsample)$', r'\1.\2.\3', name)
    name = re.sub(r'^mid_(block_\d+|attn_\d+)$', r'mid.\1', name)
    renamed.append(name)
  return ['.'.join(renamed + [_leaf_suffix(leaf)])]


# Attention sub-layers: ours -> diffusers' current name, then the name older checkpoints use.
_DIFFUSERS_ATTENTION = {'norm': ('group_norm',), 'q': ('to_q', 'query'), 'k': ('to_k', 'key'),
                        'v': ('to_v', 'value'), 'proj_out': ('to_out.0', 'proj_attn')}


def _diffusers_keys(path: tuple[str, ...], num_levels: int) -> list[str]:
  """Our path -> candidate diffusers keys (current name first). Decoder level l is up_blocks[L-1-l]."""
  *modules, leaf = path
  renamed, in_attention = [], False
  for name in modules:
    if in_attention and name in _DIFFUSERS_ATTENTION:
      renamed.append(_DIFFUSERS_ATTENTION[name])
      continue
    in_attention = bool(re.fullmatch(r'(down|up)_\d+_attn_\d+|mid_attn_\d+', name))
    if match := re.fullmatch(r'down_(\d+)_(block|attn)_(\d+)', name):
      name = f'down_blocks.{match[1]}.{_diffusers_list(match[2])}.{match[3]}'
    elif match := re.fullmatch(r'up_(\d+)_(block|attn)_(\d+)', name):
      name = f'up_blocks.{num_levels - 1 - int(match[1])}.{_diffusers_list(match[2])}.{match[3]}'
    elif match := re.fullmatch(r'down_(\d+)_downsample', name):
      name = f'down_blocks.{match[1]}.downsamplers.0'
    elif match := re.fullmatch(r'up_(\d+)_upsample', name):
      name = f'up_blocks.{num_levels - 1 - int(match[1])}.upsamplers.0'
    elif match := re.fullmatch(r'mid_block_(\d+)', name):
      name = f'mid_block.resnets.{int(match[1]) - 1}'
    elif re.fullmatch(r'mid_attn_1', name):
      name = 'mid_block.attentions.0'
    else:
      name = {'norm_out': 'conv_norm_out', 'nin_shortcut': 'conv_shortcut'}.get(name, name)
    renamed.append((name,))
  keys = ['']
  for choices in renamed:
    keys = [f'{key}{choice}.' for choice in choices for key in keys]
  return [key + _leaf_suffix(leaf) for key in keys]


def _diffusers_list(kind: str) -> str:
  return 'resnets' if kind == 'block' else 'attentions'


def _source_shape(target_shape: tuple[int, ...], leaf: str, source_ndim: int) -> tuple[int, ...]:
  """The shape a tensor must have in the checkpoint (PyTorch layout) to fill a target leaf."""
  if leaf == 'kernel' and len(target_shape) == 4:   # HWIO <- OIHW
    height, width, fan_in, fan_out = target_shape
    return (fan_out, fan_in, height, width)
  if leaf == 'kernel' and len(target_shape) == 2:   # Dense (in, out) <- Linear or 1x1 conv
    fan_in, fan_out = target_shape
    return (fan_out, fan_in, 1, 1) if source_ndim == 4 else (fan_out, fan_in)
  return tuple(target_shape)


def _to_target(tensor: np.ndarray, target_shape: tuple[int, ...], leaf: str) -> np.ndarray:
  if leaf == 'kernel' and len(target_shape) == 4:
    return tensor.transpose(2, 3, 1, 0)
  if leaf == 'kernel' and len(target_shape) == 2:
    return tensor.reshape(target_shape[::-1]).T
  return tensor


def _convert(state_dict: StateDict, abstract_params: Any, layout: str,
             source_keys: Callable[[tuple[str, ...]], list[str]],
             ignored: Callable[[str], bool], model: str = 'autoencoder') -> Any:
  """Fill every leaf of `abstract_params` from `state_dict`; missing, unexpected or misshapen
  tensors raise a CheckpointError naming the first one (in our tree's order)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
  paths = [tuple(str(getattr(entry, 'key', entry)) for entry in path) for path, _ in leaves]
  chosen, missing = [], []
  for path in paths:
    candidates = source_keys(path)
    key = next((key for key in candidates if key in state_dict), None)
    chosen.append(key)
    if key is None:
      missing.append((path, candidates[0]))
  if missing:
    path, key = missing[0]
    more = f' and {len(missing) - 1} more' if len(missing) > 1 else ''
    raise CheckpointError(f'{layout} checkpoint lacks {key} (for {"/".join(path)}){more}: '
                          f'does the {model} config match the checkpoint?')
  unexpected = sorted(set(state_dict) - set(chosen) - {key for key in state_dict if ignored(key)})
  if unexpected:
    more = f' and {len(unexpected) - 1} more' if len(unexpected) > 1 else ''
    raise CheckpointError(f'{layout} checkpoint has {unexpected[0]}{more}, which the model does not '
                          f'use: does the {model} config match the checkpoint?')
  values = []
  for path, (_, target), key in zip(paths, leaves, chosen):
    tensor = np.asarray(state_dict[key])
    expected = _source_shape(tuple(target.shape), path[-1], tensor.ndim)
    if tensor.shape != expected:
      raise CheckpointError(
          f'{layout} checkpoint does not fit the model: {"/".join(path)} ({key}) has shape '
          f'{tuple(tensor.shape)} in the checkpoint, the model needs {expected}')
    values.append(np.asarray(_to_target(tensor, tuple(target.shape), path[-1]), dtype=target.dtype))
  return jax.tree_util.tree_unflatten(treedef, values)
