"""Tests for models/unet.py: shapes, zero-initialised output, timestep conditioning and the
parameter counts of the paper's openaimodel.UNetModel."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion.models.unet import UNetModel

TINY = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2),
            num_res_blocks=1, attention_resolutions=(2,), num_heads=2)


def count(params):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def abstract_params(model, size, channels=4):
  return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32),
                        jax.ShapeDtypeStruct((1,), jnp.int32))['params']


@pytest.fixture(scope='module')
def tiny(make_random_params):
  """(model, random params, x, compiled apply)."""
  model = UNetModel(**TINY)
  params = make_random_params(abstract_params(model, 8))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32))
  return model, params, x, jax.jit(lambda p, x, t: model.apply({'params': p}, x, t))


def test_fresh_unet_outputs_exactly_zero():
  """The final conv is zero-initialised (the paper's zero_module), so eps_theta starts at 0."""
  model = UNetModel(**{**TINY, 'channel_mult': (1,), 'attention_resolutions': (1,)})
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 4, 4)).astype(np.float32))
  t = jnp.array([3, 900])
  # An rbg key: the initialisers compile several times faster than with threefry on CPU.
  out, variables = jax.jit(model.init_with_output)(jax.random.key(0, impl='rbg'), x, t)
  assert out.shape == (2, 4, 4, 4) and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, np.zeros_like(out))
  # Not vacuous: the rest of the network was initialised with non-zero weights.
  assert np.abs(np.asarray(variables['params']['input_blocks_0_layers_0']['kernel'])).max() > 0


@pytest.mark.parametrize('out_channels, size', [(4, 8), (8, 16)])
def test_output_has_input_spatial_shape_and_out_channels(out_channels, size):
  model = UNetModel(**{**TINY, 'out_channels': out_channels})
  out = jax.eval_shape(lambda x, t: model.init_with_output(jax.random.PRNGKey(0), x, t)[0],
                       jax.ShapeDtypeStruct((3, size, size, 4), jnp.float32),
                       jax.ShapeDtypeStruct((3,), jnp.int32))
  assert out.shape == (3, size, size, out_channels) and out.dtype == jnp.float32


def test_output_depends_on_the_timestep(tiny):
  _, params, x, apply = tiny
  early, late = apply(params, x, jnp.array([0, 0])), apply(params, x, jnp.array([999, 999]))
  assert np.all(np.isfinite(early)) and early.shape == x.shape
  assert not np.allclose(early, late, atol=1e-4)


def test_examples_in_a_batch_are_independent(tiny):
  _, params, x, apply = tiny
  both = apply(params, x, jnp.array([10, 500]))
  second_alone = apply(params, jnp.concatenate([x[1:], x[1:]]), jnp.array([500, 500]))
  np.testing.assert_allclose(both[1], second_alone[0], atol=1e-4)


@pytest.mark.parametrize('overrides', [
    dict(resblock_updown=False, conv_resample=True, use_scale_shift_norm=False, num_head_channels=16),
    dict(resblock_updown=False, conv_resample=False, num_heads_upsample=1),
])
def test_variants_of_the_papers_options_build_and_keep_shapes(overrides):
  model = UNetModel(**{**TINY, **overrides})
  out = jax.eval_shape(lambda x, t: model.init_with_output(jax.random.PRNGKey(0), x, t)[0],
                       jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32),
                       jax.ShapeDtypeStruct((1,), jnp.int32))
  assert out.shape == (1, 8, 8, 4) and out.dtype == jnp.float32


def test_dropout_is_active_when_not_deterministic(make_random_params):
  model = UNetModel(**{**TINY, 'channel_mult': (1,), 'attention_resolutions': (), 'dropout': 0.5})
  params = make_random_params(abstract_params(model, 4))
  x = np.random.default_rng(3).normal(size=(1, 4, 4, 4)).astype(np.float32)
  run = jax.jit(lambda key, deterministic: model.apply(
      {'params': params}, x, jnp.array([5]), deterministic=deterministic, rngs={'dropout': key}),
      static_argnums=1)
  first, second = run(jax.random.key(0, impl='rbg'), False), run(jax.random.key(1, impl='rbg'), False)
  assert not np.allclose(first, second)
  kept = run(jax.random.key(0, impl='rbg'), True)
  np.testing.assert_array_equal(kept, run(jax.random.key(1, impl='rbg'), True))
  assert not np.allclose(first, kept)


def test_bfloat16_compute_keeps_float32_params_and_output():
  model = UNetModel(**TINY, dtype=jnp.bfloat16)
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract_params(model, 8))} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(lambda x, t: model.init_with_output(jax.random.PRNGKey(0), x, t)[0],
                       jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32),
                       jax.ShapeDtypeStruct((2,), jnp.int32))
  assert out.dtype == jnp.float32


