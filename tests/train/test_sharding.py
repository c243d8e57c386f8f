"""Tests for train/sharding.py: the (data, fsdp) mesh and global batches."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from latent_diffusion.errors import ConfigError
from latent_diffusion.train import sharding

REPO_ROOT = Path(__file__).resolve().parents[2]


def mesh_config(data, fsdp):
  return ml_collections.ConfigDict({'data': data, 'fsdp': fsdp})


@pytest.mark.parametrize('data, fsdp', [(-1, 1), (1, -1), (1, 1)])
def test_make_mesh_fills_minus_one_with_the_available_devices(data, fsdp):
  mesh = sharding.make_mesh(mesh_config(data, fsdp))
  assert mesh.axis_names == ('data', 'fsdp')
  assert mesh.devices.size == jax.device_count()
  assert dict(mesh.shape) == {'data': jax.device_count() if data == -1 else 1,
                              'fsdp': jax.device_count() if fsdp == -1 else 1}


@pytest.mark.parametrize('data, fsdp, message', [
    (-1, -1, 'at most one'),
    (3, -1, 'data=3'),           # 3 does not divide 8
    (2, 2, '!= 8 devices'),      # 4 devices of 8
    (0, 1, 'data=0'),
    (4, 4, 'fsdp=4'),
])
def test_make_mesh_rejects_sizes_that_do_not_fit_the_devices(data, fsdp, message):
  fake_devices = [object()] * 8  # rejected before any device is touched
  with pytest.raises(ConfigError, match=message) as error:
    sharding.make_mesh(mesh_config(data, fsdp), devices=fake_devices)
  assert str(error.value).startswith('mesh:') and '\n' not in str(error.value)


def test_global_batch_keeps_numeric_arrays_and_drops_strings():
  mesh = sharding.make_mesh(mesh_config(-1, 1))
  local = {'image': np.random.default_rng(0).uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32),
           'label': np.arange(4, dtype=np.int32),
           'caption': np.array(['a red circle', 'b', 'c', 'd']),
           'mask': np.ones((4, 8, 8, 1), np.bool_)}
  batch = sharding.global_batch(local, mesh)
  assert set(batch) == {'image', 'label', 'mask'}
  for key, value in batch.items():
    assert isinstance(value, jax.Array)
    assert value.shape == local[key].shape and value.dtype == local[key].dtype
    np.testing.assert_array_equal(value, local[key])
    assert value.sharding == sharding.batch_sharding(mesh)


def test_state_shardings_replicate_every_leaf():
  mesh = sharding.make_mesh(mesh_config(-1, 1))
  tree = {'a': np.zeros((2, 3)), 'b': [np.zeros(4), np.zeros(())]}
  shardings = sharding.state_shardings(tree, mesh)
  assert jax.tree.structure(shardings) == jax.tree.structure(tree)
  assert all(s == sharding.replicated(mesh) for s in jax.tree.leaves(shardings))


def test_eight_cpu_devices_split_mesh_and_batch():
  """With 8 forced CPU devices (a fresh process): data=-1, fsdp=2 gives a 4 x 2 mesh and the batch
  is split over all 8 devices along its leading axis."""
  script = textwrap.dedent('''
      import os
      os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
      import jax, ml_collections, numpy as np
      from latent_diffusion.train import sharding
      mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 2}))
      assert dict(mesh.shape) == {'data': 4, 'fsdp': 2}, mesh.shape
      image = np.arange(16 * 2, dtype=np.float32).reshape(16, 2)
      batch = sharding.global_batch({'image': image, 'caption': np.array(['x'] * 16)}, mesh)
      assert set(batch) == {'image'}
      shards = batch['image'].addressable_shards
      assert len(shards) == 8 and all(s.data.shape == (2, 2) for s in shards)
      np.testing.assert_array_equal(np.asarray(batch['image']), image)
      print('ok')
  ''')
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, 'PYTHONPATH': str(REPO_ROOT),
                               'TF_CPP_MIN_LOG_LEVEL': '2', 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == 'ok'


def test_size_rule_shards_large_arrays_over_fsdp_on_their_largest_divisible_axis():
  mesh = jax.sharding.Mesh(np.asarray([object()] * 4).reshape(2, 2), ('data', 'fsdp'))
  spec = lambda shape, min_size=100: sharding.array_sharding(shape, mesh, min_size).spec
  assert spec((3, 3, 64, 128)) == P(None, None, None, 'fsdp')   # largest divisible axis
  assert spec((256, 64)) == P('fsdp', None)
  assert spec((3, 3, 65, 7)) == P()                              # no axis divisible by 2
  assert spec((64,), min_size=128) == P()                        # below the size threshold
  assert spec(()) == P()                                         # step, scalars


def test_state_shardings_give_a_parameter_its_moments_and_ema_the_same_sharding():
  mesh = jax.sharding.Mesh(np.asarray([object()] * 2).reshape(1, 2), ('data', 'fsdp'))
  kernel = jax.ShapeDtypeStruct((32, 64), np.float32)
  state = {'params': {'k': kernel}, 'opt': ({'mu': {'k': kernel}, 'nu': {'k': kernel}},),
           'ema': {'k': kernel}, 'count': jax.ShapeDtypeStruct((), np.int32)}
  shardings = sharding.state_shardings(state, mesh, fsdp_min_size=1024)
  specs = {s.spec for s in jax.tree.leaves(shardings) if s.spec != P()}
  assert specs == {P(None, 'fsdp')}
  assert len([s for s in jax.tree.leaves(shardings) if s.spec != P()]) == 4
  assert shardings['count'].spec == P()


def test_initialize_distributed_after_jax_has_started_goes_on_as_one_process():
  jax.devices()  # the backend is up (as in a notebook)
  sharding.initialize_distributed(ml_collections.ConfigDict(
      {'coordinator_address': '', 'num_processes': 0, 'process_id': -1}))
  assert jax.process_count() == 1 and not jax.distributed.is_initialized()


@pytest.mark.parametrize('notices', [True, False])
def test_a_lone_process_gets_a_coordination_service_only_when_it_trains_and_no_gloo(notices):
  # With one, SIGTERM becomes a preemption notice; sample and eval modes go without, so it ends them.
  # Either way its devices reduce in-process, not over gloo's TCP loopback (jax's default).
  script = textwrap.dedent(f'''
      import jax, ml_collections
      from latent_diffusion.train import sharding
      sharding.initialize_distributed(ml_collections.ConfigDict(
          {{'coordinator_address': '', 'num_processes': 0, 'process_id': -1}}), preemption_notices={notices})
      print(jax.distributed.is_initialized(), jax.config.jax_cpu_collectives_implementation)
  ''')
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, 'PYTHONPATH': str(REPO_ROOT),
                                            'TF_CPP_MIN_LOG_LEVEL': '2', 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == f'{notices} None'
