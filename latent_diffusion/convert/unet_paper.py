"""The paper's diffusion U-Net weights (openaimodel.UNetModel state dict) -> our UNetModel params.

Keys as in CompVis/latent-diffusion checkpoints, under `model.diffusion_model.`:
  time_embed.{0,2}, label_emb.weight, input_blocks.0.0 (conv), input_blocks.{i}.0 (ResBlock:
  in_layers.{0,2}, emb_layers.1, out_layers.{0,3}, skip_connection) or input_blocks.{i}.0.op
  (Downsample), input_blocks.{i}.1 (AttentionBlock: norm, qkv, proj_out, or SpatialTransformer: norm,
  proj_in, transformer_blocks.{d}.{norm1..3, attn1/attn2.{to_q,to_k,to_v,to_out.0}, ff.net.0.proj,
  ff.net.2}, proj_out), middle_block.{0,1,2}, output_blocks.{i}.{j} (Upsample: .conv), out.{0,2},
  id_predictor.{0,1}.
The Lightning EMA copy (LitEma) holds the same tensors as `model_ema.diffusion_model<key without dots>`.
Conv2d OIHW -> HWIO, Linear (out, in) and Conv1d (out, in, 1) -> Dense (in, out), norm weight -> scale.
"""

import re
from typing import Any

import jax
import numpy as np

from latent_diffusion.convert.autoencoder import StateDict, _to_target
from latent_diffusion.errors import CheckpointError

PAPER_PREFIX = 'model.diffusion_model.'
EMA_PREFIX = 'model_ema.'

# ResBlock children: ours -> the paper's Sequential indices.
_RES_BLOCK = {'in_norm': 'in_layers.0', 'in_conv': 'in_layers.2', 'emb_dense': 'emb_layers.1',
              'out_norm': 'out_layers.0', 'out_conv': 'out_layers.3'}
# Top-level and nested names that are not a plain `_` -> `.` rename.
_RENAMES = {'out_norm': 'out.0', 'out_conv': 'out.2', 'to_out_0': 'to_out.0', 'net_0_proj': 'net.0.proj',
            'net_2': 'net.2', 'time_embed_0': 'time_embed.0', 'time_embed_2': 'time_embed.2',
            'id_predictor_0': 'id_predictor.0', 'id_predictor_1': 'id_predictor.1'}
# The AttentionBlock's projections are Conv1d (out, in, 1) in the paper; ours are Dense. (The
# SpatialTransformer's proj_out is a 1x1 Conv2d on both sides: a 4-d kernel, handled as a conv.)
_CONV1D = ('qkv', 'proj_out')
_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'embedding': 'weight'}


def params_from_paper_unet_state_dict(state_dict: StateDict, abstract_params: Any,
                                      prefix: str = PAPER_PREFIX, ema: bool = False) -> Any:
  """Our UNetModel params (numpy, the structure of `abstract_params`) from the paper's state dict.

  `abstract_params`: the target's 'params' collection, e.g. jax.eval_shape(model.init, ...)['params'].
  `prefix`: where the U-Net sits in the checkpoint ('' for a bare U-Net state dict). `ema`: read the
  LitEma copy (`model_ema.diffusion_model...`) instead. Raises CheckpointError for a missing key, an
  unused key under the U-Net's prefix, or a tensor of the wrong shape.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
  paths = [tuple(str(getattr(entry, 'key', entry)) for entry in path) for path, _ in leaves]
  if ema:
    source_prefix = EMA_PREFIX + prefix.removeprefix('model.').replace('.', '')
    source_key = lambda path: source_prefix + paper_unet_key(path).replace('.', '')
  else:
    source_prefix = prefix
    source_key = lambda path: prefix + paper_unet_key(path)
  keys = [source_key(path) for path in paths]
  if len(set(keys)) != len(keys):
    raise AssertionError('two parameters map to one checkpoint key')  # a bug in paper_unet_key

  missing = [(path, key) for path, key in zip(paths, keys) if key not in state_dict]
  if missing:
    path, key = missing[0]
    more = f' and {len(missing) - 1} more' if len(missing) > 1 else ''
    raise CheckpointError(f'U-Net checkpoint lacks {key} (for {"/".join(path)}){more}: does the unet '
                          'config match the checkpoint?')
  unexpected = sorted(set(key for key in state_dict if key.startswith(source_prefix)) - set(keys))
  if unexpected:
    more = f' and {len(unexpected) - 1} more' if len(unexpected) > 1 else ''
    raise CheckpointError(f'U-Net checkpoint has {unexpected[0]}{more}, which the model does not use: '
                          'does the unet config match the checkpoint?')

  values = []
  for path, (_, target), key in zip(paths, leaves, keys):
    tensor = np.asarray(state_dict[key])
    expected = _source_shape(path, tuple(target.shape))
    if tensor.shape != expected:
      raise CheckpointError(
          f'U-Net checkpoint does not fit the model: {key} has shape {tuple(tensor.shape)}, the model '
          f'needs {expected} (for {"/".join(path)}, {tuple(target.shape)} in our layout)')
    values.append(np.asarray(_to_target(tensor, tuple(target.shape), path[-1]), dtype=target.dtype))
  return jax.tree_util.tree_unflatten(treedef, values)


def paper_unet_key(path: tuple[str, ...]) -> str:
  """Our parameter path -> the paper's key (without prefix).

  ('input_blocks_1_layers_0', 'in_conv', 'kernel') -> 'input_blocks.1.0.in_layers.2.weight'.
  """
  top, *children, leaf = path
  block = re.fullmatch(r'(input_blocks|output_blocks)_(\d+)_layers_(\d+)|middle_block_layers_(\d+)', top)
  if block is None:
    names = [_RENAMES.get(top, top)]
  elif block[4] is not None:
    names = [f'middle_block.{block[4]}']
  else:
    names = [f'{block[1]}.{block[2]}.{block[3]}']
    if not children and top != 'input_blocks_0_layers_0':  # a bare conv: Downsample.op / Upsample.conv
      names.append('op' if block[1] == 'input_blocks' else 'conv')
  for name in children:
    if name in _RES_BLOCK:  # before _RENAMES: a ResBlock's out_norm is not the U-Net's out.0
      names.append(_RES_BLOCK[name])
    elif match := re.fullmatch(r'transformer_blocks_(\d+)', name):
      names.append(f'transformer_blocks.{match[1]}')
    else:
      names.append(_RENAMES.get(name, name))
  return '.'.join(names + [_LEAVES[leaf]])


def _source_shape(path: tuple[str, ...], target_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape the paper's tensor has (PyTorch layout) for the target leaf at `path`."""
  *_, module, leaf = path
  if leaf == 'kernel' and len(target_shape) == 4:   # HWIO <- Conv2d OIHW
    height, width, fan_in, fan_out = target_shape
    return (fan_out, fan_in, height, width)
  if leaf == 'kernel' and len(target_shape) == 2:   # Dense (in, out) <- Linear, or the AttentionBlock's Conv1d
    fan_in, fan_out = target_shape
    return (fan_out, fan_in, 1) if module in _CONV1D else (fan_out, fan_in)
  return tuple(target_shape)
