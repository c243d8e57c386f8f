"""The benchmark suite: ours against the PyTorch reference (diffusers) on one machine, in one run.

  python -m benchmarks.run [--only=unet_forward,unet_train,...] [--quick] [--out=FILE]

Every pair runs the same architecture, shapes, dtype (float32) and batch, with torch on as many
threads as the machine has cores (XLA's CPU client uses them all), after a warm-up (which compiles
ours); rows give median, min and max over the repeats and the ratio ours / reference of the medians.
Results go to benchmarks/results/<machine>-<date>.json (or --out) with the machine's facts; the
table in benchmarks/README.md is made from them (--table prints it). --quick shrinks every case
to a tiny U-Net and image so the whole suite runs in about a minute (the test suite's smoke run).
"""

import argparse
import datetime
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

# The XLA flag main.py sets by default (config.xla_cpu_fast_conv), before jax starts; it concerns
# CPU convolutions only, so machines with an accelerator (whose jaxlib may not know it) go without.
from latent_diffusion.main import FAST_CPU_CONV_FLAG  # pylint: disable=g-import-not-at-top,wrong-import-position

ACCELERATOR_DEVICE_FILES = ('/dev/nvidia0', '/dev/accel0')
if (FAST_CPU_CONV_FLAG.split('=')[0] not in os.environ.get('XLA_FLAGS', '')
    and not any(Path(device).exists() for device in ACCELERATOR_DEVICE_FILES)):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + FAST_CPU_CONV_FLAG).strip()

BENCHMARKS = ('unet_forward', 'unet_train', 'ddim_sample', 'kl_codec', 'compile', 'latent_vs_pixel',
              'input_pipeline', 'sampler_throughput', 'train_mfu')
# What a run without --only measures: on CPU every pair against torch; on an accelerator (where the
# reference side need not be installed) the throughput targets first.
DEFAULT_CPU = BENCHMARKS[:7]
DEFAULT_ACCELERATOR = ('sampler_throughput', 'train_mfu', 'unet_forward', 'unet_train', 'kl_codec',
                       'latent_vs_pixel', 'compile')
CHURCHES = 'configs/lsun_churches_f8.py'
SMALL = 'configs/utkface64_f4.py'
QUICK = 'benchmarks/quick_config.py'


