"""Time per sampling step of each sampler (ddim, ddpm, plms, dpm_solver) on a config's denoiser.

  python benchmarks/samplers.py --config=configs/utkface64_f4.py [--batch=16] [--steps=10,50]
      [--guidance=1.0] [--repeats=3] [--out=benchmarks/results/samplers-<config>.json]

Random weights of the config's denoiser (the time does not depend on them); latents only, no decode.
Each sampler is compiled once per step count (recorded as compile_s), then timed `repeats` times;
per-step time is the median call time divided by the model calls the sampler makes (PLMS makes one
more than its steps). The slope between two step counts removes the fixed cost per call.
"""

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from latent_diffusion.train import diffusion  # pylint: disable=g-import-not-at-top,wrong-import-position

SAMPLERS = ('ddim', 'ddpm', 'plms', 'dpm_solver')


def load_config(path):
  spec = importlib.util.spec_from_file_location('benchmark_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def sampler_fn(config, model, schedule, name, num_steps, batch):
  """A jitted fn(params, rng, raw) -> latents for one sampler (as sample mode draws them, undecoded)."""
  config = config.copy_and_resolve_references()
  config.sample.sampler = name
  return jax.jit(lambda params, rng, raw: diffusion.sample_latents(model, config, schedule, params, rng, raw,
                                                                   batch, num_steps))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', required=True)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--steps', default='10,50')
  parser.add_argument('--guidance', type=float, default=None)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--samplers', default=','.join(SAMPLERS))
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  config = load_config(args.config)
  if args.guidance is not None:
    config.sample.guidance_scale = args.guidance
  model = diffusion.build_denoiser(config)
  schedule = diffusion.schedule_from_config(config)
  params = diffusion.init_params(model, config, jax.random.PRNGKey(0))
  raw = diffusion.sample_conditions(config, args.batch)
  steps = [int(s) for s in args.steps.split(',')]
  results = []
  for name in args.samplers.split(','):
    row = {'sampler': name, 'runs': {}}
    for num_steps in steps:
      fn = sampler_fn(config, model, schedule, name, num_steps, args.batch)
      start = time.perf_counter()
      jax.block_until_ready(fn(params, jax.random.PRNGKey(1), raw))
      compile_s = time.perf_counter() - start
      times = []
      for repeat in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(params, jax.random.PRNGKey(2 + repeat), raw))
        times.append(time.perf_counter() - start)
      calls = num_steps + (name == 'plms')
      row['runs'][num_steps] = {'model_calls': calls, 'compile_and_first_s': compile_s,
                                'median_s': statistics.median(times), 'min_s': min(times),
                                'per_step_s': statistics.median(times) / calls}
      print(f'{name:>10} {num_steps:>4} steps: {statistics.median(times):8.3f} s '
            f'({statistics.median(times) / calls * 1e3:7.1f} ms/step; compile+first {compile_s:.1f} s)',
            flush=True)
    if len(steps) >= 2:
      (s0, r0), (s1, r1) = sorted(row['runs'].items())[0], sorted(row['runs'].items())[-1]
      row['marginal_step_s'] = (r1['median_s'] - r0['median_s']) / (r1['model_calls'] - r0['model_calls'])
    results.append(row)
  record = {'config': args.config, 'batch': args.batch, 'guidance_scale': config.sample.guidance_scale,
            'latent_shape': diffusion.latent_shape(config), 'backend': jax.default_backend(),
            'device': str(jax.devices()[0].device_kind), 'cpu': platform.processor() or platform.machine(),
            'jax': jax.__version__, 'results': results}
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + '\n')
    print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
