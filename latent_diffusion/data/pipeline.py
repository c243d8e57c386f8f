"""grain input pipeline: source -> per-process slice -> shuffle -> repeat ->
crop/resize/flip -> [low-res input] [inpainting mask] -> float -> batch ->
iterator with checkpointable state.

Batches are dicts of numpy arrays (S = data.image_size, s = data.low_res_size,
B = batch_size):
  image         float32 (B, S, S, 3) in [-1, 1]     every source
  label         int32 (B,)                           sources with labels
  caption       str (B,), numpy dtype '<U..'         synthetic
  boxes         float32 (B, MAX_OBJECTS, 5)          synthetic; -1 row = none
  segmentation  int32 (B, S, S)                      synthetic
  low_res       float32 (B, s, s, 3) in [-1, 1]     data.low_res_size > 0: the
                                                     image degraded by
                                                     data.degradation
  mask          float32 (B, S, S, 1), 1 = to fill    data.inpainting_masks

Every random choice is a pure function of (seed, process_index, position in
the repeated stream), so a restored iterator (get_state/set_state, or orbax with
grain.checkpoint.CheckpointSave/CheckpointRestore) yields the same batches as an
uninterrupted run, and each epoch is shuffled and augmented differently. The
state's layout depends on data.worker_count (0 or not): restore with the same
setting it was saved with.

Worker processes (data.worker_count > 0) ignore SIGTERM: a cluster's preemption
signals every process of the job, and the main process still needs batches up to
the step it saves at. grain stops the workers when the iterator closes; on Linux
they are also killed when the main process dies (even by SIGKILL), so none is
left behind.
"""

import ctypes
import functools
import os
import re
import signal
import sys

from absl import flags
from absl import logging
import grain
import jax
import numpy as np
from PIL import Image

from latent_diffusion import errors
from latent_diffusion.data import degradation
from latent_diffusion.data import folder
from latent_diffusion.data import masks
from latent_diffusion.data import synthetic

SOURCES = ('synthetic', 'folder', 'tfds')
CROPS = ('center', 'random')
DEGRADATIONS = ('bicubic', 'bsrgan_light')
_READ_THREADS = max(1, min(4, os.cpu_count() or 1))
_PREFETCH_BATCHES = 2 * _READ_THREADS


def check_config(data_config):
  """Raises ConfigError naming the first data field with a bad value."""
  if data_config.source not in SOURCES:
    raise errors.ConfigError(
        f'data.source must be one of {SOURCES}, got {data_config.source!r}')
  if data_config.crop not in CROPS:
    raise errors.ConfigError(
        f'data.crop must be one of {CROPS}, got {data_config.crop!r}')
  if int(data_config.image_size) <= 0:
    raise errors.ConfigError(
        f'data.image_size must be positive, got {data_config.image_size}')
  if int(data_config.worker_count) < 0:
    raise errors.ConfigError(
        f'data.worker_count must be >= 0, got {data_config.worker_count}')
  if data_config.source == 'synthetic' and int(data_config.synthetic_size) <= 0:
    raise errors.ConfigError(
        'data.synthetic_size must be positive, got '
        f'{data_config.synthetic_size}')
  if not 0 <= float(data_config.max_bad_fraction) <= 1:
    raise errors.ConfigError(
        'data.max_bad_fraction must be in [0, 1], got '
        f'{data_config.max_bad_fraction}')
  if data_config.source == 'folder' and not data_config.path:
    raise errors.ConfigError("data.path must name an image folder when "
                             "data.source is 'folder'")
  _check_conditioning_fields(data_config)
  if data_config.shuffle_buffer:
    logging.warning('data.shuffle_buffer=%d is unused: random-access sources '
                    'are shuffled globally.', data_config.shuffle_buffer)


