"""Tests for torch_files.py: every array read without torch equals the tensor torch saved, in both
torch.save formats and safetensors; classes a checkpoint pickles beside its weights are never run."""

import collections
import importlib.util
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file as save_safetensors

from latent_diffusion.errors import CheckpointError
from latent_diffusion.torch_files import load_state_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
FORMATS = {'zip': True, 'legacy': False}  # name -> torch.save's _use_new_zipfile_serialization


def save_torch(obj, path, file_format):
  torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[file_format])
  return path


def as_numpy(tensor):
  """What load_state_dict promises for a tensor: its values, bfloat16 widened to float32."""
  tensor = tensor.detach()
  return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def assert_same_arrays(loaded, expected_tensors):
  assert sorted(loaded) == sorted(expected_tensors)
  for name, tensor in expected_tensors.items():
    expected = as_numpy(tensor)
    assert loaded[name].dtype == expected.dtype, name
    assert loaded[name].shape == expected.shape, name
    np.testing.assert_array_equal(loaded[name], expected, err_msg=name)


def dtype_tensors():
  generator = torch.Generator().manual_seed(0)
  normal = lambda *shape: torch.randn(*shape, generator=generator)
  return {
      'float32': normal(4, 3, 3, 3), 'float16': normal(5, 2).half(), 'bfloat16': normal(7, 3).bfloat16(),
      'float64': normal(3).double(), 'int64': torch.arange(-3, 9).reshape(3, 4),
      'int32': torch.arange(6, dtype=torch.int32), 'int8': torch.tensor([-128, 0, 127], dtype=torch.int8),
      'uint8': torch.tensor([0, 7, 255], dtype=torch.uint8), 'bool': torch.tensor([True, False, True]),
      'scalar': torch.tensor(2.5), 'empty': torch.zeros(0, 3),
  }


def view_tensors():
  """Tensors that are windows onto larger storages: torch saves the whole storage plus offset,
  shape and stride, and tensors sharing a storage share it in the file."""
  shared = torch.arange(60, dtype=torch.float32).reshape(5, 12)
  bfloat_shared = torch.linspace(-3, 3, 24).bfloat16().reshape(4, 6)
  return {
      'transposed': torch.randn(3, 5, generator=torch.Generator().manual_seed(1)).t(),
      'permuted_conv_kernel': torch.randn(2, 3, 4, 5).permute(3, 2, 0, 1),
      'shared_row': shared[3],
      'shared_column': shared[:, 7],
      'shared_window': shared[1:4, 2:10:3],
      'shared_whole': shared,
      'bfloat16_window': bfloat_shared[1:, ::2],
      'parameter': torch.nn.Parameter(torch.randn(4, 2)),
  }


@pytest.mark.parametrize('file_format', sorted(FORMATS))
def test_every_dtype_matches_torch(tmp_path, file_format):
  tensors = dtype_tensors()
  path = save_torch(tensors, tmp_path / 'weights.pt', file_format)
  assert_same_arrays(load_state_dict(path), tensors)


@pytest.mark.parametrize('file_format', sorted(FORMATS))
def test_strided_offset_and_shared_storage_views_match_torch(tmp_path, file_format):
  tensors = view_tensors()
  path = save_torch(tensors, tmp_path / 'weights.pt', file_format)
  loaded = load_state_dict(path)
  assert_same_arrays(loaded, tensors)
  assert loaded['transposed'].flags.c_contiguous and loaded['shared_row'].flags.owndata


@pytest.mark.parametrize('file_format', sorted(FORMATS))
def test_nested_dicts_are_flattened_with_dots_and_non_tensors_left_out(tmp_path, file_format):
  inner, outer = torch.ones(2), torch.arange(3)
  path = save_torch({'encoder': {'block': {'weight': inner}, 'steps': 7}, 'bias': outer, 'name': 'x'},
                    tmp_path / 'weights.pt', file_format)
  assert_same_arrays(load_state_dict(path), {'encoder.block.weight': inner, 'bias': outer})


CALLS = []  # what ran while a checkpoint was loaded


def _record_call(*args):
  CALLS.append(args)
  return 'ran'


class RecordingReduce:
  """Pickles as a call of _record_call: torch.load(weights_only=False) would run it."""

  def __reduce__(self):
    return _record_call, ('__reduce__',)


class RecordingState:
  """Pickles as class + __dict__: unpickling would run its __setstate__."""

  def __init__(self):
    self.learning_rate = 1e-4

  def __setstate__(self, state):
    CALLS.append(('__setstate__', state))
    self.__dict__.update(state)


@pytest.mark.parametrize('file_format', sorted(FORMATS))
def test_lightning_checkpoint_gives_its_state_dict_without_running_pickled_classes(tmp_path, file_format):
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
  with torch.no_grad():
    model[1].weight.normal_()
  state_dict = model.state_dict()
  checkpoint = {'epoch': 3, 'global_step': 1200, 'state_dict': state_dict,
                'optimizer_states': [{'state': {0: {'exp_avg': torch.ones(4)}}}],
                'hyper_parameters': {'config': RecordingState(), 'callback': RecordingReduce()}}
  path = save_torch(checkpoint, tmp_path / 'last.ckpt', file_format)
  CALLS.clear()
  loaded = load_state_dict(path)
  assert not CALLS
  assert_same_arrays(loaded, dict(state_dict))


