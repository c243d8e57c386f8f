"""Tests for models/conditioners.py: the paper's ClassEmbedder, TransformerEmbedder (against
x-transformers' TransformerWrapper and Encoder) and SpatialRescaler (against torch's F.interpolate and
Conv2d), on the same weights through convert/conditioners.py."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import x_transformers

from latent_diffusion.convert import conditioners as convert
from latent_diffusion.models.conditioners import ClassEmbedder, SpatialRescaler, TransformerEmbedder


def test_class_embedder_matches_the_papers_on_the_same_weights():
  # The paper's ClassEmbedder is torch.nn.Embedding(n_classes, embed_dim)(labels)[:, None].
  torch.manual_seed(0)
  embedding = torch.nn.Embedding(11, 8)
  labels = np.array([0, 3, 10, 3])
  expected = embedding(torch.from_numpy(labels))[:, None].detach().numpy()  # (B, 1, 8)
  ours = ClassEmbedder(n_classes=11, embed_dim=8)
  params = {'embedding': {'embedding': jnp.asarray(embedding.weight.detach().numpy())}}
  got = ours.apply({'params': params}, jnp.asarray(labels))
  assert got.shape == (4, 1, 8)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_class_embedder_gives_each_class_its_own_row():
  model = ClassEmbedder(n_classes=5, embed_dim=4)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32))['params']
  assert params['embedding']['embedding'].shape == (5, 4)
  out = model.apply({'params': params}, jnp.arange(5))
  assert len({tuple(np.round(row, 6)) for row in np.asarray(out[:, 0])}) == 5


# ---------------------------------------------------------------------------------------------------
# TransformerEmbedder against the paper's TransformerWrapper(Encoder) (x-transformers 0.10.2, the
# release of the paper's vendored copy; requirements-reference.txt).

def random_torch_weights(module, seed):
  """Every parameter random at scales that keep activations O(1): matrices N(0, 1/fan_in), norm
  weights N(1, 0.1^2), biases N(0, 0.1^2)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, parameter in module.named_parameters():
      if parameter.ndim > 1:
        parameter.normal_(0.0, 1.0 / math.sqrt(parameter.shape[-1]), generator=generator)
      elif name.endswith('weight'):
        parameter.normal_(1.0, 0.1, generator=generator)
      else:
        parameter.normal_(0.0, 0.1, generator=generator)
  return module.eval()


def paper_transformer_embedder(n_embed, n_layer, vocab_size, max_seq_len, emb_dropout=0.0):
  """The paper's TransformerEmbedder: its `transformer` is this TransformerWrapper."""
  wrapper = x_transformers.TransformerWrapper(num_tokens=vocab_size, max_seq_len=max_seq_len,
                                              attn_layers=x_transformers.Encoder(dim=n_embed, depth=n_layer),
                                              emb_dropout=emb_dropout)
  embedder = torch.nn.Module()
  embedder.transformer = wrapper
  return embedder


def abstract_params(model, length):
  tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)['params']


