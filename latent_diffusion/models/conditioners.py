"""Conditioning encoders of the paper's cond_stage_config (ldm/modules/encoders/modules.py)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class ClassEmbedder(nn.Module):
  """Class labels (B,) int32 -> a one-token context (B, 1, embed_dim), the paper's ClassEmbedder.

  For classifier-free guidance, give it one row more than the data has classes: the last row is the
  null class that dropped conditions map to.
  """
  n_classes: int = 1000
  embed_dim: int = 512

  @nn.compact
  def __call__(self, labels: jax.Array) -> jax.Array:
    # torch's nn.Embedding initialises N(0, 1).
    embedding = nn.Embed(self.n_classes, self.embed_dim, embedding_init=nn.initializers.normal(1.0),
                         param_dtype=jnp.float32, name='embedding')
    return embedding(labels.astype(jnp.int32))[:, None, :]
