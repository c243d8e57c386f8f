"""The device mesh and the shardings of state and batches. Same code for 1 device or many."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from latent_diffusion.errors import ConfigError

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')  # the batch is split over every axis


def make_mesh(mesh_config, devices=None) -> Mesh:
  """A (data, fsdp) mesh; one axis may be -1 to take the remaining devices."""
  devices = jax.devices() if devices is None else devices
  sizes = [mesh_config.data, mesh_config.fsdp]
  if sizes.count(-1) > 1:
    raise ConfigError('mesh: at most one of mesh.data, mesh.fsdp may be -1')
  known = int(np.prod([s for s in sizes if s != -1]))
  if known <= 0 or len(devices) % known:
    raise ConfigError(f'mesh: data={mesh_config.data} x fsdp={mesh_config.fsdp} does not divide '
                      f'the {len(devices)} available devices')
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise ConfigError(f'mesh: data={sizes[0]} x fsdp={sizes[1]} != {len(devices)} devices')
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the whole mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def state_shardings(state, mesh: Mesh):
  """Shardings for every leaf of the train state: replicated for now."""
  return jax.tree.map(lambda _: replicated(mesh), state)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assemble the global batch from each process's numpy shard. Non-numeric keys are dropped."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items() if np.asarray(v).dtype.kind in 'fiub'}
