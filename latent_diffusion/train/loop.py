"""What both training stages share: checkpoints, writers, progress lines and the step loop."""

import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from latent_diffusion.errors import CheckpointError, Preempted, TrainingError


def write_config(directory: Path, config) -> None:
  """Write the resolved config as JSON (process 0 only)."""
  if jax.process_index() == 0:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / 'config.json').write_text(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')


def make_writer(directory: Path):
  """A clu MetricWriter: TensorBoard events in `directory` on process 0, plain logging elsewhere.

  clu's writers import TensorFlow (about 8 s on a 2-core CPU), so they are imported here, by process
  0 of a training run only: the models, samplers, benchmarks and the other processes of a job go
  without it (as on accelerator images that lack it).
  """
  if jax.process_index() > 0:
    return LoggingWriter()
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # no TensorFlow on this image: scalars still reach the log and metrics.jsonl
    logging.warning('TensorBoard events off (%s); logging metrics only', e)
    return LoggingWriter()
  return metric_writers.create_default_writer(str(directory))


class LoggingWriter:
  """The writer methods the loops use, logging scalars only: on processes other than 0, and where
  clu's TensorFlow writers cannot load."""

  def write_scalars(self, step: int, scalars: dict) -> None:
    logging.info('[%d] %s', step, ', '.join(f'{k}={float(v):.6g}' for k, v in scalars.items()))

  def write_images(self, step: int, images: dict) -> None:
    del step, images

  def flush(self) -> None:
    pass


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


@functools.cache
def _write_whole_replicas_on_cpu() -> None:
  """On CPU, save each replicated array from one replica, whole (registered once per process).

  Orbax's replica-parallel save (its default off GPU) gives every replica a slice to write, which
  costs one slice program per array per device at the first save. CPU devices share the host's
  memory, so the split gains nothing: on 8 CPU devices the first save of the tiny test state compiled
  136 slice programs in each stage (about 5 s each time on 2 idle cores).
  """
  if jax.default_backend() == 'cpu' and jax.local_device_count() > 1:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpoints:
  """One orbax CheckpointManager for a stage: the train state plus the data iterator state.

  Saving is asynchronous; `latest_step` and `close` wait for a save in flight first. A save is
  written to a temporary directory and renamed when complete, so a process killed mid-save leaves
  the previous checkpoints intact (the temporary directory is removed on the next start).
  """

  def __init__(self, directory: Path, keep: int | None, save_every: int, keep_period: int = 0,
               writer: bool = True):
    """keep: how many recent checkpoints to retain (None = all); keep_period: also keep every
    checkpoint whose step is a multiple of it (0 = none). Only a writer removes the temporary
    folders of unfinished saves (a reader must not touch a save in flight), and it does so before
    returning, so that an error right after cannot interrupt the clean-up."""
    self.directory = Path(directory).absolute()
    _write_whole_replicas_on_cpu()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period or None,
                                             create=True, cleanup_tmp_directories=writer,
                                             enable_async_checkpointing=True),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler()})
    if writer:  # orbax runs the clean-up in the background and awaits it only at the first save
      getattr(self.manager, '_maybe_await_cleanup_tmp_directory', lambda: None)()
    self.save_every = save_every

  def latest_step(self) -> int | None:
    self.manager.wait_until_finished()
    return self.manager.latest_step()

  def reached_preemption(self, step: int) -> bool:
    """True at the step where every process agreed to save after a preemption notice (SIGTERM).
    Call at every step on every process; always False without jax.distributed."""
    return self.manager.reached_preemption(step)

  def save(self, step: int, state, iterator=None, force: bool = False) -> None:
    """Start an async save; the state is checked to be finite first (TrainingError if not)."""
    assert_state_finite(state, step)
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


# Leaves of one shape and dtype are stacked and reduced together, at most this many values per stack
# (a 64 MiB float32 copy): the check then compiles to a few dozen reductions instead of one per leaf
# (params, both Adam moments and the EMA share their shapes). The first call for the tiny stage-1 state
# went from 3.88 s to 0.72 s on a 2-core CPU.
STACK_VALUES = 2**24


def _stack_groups(leaves: dict) -> list[list[str]]:
  """Leaf names grouped by (shape, dtype), each group split to hold at most STACK_VALUES values."""
  groups, open_groups = [], {}
  for name, leaf in leaves.items():
    key, size = (tuple(leaf.shape), jnp.dtype(leaf.dtype)), max(1, int(np.prod(leaf.shape)))
    group = open_groups.get(key)
    if group is None or (len(group) + 1) * size > STACK_VALUES:
      group = open_groups[key] = []
      groups.append(group)
    group.append(name)
  return groups


@jax.jit
def _rows_finite(stacks):
  """For each tuple of same-shaped arrays: a bool per array, True where it is finite everywhere."""
  return [jnp.all(jnp.isfinite(jnp.stack(arrays)), axis=tuple(range(1, arrays[0].ndim + 1)))
          for arrays in stacks]


def _nonfinite_leaves(tree) -> list[str]:
  """Names of the floating leaves with a NaN or Inf anywhere (reduced on device)."""
  leaves = _floating_leaves(tree)
  groups = _stack_groups(leaves)
  flags = jax.device_get(_rows_finite([tuple(leaves[name] for name in group) for group in groups]))
  return sorted(name for group, row in zip(groups, flags) for name, finite in zip(group, row) if not finite)


def _floating_leaves(tree) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_leaf_path(path): leaf for path, leaf in leaves
          if jnp.issubdtype(leaf.dtype, jnp.inexact)}