def _check_conditioning_fields(data_config):
  """The super-resolution and inpainting fields (absent ones read as off)."""
  image_size = int(data_config.image_size)
  low_res_size = data_config.get('low_res_size', 0)
  if (not isinstance(low_res_size, (int, np.integer))
      or isinstance(low_res_size, bool) or low_res_size < 0):
    raise errors.ConfigError('data.low_res_size must be an integer >= 0 '
                             f'(0 = off), got {low_res_size!r}')
  if low_res_size and (low_res_size >= image_size
                       or image_size % low_res_size):
    raise errors.ConfigError(
        'data.low_res_size must divide data.image_size '
        f'({image_size}) and be smaller, got {low_res_size}')
  kind = data_config.get('degradation', 'bicubic')
  if kind not in DEGRADATIONS:
    raise errors.ConfigError(
        f'data.degradation must be one of {DEGRADATIONS}, got {kind!r}')
  inpainting_masks = data_config.get('inpainting_masks', False)
  if not isinstance(inpainting_masks, (bool, np.bool_)):
    raise errors.ConfigError('data.inpainting_masks must be True or False, '
                             f'got {inpainting_masks!r}')
  if inpainting_masks and image_size < masks.MIN_SIZE:
    raise errors.ConfigError(
        f'data.inpainting_masks needs data.image_size >= {masks.MIN_SIZE}, '
        f'got {image_size}')


def make_source(data_config):
  """The random-access source named by data_config.source."""
  check_config(data_config)
  if data_config.source == 'synthetic':
    return synthetic.SyntheticShapes(
        data_config.synthetic_size, data_config.synthetic_seed,
        image_size=data_config.image_size)
  if data_config.source == 'folder':
    return folder.ImageFolder(data_config.path, data_config.label_column,
                              data_config.max_bad_fraction)
  # Imported here: TFDS is slow to import and only this source needs it.
  from latent_diffusion.data import tfds  # pylint: disable=g-import-not-at-top
  return tfds.TfdsSource(data_config.tfds_name, data_config.tfds_split,
                         data_config.tfds_data_dir)


def describe(data_config, source=None):
  """One line for logs, e.g. 'synthetic shapes, 10000 examples, 6 classes'."""
  source = make_source(data_config) if source is None else source
  if isinstance(source, synthetic.SyntheticShapes):
    return (f'synthetic shapes, {len(source)} examples, '
            f'{synthetic.NUM_CLASSES} classes, seed {source.seed}')
  if isinstance(source, folder.ImageFolder):
    labels = (f'labels from {source.label_source}' if source.label_source
              else 'no labels')
    if source.class_names:
      labels += f' ({len(source.class_names)} classes)'
    return f'folder {source.root}, {len(source)} images, {labels}'
  return (f'tfds {data_config.tfds_name} split {data_config.tfds_split}, '
          f'{len(source)} examples')


# Transforms on single records. Records hold 'image' uint8 (H, W, 3) and may
# hold 'segmentation' (H, W), 'boxes' (N, 5) and 'caption', which follow the
# image through every geometric step; other keys pass through unchanged.


def crop_window(height, width, random_crop, rng):
  """(top, left, side) of the largest square: centred, or placed at random."""
  side = min(height, width)
  if random_crop:
    return (int(rng.integers(0, height - side + 1)),
            int(rng.integers(0, width - side + 1)), side)
  return (height - side) // 2, (width - side) // 2, side


def crop_boxes(boxes, height, width, top, left, side):
  """Boxes in [0,1] of an (H, W) image, moved into the square crop window."""
  boxes = boxes.copy()
  valid = boxes[:, 0] >= 0
  scale = np.array([width, height, width, height], np.float32)
  offset = np.array([left, top, left, top], np.float32)
  coords = np.clip((boxes[valid, 1:] * scale - offset) / side, 0.0, 1.0)
  boxes[valid, 1:] = coords
  empty = valid.copy()
  empty[valid] = (coords[:, 2] <= coords[:, 0]) | (coords[:, 3] <= coords[:, 1])
  boxes[empty] = synthetic.BOX_PADDING
  return boxes


