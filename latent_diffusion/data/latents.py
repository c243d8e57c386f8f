"""Precomputed stage-1 latents: encode the dataset once, train stage 2 from it.

`write_cache` runs this process's slice of the data (the slice of
pipeline.make_dataset) once through the pipeline in source order, centre
cropped, unflipped, and stores what `encode_fn` returns, the posterior moments
concat(mean, logvar); with data.flip it also stores the moments of the mirrored
image, so training from the cache still flips. With `with_labels` it also keeps
each image's class label. `make_iterator` streams batches
{'moments': float32 (B, h, w, 2c)} (+ 'label' int32 (B,)) from that file with a
checkpointable grain state, like pipeline.make_iterator.

Files in the cache directory, per process i of n:
  moments-{i:05d}-of-{n:05d}.npy   float32 (N_i, V, h, w, 2c); V = 2 with flip
                                   (variant 1 = mirrored image), else 1
  labels-{i:05d}-of-{n:05d}.npy    int32 (N_i,), the class labels (with_labels)
  moments-{i:05d}-of-{n:05d}.json  fingerprint, data fields, counts, shape;
                                   written last, so it marks a complete file

The cache always holds centre crops: data.crop = 'random' is not reproduced.
"""

import json
import os
from pathlib import Path
import time

from absl import logging
import grain
import jax
import numpy as np

from latent_diffusion import errors
from latent_diffusion.data import pipeline

# The data fields that decide which images a source yields, per source.
_SOURCE_FIELDS = {
    'synthetic': ('synthetic_size', 'synthetic_seed'),
    'folder': ('path',),
    'tfds': ('tfds_name', 'tfds_split', 'tfds_data_dir'),
}


def _process(process_index, process_count):
  """(index, count) with jax's values as defaults, checked."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if not 0 <= index < count:
    raise ValueError(f'process_index {index} is not in [0, {count})')
  return index, count


def cache_paths(directory, process_index, process_count):
  """(moments .npy, meta .json) paths of one process's cache file."""
  stem = f'moments-{process_index:05d}-of-{process_count:05d}'
  directory = Path(directory)
  return directory / f'{stem}.npy', directory / f'{stem}.json'


def labels_path(moments_path):
  """The labels .npy beside a moments .npy."""
  return moments_path.with_name(moments_path.name.replace('moments-', 'labels-', 1))


def data_fields(data_config):
  """The data config fields that the cached moments depend on."""
  names = ('source', 'image_size', 'flip') + _SOURCE_FIELDS.get(
      data_config.source, ())
  return {name: data_config[name] for name in names}


def _jsonable(value):
  """value as it reads back from JSON (tuples become lists, ...)."""
  return json.loads(json.dumps(value))


def _write_atomic(path, write):
  """Calls write(temporary path), then renames it onto path."""
  tmp = path.with_name(f'{path.name}.tmp-{os.getpid()}')
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def read_meta(meta_path):
  """The meta dict of a cache file, or None when absent or unreadable."""
  try:
    return json.loads(Path(meta_path).read_text())
  except (OSError, ValueError):
    return None


def _open_moments(path, meta_path):
  """(memory-mapped moments, meta); DataError naming the path if not usable."""
  meta = read_meta(meta_path)
  if meta is None:
    raise errors.DataError(f'latent cache {meta_path} is missing or unreadable'
                           ' (write it with latents.write_cache)')
  try:
    moments = np.load(path, mmap_mode='r')
  except (OSError, ValueError) as e:
    raise errors.DataError(f'latent cache {path} cannot be read: {e}') from e
  if (list(moments.shape) != meta.get('shape') or moments.dtype != np.float32
      or moments.ndim != 5):
    raise errors.DataError(
        f'latent cache {path} is incomplete: {moments.dtype} '
        f'{moments.shape}, expected float32 {meta.get("shape")}')
  return moments, meta


def _is_current(path, meta_path, expected):
  """True when the cache file is complete and was built for `expected`."""
  try:
    _, meta = _open_moments(path, meta_path)
  except errors.DataError:
    return False
  return all(meta.get(key) == value for key, value in expected.items())


def _image_batches(data_config, batch_size, process_index, process_count,
                   source):
  """This process's images in source order, centre-cropped, unflipped."""
  config = data_config.copy_and_resolve_references()
  config.flip = False
  config.crop = 'center'
  return pipeline.make_iterator(
      config, batch_size=batch_size, seed=0, shuffle=False, num_epochs=1,
      process_index=process_index, process_count=process_count,
      drop_remainder=False, source=source)