def load_config(path: str):
  spec = importlib.util.spec_from_file_location('benchmark_config', REPO_ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def settings(args) -> dict:
  """Which configs, batches, steps and repeats each benchmark uses."""
  if args.quick:
    return dict(unet_cases=[('tiny', QUICK, 2)], ddim_cases=[('tiny', QUICK, 2, 4)], codec=(QUICK, 1),
                compile=(QUICK, 1, (2, 20)), latent_vs_pixel=(QUICK, 1, 10), pipeline=(QUICK, 2, 2),
                throughput=(QUICK, 2, 4, 2), repeats=1, dtype=args.dtype)
  gpu = args.batch_scale > 1
  return dict(unet_cases=[('churches', CHURCHES, 4 * args.batch_scale), ('small', SMALL, 16 * args.batch_scale)],
              ddim_cases=[('churches', CHURCHES, 4, 50), ('small', SMALL, 4, 50)],
              codec=(CHURCHES, 1 * args.batch_scale), compile=(CHURCHES, 4, (10, 200)),
              latent_vs_pixel=(CHURCHES, 1 * args.batch_scale, 200),
              pipeline=(CHURCHES, 16, 8), repeats=args.repeats or (10 if gpu else 3),
              throughput=(CHURCHES, args.sampler_batch, 200, 96), dtype=args.dtype)


def run_benchmark(name: str, s: dict, reference: bool) -> dict:
  """{case: result} of one benchmark."""
  # pylint: disable=g-import-not-at-top
  if name in ('unet_forward', 'unet_train'):
    from benchmarks import unet
    fn = unet.forward if name == 'unet_forward' else unet.train_step
    return {f'{case} b{batch}': dict(fn(load_config(path), batch, s['repeats'], reference), config=path, batch=batch)
            for case, path, batch in s['unet_cases']}
  if name == 'ddim_sample':
    from benchmarks import sampling
    return {f'{case} b{batch} {steps} steps': dict(
        sampling.ddim(load_config(path), batch, steps, max(1, s['repeats'] // 3) if case == 'churches' else s['repeats'],
                      reference), config=path, batch=batch, num_steps=steps)
            for case, path, batch, steps in s['ddim_cases']}
  if name == 'kl_codec':
    from benchmarks import autoencoder
    path, batch = s['codec']
    config = load_config(path)
    rows = autoencoder.kl_codec(config, batch, s['repeats'], reference)
    return {f'{part} {config.data.image_size}px b{batch}': dict(row, config=path, batch=batch) for part, row in rows.items()}
  if name == 'compile':
    from benchmarks import compile as compile_times
    path, batch, (few, many) = s['compile']
    return {'train_step': dict(compile_times.cold_and_cached(path, 'train_step', batch), config=path, batch=batch),
            **{f'ddim {steps} steps': dict(compile_times.cold_and_cached(path, 'sampler', batch, steps),
                                           config=path, batch=batch) for steps in (few, many)}}
  if name == 'latent_vs_pixel':
    from benchmarks import latent_vs_pixel
    path, batch, steps = s['latent_vs_pixel']
    return {f'b{batch}': dict(latent_vs_pixel.latent_vs_pixel(load_config(path), batch, steps, s['repeats']),
                              config=path, batch=batch)}
  if name == 'input_pipeline':
    from benchmarks import input_pipeline
    path, batch, num_batches = s['pipeline']
    config = load_config(path)
    if not s.get('quick'):  # LSUN is not on this machine: the real UTKFace-200 JPEGs at Churches' 256 px
      config.data.source, config.data.path = 'folder', str(REPO_ROOT.parent / 'shared/data/utkface200/train')
    return {f'{config.data.source} {config.data.image_size}px b{batch}':
            input_pipeline.images_per_second(config.data, batch, num_batches)}
  if name in ('sampler_throughput', 'train_mfu'):
    from benchmarks import throughput
    path, sampler_batch, steps, train_batch = s['throughput']
    config = load_config(path)
    if name == 'sampler_throughput':
      return {f'{impl} b{sampler_batch} {steps} steps {s["dtype"]}': dict(
          throughput.sampler(config, sampler_batch, steps, s['repeats'], s['dtype'], impl), config=path)
              for impl in s['attention_impls']}
    return {f'{impl} b{train_batch} {s["dtype"]}': dict(
        throughput.train_step(config, train_batch, s['repeats'], s['dtype'], impl, s['peak_tflops']), config=path)
            for impl in s['attention_impls']}
  raise ValueError(f'unknown benchmark {name!r}; choose from {", ".join(BENCHMARKS)}')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--only', default='', help='comma-separated, of: ' + ', '.join(BENCHMARKS)
                      + ' (default: ' + ', '.join(DEFAULT_CPU) + ' on CPU; ' + ', '.join(DEFAULT_ACCELERATOR)
                      + ' elsewhere)')
  parser.add_argument('--quick', action='store_true', help='tiny shapes, one repeat: a smoke run')
  parser.add_argument('--no_reference', action='store_true', help='time ours only (no torch)')
  parser.add_argument('--repeats', type=int, default=0, help='timed repeats (default 3 on CPU, 10 on GPU)')
  parser.add_argument('--batch_scale', type=int, default=1, help='multiply the default batches (GPU runs)')
  parser.add_argument('--cases', default='', help='unet_* and ddim_sample: only these cases (churches, small)')
  parser.add_argument('--dtype', default='bfloat16', help='sampler_throughput and train_mfu activations')
  parser.add_argument('--sampler_batch', type=int, default=128, help='sampler_throughput batch')
  parser.add_argument('--attention_impls', default='auto', help='sampler_throughput / train_mfu: comma-separated '
                      'attention_impl values to compare (e.g. auto,cudnn)')
  parser.add_argument('--peak_tflops', type=float, default=0.0, help='MFU denominator (default: datasheet bf16 peak)')
  parser.add_argument('--out', default='', help='result JSON (default benchmarks/results/<machine>-<date>.json)')
  parser.add_argument('--table', default='', help='print the markdown table of a result JSON and exit')
  args = parser.parse_args(argv)
  from benchmarks import table, timing  # pylint: disable=g-import-not-at-top
  if args.table:
    print(table.markdown(json.loads(Path(args.table).read_text())))
    return
  import jax  # pylint: disable=g-import-not-at-top
  names = [n for n in args.only.split(',') if n] or list(
      DEFAULT_CPU if jax.default_backend() == 'cpu' else DEFAULT_ACCELERATOR)
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    parser.error(f'--only: unknown benchmark(s) {", ".join(unknown)}; choose from {", ".join(BENCHMARKS)}')
  reference = not args.no_reference
  if reference:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count())
  s = settings(args)
  if args.cases:
    chosen = args.cases.split(',')
    s.update(unet_cases=[c for c in s['unet_cases'] if c[0] in chosen],
             ddim_cases=[c for c in s['ddim_cases'] if c[0] in chosen])
  s = dict(s, quick=args.quick, attention_impls=args.attention_impls.split(','),
           peak_tflops=args.peak_tflops or None)
  machine = timing.machine()
  date = datetime.date.today().isoformat()
  out = Path(args.out) if args.out else (
      REPO_ROOT / 'benchmarks/results' / f'{machine_name(machine)}-{date}.json')
  results = {'date': date, 'machine': machine, 'quick': args.quick, 'repeats': s['repeats'], 'benchmarks': {}}
  for name in names:
    start = time.perf_counter()
    results['benchmarks'][name] = run_benchmark(name, s, reference)
    print(f'{name}: {time.perf_counter() - start:.0f} s', flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))  # after each benchmark: a stopped run keeps its rows
  print(table.markdown(results))
  print(f'wrote {out}')


def machine_name(machine: dict) -> str:
  """e.g. 'cpu2-amd_epyc' or 'nvidia_h100_80gb_hbm3'."""
  slug = lambda text: re.sub(r'[^a-z0-9]+', '_', text.lower()).strip('_')
  if machine['backend'] != 'cpu':
    return slug(machine['devices'][0])
  return f'cpu{machine["cpu_count"]}-{slug(machine["cpu"])}'


if __name__ == '__main__':
  main()