def resize_image(image, size):
  """uint8 (size, size, 3) by PIL bicubic (antialiased when shrinking)."""
  if image.shape[:2] == (size, size):
    return image
  resized = Image.fromarray(image).resize(
      (size, size), Image.Resampling.BICUBIC)
  return np.asarray(resized, np.uint8)


def resize_nearest(array, size):
  """Nearest-neighbour resize of a square (H, H, ...) array to (size, size)."""
  if array.shape[0] == size:
    return array
  index = ((np.arange(size) + 0.5) * array.shape[0] / size).astype(np.int64)
  return array[index][:, index]


def flip_caption(caption):
  """Swaps 'left' and 'right' so a mirrored caption stays true."""
  return re.sub(r'\b(left|right)\b',
                lambda m: 'right' if m.group(1) == 'left' else 'left', caption)


def flip_boxes(boxes):
  """Mirrors valid boxes horizontally: x0' = 1 - x1, x1' = 1 - x0."""
  boxes = boxes.copy()
  valid = boxes[:, 0] >= 0
  boxes[valid, 1], boxes[valid, 3] = 1 - boxes[valid, 3], 1 - boxes[valid, 1]
  return boxes


class CropResize(grain.transforms.RandomMap):
  """Crops the largest square (centre or random), resizes to image_size."""

  def __init__(self, image_size, random_crop):
    self.image_size = image_size
    self.random_crop = random_crop

  def random_map(self, element, rng):
    record = dict(element)
    height, width = record['image'].shape[:2]
    top, left, side = crop_window(height, width, self.random_crop, rng)
    window = (slice(top, top + side), slice(left, left + side))
    record['image'] = resize_image(record['image'][window], self.image_size)
    if 'segmentation' in record:
      record['segmentation'] = resize_nearest(
          record['segmentation'][window], self.image_size)
    if 'boxes' in record:
      record['boxes'] = crop_boxes(record['boxes'], height, width, top, left,
                                   side)
    return record


class RandomFlip(grain.transforms.RandomMap):
  """Mirrors image, segmentation, boxes and caption with probability 1/2."""

  def random_map(self, element, rng):
    if rng.random() >= 0.5:
      return element
    record = dict(element)
    record['image'] = np.ascontiguousarray(record['image'][:, ::-1])
    if 'segmentation' in record:
      record['segmentation'] = np.ascontiguousarray(
          record['segmentation'][:, ::-1])
    if 'boxes' in record:
      record['boxes'] = flip_boxes(record['boxes'])
    if 'caption' in record:
      record['caption'] = flip_caption(record['caption'])
    return record


class AddLowRes(grain.transforms.RandomMap):
  """Adds 'low_res': uint8 (s, s, 3), the final image degraded S/s times."""

  def __init__(self, image_size, low_res_size, kind):
    self.factor = image_size // low_res_size
    self.kind = kind

  def random_map(self, element, rng):
    record = dict(element)
    if self.kind == 'bsrgan_light':
      record['low_res'] = degradation.bsrgan_light(record['image'], self.factor,
                                                   rng)
    else:
      record['low_res'] = degradation.bicubic_downsample(record['image'],
                                                         self.factor)
    return record


class AddInpaintingMask(grain.transforms.RandomMap):
  """Adds 'mask': float32 (S, S, 1), 1 where the image is to be filled."""

  def __init__(self, image_size):
    self.image_size = image_size

  def random_map(self, element, rng):
    record = dict(element)
    record['mask'] = masks.inpainting_mask(self.image_size, rng)
    return record


class ToFloat(grain.transforms.Map):
  """uint8 image (and low_res) -> float32 in [-1, 1]."""

  def map(self, element):
    record = dict(element)
    for key in ('image', 'low_res'):
      if key in record:
        record[key] = record[key].astype(np.float32) / 127.5 - 1.0
    return record


