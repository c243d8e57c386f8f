"""The device mesh and the shardings of state and batches. Same code for 1 device or many."""

import os
import socket

import jax
import numpy as np
from absl import logging
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


def array_sharding(shape: tuple[int, ...], mesh: Mesh, fsdp_min_size: int) -> NamedSharding:
  """The size rule: an array of at least `fsdp_min_size` elements is split over `fsdp` along its
  largest dimension that the fsdp axis size divides (the last such on ties); others are replicated.

  The rule sees only the shape, so a parameter, its Adam moments and its EMA copy always get the
  same sharding, and a checkpoint restores onto any mesh by recomputing it.
  """
  fsdp = mesh.shape['fsdp']
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < fsdp_min_size:
    return replicated(mesh)
  candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0]
  if not candidates:
    return replicated(mesh)
  _, axis = max(candidates)
  spec = [None] * len(shape)
  spec[axis] = 'fsdp'
  return NamedSharding(mesh, P(*spec))


def state_shardings(state, mesh: Mesh, fsdp_min_size: int = 2**16):
  """Shardings for every leaf of the train state (params, optimizer state, EMA, step, rng)."""
  return jax.tree.map(lambda leaf: array_sharding(tuple(leaf.shape), mesh, fsdp_min_size), state)


def describe_param_sharding(params, shardings) -> str:
  """e.g. 'fsdp=2: 12 of 80 parameter arrays (91% of the values) sharded'."""
  leaves = jax.tree.leaves(params)
  split = [leaf for leaf, s in zip(leaves, jax.tree.leaves(shardings)) if not s.is_fully_replicated]
  total = sum(int(np.prod(leaf.shape)) for leaf in leaves)
  values = sum(int(np.prod(leaf.shape)) for leaf in split)
  fsdp = jax.tree.leaves(shardings)[0].mesh.shape['fsdp']
  return (f'fsdp={fsdp}: {len(split)} of {len(leaves)} parameter arrays '
          f'({100 * values / max(total, 1):.0f}% of the values) sharded')


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assemble the global batch from each process's numpy shard. Non-numeric keys are dropped."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items() if np.asarray(v).dtype.kind in 'fiub'}


# Environment variables that tell jax.distributed.initialize() how to find its peers.
CLUSTER_ENVIRONMENT = ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE',
                       'TPU_WORKER_HOSTNAMES', 'CLOUD_TPU_TASK_ID')


def _free_local_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def initialize_distributed(distributed_config, preemption_notices: bool = True) -> None:
  """jax.distributed.initialize from the config, else from the cluster environment, else as a
  single local process. Must run before any computation.

  Even one process gets a coordination service when it trains (`preemption_notices`): it is what
  turns a SIGTERM into a preemption notice that every process sees at the same step
  (`reached_preemption_sync_point`). A lone process that only samples or evaluates gets none, so
  that SIGTERM ends it as usual.
  """
  if jax.distributed.is_initialized():
    return
  c = distributed_config
  several_processes = bool(c.coordinator_address) or any(name in os.environ for name in CLUSTER_ENVIRONMENT)
  # Processes reduce over gloo (TCP). A lone process's CPU devices share its memory: XLA's in-process
  # collectives make steps 4.6-7.4x faster than gloo's loopback (8 devices: benchmarks/mesh_parity.py).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo' if several_processes else None)
  if c.coordinator_address:
    jax.distributed.initialize(c.coordinator_address,
                               num_processes=c.num_processes if c.num_processes > 0 else None,
                               process_id=c.process_id if c.process_id >= 0 else None)
  elif several_processes:
    jax.distributed.initialize()
  elif not preemption_notices:
    return
  else:
    try:
      jax.distributed.initialize(f'127.0.0.1:{_free_local_port()}', num_processes=1, process_id=0)
    except RuntimeError as e:  # jax already computed something (a notebook, a test): go on alone
      logging.info('single process without jax.distributed (%s); SIGTERM will not save', e)
      return
  if jax.process_count() > 1:
    logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
