"""A whole LDM from elsewhere: the denoiser's params (U-Net, conditioning model) and scale_factor.

Sources:
  a paper Lightning checkpoint (.ckpt of CompVis/latent-diffusion): `model.diffusion_model.*` (or the
      EMA copy `model_ema.diffusion_model*`), `cond_stage_model.*` (the ClassEmbedder's
      `embedding.weight`), `scale_factor`; its `first_stage_model.*` goes to the stage-1 converter.
  a diffusers pipeline folder (`unet/` beside `vae/` or `vqvae/`, e.g. LDMPipeline): the U-Net, and the
      first stage's `scaling_factor` from its config.json.
"""

import json
from pathlib import Path
from typing import Any

import numpy as np

from latent_diffusion.convert import unet_diffusers, unet_paper
from latent_diffusion.errors import CheckpointError

CLASS_EMBEDDING = 'cond_stage_model.embedding.weight'
FIRST_STAGE_FOLDERS = ('vae', 'vqvae')


def load_denoiser_params(source: str | Path, abstract_params: dict, unet_kwargs: dict,
                         use_ema: bool = True) -> tuple[dict, float | None]:
  """(params of the structure of `abstract_params` {'unet', ['cond_stage']}, scale_factor or None).

  `unet_kwargs`: our UNetModel's keyword arguments (the diffusers converter needs its head counts).
  `use_ema`: from a paper checkpoint, take the EMA copy of the U-Net when it holds one.
  """
  path = Path(source)
  if not path.exists():
    raise CheckpointError(f'LDM checkpoint {path} does not exist')
  if path.is_dir():
    return _from_diffusers(path, abstract_params, unet_kwargs)
  return _from_paper(path, abstract_params, use_ema)


def _from_paper(path: Path, abstract_params: dict, use_ema: bool):
  from latent_diffusion import torch_files  # pylint: disable=g-import-not-at-top
  state_dict = torch_files.load_state_dict(path)
  if not any(key.startswith(unet_paper.PAPER_PREFIX) for key in state_dict):
    raise CheckpointError(f'{path}: not a paper LDM checkpoint (no {unet_paper.PAPER_PREFIX}* keys)')
  ema = use_ema and any(key.startswith(unet_paper.EMA_PREFIX) for key in state_dict)
  try:
    params = {'unet': unet_paper.params_from_paper_unet_state_dict(state_dict, abstract_params['unet'],
                                                                   ema=ema)}
    if 'cond_stage' in abstract_params:
      params['cond_stage'] = {'embedding': {'embedding': _class_embedding(
          state_dict, abstract_params['cond_stage']['embedding']['embedding'])}}
  except CheckpointError as error:
    raise CheckpointError(f'{path}: {error}') from None
  scale_factor = float(np.asarray(state_dict['scale_factor'])) if 'scale_factor' in state_dict else None
  return params, scale_factor


def _class_embedding(state_dict, target) -> np.ndarray:
  if CLASS_EMBEDDING not in state_dict:
    raise CheckpointError(f'checkpoint lacks {CLASS_EMBEDDING}: cond_stage.kind=class needs the '
                          'paper\'s ClassEmbedder')
  weight = np.asarray(state_dict[CLASS_EMBEDDING], np.float32)
  if weight.shape != tuple(target.shape):
    raise CheckpointError(f'{CLASS_EMBEDDING} has shape {weight.shape}, cond_stage needs '
                          f'{tuple(target.shape)} (n_classes, embed_dim)')
  return weight


def _from_diffusers(path: Path, abstract_params: dict, unet_kwargs: dict):
  from latent_diffusion import torch_files  # pylint: disable=g-import-not-at-top
  if 'cond_stage' in abstract_params:
    raise CheckpointError(f'{path}: a diffusers pipeline holds no ClassEmbedder; convert the '
                          'class-conditional LDMs from the paper\'s .ckpt')
  folder = path / 'unet' if (path / 'unet').is_dir() else path
  file = next((folder / name for name in ('diffusion_pytorch_model.safetensors', 'diffusion_pytorch_model.bin')
               if (folder / name).is_file()), None)
  if file is None:
    raise CheckpointError(f'{folder} holds no diffusion_pytorch_model.safetensors or .bin')
  try:
    unet = unet_diffusers.params_from_diffusers_unet_state_dict(
        torch_files.load_state_dict(file), abstract_params['unet'], unet_kwargs)
  except CheckpointError as error:
    raise CheckpointError(f'{file}: {error}') from None
  return {'unet': unet}, _diffusers_scaling_factor(path)


def _diffusers_scaling_factor(path: Path) -> float | None:
  for name in FIRST_STAGE_FOLDERS:
    config = path / name / 'config.json'
    if config.is_file():
      try:
        return json.loads(config.read_text()).get('scaling_factor')
      except ValueError as error:
        raise CheckpointError(f'{config} cannot be read as JSON: {error}') from None
  return None