def _encode_padded(encode_fn, images, batch_size):
  """encode_fn on images padded to batch_size; the padding rows dropped."""
  count = images.shape[0]
  if count < batch_size:
    padding = np.repeat(images[-1:], batch_size - count, axis=0)
    images = np.concatenate([images, padding])
  moments = np.asarray(encode_fn(images), np.float32)
  return moments[:count]


def write_cache(directory, data_config, encode_fn, *, batch_size,
                process_index=None, process_count=None, fingerprint,
                with_labels=False):
  """Encodes this process's slice into `directory` unless already there.

  Args:
    directory: the cache directory; created if needed.
    data_config: the `config.data` ConfigDict.
    encode_fn: images float32 (batch_size, S, S, 3) in [-1, 1] -> moments
      (batch_size, h, w, 2c); always called with exactly batch_size images.
    batch_size: images per encode_fn call.
    process_index: this process's slice index; default jax.process_index().
    process_count: number of slices; default jax.process_count().
    fingerprint: JSON-serialisable dict naming what the moments depend on
      beyond the data (e.g. the autoencoder checkpoint step); a cache built
      with another fingerprint is rebuilt.
    with_labels: also store each example's 'label' (the source must have
      labels); a cache without them is rebuilt.

  Returns:
    The path of this process's moments file.
  """
  if batch_size <= 0:
    raise errors.ConfigError(f'batch_size must be positive, got {batch_size}')
  process_index, process_count = _process(process_index, process_count)
  path, meta_path = cache_paths(directory, process_index, process_count)
  source = pipeline.make_source(data_config)
  count = len(range(process_index, len(source), process_count))
  variants = 2 if data_config.flip else 1
  expected = _jsonable({
      'fingerprint': fingerprint, 'data': data_fields(data_config),
      'process_index': process_index, 'process_count': process_count,
      'count': count, 'variants': variants, 'labels': bool(with_labels)})
  if _is_current(path, meta_path, expected):
    logging.info('latents: using the cache %s (%d examples)', path, count)
    return path
  if path.exists() or meta_path.exists():
    logging.info('latents: %s was built for another fingerprint, data or is '
                 'incomplete (found %s); rebuilding', path,
                 read_meta(meta_path))
  if data_config.crop != 'center':
    logging.warning("latents: data.crop=%r is not cached; the cache holds "
                    "centre crops", data_config.crop)
  path.parent.mkdir(parents=True, exist_ok=True)
  if meta_path.exists():
    meta_path.unlink()  # A file mid-rewrite must not look complete.

  labels = [] if with_labels else None

  def write_moments(tmp):
    moments = _encode_all(
        tmp, _image_batches(data_config, batch_size, process_index,
                            process_count, source),
        encode_fn, batch_size, count, variants,
        pipeline.describe(data_config, source), labels)
    expected['shape'] = list(moments.shape)
    moments.flush()
    del moments

  _write_atomic(path, write_moments)
  if with_labels:
    _write_atomic(labels_path(path), lambda tmp: _save_npy(
        tmp, np.concatenate(labels).astype(np.int32)))
  _write_atomic(meta_path,
                lambda tmp: tmp.write_text(json.dumps(expected, indent=2)))
  logging.info('latents: wrote %s, %s', path, expected['shape'])
  return path


def _save_npy(path, array):
  with open(path, 'wb') as f:
    np.save(f, array)


