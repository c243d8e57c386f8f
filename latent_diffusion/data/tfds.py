"""TFDS random-access source (e.g. lsun/church_outdoor) over prepared data only.

Nothing is downloaded at run time: the dataset must already be prepared in a
random-access format under data_dir, e.g.

  tfds build lsun/church_outdoor --data_dir=DIR --file_format=array_record

Records: 'image' uint8 (H, W, 3) and, where the dataset has a scalar one,
'label' int32. Grey images, (H, W) or (H, W, 1), are repeated to 3 channels, an
alpha channel is dropped and uint16 images are scaled to 0..255; any other
shape raises DataError naming the dataset, split and record index.
"""

import numpy as np

from latent_diffusion import errors


def to_rgb(image):
  """uint8 (H, W, 3) from an image of 1, 3 or 4 channels, else ValueError."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f'image of shape {image.shape}, expected (H, W) or '
                     '(H, W, C) with C in 1, 3, 4')
  if min(image.shape[:2]) < 1:
    raise ValueError(f'empty image of shape {image.shape}')
  if image.dtype == np.uint16:  # tfds.features.Image(dtype=uint16).
    image = np.rint(image * (255.0 / 65535.0))
  image = image.astype(np.uint8)
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return np.ascontiguousarray(image[..., :3])


def default_data_dir():
  """Where TFDS looks when data.tfds_data_dir is ''."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return str(tfds.core.constants.DATA_DIR)


def open_data_source(name, split, data_dir):
  """tfds.data_source, never downloading; one-line DataError if unavailable."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = data_dir or default_data_dir()
  try:
    return tfds.data_source(
        name, split=split, data_dir=data_dir or None, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise errors.DataError(
        f'data.tfds_name: no TFDS dataset named {name!r}') from None
  except Exception as e:  # pylint: disable=broad-except
    # TFDS reports an unprepared dataset with several exception types
    # (NotImplementedError for a TFRECORD default, AssertionError, OSError...).
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise errors.DataError(
        f'TFDS dataset {name!r} split {split!r} is not prepared for random '
        f'access in data_dir {where!r} ({reason}); prepare it first with '
        f'`tfds build {name} --data_dir={where} --file_format=array_record`'
    ) from None


class TfdsSource:
  """Random-access source over a prepared TFDS split (see module doc)."""

  def __init__(self, name, split='train', data_dir=''):
    self.name = name
    self.split = split
    self.data_dir = data_dir
    self._source = open_data_source(name, split, data_dir)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    index = int(index)
    example = self._source[index]
    try:
      image = to_rgb(example['image'])
    except ValueError as e:
      raise errors.DataError(
          f'TFDS dataset {self.name!r} split {self.split!r} record {index}: '
          f'{e}') from None
    record = {'image': image}
    label = example.get('label')
    if label is not None and np.ndim(label) == 0:
      record['label'] = np.int32(label)
    return record

  def __repr__(self):
    return (f'TfdsSource({self.name!r}, split={self.split!r}, '
            f'{len(self)} examples)')