def assert_state_finite(state, step: int) -> None:
  """TrainingError unless every parameter, optimizer moment and EMA is finite (checked on device)."""
  bad = _nonfinite_leaves(state)
  if bad:
    raise TrainingError(f'refusing to save a non-finite state at step {step}: '
                        f'{", ".join(bad[:5])}{" ..." if len(bad) > 5 else ""}')


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying target shardings, for restoring onto any mesh."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


def restore_or_create(checkpoints: Checkpoints, abstract, shardings, create: Callable, rng, iterator):
  """(state, resumed): the latest checkpoint restored onto `shardings`, or create(rng) compiled."""
  if checkpoints.latest_step() is not None:
    return checkpoints.restore(abstract_with_shardings(abstract, shardings), iterator), True
  return jax.jit(create, out_shardings=shardings)(rng), False


def drop_torn_last_line(path: Path) -> None:
  """Cut a last line that a killed run left without its newline: the next run appends whole lines
  after it, and a torn record would otherwise merge with the first of them into one unreadable line."""
  try:
    with open(path, 'rb+') as f:
      end = f.seek(0, os.SEEK_END)
      tail = b''
      while end > 0 and b'\n' not in tail:  # only the last line is read, however long the log
        start = max(0, end - 4096)
        f.seek(start)
        tail, end = f.read(end - start) + tail, start
      if tail and not tail.endswith(b'\n'):
        f.truncate(end + tail.rfind(b'\n') + 1)
  except FileNotFoundError:
    pass


class Progress:
  """Progress lines with steps/s and ETA; scalar averages written every `every` steps to the
  TensorBoard writer and, on process 0, appended as one JSON line each to `metrics_path`."""

  def __init__(self, name: str, writer, total_steps: int, every: int, start_step: int,
               metrics_path: Path | None = None):
    self.name, self.writer, self.total_steps, self.every = name, writer, total_steps, every
    self.metrics_path = metrics_path if jax.process_index() == 0 else None
    if self.metrics_path is not None:
      drop_torn_last_line(self.metrics_path)
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
    if self.metrics_path is not None:
      with open(self.metrics_path, 'a') as f:
        f.write(json.dumps({'step': step, **means, 'steps_per_second': round(steps_per_second, 4)}) + '\n')
    logging.info('%s step %d/%d  %s  %.2f steps/s  ETA %s', self.name, step, self.total_steps,
                 '  '.join(f'{k} {v:.4g}' for k, v in sorted(means.items())), steps_per_second,
                 time.strftime('%H:%M:%S', time.gmtime(eta)))
    self.sums, self.count, self.last_time, self.last_step = None, 0, now, step


def read_metrics(path: Path) -> dict[int, dict]:
  """{step: metrics} from a metrics.jsonl; a step logged twice (a rerun after a crash between
  logging and checkpointing) keeps its last line."""
  lines = Path(path).read_text().splitlines() if Path(path).exists() else []
  return {record['step']: record for record in map(json.loads, lines)}


class NonFiniteGuard:
  """Counts consecutive steps whose update was skipped for a non-finite loss or gradient and stops
  training after `patience` of them. Each step's flag is read one step late, so the host never
  waits for the step it has just dispatched."""

  def __init__(self, name: str, patience: int):
    self.name, self.patience = name, patience
    self.consecutive, self.pending = 0, None

  def push(self, step: int, skipped) -> None:
    self.flush()
    self.pending = (step, skipped)

  def flush(self) -> None:
    if self.pending is None:
      return
    step, skipped = self.pending
    self.pending = None
    if not float(skipped):
      self.consecutive = 0
      return
    self.consecutive += 1
    logging.warning('%s step %d: non-finite loss or gradient; update skipped (%d in a row)',
                    self.name, step, self.consecutive)
    if self.consecutive >= self.patience:
      raise TrainingError(f'{self.name}: {self.consecutive} consecutive steps with a non-finite loss '
                          f'or gradient, the last at step {step}; stopping (max_nonfinite_steps='
                          f'{self.patience}). The last checkpoint holds the state before them.')


def run_steps(*, name: str, state, train_step: Callable, batches: Iterator[dict], iterator,
              checkpoints: Checkpoints, writer, total_steps: int, log_every: int,
              max_nonfinite_steps: int = 10, metrics_path: Path | None = None,
              periodic: list[tuple[int, Callable[[Any, int], None]]] = ()):
  """Run `train_step` from state.step to total_steps; checkpoint and run periodic hooks.

  `batches` yields global batches built from `iterator`, whose state is checkpointed with the
  train state. `periodic` holds (every, fn(state, step)) pairs, e.g. writing sample grids.
  A preemption notice saves at the agreed step and raises Preempted once the save is complete.
  `train_step` must report metrics['nonfinite'] (1.0 when it skipped the update).
  """
  step = int(jax.device_get(state.step))
  progress = Progress(name, writer, total_steps, log_every, step, metrics_path)
  guard = NonFiniteGuard(name, max_nonfinite_steps)
  while step < total_steps:
    state, metrics = train_step(state, next(batches))
    step += 1
    guard.push(step, metrics['nonfinite'])
    progress.update(step, metrics)
    preempted = checkpoints.reached_preemption(step)
    if preempted or step % checkpoints.save_every == 0 or step == total_steps:
      checkpoints.save(step, state, iterator, force=True)
    if preempted:
      checkpoints.manager.wait_until_finished()
      writer.flush()
      raise Preempted(name, step)
    for every, fn in periodic:
      if every and (step % every == 0 or step == total_steps):
        fn(state, step)
  guard.flush()
  checkpoints.manager.wait_until_finished()
  writer.flush()
  return state


def save_json(path: Path, payload: dict) -> None:
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + '\n')


def to_numpy(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))