def _encode_all(tmp, batches, encode_fn, batch_size, count, variants,
                description, labels=None):
  """Fills a new .npy memmap at tmp with the moments of every batch; appends
  each batch's labels to `labels` unless it is None."""
  num_batches = -(-count // batch_size)
  log_every = max(1, num_batches // 10)
  logging.info('latents: encoding %d examples%s of %s', count,
               ' and their mirror images' if variants == 2 else '',
               description)
  moments, start, begin = None, 0, time.perf_counter()
  for number, batch in enumerate(batches, 1):
    images = batch['image']
    if labels is not None:
      if 'label' not in batch:
        raise errors.DataError(f'{description}: has no class labels to cache '
                               '(conditioning on labels needs them)')
      labels.append(np.asarray(batch['label']))
    encoded = [_encode_padded(encode_fn, images, batch_size)]
    if variants == 2:
      mirrored = np.ascontiguousarray(images[:, :, ::-1])
      encoded.append(_encode_padded(encode_fn, mirrored, batch_size))
    encoded = np.stack(encoded, axis=1)
    if moments is None:
      moments = np.lib.format.open_memmap(
          tmp, mode='w+', dtype=np.float32,
          shape=(count,) + encoded.shape[1:])
    moments[start:start + len(images)] = encoded
    start += len(images)
    if number % log_every == 0 or number == num_batches:
      rate = start * variants / max(time.perf_counter() - begin, 1e-9)
      logging.info('latents: %d/%d examples (%.0f%%), %.1f images/s', start,
                   count, 100 * start / count, rate)
  if start != count:
    raise errors.DataError(f'{description}: encoded {start} examples, '
                           f'expected {count}')
  return moments


class MomentsSource:
  """Random access to one process's cached moments: {'moments': (V, h, w, 2c)}
  rows, with 'label' when the cache holds labels."""

  def __init__(self, path, meta_path):
    self.path = path
    self.moments, self.meta = _open_moments(path, meta_path)
    self.labels = None
    if self.meta.get('labels'):
      try:
        self.labels = np.load(labels_path(path))
      except (OSError, ValueError) as e:
        raise errors.DataError(f'latent cache labels {labels_path(path)} cannot be read: {e}') from e
      if self.labels.shape != (len(self),):
        raise errors.DataError(f'latent cache labels {labels_path(path)} hold {self.labels.shape}, '
                               f'expected ({len(self)},)')

  def __len__(self):
    return self.moments.shape[0]

  def __getitem__(self, index):
    row = {'moments': np.array(self.moments[index])}
    if self.labels is not None:
      row['label'] = self.labels[index]
    return row


class PickVariant(grain.transforms.RandomMap):
  """Moments of the image or, with flip and probability 1/2, its mirror."""

  def __init__(self, flip):
    self.flip = flip

  def random_map(self, element, rng):
    mirrored = self.flip and rng.random() < 0.5
    return dict(element, moments=element['moments'][1 if mirrored else 0])


def make_dataset(directory, *, batch_size, seed, flip, shuffle=True,
                 process_index=None, process_count=None):
  """The endless batched grain IterDataset of this process's cached moments.

  Args:
    directory: a cache written by write_cache with the same process count.
    batch_size: examples per batch on this process.
    seed: run seed; shuffling and flips derive from it.
    flip: pick the mirrored image's moments with probability 1/2; needs a
      cache written with data.flip.
    shuffle: shuffle globally, differently each epoch.
    process_index: this process's slice index; default jax.process_index().
    process_count: number of slices; default jax.process_count().

  Returns:
    A grain IterDataset of {'moments': float32 (B, h, w, 2c)} (+ 'label'
    int32 (B,) when the cache holds labels).
  """
  if batch_size <= 0:
    raise errors.ConfigError(f'batch_size must be positive, got {batch_size}')
  process_index, process_count = _process(process_index, process_count)
  source = MomentsSource(*cache_paths(directory, process_index, process_count))
  if flip and source.meta.get('variants') != 2:
    raise errors.DataError(f'latent cache {source.path} holds no mirrored '
                           'images: rebuild it with data.flip=True')
  if not len(source):
    raise errors.DataError(f'latent cache {source.path} is empty')
  shuffle_seed, flip_seed = pipeline._derived_seeds(  # pylint: disable=protected-access
      seed, process_index, 2)
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=shuffle_seed)
  ds = ds.repeat(None)
  ds = ds.random_map(PickVariant(flip), seed=flip_seed)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.to_iter_dataset(grain.ReadOptions(
      num_threads=pipeline._READ_THREADS,  # pylint: disable=protected-access
      prefetch_buffer_size=pipeline._PREFETCH_BATCHES))  # pylint: disable=protected-access


def make_iterator(directory, *, batch_size, seed, flip, shuffle=True,
                  process_index=None, process_count=None):
  """iter(make_dataset(...)): a grain DatasetIterator with get/set_state."""
  return iter(make_dataset(
      directory, batch_size=batch_size, seed=seed, flip=flip, shuffle=shuffle,
      process_index=process_index, process_count=process_count))
