"""Compile time of the stage-2 training step and of the sampler, cold and from the persistent cache.

Each measurement runs in a fresh process (`python -m benchmarks.compile --what=...`), which prints
its lower and compile seconds as JSON: 'cold' with an empty persistent compilation cache, 'cached'
again with the cache the cold run filled. Inputs are abstract (no parameters are made).
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def child(config_path: str, what: str, batch: int, num_steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import run  # pylint: disable=g-import-not-at-top
  from latent_diffusion.train import diffusion  # pylint: disable=g-import-not-at-top

  config = run.load_config(config_path)
  model = diffusion.build_denoiser(config)
  schedule = diffusion.schedule_from_config(config)
  if what == 'train_step':
    tx = diffusion.make_optimizer(config.diffusion_train)
    state = jax.eval_shape(functools.partial(diffusion.create_state, model, config, tx=tx), jax.random.PRNGKey(0))
    h, w, c = diffusion.latent_shape(config)
    batch_shapes = {'moments': jax.ShapeDtypeStruct((batch, h, w, 2 * c), 'float32')}
    fn = jax.jit(functools.partial(
        diffusion.train_step, model=model, tx=tx, schedule=schedule,
        objective=diffusion.Objective.from_config(config), base_ema_decay=config.diffusion_train.ema_decay,
        deterministic=True), donate_argnums=0)
    args = (state, batch_shapes)
  else:
    params = jax.eval_shape(lambda: diffusion.init_params(model, config, jax.random.PRNGKey(0)))
    raw = diffusion.sample_conditions(config, batch)
    fn = jax.jit(lambda params, rng: diffusion.sample_latents(model, config, schedule, params, rng, raw,
                                                              batch, num_steps))
    args = (params, jax.eval_shape(lambda: jax.random.PRNGKey(0)))
  start = time.perf_counter()
  lowered = fn.lower(*args)
  lowered_at = time.perf_counter()
  lowered.compile()
  done = time.perf_counter()
  return {'lower_s': lowered_at - start, 'compile_s': done - lowered_at, 'total_s': done - start}


def measure(config_path: str, what: str, batch: int, num_steps: int = 0, cache_dir: str | None = None) -> dict:
  """{'lower_s', 'compile_s', 'total_s'} of one fresh process; cache_dir: the persistent cache."""
  env = dict(os.environ)
  for name in ('JAX_COMPILATION_CACHE_DIR', 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
               'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'):
    env.pop(name, None)
  if cache_dir:
    env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  command = [sys.executable, '-m', 'benchmarks.compile', f'--config={config_path}', f'--what={what}',
             f'--batch={batch}', f'--num_steps={num_steps}']
  result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False)
  if result.returncode:
    raise RuntimeError(f'{" ".join(command)} failed:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def cold_and_cached(config_path: str, what: str, batch: int, num_steps: int = 0) -> dict:
  with tempfile.TemporaryDirectory(prefix='jax_cache_') as cache_dir:
    cold = measure(config_path, what, batch, num_steps, cache_dir)
    cached = measure(config_path, what, batch, num_steps, cache_dir)
  return {'cold': cold, 'cached': cached}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', required=True)
  parser.add_argument('--what', choices=('train_step', 'sampler'), required=True)
  parser.add_argument('--batch', type=int, required=True)
  parser.add_argument('--num_steps', type=int, default=0)
  args = parser.parse_args()
  print(json.dumps(child(args.config, args.what, args.batch, args.num_steps)))


if __name__ == '__main__':
  main()
