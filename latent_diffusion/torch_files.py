"""Read PyTorch weight files into numpy without importing torch.

Runtime installs have no torch, yet the weights this project starts from ship as torch files:
torchvision's VGG16 and the LPIPS heads (legacy pre-1.6 `torch.save` format), the paper's Lightning
`.ckpt` files and diffusers `.bin` files (`torch.save` zip format), and `.safetensors` files.

The pickles are read by a restricted unpickler: it knows tensors, storages and OrderedDict, and turns
every other global into an inert placeholder, so a file never runs code (a Lightning checkpoint
pickles callbacks and config objects beside its weights).
"""

import codecs
import collections
import dataclasses
import io
import os
import pickle
import zipfile
import zlib
from typing import Any, Callable

import ml_dtypes  # registers bfloat16 with numpy, so safetensors.numpy can read bfloat16 files
import numpy as np
import safetensors.numpy

from latent_diffusion.errors import CheckpointError

FORMATS = 'torch.save zip format, legacy (pre-1.6) torch.save format or safetensors'

# Written by torch.save as the first pickle of a legacy file.
_LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL_VERSION = 1001

# torch.<Name>Storage -> element type as stored. bfloat16 is read as its raw 16 bits (uint16) and
# widened to float32 once a tensor is built.
_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': np.uint16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
    'ComplexFloatStorage': np.complex64, 'ComplexDoubleStorage': np.complex128,
}


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Flat {name: array} from a torch.save file (zip or legacy format) or a .safetensors file.

  A file holding a dict with a 'state_dict' entry (a Lightning checkpoint) gives that entry. Nested
  dicts are flattened with '.'; entries that are not tensors (step counters, placeholders of
  unknown classes) are left out. bfloat16 tensors come back as float32, every other dtype as is.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f'weight file not found: {path}')
  if _is_safetensors(path):
    return _load_safetensors(path)
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      return _flat_state_dict(_load_zip(archive, path), path)
  with open(path, 'rb') as file:
    return _flat_state_dict(_load_legacy(file, path), path)


@dataclasses.dataclass(eq=False)
class _Storage:
  """A torch storage: a flat array of one element type, read when a tensor first needs it."""
  bfloat16: bool  # then the array holds the raw uint16 bits
  read: Callable[[], np.ndarray]
  _array: np.ndarray | None = None

  def array(self) -> np.ndarray:
    if self._array is None:
      self._array = self.read()
    return self._array


@dataclasses.dataclass(eq=False)
class _Tensor:
  """A tensor as pickled: a strided window onto a storage, built into numpy after loading."""
  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]

  def to_numpy(self, path: str) -> np.ndarray:
    flat = self.storage.array()
    if 0 in self.shape:
      values = np.zeros(self.shape, flat.dtype)
    else:
      end = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) + 1
      if self.offset < 0 or min(self.stride, default=0) < 0 or end > flat.size:
        raise CheckpointError(f'{path}: a tensor of shape {self.shape} reads past the end of its storage')
      window = np.lib.stride_tricks.as_strided(
          flat[self.offset:], self.shape, [s * flat.itemsize for s in self.stride], writeable=False)
      values = np.array(window, order='C')  # a copy: the storage may be shared and is read-only
    if self.storage.bfloat16:  # the upper half of a float32
      return (values.astype(np.uint32) << 16).view(np.float32)
    return values


class _Placeholder:
  """Stands in for any class or function a pickle names that is not a tensor: built, filled, never run."""

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    return object.__new__(cls)

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    pass

  def append(self, value):
    pass

  def extend(self, values):
    pass


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """What find_class returns for torch.<Name>Storage: the element type persistent ids refer to."""
  name: str

  @property
  def raw_dtype(self) -> np.dtype:
    return np.dtype(_STORAGE_DTYPES[self.name])

  @property
  def bfloat16(self) -> bool:
    return self.name == 'BFloat16Storage'


def _rebuild_tensor(storage, offset, shape, stride, *unused):
  """torch._utils._rebuild_tensor(_v2): (storage, offset, size, stride, requires_grad, hooks, ...)."""
  del unused
  if not isinstance(storage, _Storage):
    return _Placeholder()
  return _Tensor(storage, int(offset), tuple(int(n) for n in shape), tuple(int(s) for s in stride))


def _rebuild_parameter(data, *unused):
  """torch._utils._rebuild_parameter(_with_state): an nn.Parameter is its data tensor."""
  del unused
  return data


