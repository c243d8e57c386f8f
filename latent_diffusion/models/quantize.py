"""The VQ regulariser of the paper's VQModel (taming-transformers' VectorQuantizer2), NHWC.

Nearest-codebook lookup, a straight-through gradient, the codebook + commitment loss with `beta`
(on the paper's `legacy` term unless told otherwise), and optional index remapping onto a subset
of used codes loaded from a .npy file.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.errors import ConfigError


@functools.cache
def _remap_tables(path: str, n_embed: int, unknown_index: Any) -> tuple[np.ndarray, np.ndarray, int, int]:
  """(used codes, code -> position in used or -1, number of remapped indices, unknown index)."""
  try:
    used = np.asarray(np.load(path), np.int32).reshape(-1)
  except (OSError, ValueError) as error:
    raise ConfigError(f'autoencoder.remap: cannot read the used-codes .npy file {path}: {error}') from None
  if used.size == 0 or used.min() < 0 or used.max() >= n_embed:
    raise ConfigError(f'autoencoder.remap: {path} must hold code indices in [0, {n_embed}); '
                      f'it holds {used.size} values in [{used.min(initial=0)}, {used.max(initial=0)}]')
  position = np.full((n_embed,), -1, np.int32)
  for i in reversed(range(used.size)):  # the first occurrence wins, as the paper's argmax over matches
    position[used[i]] = i
  num_indices = used.size
  if unknown_index == 'extra':
    unknown_index, num_indices = used.size, used.size + 1
  return used, position, num_indices, unknown_index


def count_indices(n_embed: int, remap: str | None, unknown_index: Any = 'random') -> int:
  """How many distinct indices the quantiser returns: n_embed, or the remapped count."""
  return n_embed if remap is None else _remap_tables(remap, n_embed, unknown_index)[2]


class VectorQuantizer(nn.Module):
  """z (B,h,w,embed_dim) -> (z_q with straight-through gradient, loss, indices (B,h,w) int32).

  loss = mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2) when `legacy` (the paper's
  checkpoints were trained so), else beta on the first term (the usual commitment placement).
  With `remap` (a .npy of used code indices), returned indices count within that subset;
  codes outside it become `unknown_index`: 'random' (a random remapped index, from the
  'quantize' rng stream, or 0 without one), 'extra' (one extra index) or an integer.
  """
  n_embed: int
  embed_dim: int
  beta: float = 0.25
  legacy: bool = True
  remap: str | None = None
  unknown_index: Any = 'random'

  def setup(self):
    limit = 1.0 / self.n_embed  # the paper's U(-1/n, 1/n) codebook initialisation
    self.embedding = self.param(
        'embedding', lambda rng, shape: jax.random.uniform(rng, shape, jnp.float32, -limit, limit),
        (self.n_embed, self.embed_dim))

  def __call__(self, z):
    z = z.astype(jnp.float32)
    flat = z.reshape(-1, self.embed_dim)
    # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e, at full float32 precision so near-ties resolve as in torch.
    distances = (jnp.sum(flat ** 2, axis=1, keepdims=True) + jnp.sum(self.embedding ** 2, axis=1)
                 - 2.0 * jnp.dot(flat, self.embedding.T, precision=jax.lax.Precision.HIGHEST))
    codes = jnp.argmin(distances, axis=1).astype(jnp.int32)
    z_q = self.embedding[codes].reshape(z.shape)
    codebook_term = jnp.mean((z_q - jax.lax.stop_gradient(z)) ** 2)
    commitment_term = jnp.mean((jax.lax.stop_gradient(z_q) - z) ** 2)
    if self.legacy:
      loss = commitment_term + self.beta * codebook_term
    else:
      loss = self.beta * commitment_term + codebook_term
    z_q = z + jax.lax.stop_gradient(z_q - z)
    return z_q, loss, self.remap_to_used(codes).reshape(z.shape[:-1])

  @property
  def num_indices(self) -> int:
    return count_indices(self.n_embed, self.remap, self.unknown_index)

  def remap_to_used(self, codes):
    if self.remap is None:
      return codes
    _, position, num_indices, unknown_index = _remap_tables(self.remap, self.n_embed, self.unknown_index)
    remapped = jnp.asarray(position)[codes]
    if unknown_index == 'random':
      replacement = (jax.random.randint(self.make_rng('quantize'), codes.shape, 0, num_indices)
                     if self.has_rng('quantize') else jnp.zeros_like(codes))
    else:
      replacement = jnp.full_like(codes, int(unknown_index))
    return jnp.where(remapped < 0, replacement, remapped).astype(jnp.int32)

  def unmap_to_all(self, indices):
    if self.remap is None:
      return indices
    used = _remap_tables(self.remap, self.n_embed, self.unknown_index)[0]
    indices = jnp.where(indices >= used.size, 0, indices)  # the 'extra' index decodes as code used[0]
    return jnp.asarray(used)[indices]

  def lookup(self, indices):
    """Codebook vectors of indices (any shape) -> indices.shape + (embed_dim,)."""
    return self.embedding[self.unmap_to_all(indices)]


def codebook_usage(indices: jax.Array, num_indices: int) -> dict[str, jax.Array]:
  """Perplexity exp(H(p)) of the batch's code histogram p, and how many codes it uses."""
  counts = jnp.zeros((num_indices,), jnp.float32).at[indices.reshape(-1)].add(1.0)
  probs = counts / indices.size
  return {'perplexity': jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10))),
          'codes_used': jnp.sum(counts > 0).astype(jnp.float32)}
