"""Tests for models/conditioners.py: the paper's ClassEmbedder."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from latent_diffusion.models.conditioners import ClassEmbedder


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
