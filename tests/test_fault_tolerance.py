"""Scale and reliability of both training stages, end to end on tests/tiny_config.py (16x16 images,
2 batches of 8 per epoch): exact resume, SIGTERM preemption, SIGKILL during saves, 8 devices vs 1,
restoring 8 devices onto 1, and two jax.distributed processes.

In-process runs and `python -m latent_diffusion.main` subprocesses share the XLA flags and the
persistent compilation cache set in conftest.py, so they run the same compiled programs and their
results can be compared bit for bit.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import kill_loop
import tiny_config
from latent_diffusion import main
from latent_diffusion.train import autoencoder, common, diffusion, loop, sharding

STAGES = {'autoencoder': autoencoder, 'diffusion': diffusion}
STEPS = 6


# Only each stage's final (or preemption) save: in-process runs and the subprocesses that need no more.
FINAL_SAVES_ONLY = {'autoencoder_train.checkpoint_every_steps': 100, 'diffusion_train.checkpoint_every_steps': 100}


def tiny(mode='train', **overrides):
  config = tiny_config.get_config()
  config.mode = mode
  for name, value in FINAL_SAVES_ONLY.items():
    section, field = name.split('.')
    config[section][field] = value
  config.autoencoder_train.eval_every_steps = 0  # validation is not what these tests are about
  for name, value in overrides.items():
    section, field = name.split('__')
    config[section][field] = value
  return config


def final_state(workdir, stage, config=None):
  """The latest checkpoint of a stage, restored onto this process's single device, as numpy."""
  config = config or tiny()
  module = STAGES[stage]
  model = autoencoder.build_autoencoder(config) if stage == 'autoencoder' else diffusion.build_denoiser(config)
  abstract, shardings = module.abstract_state(model, config, sharding.make_mesh(config.mesh))
  checkpoints = common.stage_checkpoints(workdir, stage)
  try:
    return loop.to_numpy(checkpoints.restore(loop.abstract_with_shardings(abstract, shardings)))
  finally:
    checkpoints.close()


def metrics(workdir, stage):
  """{step: logged values} without the timing, which no two runs share."""
  return {step: {k: v for k, v in record.items() if k != 'steps_per_second'}
          for step, record in loop.read_metrics(Path(workdir) / stage / 'metrics.jsonl').items()}


def assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def run_main(workdir, mode, overrides, extra_env=None, timeout=600):
  result = subprocess.run(kill_loop.main_command(workdir, mode, overrides), cwd=kill_loop.REPO_ROOT,
                          env=kill_loop.subprocess_env(extra_env), capture_output=True, text=True,
                          timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """Both stages trained STEPS steps without interruption, on one device."""
  workdir = tmp_path_factory.mktemp('straight')
  main.run(tiny(), str(workdir))
  return workdir


# With 16 examples in batches of 8, an epoch is 2 batches. Stage 1 stops after step 3, inside its
# second epoch. Stage 2's scale_by_std reads one batch before its first step, so its stop after step 3
# is at an epoch boundary. Both stages restore the data iterator with the same code: each position is
# tested once.
@pytest.mark.parametrize('stage', ['autoencoder', 'diffusion'])
def test_stopping_and_resuming_is_bitwise_equal_to_training_straight(straight, tmp_path, stage):
  workdir = tmp_path / 'resumed'
  if stage == 'diffusion':  # the same trained stage 1
    shutil.copytree(straight / 'autoencoder', workdir / 'autoencoder')
  for num_steps in (3, STEPS):  # the second run restores the first one's checkpoint
    main.run(tiny(f'train_{stage}', **{f'{stage}_train__num_steps': num_steps}), str(workdir))
  resumed, reference = final_state(workdir, stage), final_state(straight, stage)
  assert int(resumed.step) == STEPS
  # params, optimizer state, EMA, rng and scale factor
  assert_bitwise_equal(resumed, reference)
  assert sorted(metrics(workdir, stage)) == list(range(1, STEPS + 1))
  assert metrics(workdir, stage) == metrics(straight, stage)  # every logged value of every step


def wait_until(done, process, timeout=600):
  """Poll until done() (or the timeout); the training process must still be running then."""
  deadline = time.time() + timeout
  while not done() and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  assert process.poll() is None, process.communicate()[1][-3000:]


def start_training(workdir, overrides, logged_steps, **popen_args):
  """`python -m latent_diffusion.main` training stage 1 in a subprocess, once it has logged `logged_steps`."""
  process = subprocess.Popen(kill_loop.main_command(workdir, 'train_autoencoder', overrides),
                             cwd=kill_loop.REPO_ROOT, env=kill_loop.subprocess_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, **popen_args)
  metrics_path = workdir / 'autoencoder' / 'metrics.jsonl'
  wait_until(lambda: kill_loop.logged_steps(metrics_path) >= logged_steps, process)
  return process


def latest_saved_step(workdir) -> int | None:
  checkpoints = common.stage_checkpoints(workdir, 'autoencoder')
  try:
    return checkpoints.latest_step()
  finally:
    checkpoints.close()


def saved_on_preemption(process, workdir) -> int:
  """The step a signalled training process saved at: it exits 0, says so, and ran no step past it."""
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 0, stderr[-3000:]
  assert 'preempted; saved a checkpoint at step' in stderr
  saved_step = latest_saved_step(workdir)
  assert saved_step is not None and 1 <= saved_step < 10000  # saved on SIGTERM, not by schedule
  assert max(metrics(workdir, 'autoencoder')) == saved_step  # no step ran past the save
  return saved_step


def other_processes_of_group(group: int) -> list[int]:
  """The pids in process group `group` other than its leader (Linux /proc)."""
  pids = []
  for stat in Path('/proc').glob('[0-9]*/stat'):
    try:
      fields = stat.read_text().rsplit(')', 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
    except OSError:  # the process has gone
      continue
    pid = int(stat.parent.name)
    if int(fields[2]) == group and pid != group and fields[0] != 'Z':  # zombies have exited
      pids.append(pid)
  return pids


@pytest.mark.skipif(not Path('/proc/self/stat').exists(), reason='reads process groups from /proc (Linux)')
def test_sigterm_to_every_process_saves_then_resumes_as_if_uninterrupted_and_sigkill_leaves_no_worker(
    straight, tmp_path):
  """A cluster's preemption signals every process of the job, the data workers too, in no set order.
  The workers are signalled first here, two seconds before the main process: it must keep getting
  batches up to the agreed step, save, and exit 0. A resumed run, saving at every step, is then
  killed outright soon after its first save, while it trains and saves on: its workers must die
  with it, and its latest checkpoint must restore. Resuming from it to the end gives what a run
  never interrupted gives."""
  workdir = tmp_path / 'preempted'
  overrides = {'autoencoder_train.num_steps': 10000, 'autoencoder_train.checkpoint_every_steps': 10000,
               'autoencoder_train.eval_every_steps': 0, 'data.worker_count': 2}
  process = start_training(workdir, overrides, logged_steps=2, start_new_session=True)
  workers = other_processes_of_group(process.pid)
  assert len(workers) >= 2  # the grain workers (and multiprocessing's resource tracker)
  for pid in workers:
    os.kill(pid, signal.SIGTERM)
  time.sleep(2)
  os.kill(process.pid, signal.SIGTERM)
  saved_step = saved_on_preemption(process, workdir)
  assert saved_step >= 2

  killed = start_training(workdir, {**overrides, 'autoencoder_train.checkpoint_every_steps': 1},
                          logged_steps=saved_step + 1, start_new_session=True)
  assert len(other_processes_of_group(killed.pid)) >= 2
  checkpoint_dir = workdir / 'autoencoder' / 'checkpoints'
  wait_until(lambda: kill_loop.finished_steps(checkpoint_dir) > saved_step, killed, timeout=300)
  time.sleep(0.3)  # a save takes about a second here: the next one is likely in flight
  assert killed.poll() is None, killed.communicate()[1][-3000:]
  killed.kill()
  killed.communicate(timeout=60)
  lines = (workdir / 'autoencoder' / 'metrics.jsonl').read_text().splitlines()
  steps = sorted({json.loads(line)['step'] for line in lines if line.endswith('}')})  # whole lines
  assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > saved_step  # resumed where it stopped
  deadline = time.time() + 30
  while other_processes_of_group(killed.pid) and time.time() < deadline:
    time.sleep(0.1)
  assert not other_processes_of_group(killed.pid)
  killed_step = latest_saved_step(workdir)  # the killed run's newest finished save
  assert killed_step > saved_step

  # This run restores the killed run's latest checkpoint (a failed restore raises), trains past it,
  # and is compared with a run that was never interrupted (the workers give the in-process batches).
  final_step = max(STEPS, killed_step + 1)
  reference = straight
  if final_step > STEPS:  # the usual case: stage 1 trains on in the 2 s before the SIGTERM
    reference = tmp_path / 'uninterrupted'
    main.run(tiny('train_autoencoder', autoencoder_train__num_steps=final_step), str(reference))
  main.run(tiny('train_autoencoder', autoencoder_train__num_steps=final_step, data__worker_count=2), str(workdir))
  assert_bitwise_equal(final_state(workdir, 'autoencoder'), final_state(reference, 'autoencoder'))
  resumed_metrics, reference_metrics = metrics(workdir, 'autoencoder'), metrics(reference, 'autoencoder')
  assert resumed_metrics == {step: reference_metrics[step] for step in resumed_metrics}
  assert sorted(resumed_metrics) == list(range(1, final_step + 1))


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_checkpoint_that_fails_to_restore(tmp_path):
  """Two rounds of tests/kill_loop.py (--kills=30 is the long loop). The SIGTERM test above covers
  one such kill, during the saves of a resumed run, and the resume from what it left."""
  result = kill_loop.kill_loop(tmp_path / 'killed', kills=2, seed=1, max_delay=4.0)
  assert result['kills'] == 2 and result['failures'] == 0, result['errors']
  assert result['restores'] == 2 and result['latest_step'] >= 2, result


def test_eight_devices_match_one_device_and_restore_onto_one(straight, tmp_path):
  """data=4 x fsdp=2 (parameters of >= 4096 values sharded) vs one device: the same losses for the
  same global batches in both stages; then stage 2's 8-device checkpoint resumes on one device.
  Stage 1 runs all STEPS so that stage 2 encodes with the same autoencoder as the reference."""
  workdir = tmp_path / 'eight'
  result = run_main(workdir, 'train',
                    {'autoencoder_train.num_steps': STEPS, 'diffusion_train.num_steps': 3,
                     'autoencoder_train.eval_every_steps': 0, **FINAL_SAVES_ONLY,
                     'mesh.data': 4, 'mesh.fsdp': 2, 'mesh.fsdp_min_size': 4096},
                    extra_env={'XLA_FLAGS': os.environ['XLA_FLAGS'] +
                               ' --xla_force_host_platform_device_count=8'})
  assert "mesh {'data': 4, 'fsdp': 2}" in result.stderr
  assert 'fsdp=2: 0 of' not in result.stderr  # some parameters were really sharded
  for stage, steps in (('autoencoder', range(1, STEPS + 1)), ('diffusion', range(1, 4))):
    eight, one = metrics(workdir, stage), metrics(straight, stage)
    assert sorted(eight) == list(steps)
    for step in steps:  # only the order of the reductions differs
      np.testing.assert_allclose(eight[step]['loss'], one[step]['loss'], rtol=1e-5,
                                 err_msg=f'{stage} step {step}')

  # Restore 8 -> 1: this process has one device. `train` skips the complete stage 1 and trains
  # stage 2 on from step 3 to STEPS.
  stage1_log = (workdir / 'autoencoder' / 'metrics.jsonl').read_text()
  main.run(tiny('train'), str(workdir))
  assert (workdir / 'autoencoder' / 'metrics.jsonl').read_text() == stage1_log  # not one step more
  assert int(final_state(workdir, 'diffusion').step) == STEPS
  for step in range(4, STEPS + 1):
    np.testing.assert_allclose(metrics(workdir, 'diffusion')[step]['loss'],
                               metrics(straight, 'diffusion')[step]['loss'], rtol=1e-5,
                               err_msg=f'step {step}')


def test_two_jax_distributed_processes_train_checkpoint_and_resume(tmp_path):
  """Two processes on 127.0.0.1, one CPU device each: each reads its half of every batch; both
  write one checkpoint; the relaunched pair resumes from it. Stage 1 only, at f=1 to compile fast."""
  workdir = tmp_path / 'two'
  outputs = []
  for num_steps in (2, 3):
    address = f'127.0.0.1:{sharding._free_local_port()}'  # pylint: disable=protected-access
    processes = [subprocess.Popen(
        kill_loop.main_command(workdir, 'train_autoencoder', {
            'autoencoder_train.num_steps': num_steps, **FINAL_SAVES_ONLY, 'autoencoder.ch_mult': '(1,)',
            'autoencoder.attn_resolutions': '()', 'distributed.coordinator_address': address,
            'distributed.num_processes': 2, 'distributed.process_id': index}),
        cwd=kill_loop.REPO_ROOT, env=kill_loop.subprocess_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for index in range(2)]
    outputs = [p.communicate(timeout=900)[1] for p in processes]
    for index, (process, stderr) in enumerate(zip(processes, outputs)):
      assert process.returncode == 0, f'process {index}: {stderr[-3000:]}'
      assert f'process {index} of 2, 1 local / 2 global devices' in stderr
  assert 'autoencoder: resumed from step 2' in outputs[0] and 'resumed from step 2' in outputs[1]
  config = tiny('train_autoencoder', autoencoder__ch_mult=(1,), autoencoder__attn_resolutions=())
  assert int(final_state(workdir, 'autoencoder', config).step) == 3
  assert sorted(metrics(workdir, 'autoencoder')) == [1, 2, 3]  # process 0 only, once per step
  data_states = sorted(p.name for p in (workdir / 'autoencoder' / 'checkpoints' / '3' / 'data').glob('*.json'))
  assert data_states == ['process_0-of-2.json', 'process_1-of-2.json']  # each process's iterator