def _derived_seeds(seed, process_index, count):
  """`count` independent uint32 seeds for one process from the run seed.

  The first k seeds do not depend on `count` (SeedSequence.generate_state
  hashes word by word), so seeds added later leave the earlier ones unchanged.
  """
  entropy = [int(seed) % 2**64, int(process_index)]
  return [int(s) for s in np.random.SeedSequence(entropy).generate_state(count)]


def _ensure_flags_parsed():
  """grain worker processes read absl flags; outside app.run use defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _init_worker(worker_index, worker_count, *, main_pid):
  """grain worker_init_fn: leave the preemption signal to the main process, and die with it.

  The worker is spawned by the main process's main thread (the first next() of the iterator), so
  the parent-death signal fires only when the main process exits.
  """
  del worker_index, worker_count
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  if sys.platform.startswith('linux'):
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != main_pid:  # the main process died before the line above
      os._exit(1)


def make_dataset(data_config, *, batch_size, seed, shuffle=True,
                 num_epochs=None, process_index=None, process_count=None,
                 drop_remainder=True, source=None):
  """The batched grain IterDataset for this process (see module doc).

  Args:
    data_config: the `config.data` ConfigDict.
    batch_size: examples per batch on this process.
    seed: run seed; shuffling and augmentation derive from it.
    shuffle: shuffle globally, differently each epoch.
    num_epochs: passes over this process's slice; None repeats forever.
    process_index: this process's slice index; default jax.process_index().
    process_count: number of slices; default jax.process_count().
    drop_remainder: drop a last batch smaller than batch_size.
    source: an already built source; default make_source(data_config).

  Returns:
    A grain IterDataset of dict batches.
  """
  if batch_size <= 0:
    raise errors.ConfigError(f'batch_size must be positive, got {batch_size}')
  source = make_source(data_config) if source is None else source
  process_index = (jax.process_index() if process_index is None
                   else process_index)
  process_count = (jax.process_count() if process_count is None
                   else process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in '
                     f'[0, {process_count})')
  (shuffle_seed, crop_seed, flip_seed, low_res_seed,
   mask_seed) = _derived_seeds(seed, process_index, 5)

  ds = grain.MapDataset.source(source)
  ds = ds[process_index::process_count]
  if not len(ds):
    raise errors.DataError(
        f'{describe(data_config, source)}: too few examples for '
        f'{process_count} processes')
  if shuffle:
    ds = ds.shuffle(seed=shuffle_seed)
  ds = ds.repeat(num_epochs)
  ds = ds.random_map(
      CropResize(data_config.image_size, data_config.crop == 'random'),
      seed=crop_seed)
  if data_config.flip:
    ds = ds.random_map(RandomFlip(), seed=flip_seed)
  low_res_size = data_config.get('low_res_size', 0)
  if low_res_size:
    ds = ds.random_map(
        AddLowRes(data_config.image_size, low_res_size,
                  data_config.get('degradation', 'bicubic')),
        seed=low_res_seed)
  if data_config.get('inpainting_masks', False):
    ds = ds.random_map(AddInpaintingMask(data_config.image_size),
                       seed=mask_seed)
  ds = ds.map(ToFloat())
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  read_options = grain.ReadOptions(
      num_threads=_READ_THREADS, prefetch_buffer_size=_PREFETCH_BATCHES)
  iter_ds = ds.to_iter_dataset(read_options)
  if data_config.worker_count > 0:
    _ensure_flags_parsed()
    iter_ds = iter_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=data_config.worker_count),
        worker_init_fn=functools.partial(_init_worker, main_pid=os.getpid()))
  return iter_ds


def make_iterator(data_config, *, batch_size, seed, shuffle=True,
                  num_epochs=None, process_index=None, process_count=None,
                  drop_remainder=True, source=None):
  """iter(make_dataset(...)): a grain DatasetIterator with get/set_state."""
  return iter(make_dataset(
      data_config, batch_size=batch_size, seed=seed, shuffle=shuffle,
      num_epochs=num_epochs, process_index=process_index,
      process_count=process_count, drop_remainder=drop_remainder,
      source=source))
