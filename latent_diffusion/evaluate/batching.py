"""One network over many images, in fixed-size batches: the feature networks of the evaluations."""

from typing import Any, Callable

import jax
import numpy as np


def map_in_batches(fn: Callable[[np.ndarray], Any], images: np.ndarray, batch_size: int, *,
                   pad_single: bool = True) -> Any:
  """fn over `images` (N, ...) in batches of `batch_size`: the pytree of its outputs, each (N, ...) numpy.

  Every batch is zero-padded to batch_size, so fn compiles once whatever N; the padded rows are dropped.
  With pad_single=False, an N <= batch_size runs as one batch of N (small evaluations stay small).
  fn returns device arrays (B, ...); they are fetched after every batch is dispatched, so the host
  prepares the next batch while the device works. N = 0 gives empty outputs of fn's shapes (fn runs
  once on a zero batch to learn them: fn may do host work that cannot be traced).
  """
  images = np.asarray(images, np.float32)
  size = batch_size if pad_single or len(images) > batch_size else max(len(images), 1)
  if not len(images):
    return jax.tree.map(lambda x: np.asarray(x)[:0], fn(np.zeros((size,) + images.shape[1:], np.float32)))
  outputs, counts = [], []
  for start in range(0, len(images), size):
    batch = images[start:start + size]
    counts.append(len(batch))
    if len(batch) < size:
      batch = np.concatenate([batch, np.zeros((size - len(batch),) + batch.shape[1:], np.float32)])
    outputs.append(fn(batch))
  trimmed = [jax.tree.map(lambda x, count=count: np.asarray(x)[:count], out) for out, count in zip(outputs, counts)]
  return jax.tree.map(lambda *parts: np.concatenate(parts), *trimmed)
