"""The input pipeline's images/s (decode, crop, resize, flip, batch) on a real image folder."""

import time

from latent_diffusion.data import pipeline


def images_per_second(data_config, batch: int, num_batches: int) -> dict:
  """Images/s over `num_batches` batches after the first (which starts the workers)."""
  iterator = pipeline.make_iterator(data_config, batch_size=batch, seed=0)
  next(iterator)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(iterator)
  seconds = time.perf_counter() - start
  return {'images': batch * num_batches, 'seconds': seconds, 'images_per_s': batch * num_batches / seconds,
          'source': data_config.source, 'path': data_config.path, 'image_size': data_config.image_size,
          'worker_count': data_config.worker_count}