def count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize('length', [12, 5])
def test_transformer_embedder_matches_the_papers_on_the_same_weights(length, single_torch_thread):
  reference = random_torch_weights(paper_transformer_embedder(64, 2, 100, 12), seed=length)
  state_dict = {key: value.detach().numpy() for key, value in reference.state_dict().items()}
  model = TransformerEmbedder(n_embed=64, n_layer=2, vocab_size=100, max_seq_len=12)
  params = convert.params_from_paper_transformer_state_dict(state_dict, abstract_params(model, 12))
  tokens = np.random.default_rng(length).integers(0, 100, size=(3, length))
  tokens[0, length // 2:] = 0  # padded like a short caption: padding is attended to, as in the paper
  with torch.no_grad():
    expected = reference.transformer(torch.from_numpy(tokens), return_embeddings=True).numpy()
    expected_logits = reference.transformer(torch.from_numpy(tokens)).numpy()
  got = jax.jit(model.apply)({'params': params}, jnp.asarray(tokens, jnp.int32))
  assert got.shape == (3, length, 64) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  logits = jax.jit(functools.partial(model.apply, method=TransformerEmbedder.logits))(
      {'params': params}, jnp.asarray(tokens, jnp.int32))
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('n_embed,n_layer,vocab_size,max_seq_len', [
    (640, 32, 30522, 77),  # text2img256 (BERTEmbedder)
    (512, 16, 8192, 92),   # layout2img-openimages256
])
def test_transformer_embedder_parameter_count_equals_the_papers(n_embed, n_layer, vocab_size, max_seq_len):
  with torch.device('meta'):  # shapes only, no memory
    reference = paper_transformer_embedder(n_embed, n_layer, vocab_size, max_seq_len)
  model = TransformerEmbedder(n_embed=n_embed, n_layer=n_layer, vocab_size=vocab_size,
                              max_seq_len=max_seq_len)
  params = abstract_params(model, max_seq_len)
  assert count(params) == sum(p.numel() for p in reference.parameters())
  assert count(params['to_logits']) == (n_embed + 1) * vocab_size  # kept for the count and checkpoints


@pytest.fixture(scope='module')
def initialised_embedder():
  """A small TransformerEmbedder and its own initial params (one compiled init for the tests below)."""
  model = TransformerEmbedder(n_embed=64, n_layer=1, vocab_size=2000, max_seq_len=77)
  return model, jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32))['params']


def test_transformer_embedder_initialisation_follows_the_papers(initialised_embedder, single_torch_thread):
  model, params = initialised_embedder
  torch.manual_seed(0)
  reference = paper_transformer_embedder(model.n_embed, model.n_layer, model.vocab_size, model.max_seq_len)
  torch_params = {key: value.detach().numpy() for key, value in reference.state_dict().items()}
  pairs = {  # ours -> theirs: initial distributions that must agree
      ('token_emb', 'embedding'): 'transformer.token_emb.weight',         # N(0, 0.02^2)
      ('pos_emb', 'embedding'): 'transformer.pos_emb.emb.weight',         # N(0, 0.02^2)
      ('attn_layers', 'layers_0_1', 'to_q', 'kernel'): 'transformer.attn_layers.layers.0.1.to_q.weight',
      ('attn_layers', 'layers_0_1', 'to_out', 'bias'): 'transformer.attn_layers.layers.0.1.to_out.bias',
      ('attn_layers', 'layers_1_1', 'net_2', 'kernel'): 'transformer.attn_layers.layers.1.1.net.2.weight',
      ('attn_layers', 'layers_1_1', 'net_0_0', 'bias'): 'transformer.attn_layers.layers.1.1.net.0.0.bias',
      ('to_logits', 'bias'): 'transformer.to_logits.bias',
  }
  for path, key in pairs.items():
    ours = np.asarray(functools.reduce(lambda tree, name: tree[name], path, params))
    theirs = torch_params[key]
    assert ours.size == theirs.size, key
    np.testing.assert_allclose(ours.std(), theirs.std(), rtol=0.15, err_msg=key)
    np.testing.assert_allclose(np.abs(ours).max(), np.abs(theirs).max(), rtol=0.15, err_msg=key)
    assert abs(ours.mean()) < 0.1 * theirs.std() + 1e-3, key
  np.testing.assert_array_equal(params['attn_layers']['layers_0_0']['scale'], 1.0)
  np.testing.assert_array_equal(params['norm']['bias'], 0.0)


def test_transformer_embedder_dropout_only_when_not_deterministic(initialised_embedder):
  model, params = initialised_embedder
  model = model.clone(embedding_dropout=0.5)
  tokens = jnp.arange(16).reshape(2, 8)
  apply = jax.jit(model.apply, static_argnames='deterministic')
  eval_out = apply({'params': params}, tokens)
  train_out = apply({'params': params}, tokens, deterministic=False, rngs={'dropout': jax.random.PRNGKey(1)})
  assert not np.allclose(train_out, eval_out, atol=1e-3)
  without_dropout = jax.jit(model.clone(embedding_dropout=0.0).apply)({'params': params}, tokens)
  np.testing.assert_array_equal(eval_out, without_dropout)


