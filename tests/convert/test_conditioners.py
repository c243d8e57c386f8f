"""Tests for convert/conditioners.py: key names of the paper's TransformerEmbedder and SpatialRescaler
(x-transformers 0.10.2 modules built here), LDM-checkpoint prefixes, and the errors. The numbers of
converted models against the paper's are tested in tests/models/test_conditioners.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import x_transformers

from latent_diffusion.convert import conditioners as convert
from latent_diffusion.errors import CheckpointError
from latent_diffusion.models.conditioners import SpatialRescaler, TransformerEmbedder


@pytest.fixture(scope='module')
def embedder_case():
  """(abstract params of our TransformerEmbedder, the paper's state dict as in an LDM checkpoint)."""
  torch.manual_seed(0)
  wrapper = x_transformers.TransformerWrapper(num_tokens=30, max_seq_len=6,
                                              attn_layers=x_transformers.Encoder(dim=16, depth=2))
  state_dict = {f'{convert.LDM_PREFIX}transformer.{key}': value.numpy()
                for key, value in wrapper.state_dict().items()}
  state_dict['model.diffusion_model.out.2.weight'] = np.zeros((3, 4, 3, 3), np.float32)  # not ours
  model = TransformerEmbedder(n_embed=16, n_layer=2, vocab_size=30, max_seq_len=6)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 6), jnp.int32))['params']
  return abstract, state_dict


def test_every_paper_tensor_fills_one_parameter_of_ours(embedder_case):
  abstract, state_dict = embedder_case
  params = convert.params_from_paper_transformer_state_dict(state_dict, abstract,
                                                            prefix=convert.LDM_PREFIX + 'transformer.')
  prefix = convert.LDM_PREFIX + 'transformer.'
  np.testing.assert_array_equal(params['pos_emb']['embedding'], state_dict[prefix + 'pos_emb.emb.weight'])
  np.testing.assert_array_equal(params['attn_layers']['layers_2_1']['to_v']['kernel'],
                                state_dict[prefix + 'attn_layers.layers.2.1.to_v.weight'].T)
  np.testing.assert_array_equal(params['attn_layers']['layers_3_1']['net_0_0']['bias'],
                                state_dict[prefix + 'attn_layers.layers.3.1.net.0.0.bias'])
  np.testing.assert_array_equal(params['attn_layers']['layers_1_0']['scale'],
                                state_dict[prefix + 'attn_layers.layers.1.0.weight'])
  converted = sum(leaf.size for leaf in jax.tree.leaves(params))
  assert converted == sum(value.size for key, value in state_dict.items() if key.startswith(prefix))


def test_paper_keys_of_our_paths():
  assert convert.paper_conditioner_key(('attn_layers', 'layers_13_1', 'to_out', 'kernel')) == \
      'attn_layers.layers.13.1.to_out.weight'
  assert convert.paper_conditioner_key(('token_emb', 'embedding')) == 'token_emb.weight'
  assert convert.paper_conditioner_key(('norm', 'scale')) == 'norm.weight'
  assert convert.paper_conditioner_key(('to_logits', 'bias')) == 'to_logits.bias'


def test_missing_tensor_is_named(embedder_case):
  abstract, state_dict = embedder_case
  prefix = convert.LDM_PREFIX + 'transformer.'
  partial = {key: value for key, value in state_dict.items() if 'layers.3.1.net.2.weight' not in key}
  with pytest.raises(CheckpointError, match=r'lacks cond_stage_model\.transformer\.attn_layers\.layers\.3\.1'
                                            r'\.net\.2\.weight'):
    convert.params_from_paper_transformer_state_dict(partial, abstract, prefix=prefix)


def test_unused_tensor_under_the_prefix_is_named(embedder_case):
  abstract, state_dict = embedder_case
  prefix = convert.LDM_PREFIX + 'transformer.'
  extra = dict(state_dict, **{prefix + 'attn_layers.layers.4.0.weight': np.ones(16, np.float32)})
  with pytest.raises(CheckpointError, match=r'has cond_stage_model\.transformer\.attn_layers\.layers\.4\.0'
                                            r'\.weight.*does the cond_stage \(transformer\) config match'):
    convert.params_from_paper_transformer_state_dict(extra, abstract, prefix=prefix)


def test_vocabulary_size_mismatch_names_shapes(embedder_case):
  _, state_dict = embedder_case
  model = TransformerEmbedder(n_embed=16, n_layer=2, vocab_size=31, max_seq_len=6)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 6), jnp.int32))['params']
  with pytest.raises(CheckpointError, match=r'has shape \(30,.*\) in the checkpoint, the model needs \(31,'):
    convert.params_from_paper_transformer_state_dict(state_dict, abstract,
                                                     prefix=convert.LDM_PREFIX + 'transformer.')


@pytest.mark.parametrize('bias', [False, True])
def test_rescaler_channel_mapper_from_an_ldm_checkpoint(bias):
  conv = torch.nn.Conv2d(182, 3, 1, bias=bias)
  state_dict = {f'{convert.LDM_PREFIX}channel_mapper.{key}': value.detach().numpy()
                for key, value in conv.state_dict().items()}
  model = SpatialRescaler(n_stages=2, in_channels=182, out_channels=3, bias=bias)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 8, 8, 182), jnp.float32))['params']
  params = convert.params_from_paper_rescaler_state_dict(state_dict, abstract, prefix=convert.LDM_PREFIX)
  np.testing.assert_array_equal(params['channel_mapper']['kernel'],
                                conv.weight.detach().numpy()[:, :, 0, 0].T)
  assert ('bias' in params['channel_mapper']) == bias
