"""Image-folder source: every image file under a directory, optionally labelled.

Files: every file under `path`, searched recursively, whose suffix is one of
IMAGE_SUFFIXES (any case), sorted by path relative to the root (POSIX form), so
index i names the same file on every machine. Hidden files and folders (names
starting with '.') are left out.

Labels (int32 'label' key), first rule that applies:
  1. label_column == '': no labels.
  2. `labels.csv` exists at the root: it needs a `filename` column and the
     label column. A row matches an image by its path relative to the root, or
     else by its base name. An image without a row, a missing column or a
     non-integer label raises DataError.
  3. Class folders: when every image lies in a top-level sub-folder (none sits
     directly at the root), the label is the index of its top-level folder name
     among the sorted names of the top-level folders holding images. For
     cifar10/test this gives airplane=0, automobile=1, ..., truck=9.
  4. Otherwise: no labels.

Images come out as uint8 (H, W, 3) RGB whatever their mode: grey, palette,
LA, RGBA and CMYK by PIL's conversion (alpha is dropped, not composited); 16-bit
grey ('I;16*', and 'I' as 16-bit PNGs read in older Pillow) scaled from
0..65535; float ('F') scaled from the smallest of [0, 1], [0, 255], [0, 65535]
holding its maximum. Animations give their first frame. EXIF orientation is not
applied.

Bad files: a file that does not decode, or an image with a side shorter than
MIN_SIDE pixels (a 1-pixel line or tracking dot has nothing to crop), is skipped
with a warning naming it: reading index i returns the next good image (i+1,
i+2, ..., wrapping around). Once the distinct bad files met exceed
max_bad_fraction * len(files), every read raises DataError listing them.
`num_skipped` and `skipped_paths` report the bad files this process has met
(with grain workers, each worker counts its own; with several processes the
limit applies to each process's count, against the whole folder).
"""

import csv
import os
from pathlib import Path
import threading

from absl import logging
import numpy as np
from PIL import Image

from latent_diffusion import errors

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.gif')
LABELS_CSV = 'labels.csv'
FILENAME_COLUMN = 'filename'
MIN_SIDE = 2  # Images with a shorter side are refused as bad files.
MAX_LISTED = 10  # Bad files named in the error; the rest are counted.
_FLOAT_RANGES = (1.0, 255.0, 65535.0)


