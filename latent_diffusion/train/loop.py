"""What both training stages share: checkpoints, writers, progress lines and the step loop."""

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from clu import metric_writers

from latent_diffusion.errors import CheckpointError


def write_config(directory: Path, config) -> None:
  """Write the resolved config as JSON (process 0 only)."""
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / 'config.json').write_text(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')


def make_writer(directory: Path) -> metric_writers.MetricWriter:
  """TensorBoard events in `directory` on process 0, plain logging elsewhere."""
  return metric_writers.create_default_writer(str(directory), just_logging=jax.process_index() > 0)


def _leaf_path(path) -> str:
  parts = []
  for entry in path:
    for attr in ('name', 'key', 'idx'):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
  return '/'.join(parts)


def _shapes_by_path(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]
  return {_leaf_path(path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, 'shape')}


def check_checkpoint_shapes(saved, expected, directory) -> None:
  """Raise CheckpointError naming the first parameter whose saved shape differs from the config's."""
  saved_shapes, expected_shapes = _shapes_by_path(saved), _shapes_by_path(expected)
  for name, shape in expected_shapes.items():
    if name not in saved_shapes:
      raise CheckpointError(f'checkpoint {directory} has no entry {name} that the config needs '
                            f'(shape {shape}); was it written with another config?')
    if saved_shapes[name] != shape:
      raise CheckpointError(f'checkpoint {directory}: {name} has shape {saved_shapes[name]} but the '
                            f'config gives {shape}')


class Checkpoints:
  """One orbax CheckpointManager for a stage: the train state plus the data iterator state."""

  def __init__(self, directory: Path, keep: int | None, save_every: int):
    """keep: how many recent checkpoints to retain (None = all)."""
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler()})
    self.save_every = save_every

  def latest_step(self) -> int | None:
    self.manager.wait_until_finished()
    return self.manager.latest_step()

  def save(self, step: int, state, iterator=None, force: bool = False) -> None:
    items = {'state': ocp.args.StandardSave(state)}
    if iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, iterator=None, step: int | None = None):
    """Restore onto the shapes, dtypes and shardings of `abstract_state`; iterator in place."""
    step = self.latest_step() if step is None else step
    saved = self.manager.item_metadata(step)['state']
    check_checkpoint_shapes(saved, abstract_state, self.directory)
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f'cannot restore step {step} from {self.directory}: {e}') from e
    return restored['state']

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying target shardings, for restoring onto any mesh."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


def restore_or_create(checkpoints: Checkpoints, abstract, shardings, create: Callable, rng, iterator):
  """(state, resumed): the latest checkpoint restored onto `shardings`, or create(rng) compiled."""
  if checkpoints.latest_step() is not None:
    return checkpoints.restore(abstract_with_shardings(abstract, shardings), iterator), True
  return jax.jit(create, out_shardings=shardings)(rng), False


class Progress:
  """Progress lines with steps/s and ETA, and scalar averages written every `every` steps."""

  def __init__(self, name: str, writer, total_steps: int, every: int, start_step: int):
    self.name, self.writer, self.total_steps, self.every = name, writer, total_steps, every
    self.sums, self.count = None, 0
    self.last_time, self.last_step = time.perf_counter(), start_step

  def update(self, step: int, metrics: dict) -> None:
    """Accumulate on device (no sync); log and write at every `every`-th step and the last one."""
    self.sums = metrics if self.sums is None else jax.tree.map(jnp.add, self.sums, metrics)
    self.count += 1
    if step % self.every and step != self.total_steps:
      return
    means = {k: float(v) / self.count for k, v in jax.device_get(self.sums).items()}
    now = time.perf_counter()
    steps_per_second = (step - self.last_step) / max(now - self.last_time, 1e-9)
    eta = (self.total_steps - step) / max(steps_per_second, 1e-9)
    self.writer.write_scalars(step, {**means, 'steps_per_second': steps_per_second})
    logging.info('%s step %d/%d  %s  %.2f steps/s  ETA %s', self.name, step, self.total_steps,
                 '  '.join(f'{k} {v:.4g}' for k, v in sorted(means.items())), steps_per_second,
                 time.strftime('%H:%M:%S', time.gmtime(eta)))
    self.sums, self.count, self.last_time, self.last_step = None, 0, now, step


def run_steps(*, name: str, state, train_step: Callable, batches: Iterator[dict], iterator,
              checkpoints: Checkpoints, writer, total_steps: int, log_every: int,
              periodic: list[tuple[int, Callable[[Any, int], None]]] = ()):
  """Run `train_step` from state.step to total_steps; checkpoint and run periodic hooks.

  `batches` yields global batches built from `iterator`, whose state is checkpointed with the
  train state. `periodic` holds (every, fn(state, step)) pairs, e.g. writing sample grids.
  """
  step = int(jax.device_get(state.step))
  progress = Progress(name, writer, total_steps, log_every, step)
  while step < total_steps:
    state, metrics = train_step(state, next(batches))
    step += 1
    progress.update(step, metrics)
    if step % checkpoints.save_every == 0 or step == total_steps:
      checkpoints.save(step, state, iterator, force=step == total_steps)
    for every, fn in periodic:
      if every and (step % every == 0 or step == total_steps):
        fn(state, step)
  checkpoints.manager.wait_until_finished()
  writer.flush()
  return state


def save_json(path: Path, payload: dict) -> None:
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + '\n')


def to_numpy(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))
