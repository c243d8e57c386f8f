"""Tests for models/quantize.py against taming-transformers' VectorQuantizer2 (the quantiser of the
paper's VQModel): codes, quantised latents, the loss with both placements of beta, index remapping
and codebook lookup; the straight-through gradient; perplexity and usage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from taming.modules.vqvae.quantize import VectorQuantizer2

from latent_diffusion.errors import ConfigError
from latent_diffusion.models.quantize import VectorQuantizer, codebook_usage

N_EMBED, DIM = 24, 4


def inputs(seed=0):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((2, 5, 6, DIM)).astype(np.float32)  # NHWC
  codebook = rng.standard_normal((N_EMBED, DIM)).astype(np.float32)
  return z, codebook


def reference(legacy=True, remap=None, unknown_index='random', codebook=None):
  quantizer = VectorQuantizer2(N_EMBED, DIM, beta=0.25, legacy=legacy, remap=remap,
                               unknown_index=unknown_index, sane_index_shape=True)
  with torch.no_grad():
    quantizer.embedding.weight.copy_(torch.from_numpy(codebook))
  return quantizer


def run_reference(quantizer, z):
  z_q, loss, (_, _, indices) = quantizer(torch.from_numpy(z.transpose(0, 3, 1, 2).copy()))
  return z_q.detach().numpy().transpose(0, 2, 3, 1), float(loss.detach()), indices.numpy()


def run_ours(z, codebook, **fields):
  quantizer = VectorQuantizer(N_EMBED, DIM, **fields)
  return quantizer.apply({'params': {'embedding': codebook}}, z)


@pytest.mark.parametrize('legacy', [True, False])
def test_codes_latents_and_loss_equal_taming(legacy):
  z, codebook = inputs()
  expected_z_q, expected_loss, expected_indices = run_reference(reference(legacy, codebook=codebook), z)
  z_q, loss, indices = run_ours(z, codebook, legacy=legacy)
  np.testing.assert_array_equal(indices, expected_indices)
  assert len(np.unique(indices)) > 5
  np.testing.assert_allclose(z_q, expected_z_q, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)


def test_legacy_puts_beta_on_the_codebook_term():
  z, codebook = inputs(1)
  _, legacy_loss, _ = run_ours(z, codebook, legacy=True)
  _, loss, _ = run_ours(z, codebook, legacy=False)
  z_q = codebook[np.asarray(run_ours(z, codebook)[2])]
  distance = np.mean((z_q - z) ** 2)  # both terms have this value; only their gradients differ
  np.testing.assert_allclose([legacy_loss, loss], [1.25 * distance] * 2, rtol=1e-5)
  grads = [jax.grad(lambda c, legacy=legacy: run_ours(z, c, legacy=legacy)[1])(codebook)
           for legacy in (True, False)]
  np.testing.assert_allclose(np.asarray(grads[1]), 4.0 * np.asarray(grads[0]), rtol=1e-5, atol=1e-7)


def test_straight_through_gradient_passes_unchanged_to_z():
  z, codebook = inputs(2)
  weights = np.random.default_rng(3).standard_normal(z.shape).astype(np.float32)
  grad = jax.grad(lambda x: jnp.sum(run_ours(x, codebook)[0] * weights))(z)
  np.testing.assert_allclose(grad, weights, rtol=1e-6)


@pytest.mark.parametrize('unknown_index', ['extra', 3])
def test_remapped_indices_and_lookup_equal_taming(tmp_path, unknown_index):
  z, codebook = inputs(4)
  _, _, all_codes = run_ours(z, codebook)
  used = np.unique(np.asarray(all_codes))[::2]  # half of the codes in use: others are unknown
  path = tmp_path / 'used.npy'
  np.save(path, used)
  quantizer = reference(remap=str(path), unknown_index=unknown_index, codebook=codebook)
  _, _, expected = run_reference(quantizer, z)
  _, _, indices = run_ours(z, codebook, remap=str(path), unknown_index=unknown_index)
  np.testing.assert_array_equal(indices, expected)
  ours = VectorQuantizer(N_EMBED, DIM, remap=str(path), unknown_index=unknown_index)
  looked_up = ours.apply({'params': {'embedding': codebook}}, indices, method=ours.lookup)
  expected_entries = quantizer.get_codebook_entry(torch.from_numpy(expected.reshape(-1)).long(),
                                                  indices.shape + (DIM,))
  np.testing.assert_allclose(looked_up, expected_entries.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-6)
  assert ours.num_indices == len(used) + (unknown_index == 'extra')


def test_random_unknown_indices_fall_in_the_remapped_range(tmp_path):
  z, codebook = inputs(5)
  path = tmp_path / 'used.npy'
  np.save(path, np.arange(3))
  quantizer = VectorQuantizer(N_EMBED, DIM, remap=str(path))
  _, _, indices = quantizer.apply({'params': {'embedding': codebook}}, z,
                                  rngs={'quantize': jax.random.PRNGKey(0)})
  assert np.all((np.asarray(indices) >= 0) & (np.asarray(indices) < 3))


def test_a_remap_file_with_codes_out_of_range_is_a_config_error(tmp_path):
  path = tmp_path / 'used.npy'
  np.save(path, np.array([1, N_EMBED + 5]))
  z, codebook = inputs()
  with pytest.raises(ConfigError, match='used.npy'):
    run_ours(z, codebook, remap=str(path))


def test_perplexity_and_usage_of_a_histogram():
  indices = jnp.array([[0, 1], [2, 3]] * 3)  # four codes, equally often
  usage = codebook_usage(indices, 16)
  np.testing.assert_allclose(usage['perplexity'], 4.0, rtol=1e-5)
  assert float(usage['codes_used']) == 4.0
  np.testing.assert_allclose(codebook_usage(jnp.zeros((3, 3), jnp.int32), 16)['perplexity'], 1.0, rtol=1e-5)