def find_images(root):
  """Sorted POSIX paths, relative to root, of the image files under it."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = [d for d in dirnames if not d.startswith('.')]
    rel_dir = Path(dirpath).relative_to(root)
    for name in filenames:
      if not name.startswith('.') and name.lower().endswith(IMAGE_SUFFIXES):
        found.append((rel_dir / name).as_posix())
  return sorted(found)


def read_csv_labels(csv_path, label_column):
  """{filename: int label} from a labels.csv."""
  with open(csv_path, newline='') as f:
    reader = csv.DictReader(f)
    columns = reader.fieldnames or []
    for column in (FILENAME_COLUMN, label_column):
      if column not in columns:
        raise errors.DataError(
            f'{csv_path} has no column {column!r} (columns: {columns}); set '
            'data.label_column to one of them, or to \'\' for no labels')
    labels = {}
    for line, row in enumerate(reader, start=2):
      try:
        labels[row[FILENAME_COLUMN]] = int(row[label_column])
      except (TypeError, ValueError):
        raise errors.DataError(
            f'{csv_path} line {line}: {label_column}={row[label_column]!r} is '
            'not an integer') from None
  return labels


def labels_from_csv(files, csv_path, label_column):
  """int32 labels of `files` (relative paths), matched by path or base name."""
  table = read_csv_labels(csv_path, label_column)
  labels = []
  for rel in files:
    label = table.get(rel, table.get(rel.rsplit('/', 1)[-1]))
    if label is None:
      raise errors.DataError(f'{csv_path} has no row for image {rel}')
    labels.append(label)
  return np.asarray(labels, np.int32)


def class_folders(files):
  """Sorted top-level folder names if every file sits in one, else None."""
  if any('/' not in rel for rel in files):
    return None
  return tuple(sorted({rel.split('/', 1)[0] for rel in files}))


def to_rgb(image):
  """uint8 (H, W, 3) RGB array of a PIL image of any mode (see module doc)."""
  if image.mode == 'I' or image.mode.startswith('I;16'):
    top = 65535.0
  elif image.mode == 'F':
    top = None
  else:
    return np.asarray(image.convert('RGB'), dtype=np.uint8)
  values = np.asarray(image, dtype=np.float64)
  if top is None:
    if not np.isfinite(values).all():
      raise ValueError('float image with non-finite values')
    peak = float(values.max())
    top = next((t for t in _FLOAT_RANGES if peak <= t), peak)
  grey = np.rint(np.clip(values, 0.0, top) * (255.0 / top)).astype(np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)


def decode_image(file_path):
  """uint8 (H, W, 3) RGB array of an image file (first frame of animations).

  Raises:
    ValueError: the image has a side shorter than MIN_SIDE.
    Exception: whatever PIL raises for a file it cannot decode.
  """
  with Image.open(file_path) as image:
    width, height = image.size
    if min(width, height) < MIN_SIDE:
      raise ValueError(f'{width}x{height} image, smaller than '
                       f'{MIN_SIDE}x{MIN_SIDE}')
    return to_rgb(image)


class ImageFolder:
  """Random-access source of the images under `path` (see module doc).

  Args:
    path: the folder, searched recursively.
    label_column: labels.csv column of the label; '' for no labels.
    max_bad_fraction: largest tolerated fraction of bad files, in [0, 1].
  """

  def __init__(self, path, label_column='label', max_bad_fraction=0.01):
    if not 0 <= max_bad_fraction <= 1:
      raise ValueError(
          f'max_bad_fraction must be in [0, 1], got {max_bad_fraction}')
    self.max_bad_fraction = float(max_bad_fraction)
    self.root = Path(path).expanduser()
    if not str(path) or not self.root.exists():
      raise errors.DataError(f'data.path does not exist: {str(path)!r}')
    if not self.root.is_dir():
      raise errors.DataError(f'data.path is not a directory: {self.root}')
    self.files = tuple(find_images(self.root))
    if not self.files:
      raise errors.DataError(
          f'data.path holds no image files ({", ".join(IMAGE_SUFFIXES)}): '
          f'{self.root}')
    self.class_names = None
    self.labels = None
    self.label_source = None
    csv_path = self.root / LABELS_CSV
    if not label_column:
      pass
    elif csv_path.is_file():
      self.labels = labels_from_csv(self.files, csv_path, label_column)
      self.label_source = f'{LABELS_CSV} column {label_column!r}'
    else:
      self.class_names = class_folders(self.files)
      if self.class_names is not None:
        index = {name: i for i, name in enumerate(self.class_names)}
        self.labels = np.asarray(
            [index[rel.split('/', 1)[0]] for rel in self.files], np.int32)
        self.label_source = 'class folders'
    self._bad = {}  # index -> None, in the order met.
    self._lock = threading.Lock()  # grain reads from several threads.

  def __getstate__(self):
    state = dict(self.__dict__)
    del state['_lock']  # Locks do not pickle (grain workers).
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  @property
  def num_skipped(self):
    """Number of distinct bad files met so far in this process."""
    return len(self._bad)

  @property
  def skipped_paths(self):
    """Paths (str) of the distinct bad files met so far, in the order met."""
    with self._lock:
      bad = tuple(self._bad)
    return tuple(str(self.root / self.files[i]) for i in bad)

  def too_many_bad(self):
    """Whether the bad files met exceed max_bad_fraction of all files."""
    # count / total, not fraction * total: 29 of 100 is not above 0.29.
    return len(self._bad) / len(self.files) > self.max_bad_fraction

  def _too_many_bad_error(self):
    """DataError naming the count, the limit, the root and the bad files."""
    with self._lock:
      bad = [self.files[i] for i in self._bad]
    listed = ', '.join(bad[:MAX_LISTED])
    if len(bad) > MAX_LISTED:
      listed += f' ... and {len(bad) - MAX_LISTED} more'
    return errors.DataError(
        f'{len(bad)} of {len(self.files)} images under {self.root} are bad '
        f'(undecodable or too small), more than data.max_bad_fraction='
        f'{self.max_bad_fraction:g} allows; fix or remove them, or raise '
        f'data.max_bad_fraction: {listed}')

  def __len__(self):
    return len(self.files)

  def _read(self, index):
    """The record of file `index`, or None if it is bad."""
    if index in self._bad:
      return None
    file_path = self.root / self.files[index]
    try:
      image = decode_image(file_path)
    except Exception as e:  # pylint: disable=broad-except
      # Any failure to read one file (truncated, not an image, gone, a decoder
      # bug) must not stop training: skip the file, up to max_bad_fraction.
      with self._lock:
        self._bad[index] = None
        count = len(self._bad)
      logging.warning('Skipping bad image %s (%s: %s); %d skipped so far.',
                      file_path, type(e).__name__, e, count)
      return None
    record = {'image': image}
    if self.labels is not None:
      record['label'] = self.labels[index]
    return record

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < len(self.files):
      raise IndexError(
          f'index {index} out of range for {len(self.files)} images')
    for offset in range(len(self.files)):
      record = self._read((index + offset) % len(self.files))
      if self.too_many_bad():
        raise self._too_many_bad_error()
      if record is not None:
        return record
    raise errors.DataError(f'no image under {self.root} could be decoded')

  def __repr__(self):
    return f'ImageFolder({str(self.root)!r}, {len(self.files)} images)'
