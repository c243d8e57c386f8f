"""SIGKILL a training run at random moments, many times, and check every checkpoint left behind.

Each round starts (or resumes) `python -m latent_diffusion.main` on tests/tiny_config.py, saving a
checkpoint at every step, waits until it has finished a new checkpoint, sleeps a random time and
kills it with SIGKILL, often in the middle of an asynchronous save. Then this process restores the
latest checkpoint (state and data iterator) as a fresh run would. A round fails if the latest
checkpoint does not restore, or if the next round cannot resume from it.

  python tests/kill_loop.py --kills=30 --workdir=/tmp/kill_loop

prints one JSON line: kills, kills during a save, kills before the first checkpoint, restores,
failures, the latest step.
The test suite runs a shorter loop (tests/test_fault_tolerance.py).
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TMP_MARKER = '.orbax-checkpoint-tmp'


def main_command(workdir, mode, overrides):
  return [sys.executable, '-m', 'latent_diffusion.main',
          f'--config={REPO_ROOT / "tests" / "tiny_config.py"}', f'--workdir={workdir}',
          f'--config.mode={mode}'] + [f'--config.{k}={v}' for k, v in overrides.items()]


def subprocess_env(extra=None):
  return {**os.environ, 'PYTHONPATH': str(REPO_ROOT), 'TF_CPP_MIN_LOG_LEVEL': '2',
          'JAX_PLATFORMS': 'cpu', **(extra or {})}


def logged_steps(metrics_path) -> int:
  try:
    return len(Path(metrics_path).read_text().splitlines())
  except FileNotFoundError:
    return 0


def finished_steps(checkpoint_dir) -> int:
  """The newest finalized checkpoint step in a directory (0 if none)."""
  try:
    return max([int(p.name) for p in Path(checkpoint_dir).iterdir() if p.name.isdigit()], default=0)
  except FileNotFoundError:
    return 0


def check_restore(workdir) -> tuple[int | None, str | None]:
  """(latest step, None) if the latest stage-1 checkpoint restores with its data state, else
  (step, error)."""
  from latent_diffusion.data import pipeline  # pylint: disable=g-import-not-at-top
  from latent_diffusion.train import autoencoder, common, loop, sharding  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(REPO_ROOT / 'tests'))
  import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config.get_config()
  checkpoints = common.stage_checkpoints(workdir, autoencoder.STAGE)
  step = None
  try:
    step = checkpoints.latest_step()
    if step is None:
      return None, None
    mesh = sharding.make_mesh(config.mesh)
    abstract, shardings = autoencoder.abstract_state(autoencoder.build_autoencoder(config), config, mesh)
    iterator = pipeline.make_iterator(config.data, batch_size=config.autoencoder_train.batch_size,
                                      seed=config.seed)
    state = checkpoints.restore(loop.abstract_with_shardings(abstract, shardings), iterator)
    if int(state.step) != step:
      return step, f'restored step {int(state.step)} from checkpoint {step}'
    next(iterator)
    return step, None
  except Exception as e:  # pylint: disable=broad-except
    return step, f'{type(e).__name__}: {e}'
  finally:
    checkpoints.close()


def kill_loop(workdir, kills: int, seed: int = 0, max_delay: float = 4.0, log=print) -> dict:
  workdir = Path(workdir)
  rng = random.Random(seed)
  checkpoint_dir = workdir / 'autoencoder' / 'checkpoints'
  overrides = {'autoencoder_train.num_steps': 100000, 'autoencoder_train.checkpoint_every_steps': 1}
  result = {'kills': 0, 'kills_during_save': 0, 'before_first_checkpoint': 0, 'restores': 0,
            'failures': 0, 'errors': []}
  for round_index in range(kills):
    before = finished_steps(checkpoint_dir)
    process = subprocess.Popen(main_command(workdir, 'train_autoencoder', overrides), cwd=REPO_ROOT,
                               env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    # Kill only once this round has finished a new checkpoint: every round then makes progress,
    # and the kill lands at a random moment of the following steps and saves.
    while finished_steps(checkpoint_dir) <= before and process.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    if process.poll() is not None:
      result['failures'] += 1
      result['errors'].append(f'round {round_index}: exited {process.returncode} before training: '
                              f'{process.stderr.read()[-500:]}')
      break
    time.sleep(rng.uniform(0.0, max_delay))
    saving = any(TMP_MARKER in p.name for p in checkpoint_dir.iterdir()) if checkpoint_dir.exists() else False
    process.send_signal(signal.SIGKILL)
    process.communicate()
    result['kills'] += 1
    result['kills_during_save'] += int(saving)
    step, error = check_restore(workdir)
    if error is None and step is None:
      result['before_first_checkpoint'] += 1  # killed before any save completed: nothing to lose
    elif error is None:
      result['restores'] += 1
    else:
      result['failures'] += 1
      result['errors'].append(f'round {round_index}: step {step}: {error}')
    log(f'kill {round_index + 1}/{kills}: {"mid-save, " if saving else ""}latest step {step}, '
        f'{"restored" if error is None else "FAILED: " + str(error)}')
  result['latest_step'] = check_restore(workdir)[0]
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--kills', type=int, default=30)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--max_delay', type=float, default=4.0)
  args = parser.parse_args()
  sys.path.insert(0, str(REPO_ROOT))
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # Later rounds load the first round's compiled programs instead of compiling again.
  os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(Path(args.workdir).absolute() / 'jax_cache'))
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  result = kill_loop(args.workdir, args.kills, args.seed, args.max_delay,
                     log=lambda line: print(line, file=sys.stderr, flush=True))
  print(json.dumps(result))
  sys.exit(1 if result['failures'] else 0)


if __name__ == '__main__':
  main()
