"""Tests for models/denoiser.py: conditions routed into the U-Net by conditioning_key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion.models.conditioners import ClassEmbedder
from latent_diffusion.models.denoiser import LatentDenoiser
from latent_diffusion.models.unet import UNetModel

# One level, attention (or the spatial transformer) in the middle block only: quick to compile.
UNET = dict(out_channels=4, model_channels=32, num_res_blocks=1, attention_resolutions=(),
            channel_mult=(1,), num_heads=2)


def build(key, **unet):
  cond_stage = ClassEmbedder(n_classes=5, embed_dim=16) if key in ('crossattn', 'hybrid') else None
  return LatentDenoiser(UNetModel(**dict(UNET, **unet)), cond_stage, key)


def init_and_randomise(model, raw):
  x, t = jnp.zeros((2, 8, 8, 4)), jnp.array([3, 7])
  params = model.init(jax.random.PRNGKey(0), x, t, raw)['params']
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])
  x = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  return params, jax.jit(lambda raw_: model.apply({'params': params}, x, t, raw_))


def test_concat_stacks_the_condition_on_the_unet_input_channels():
  concat = jnp.ones((2, 8, 8, 3))
  model = build('concat', in_channels=7)
  params, apply = init_and_randomise(model, {'concat': concat})
  assert params['unet']['input_blocks_0_layers_0']['kernel'].shape[2] == 7
  assert not np.allclose(apply({'concat': concat}), apply({'concat': -concat}), atol=1e-5)


def test_crossattn_encodes_labels_with_the_cond_stage_into_the_context():
  model = build('crossattn', use_spatial_transformer=True, context_dim=16)
  params, apply = init_and_randomise(model, {'label': jnp.zeros((2,), jnp.int32)})
  assert params['cond_stage']['embedding']['embedding'].shape == (5, 16)
  encoded = model.apply({'params': params}, {'label': jnp.array([1, 2])}, method=model.condition)
  assert set(encoded) == {'context'} and encoded['context'].shape == (2, 1, 16)
  assert not np.allclose(apply({'label': jnp.array([1, 1])}), apply({'label': jnp.array([2, 2])}), atol=1e-5)


def test_adm_feeds_labels_to_the_unets_label_embedding():
  model = build('adm', num_classes=5)
  params, apply = init_and_randomise(model, {'label': jnp.zeros((2,), jnp.int32)})
  assert 'cond_stage' not in params and 'label_emb' in params['unet']
  assert not np.allclose(apply({'label': jnp.array([0, 0])}), apply({'label': jnp.array([4, 4])}), atol=1e-5)


def test_hybrid_uses_concat_and_context_together():
  model = build('hybrid', in_channels=5, use_spatial_transformer=True, context_dim=16)
  raw = {'concat': jnp.ones((2, 8, 8, 1)), 'label': jnp.array([0, 1])}
  params, apply = init_and_randomise(model, raw)
  encoded = model.apply({'params': params}, raw, method=model.condition)
  assert set(encoded) == {'concat', 'context'}
  assert not np.allclose(apply(raw), apply(dict(raw, concat=-raw['concat'])), atol=1e-5)
  assert not np.allclose(apply(raw), apply(dict(raw, label=jnp.array([3, 3]))), atol=1e-5)


def test_unconditional_denoise_equals_the_bare_unet():
  model = build('')
  params, apply = init_and_randomise(model, {})
  x, t = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 4)), jnp.array([3, 7])
  bare = UNetModel(**UNET).apply({'params': params['unet']}, x, t)
  np.testing.assert_allclose(apply({}), bare, atol=1e-6)  # jitted vs op-by-op: float rounding only


def test_a_missing_condition_is_a_clear_error():
  model = build('adm', num_classes=5)
  with pytest.raises(ValueError, match="needs the condition 'label'"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32), {})
