"""Tests for evaluate/batching.py: fixed-size batches, padding dropped, one compile, empty input."""

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.evaluate import batching


def test_outputs_equal_the_function_on_all_images_at_once_whatever_the_batching():
  images = np.random.default_rng(0).normal(size=(7, 4, 4, 3)).astype(np.float32)
  fn = lambda batch: {'sum': jnp.sum(batch, axis=(1, 2, 3)), 'first': batch[:, 0, 0]}
  whole = jax.tree.map(np.asarray, fn(images))
  for batch_size, pad_single in ((3, True), (3, False), (7, True), (10, False), (10, True)):
    parts = batching.map_in_batches(fn, images, batch_size, pad_single=pad_single)
    np.testing.assert_allclose(parts['sum'], whole['sum'], rtol=1e-6)
    np.testing.assert_array_equal(parts['first'], whole['first'])


def test_every_batch_has_the_compiled_size_and_a_single_small_one_need_not():
  sizes = []
  fn = lambda batch: sizes.append(len(batch)) or jnp.asarray(batch[:, 0])
  batching.map_in_batches(fn, np.ones((7, 2)), 3)
  assert sizes == [3, 3, 3]
  sizes.clear()
  batching.map_in_batches(fn, np.ones((2, 2)), 3)
  assert sizes == [3]
  sizes.clear()
  batching.map_in_batches(fn, np.ones((2, 2)), 3, pad_single=False)
  assert sizes == [2]


def test_no_images_give_empty_outputs_of_the_function_shapes():
  out = batching.map_in_batches(lambda batch: (batch.sum(axis=1), jnp.zeros((len(batch), 5))), np.zeros((0, 4)), 8)
  assert out[0].shape == (0,) and out[1].shape == (0, 5)