# Parameter counts. The expected numbers were obtained by instantiating the paper's own
# ldm.modules.diffusionmodules.openaimodel.UNetModel (CompVis/latent-diffusion) with these
# settings (image_size ignored by its parameter count); ours come from jax.eval_shape, so no
# weights are allocated.


def test_parameter_count_of_small_default_config_equals_papers_unet():
  """openaimodel.UNetModel(in 4, out 4, model_channels 64, attention_resolutions (2, 4),
  num_res_blocks 2, channel_mult (1, 2, 2), num_heads 4, use_scale_shift_norm, resblock_updown)
  has 7,993,604 parameters."""
  model = UNetModel(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 2),
                    num_res_blocks=2, attention_resolutions=(2, 4), num_heads=4,
                    use_scale_shift_norm=True, resblock_updown=True)
  assert count(abstract_params(model, 16)) == 7_993_604


def test_parameter_count_of_lsun_churches_ldm8_equals_papers_unet():
  """openaimodel.UNetModel as configs/latent-diffusion/lsun_churches-ldm-kl-8.yaml (in/out 4,
  model_channels 192, attention_resolutions (1, 2, 4, 8), num_res_blocks 2, channel_mult
  (1, 2, 2, 4, 4), num_heads 8, use_scale_shift_norm, resblock_updown) has 294,966,916 parameters."""
  model = UNetModel(in_channels=4, out_channels=4, model_channels=192, channel_mult=(1, 2, 2, 4, 4),
                    num_res_blocks=2, attention_resolutions=(1, 2, 4, 8), num_heads=8,
                    use_scale_shift_norm=True, resblock_updown=True)
  assert count(abstract_params(model, 32)) == 294_966_916


# Rematerialisation (config.remat): the same network, recomputed in the backward pass.


def blocks_in(params):
  """Top-level entries that are a ResBlock (in_conv) or an AttentionBlock (qkv)."""
  return [name for name, tree in params.items() if 'in_conv' in tree or 'qkv' in tree]


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_keeps_the_parameter_tree(remat):
  expected = abstract_params(UNetModel(**TINY), 8)
  params = abstract_params(UNetModel(**TINY, remat=remat), 8)
  assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, expected)


@pytest.mark.parametrize('remat, policy', [('none', None),
                                           ('full', jax.checkpoint_policies.nothing_saveable),
                                           ('dots', jax.checkpoint_policies.dots_saveable)])
def test_remat_wraps_every_res_and_attention_block(remat, policy, remat_policies):
  """One checkpoint per block (10 ResBlocks, up/down ones included, and 4 AttentionBlocks)."""
  model = UNetModel(**TINY, remat=remat)
  params = abstract_params(model, 8)
  jaxpr = jax.make_jaxpr(lambda p, x, t: model.apply({'params': p}, x, t))(
      params, jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32))
  expected = [] if policy is None else [policy] * len(blocks_in(params))
  assert len(blocks_in(params)) == 14 and remat_policies(jaxpr) == expected


def test_remat_rejects_an_unknown_value():
  with pytest.raises(ValueError, match='remat must be one of none, full, dots'):
    abstract_params(UNetModel(**TINY, remat='everything'), 8)


# One level, dropout active: the smallest U-Net whose gradients cover every block kind (mid attention).
REMAT_TINY = {**TINY, 'channel_mult': (1,), 'attention_resolutions': (), 'dropout': 0.5}


def remat_value_and_grads(call, remat, params, x):
  model = UNetModel(**REMAT_TINY, remat=remat)

  def loss(params):
    out = model.apply({'params': params}, x, jnp.array([7]), False,
                      rngs={'dropout': jax.random.key(3, impl='rbg')})
    return jnp.mean((out - x) ** 2)

  return call(jax.value_and_grad(loss), params)


@pytest.fixture(scope='module')
def remat_reference(make_random_params, call_unoptimised):
  """(params, x, loss, grads) of the plain U-Net in training mode."""
  params = make_random_params(abstract_params(UNetModel(**REMAT_TINY), 4))
  x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 4, 4, 4)).astype(np.float32))
  return (params, x, *remat_value_and_grads(call_unoptimised, 'none', params, x))


@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_keeps_loss_and_gradients(remat, remat_reference, call_unoptimised,
                                        assert_grads_close):
  params, x, expected_loss, expected_grads = remat_reference
  loss, grads = remat_value_and_grads(call_unoptimised, remat, params, x)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  assert_grads_close(grads, expected_grads)
