"""Small helpers both stages use to set up a run: dtype, data, mesh, workdir paths."""

from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from latent_diffusion.data import pipeline
from latent_diffusion.errors import ConfigError
from latent_diffusion.train import loop, sharding

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def activation_dtype(config):
  if config.dtype not in DTYPES:
    raise ConfigError(f'dtype: {config.dtype!r} is not one of {sorted(DTYPES)}')
  return DTYPES[config.dtype]


def accumulate_gradients(tx, train_config):
  """optax.MultiSteps: gradients of `accumulate_grad_batches` steps are averaged into one update.

  Steps, checkpoints and the EMA count batches; the optimizer (and its schedule) counts updates.
  """
  k = train_config.accumulate_grad_batches
  if k < 1:
    raise ConfigError(f'accumulate_grad_batches: must be >= 1, got {k}')
  return tx if k == 1 else optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()


def stage_dir(workdir, stage: str) -> Path:
  return Path(workdir).absolute() / stage


def stage_checkpoints(workdir, stage: str, train_config=None) -> loop.Checkpoints:
  """The stage's CheckpointManager; retention and cadence from its train config when given.

  Without a train config the manager is for reading: it keeps every checkpoint, so that opening a
  workdir to look (is the stage complete? which params to sample with?) can never prune one.
  """
  keep = train_config.keep_checkpoints if train_config else None
  every = train_config.checkpoint_every_steps if train_config else 1
  keep_period = train_config.keep_period if train_config else 0
  return loop.Checkpoints(stage_dir(workdir, stage) / 'checkpoints', keep, every, keep_period,
                          writer=train_config is not None)


def latest_step(workdir, stage: str) -> int | None:
  """The step of the stage's latest checkpoint (None if there is none); read-only."""
  checkpoints = stage_checkpoints(workdir, stage)
  step = checkpoints.latest_step()
  checkpoints.close()
  return step


def is_stage_complete(workdir, stage: str, num_steps: int) -> bool:
  """True when the stage's latest checkpoint has reached num_steps."""
  latest = latest_step(workdir, stage)
  return latest is not None and latest >= num_steps


def local_batch_size(global_batch_size: int, mesh) -> int:
  """This process's share of a global batch that the mesh splits evenly."""
  if global_batch_size % mesh.size:
    raise ConfigError(f'batch_size {global_batch_size} is not divisible by the {mesh.size} devices '
                      f'of the mesh {dict(mesh.shape)}')
  if global_batch_size % jax.process_count():
    raise ConfigError(f'batch_size {global_batch_size} is not divisible by the '
                      f'{jax.process_count()} processes')
  return global_batch_size // jax.process_count()


def make_batches(config, global_batch_size: int, mesh, seed_offset: int = 0):
  """(iterator, generator of global device batches) for the config's data source."""
  iterator = pipeline.make_iterator(config.data, batch_size=local_batch_size(global_batch_size, mesh),
                                    seed=config.seed + seed_offset)

  def batches():
    for local_batch in iterator:
      yield sharding.global_batch(local_batch, mesh)

  return iterator, batches()


def preview_images(config, count: int):
  """The first `count` images of the data in a fixed order, unflipped: for reconstruction grids."""
  data_config = config.data.copy_and_resolve_references()
  with data_config.unlocked():
    data_config.flip = False
    data_config.worker_count = 0
  iterator = pipeline.make_iterator(data_config, batch_size=count, seed=config.seed, shuffle=False,
                                    process_index=0, process_count=1)
  return next(iterator)['image']