def load_in_fresh_process(path, tmp_path):
  """load_state_dict in a Python without jax, as a script that reads weights before importing jax:
  numpy knows bfloat16 only once ml_dtypes is imported, which jax does in this process."""
  out = tmp_path / 'loaded.npz'
  script = ('import sys, numpy as np; from latent_diffusion.torch_files import load_state_dict; '
            f'np.savez({str(out)!r}, **load_state_dict({str(path)!r})); '
            'assert "jax" not in sys.modules')
  subprocess.run([sys.executable, '-c', script], cwd=REPO_ROOT, check=True)
  with np.load(out) as arrays:
    return dict(arrays)


@pytest.mark.parametrize('process', ['this_process', 'fresh_process_without_jax'])
@pytest.mark.parametrize('with_bfloat16', [False, True])
@pytest.mark.parametrize('file_name', ['model.safetensors', 'model_without_suffix'])
def test_safetensors_match_torch(tmp_path, file_name, with_bfloat16, process):
  tensors = {'float32': torch.randn(3, 4), 'float16': torch.randn(5).half(),
             'int64': torch.arange(6).reshape(2, 3)}
  if with_bfloat16:
    tensors['bfloat16'] = torch.randn(2, 5).bfloat16()
  path = tmp_path / file_name
  save_safetensors(tensors, str(path))
  loaded = load_state_dict(path) if process == 'this_process' else load_in_fresh_process(path, tmp_path)
  assert_same_arrays(loaded, tensors)


LPIPS_WEIGHTS = Path(importlib.util.find_spec('lpips').origin).parent / 'weights'


@pytest.mark.parametrize('name', ['v0.1/vgg.pth', 'v0.1/alex.pth', 'v0.0/squeeze.pth'])
def test_shipped_lpips_weights_match_torch_load(name):
  path = LPIPS_WEIGHTS / name
  assert not zipfile.is_zipfile(path)  # the legacy format, as torchvision's vgg16-397923af.pth
  expected = torch.load(path, map_location='cpu')
  assert len(expected) >= 5
  assert_same_arrays(load_state_dict(path), dict(expected))


class _StorageId:
  """Pickled as a legacy persistent storage id (Pickler.persistent_id below)."""

  def __init__(self, *fields):
    self.fields = fields


class _OldTensor:
  def __init__(self, rebuild, *args):
    self.rebuild, self.args = rebuild, args

  def __reduce__(self):
    return self.rebuild, self.args


def write_pre_1_0_legacy_file(path, root_values):
  """A legacy file as torch < 1.0 wrote them, which torch.save no longer does: tensors on storage
  views (persistent ids with view metadata) and rebuilt by _rebuild_tensor as well as _v2."""
  root = ('storage', torch.FloatStorage, '0', 'cpu', root_values.size)
  view = _StorageId(*root, ('1', 2, 6))  # elements 2..7 of storage '0'
  whole = _StorageId(*root, None)
  tensors = {
      'on_view': _OldTensor(torch._utils._rebuild_tensor, view, 1, (2, 2), (3, 1)),
      'on_view_v2': _OldTensor(torch._utils._rebuild_tensor_v2, view, 0, (3,), (2,), False,
                               collections.OrderedDict()),
      'on_root': _OldTensor(torch._utils._rebuild_tensor_v2, whole, 4, (2, 3), (1, 2), False,
                            collections.OrderedDict()),
  }

  class LegacyPickler(pickle.Pickler):
    def persistent_id(self, obj):
      return obj.fields if isinstance(obj, _StorageId) else None

  with open(path, 'wb') as file:
    for header in (0x1950A86A20F9469CFC6C, 1001, {'protocol_version': 1001, 'little_endian': True}):
      pickle.dump(header, file, protocol=2)
    LegacyPickler(file, protocol=2).dump(tensors)
    pickle.dump(['0'], file, protocol=2)
    file.write(np.int64(root_values.size).tobytes() + root_values.astype('<f4').tobytes())


def test_pre_1_0_legacy_storage_views_match_torch_load(tmp_path):
  path = tmp_path / 'old.pth'
  write_pre_1_0_legacy_file(path, np.arange(12, dtype=np.float32) * 1.5)
  expected = torch.load(path, weights_only=False)  # our own file: torch may run its pickle
  assert_same_arrays(load_state_dict(path), expected)


def test_missing_file_error_names_the_path(tmp_path):
  path = tmp_path / 'absent' / 'vgg16.pth'
  with pytest.raises(CheckpointError, match=f'not found: {path}$'):
    load_state_dict(path)


def write_garbage(path, kind):
  if kind == 'random_bytes':
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  elif kind == 'text':
    path.write_text('model:\n  base_learning_rate: 4.5e-6\n')
  elif kind == 'plain_pickle':
    path.write_bytes(pickle.dumps({'weight': [1.0, 2.0]}, protocol=2))
  elif kind == 'zip_without_data_pkl':
    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr('model/readme.txt', 'hello')


@pytest.mark.parametrize('kind', ['random_bytes', 'text', 'plain_pickle', 'zip_without_data_pkl'])
def test_unknown_file_error_names_the_path_and_expected_formats(tmp_path, kind):
  path = tmp_path / 'weights.pth'
  write_garbage(path, kind)
  with pytest.raises(CheckpointError) as error:
    load_state_dict(path)
  message = str(error.value)
  assert str(path) in message and '\n' not in message
  assert all(name in message for name in ('zip', 'legacy', 'safetensors')), message