def test_transformer_embedder_computes_in_its_dtype_with_float32_params(initialised_embedder):
  model, params = initialised_embedder
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  tokens = jnp.arange(16).reshape(2, 8)
  low = jax.jit(model.clone(dtype=jnp.bfloat16).apply)({'params': params}, tokens)
  full = jax.jit(model.apply)({'params': params}, tokens)
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), full, atol=0.1)


def test_transformer_embedder_refuses_more_tokens_than_max_seq_len():
  model = TransformerEmbedder(n_embed=16, n_layer=1, vocab_size=10, max_seq_len=4)
  with pytest.raises(ValueError, match='5 tokens exceed max_seq_len=4'):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 5), jnp.int32))


# ---------------------------------------------------------------------------------------------------
# SpatialRescaler against the paper's (ldm.modules.encoders.modules.SpatialRescaler: F.interpolate with
# scale_factor n_stages times, then a 1x1 Conv2d), built here from torch: the pip `ldm` package has none.

def paper_spatial_rescaler(x_nchw, n_stages, method, multiplier, channel_mapper):
  for _ in range(n_stages):
    x_nchw = torch.nn.functional.interpolate(x_nchw, scale_factor=multiplier, mode=method)
  return channel_mapper(x_nchw) if channel_mapper is not None else x_nchw


@pytest.mark.parametrize('method,multiplier,n_stages,size,in_channels,out_channels,bias', [
    ('bilinear', 0.5, 2, (16, 12), 182, 3, False),   # semantic_synthesis256's settings
    ('bilinear', 0.5, 2, (13, 11), 7, 3, False),     # odd sides
    ('bilinear', 0.5, 1, (9, 6), 5, 4, True),        # with bias
    ('bilinear', 0.3, 1, (17, 10), 3, 0, False),     # no remap; a non-dyadic factor
    ('bilinear', 2.0, 1, (5, 7), 3, 2, False),       # upsampling
    ('nearest', 0.5, 2, (13, 9), 6, 0, False),
    ('nearest', 0.75, 1, (10, 9), 6, 2, True),
    ('nearest', 2.0, 1, (3, 5), 2, 0, False),
])
def test_spatial_rescaler_matches_the_papers(method, multiplier, n_stages, size, in_channels, out_channels,
                                             bias, single_torch_thread):
  torch.manual_seed(0)
  mapper = torch.nn.Conv2d(in_channels, out_channels, 1, bias=bias) if out_channels else None
  x = np.random.default_rng(1).normal(size=(2, *size, in_channels)).astype(np.float32)
  with torch.no_grad():
    expected = paper_spatial_rescaler(torch.from_numpy(x.transpose(0, 3, 1, 2)), n_stages, method, multiplier,
                                      mapper).numpy().transpose(0, 2, 3, 1)
  model = SpatialRescaler(n_stages=n_stages, method=method, multiplier=multiplier, in_channels=in_channels,
                          out_channels=out_channels, bias=bias)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(x.shape, jnp.float32))
  # The paper's module holds the conv as `channel_mapper`.
  state_dict = {f'channel_mapper.{key}': value.detach().numpy()
                for key, value in (mapper.state_dict() if mapper else {}).items()}
  params = convert.params_from_paper_rescaler_state_dict(state_dict, abstract.get('params', {}))
  assert count(params) == (sum(p.numel() for p in mapper.parameters()) if mapper else 0)
  got = model.apply({'params': params}, jnp.asarray(x))
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_bilinear_halving_of_even_maps_is_the_2x2_average():
  x = np.random.default_rng(0).normal(size=(1, 8, 6, 3)).astype(np.float32)
  model = SpatialRescaler(n_stages=1, method='bilinear', multiplier=0.5, in_channels=3, out_channels=0)
  got = model.apply({}, jnp.asarray(x))
  np.testing.assert_allclose(got, x.reshape(1, 4, 2, 3, 2, 3).mean(axis=(2, 4)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('method', ['bicubic', 'area', 'trilinear'])
def test_spatial_rescaler_refuses_unsupported_methods(method):
  model = SpatialRescaler(method=method, in_channels=3, out_channels=0)
  with pytest.raises(ValueError, match=f"method '{method}' is not supported; use one of nearest, bilinear"):
    model.apply({}, jnp.zeros((1, 4, 4, 3)))
