"""Tests for train/loop.py: orbax checkpoints of the train state and the data iterator, shape checks
against the config, and the shared step loop."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from latent_diffusion.data import pipeline
from latent_diffusion.errors import CheckpointError, TrainingError
from latent_diffusion.train import loop, sharding
from latent_diffusion.train.state import TrainState


def data_config():
  config = base.get_config().data
  config.image_size = 16
  config.synthetic_size = 12
  return config


def make_iterator():
  return pipeline.make_iterator(data_config(), batch_size=4, seed=3, process_index=0,
                                process_count=1)


def make_state(width=8, seed=0):
  params = {'dense': {'kernel': jnp.arange(4.0 * width).reshape(4, width) / (seed + 1),
                      'bias': jnp.full((width,), float(seed))}}
  return TrainState.create(params, optax.adam(1e-3), jax.random.PRNGKey(seed), ema=True,
                           extras={'scale_factor': jnp.asarray(0.5 + seed, jnp.float32)})


def abstract_of(state):
  mesh = sharding.make_mesh(base.get_config().mesh)
  abstract = jax.eval_shape(lambda: state)
  return loop.abstract_with_shardings(abstract, sharding.state_shardings(abstract, mesh))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture
def checkpoints(tmp_path):
  manager = loop.Checkpoints(tmp_path / 'checkpoints', keep=2, save_every=1)
  yield manager
  manager.close()


def test_empty_directory_has_no_latest_step(checkpoints):
  assert checkpoints.latest_step() is None


def test_save_restore_round_trips_state_and_resumes_the_data_stream(checkpoints):
  state = make_state().apply_gradients({'dense': {'kernel': jnp.ones((4, 8)), 'bias': jnp.ones(8)}},
                                       optax.adam(1e-3))
  iterator = make_iterator()
  next(iterator), next(iterator)
  checkpoints.save(7, state, iterator, force=True)
  expected_batch = next(iterator)  # what an uninterrupted run reads next

  fresh_iterator = make_iterator()
  restored = checkpoints.restore(abstract_of(make_state(seed=1)), fresh_iterator)
  assert checkpoints.latest_step() == 7
  assert int(restored.step) == 1
  assert_trees_equal(restored, state)
  resumed_batch = next(fresh_iterator)
  assert set(resumed_batch) == set(expected_batch)
  for key in expected_batch:
    np.testing.assert_array_equal(resumed_batch[key], expected_batch[key])
  # Not vacuous: a fresh iterator starts elsewhere in the stream.
  assert not np.array_equal(next(make_iterator())['image'], expected_batch['image'])


def test_restore_picks_the_latest_step_and_keeps_only_the_newest(checkpoints):
  for step in (1, 2, 3):
    checkpoints.save(step, make_state(seed=step), force=True)
  assert checkpoints.latest_step() == 3
  assert checkpoints.manager.all_steps() == [2, 3]  # keep=2
  restored = checkpoints.restore(abstract_of(make_state()))
  assert float(restored.extras['scale_factor']) == 3.5
  earlier = checkpoints.restore(abstract_of(make_state()), step=2)
  assert float(earlier.extras['scale_factor']) == 2.5


def test_restore_with_a_changed_shape_names_the_parameter_and_both_shapes(checkpoints):
  checkpoints.save(1, make_state(width=8), force=True)
  with pytest.raises(CheckpointError) as error:
    checkpoints.restore(abstract_of(make_state(width=16)))
  message = str(error.value)
  # Either changed leaf may come first; the message names it with its saved and configured shape.
  assert (re.search(r'params/dense/kernel\b.*\(4, 8\).*\(4, 16\)', message)
          or re.search(r'params/dense/bias\b.*\(8,\).*\(16,\)', message)), message
  assert str(checkpoints.directory) in message and '\n' not in message


def test_check_checkpoint_shapes_names_the_first_mismatch():
  saved = {'params': {'conv': {'kernel': jax.ShapeDtypeStruct((3, 3, 4, 32), jnp.float32)}}}
  expected = {'params': {'conv': {'kernel': jax.ShapeDtypeStruct((3, 3, 4, 64), jnp.float32)}}}
  with pytest.raises(CheckpointError, match=r'params/conv/kernel.*\(3, 3, 4, 32\).*\(3, 3, 4, 64\)'):
    loop.check_checkpoint_shapes(saved, expected, '/ckpt')
  loop.check_checkpoint_shapes(expected, expected, '/ckpt')  # matching shapes pass


def test_check_checkpoint_shapes_names_an_entry_missing_from_the_checkpoint():
  saved = {'params': {'a': np.zeros(2)}}
  expected = {'params': {'a': np.zeros(2), 'b': np.zeros((5, 5))}}
  with pytest.raises(CheckpointError, match=r'params/b.*\(5, 5\)'):
    loop.check_checkpoint_shapes(saved, expected, '/ckpt')


class RecordingWriter:
  def __init__(self):
    self.scalars, self.flushed = [], False

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))

  def flush(self):
    self.flushed = True


def counting_step(state, batch):
  """A pure step: params['count'] += batch size; metrics a scalar."""
  new = state.replace(step=state.step + 1,
                      params={'count': state.params['count'] + batch['image'].shape[0]})
  return new, {'loss': jnp.asarray(1.0) * state.step, 'nonfinite': jnp.zeros(())}


def test_run_steps_checkpoints_logs_and_calls_hooks_then_resumes(tmp_path):
  state = TrainState.create({'count': jnp.zeros((), jnp.int32)}, optax.identity(),
                            jax.random.PRNGKey(0))
  checkpoints = loop.Checkpoints(tmp_path / 'ckpt', keep=5, save_every=3)
  mesh = sharding.make_mesh(base.get_config().mesh)
  global_batches = lambda it: (sharding.global_batch(b, mesh) for b in it)
  iterator = make_iterator()
  batches = global_batches(iterator)
  writer, hooks = RecordingWriter(), []
  state = loop.run_steps(name='test', state=state, train_step=jax.jit(counting_step), batches=batches,
                         iterator=iterator, checkpoints=checkpoints, writer=writer, total_steps=7,
                         log_every=2, periodic=[(4, lambda s, step: hooks.append(step))])
  assert int(state.step) == 7 and int(state.params['count']) == 28
  assert checkpoints.manager.all_steps() == [3, 6, 7]
  assert hooks == [4, 7]
  assert [step for step, _ in writer.scalars] == [2, 4, 6, 7] and writer.flushed
  # Averages since the last write: steps 2 and 3 report losses 2 and 3 at step 4.
  assert writer.scalars[1][1]['loss'] == pytest.approx(2.5)
  assert 'steps_per_second' in writer.scalars[0][1]

  # Resume from step 7 towards 9.
  iterator = make_iterator()
  restored = checkpoints.restore(abstract_of(state), iterator)
  state = loop.run_steps(name='test', state=restored, train_step=jax.jit(counting_step),
                         batches=global_batches(iterator), iterator=iterator, checkpoints=checkpoints,
                         writer=RecordingWriter(), total_steps=9, log_every=2)
  assert int(state.step) == 9 and int(state.params['count']) == 36
  assert checkpoints.latest_step() == 9
  checkpoints.close()


def test_write_config_and_save_json_write_readable_json(tmp_path):
  config = base.get_config()
  loop.write_config(tmp_path / 'stage', config)
  written = json.loads((tmp_path / 'stage' / 'config.json').read_text())
  assert written['unet']['model_channels'] == config.unet.model_channels
  assert written['data']['source'] == 'synthetic'
  loop.save_json(tmp_path / 'deep' / 'eval.json', {'psnr': 30.5, 'steps': 3})
  assert json.loads((tmp_path / 'deep' / 'eval.json').read_text()) == {'psnr': 30.5, 'steps': 3}


def test_to_numpy_returns_host_arrays():
  out = loop.to_numpy({'a': jnp.ones((2,)), 'b': [jnp.zeros(())]})
  assert isinstance(out['a'], np.ndarray) and isinstance(out['b'][0], np.ndarray)


def nan_from_step(first_bad, last_bad=10**9):
  """A step whose update is skipped (nonfinite 1, params untouched) on steps first_bad..last_bad."""
  def step(state, batch):
    bad = (state.step + 1 >= first_bad) & (state.step + 1 <= last_bad)
    count = jnp.where(bad, state.params['count'], state.params['count'] + batch['image'].shape[0])
    return (state.replace(step=state.step + 1, params={'count': count}),
            {'loss': jnp.where(bad, jnp.nan, 1.0), 'nonfinite': bad.astype(jnp.float32)})
  return jax.jit(step)


def run_counting(tmp_path, train_step, total_steps, max_nonfinite_steps):
  state = TrainState.create({'count': jnp.zeros((), jnp.int32)}, optax.identity(), jax.random.PRNGKey(0))
  checkpoints = loop.Checkpoints(tmp_path / 'ckpt', keep=None, save_every=1)
  mesh = sharding.make_mesh(base.get_config().mesh)
  iterator = make_iterator()
  try:
    return checkpoints, loop.run_steps(
        name='test', state=state, train_step=train_step,
        batches=(sharding.global_batch(b, mesh) for b in iterator), iterator=iterator,
        checkpoints=checkpoints, writer=RecordingWriter(), total_steps=total_steps, log_every=1,
        max_nonfinite_steps=max_nonfinite_steps, metrics_path=tmp_path / 'metrics.jsonl')
  finally:
    checkpoints.close()


def test_fewer_consecutive_nonfinite_steps_than_the_limit_are_skipped_and_counted(tmp_path):
  _, state = run_counting(tmp_path, nan_from_step(3, 5), total_steps=8, max_nonfinite_steps=4)
  assert int(state.step) == 8 and int(state.params['count']) == 4 * 5  # steps 3, 4, 5 skipped
  logged = loop.read_metrics(tmp_path / 'metrics.jsonl')
  assert [logged[s]['nonfinite'] for s in range(1, 9)] == [0, 0, 1, 1, 1, 0, 0, 0]


def test_k_consecutive_nonfinite_steps_stop_training_naming_the_step(tmp_path):
  with pytest.raises(TrainingError, match=r'3 consecutive steps .* at step 6.*max_nonfinite_steps=3'):
    run_counting(tmp_path, nan_from_step(4), total_steps=20, max_nonfinite_steps=3)
  checkpoints = loop.Checkpoints(tmp_path / 'ckpt', keep=None, save_every=1)
  latest = checkpoints.latest_step()
  restored = checkpoints.restore(abstract_of(TrainState.create(
      {'count': jnp.zeros((), jnp.int32)}, optax.identity(), jax.random.PRNGKey(0))))
  checkpoints.close()
  assert latest <= 7 and int(restored.params['count']) == 4 * 3  # never an applied NaN step


def test_save_refuses_a_non_finite_state_naming_the_leaf_and_writes_nothing(checkpoints):
  state = make_state()
  state = state.replace(ema_params={'dense': {'kernel': state.ema_params['dense']['kernel'].at[0, 1].set(jnp.nan),
                                              'bias': state.ema_params['dense']['bias']}})
  with pytest.raises(TrainingError, match=r'step 5: ema_params/dense/kernel$'):
    checkpoints.save(5, state, force=True)
  assert checkpoints.latest_step() is None


def test_the_finite_check_stacks_same_shaped_leaves_within_its_budget_and_names_each_bad_one(monkeypatch):
  state = make_state()  # params, both Adam moments and the EMA: four (4, 8) kernels of 32 values
  monkeypatch.setattr(loop, 'STACK_VALUES', 64)  # two kernels per stack
  groups = loop._stack_groups(loop._floating_leaves(state))  # pylint: disable=protected-access
  kernels = [group for group in groups if group[0].endswith('dense/kernel')]
  assert [len(group) for group in kernels] == [2, 2]
  assert all(len(group) <= 8 for group in groups)  # the (8,) biases: up to 8 per stack
  bad = state.replace(opt_state=jax.tree.map(lambda x: x.at[0].set(jnp.inf) if x.shape == (8,) else x,
                                             state.opt_state))
  with pytest.raises(TrainingError, match=r'step 3: opt_state/0/mu/dense/bias, opt_state/0/nu/dense/bias$'):
    loop.assert_state_finite(bad, 3)
  loop.assert_state_finite(state, 3)


def test_keep_period_keeps_every_multiple_besides_the_newest(tmp_path):
  checkpoints = loop.Checkpoints(tmp_path / 'ckpt', keep=2, save_every=1, keep_period=4)
  for step in range(1, 11):
    checkpoints.save(step, make_state(), force=True)
  checkpoints.close()
  assert checkpoints.manager.all_steps() == [4, 8, 9, 10]


def test_read_metrics_keeps_the_last_line_of_a_step_logged_twice(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
  assert loop.read_metrics(path) == {1: {'step': 1, 'loss': 3.0}, 2: {'step': 2, 'loss': 1.5}}
  assert loop.read_metrics(tmp_path / 'absent.jsonl') == {}


@pytest.mark.parametrize('torn', ['{"step": 301, "lo', '{"step": 301, "note": "' + 'x' * 9000])
def test_a_line_torn_by_a_killed_run_is_dropped_before_the_resumed_run_appends(tmp_path, torn):
  """A SIGKILL in the middle of step 301's write, after 300 whole lines (longer than one read block);
  the torn line short, or itself longer than a block."""
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(f'{{"step": {step}, "loss": 3.0}}\n' for step in range(1, 301)) + torn)
  progress = loop.Progress('stage', loop.LoggingWriter(), total_steps=302, every=1, start_step=300,
                           metrics_path=path)
  progress.update(301, {'loss': jnp.float32(2.0)})
  logged = {step: record['loss'] for step, record in loop.read_metrics(path).items()}
  assert logged == {**{step: 3.0 for step in range(1, 301)}, 301: 2.0}
  loop.Progress('stage', loop.LoggingWriter(), total_steps=302, every=1, start_step=301, metrics_path=path)
  assert path.read_text().count('\n') == 301  # a log that ends with a whole line is left as it is


@pytest.mark.parametrize('why', ['no clu', 'not process 0'])
def test_make_writer_logs_scalars_when_clu_writers_cannot_load_or_are_not_needed(tmp_path, monkeypatch,
                                                                                   caplog, why):
  import sys  # pylint: disable=g-import-not-at-top
  if why == 'no clu':
    monkeypatch.setitem(sys.modules, 'clu', None)  # as on an accelerator image without TensorFlow
  else:  # process 0 writes the events; the others log only, without importing clu's TensorFlow
    monkeypatch.setattr(loop.jax, 'process_index', lambda: 1)
  writer = loop.make_writer(tmp_path)
  assert isinstance(writer, loop.LoggingWriter)
  with caplog.at_level('INFO'):
    writer.write_scalars(7, {'loss': np.float32(0.25)})
    writer.write_images(7, {'grid': np.zeros((1, 2, 2, 3))})
    writer.flush()
  assert '[7] loss=0.25' in caplog.text
  assert not list(tmp_path.iterdir())  # no event files
