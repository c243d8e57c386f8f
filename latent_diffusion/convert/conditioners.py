"""The paper's conditioning encoders (ldm/modules/encoders/modules.py) from PyTorch state dicts -> our
params (models/conditioners.py). Pure numpy.

TransformerEmbedder / BERTEmbedder: its TransformerWrapper sits under `transformer.` (in an LDM
checkpoint under `cond_stage_model.transformer.`):
  token_emb.weight, pos_emb.emb.weight, attn_layers.layers.{j}.0.{weight,bias} (LayerNorm),
  attn_layers.layers.{2i}.1.{to_q,to_k,to_v}.weight, ...{2i}.1.to_out.{weight,bias} (attention),
  attn_layers.layers.{2i+1}.1.net.{0.0,2}.{weight,bias} (feed-forward), norm.{weight,bias},
  to_logits.{weight,bias}.
SpatialRescaler: channel_mapper.weight (out, in, 1, 1) [and .bias] (in an LDM checkpoint under
`cond_stage_model.`).
Linear (out, in) and 1x1 Conv2d (out, in, 1, 1) -> Dense (in, out); LayerNorm weight -> scale;
Embedding weight -> embedding. Missing, unused (under the prefix) or misshapen tensors raise a
CheckpointError.
"""

import re
from typing import Any

from latent_diffusion.convert.autoencoder import StateDict, _convert

TRANSFORMER_PREFIX = 'transformer.'     # in the TransformerEmbedder / BERTEmbedder's own state dict
LDM_PREFIX = 'cond_stage_model.'         # where an LDM Lightning checkpoint keeps the cond_stage_model
_LEAVES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'embedding': 'weight'}


def paper_conditioner_key(path: tuple[str, ...]) -> str:
  """Our parameter path -> the paper's key (without prefix).

  ('attn_layers', 'layers_3_1', 'net_0_0', 'kernel') -> 'attn_layers.layers.3.1.net.0.0.weight';
  ('pos_emb', 'embedding') -> 'pos_emb.emb.weight'.
  """
  *modules, leaf = path
  names = [re.sub(r'_(\d+)', r'.\1', name) for name in modules]
  if names == ['pos_emb']:  # AbsolutePositionalEmbedding keeps its nn.Embedding as `emb`
    names.append('emb')
  return '.'.join(names + [_LEAVES[leaf]])


def params_from_paper_transformer_state_dict(state_dict: StateDict, abstract_params: Any,
                                             prefix: str = TRANSFORMER_PREFIX) -> Any:
  """Our TransformerEmbedder params (numpy, the structure of `abstract_params`, e.g.
  jax.eval_shape(model.init, ...)['params']) from the paper's TransformerEmbedder / BERTEmbedder
  state dict. `prefix`: where the TransformerWrapper's keys start ('transformer.' in the embedder's
  own state dict, LDM_PREFIX + 'transformer.' in an LDM checkpoint, '' for a bare wrapper)."""
  return _from_paper(state_dict, abstract_params, prefix, 'cond_stage (transformer)')


def params_from_paper_rescaler_state_dict(state_dict: StateDict, abstract_params: Any,
                                          prefix: str = '') -> Any:
  """Our SpatialRescaler params from the paper's SpatialRescaler state dict (`channel_mapper.weight`
  [, `.bias`]); `prefix` LDM_PREFIX for an LDM checkpoint."""
  return _from_paper(state_dict, abstract_params, prefix, 'cond_stage (spatial_rescaler)')


def _from_paper(state_dict: StateDict, abstract_params: Any, prefix: str, model: str) -> Any:
  return _convert(state_dict, abstract_params, 'paper', lambda path: [prefix + paper_conditioner_key(path)],
                  ignored=lambda key: not key.startswith(prefix), model=model)
