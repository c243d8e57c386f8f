"""Tests for models/sliced_attention.py: the per-slice kernel and its recomputing backward against
the plain einsum attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion.models import attention
from latent_diffusion.models.sliced_attention import sliced_attention


def test_sliced_attention_equals_the_einsum_kernel():
  rng = np.random.default_rng(2)
  q = rng.normal(size=(2, 10, 3, 8)).astype(np.float32)
  k, v = rng.normal(size=(2, 2, 7, 3, 8)).astype(np.float32)
  np.testing.assert_allclose(jax.jit(sliced_attention)(q, k, v), attention.einsum_attention(q, k, v),
                             atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize('dtype', [np.float32, 'bfloat16'])
def test_sliced_attention_gradients_equal_the_einsum_kernels(dtype):
  """The sliced kernel's own backward (recomputed weights) gives autodiff's gradients of the einsums."""
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.normal(size=(2, 12, 3, 8)), dtype)
  k, v = (jnp.asarray(a, dtype) for a in rng.normal(size=(2, 2, 9, 3, 8)))
  cotangent = jnp.asarray(rng.normal(size=(2, 12, 3, 8)), jnp.float32)
  grads = lambda fn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cotangent),
                                      argnums=(0, 1, 2)))(q, k, v)
  tolerance = 1e-5 if dtype == np.float32 else 5e-2
  for ours, expected in zip(grads(sliced_attention), grads(attention.einsum_attention)):
    assert ours.dtype == expected.dtype
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(expected, np.float32),
                               atol=tolerance, rtol=tolerance)