_KNOWN_GLOBALS = {
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch', 'Size'): tuple,
    ('_codecs', 'encode'): codecs.encode,  # how protocol-2 pickles spell bytes objects
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Maps tensor rebuilds, storage types and OrderedDict to our handlers; everything else becomes a
  _Placeholder subclass named after it. `storage_for(persistent_id)` resolves storages."""

  def __init__(self, file, storage_for: Callable[[tuple], Any] | None = None):
    super().__init__(file, encoding='utf-8')
    self._storage_for = storage_for
    self._placeholders = {}

  def find_class(self, module, name):
    if (module, name) in _KNOWN_GLOBALS:
      return _KNOWN_GLOBALS[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) not in self._placeholders:
      self._placeholders[(module, name)] = type(f'{module}.{name}', (_Placeholder,), {})
    return self._placeholders[(module, name)]

  def persistent_load(self, pid):
    if self._storage_for is None:
      raise pickle.UnpicklingError('persistent id outside the tensor pickle')
    if isinstance(pid, tuple) and pid and _ascii(pid[0]) == 'storage':
      return self._storage_for(pid[1:])
    return _Placeholder()  # ('module', ...) entries of very old files that pickled whole modules


def _ascii(value):
  return value.decode('ascii') if isinstance(value, bytes) else value


def _native(buffer: bytes, dtype: np.dtype, byteorder: str) -> np.ndarray:
  """Flat native-order array of `dtype` from raw bytes stored in `byteorder` ('little' | 'big')."""
  stored = dtype.newbyteorder('<' if byteorder == 'little' else '>')
  values = np.frombuffer(buffer, stored)
  return values if stored.isnative or dtype.itemsize == 1 else values.astype(dtype)


def _load_zip(archive: zipfile.ZipFile, path: str):
  """torch.save's default format: <prefix>/data.pkl, storages at <prefix>/data/<key>."""
  pickles = [name for name in archive.namelist() if name.rsplit('/', 1)[-1] == 'data.pkl']
  if not pickles:
    raise CheckpointError(f'{path}: a zip file without data.pkl; expected one of: {FORMATS}')
  prefix = pickles[0][:-len('data.pkl')]
  byteorder = 'little'
  if f'{prefix}byteorder' in archive.namelist():
    byteorder = archive.read(f'{prefix}byteorder').decode('ascii').strip()
  storages = {}

  def storage_for(fields):
    storage_type, key, unused_location, unused_numel = fields
    key = _ascii(key)
    if not isinstance(storage_type, _StorageType):
      return _Placeholder()  # UntypedStorage of newer dtypes (uint16, float8): such tensors are left out
    if key not in storages:
      read = lambda: _native(archive.read(f'{prefix}data/{key}'), storage_type.raw_dtype, byteorder)
      storages[key] = _Storage(storage_type.bfloat16, read)
    return storages[key]

  try:
    return _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), storage_for).load()
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError) as error:
    raise CheckpointError(f'{path}: cannot read the torch zip file: {error}') from error


def _load_legacy(file, path: str):
  """Legacy torch.save: pickles of the magic number, protocol version, system info, the object
  (storages as persistent ids) and the sorted storage keys; then per key an int64 element count and
  the raw bytes."""
  try:
    magic_number = _RestrictedUnpickler(file).load()
  except Exception:  # pylint: disable=broad-except  # any garbage fails somewhere in the unpickler
    magic_number = None
  if magic_number != _LEGACY_MAGIC_NUMBER:
    raise CheckpointError(f'{path}: not a weight file; expected one of: {FORMATS}')
  storages, arrays = {}, {}

  def storage_for(fields):
    storage_type, key, unused_location, unused_numel, view = fields
    key = _ascii(key)
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'unsupported storage type {storage_type!r}')
    if key not in storages:
      storages[key] = (_Storage(storage_type.bfloat16, lambda: arrays[key]), storage_type.raw_dtype)
    root = storages[key][0]
    if view is None:
      return root
    view_key, view_offset, view_size = view  # old files saved views of a storage as their own ids
    view_key = _ascii(view_key)
    if view_key not in storages:
      window = lambda: root.array()[view_offset:view_offset + view_size]
      storages[view_key] = (_Storage(root.bfloat16, window), storages[key][1])
    return storages[view_key][0]

  try:
    if _RestrictedUnpickler(file).load() != _LEGACY_PROTOCOL_VERSION:
      raise CheckpointError(f'{path}: legacy torch file of an unknown protocol version')
    sys_info = _RestrictedUnpickler(file).load()
    byteorder = 'little' if sys_info.get('little_endian', True) else 'big'
    result = _RestrictedUnpickler(file, storage_for).load()
    for key in _RestrictedUnpickler(file).load():
      key = _ascii(key)
      dtype = storages[key][1]
      count = int.from_bytes(file.read(8), byteorder)
      buffer = file.read(count * dtype.itemsize)
      if len(buffer) != count * dtype.itemsize:
        raise EOFError(f'storage {key} is cut short')
      arrays[key] = _native(buffer, dtype, byteorder)
  except CheckpointError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError) as error:
    raise CheckpointError(f'{path}: cannot read the legacy torch file: {error}') from error
  return result


def _flat_state_dict(obj, path: str) -> dict[str, np.ndarray]:
  if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
    obj = obj['state_dict']
  if not isinstance(obj, dict):
    raise CheckpointError(f'{path}: holds a {type(obj).__name__}, not a dict of tensors')
  flat = {}

  def walk(tree, prefix):
    for key, value in tree.items():
      name = f'{prefix}{key}'
      if isinstance(value, _Tensor):
        try:
          flat[name] = value.to_numpy(path)
        except (KeyError, zipfile.BadZipFile, zlib.error) as error:  # its storage's bytes are missing
          raise CheckpointError(f'{path}: cannot read the data of {name}: {error}') from error
      elif isinstance(value, dict):
        walk(value, f'{name}.')

  walk(obj, '')
  return flat


def _is_safetensors(path: str) -> bool:
  """A .safetensors name, or the format's header: an 8-byte little-endian length, then '{'."""
  if path.endswith('.safetensors'):
    return True
  with open(path, 'rb') as file:
    head = file.read(9)
  return len(head) == 9 and head[8:] == b'{' and int.from_bytes(head[:8], 'little') < os.path.getsize(path)


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    flat = safetensors.numpy.load_file(path)
  except Exception as error:  # pylint: disable=broad-except  # safetensors raises its own error types
    raise CheckpointError(f'{path}: cannot read the safetensors file: {error}') from error
  return {name: values.astype(np.float32) if values.dtype == ml_dtypes.bfloat16 else values
          for name, values in flat.items()}
