"""Attention kernels on the shapes of the paper's U-Nets: forward and forward+backward times.

  python benchmarks/attention.py [--dtype=float32] [--repeats=10] [--out=results.json]

Times models/attention.py's kernels ('einsum', 'xla', and on GPU 'default' and 'cudnn') per case:
B=4 self-attention over 1024/256/64 tokens (32x32/16x16/8x8 latents) with 8 heads of 24 (model
channels 192) or 32 (256), and cross-attention of those queries to 77 context tokens. Medians of
`repeats` interleaved runs after a compile and a warm-up (minima in the JSON); what
models/attention.py's 'auto' picks here is recorded.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from latent_diffusion.models import attention  # pylint: disable=g-import-not-at-top,wrong-import-position

BATCH, HEADS = 4, 8
# (name, query tokens, key tokens, head width)
CASES = [(f'{kind} {tokens}x{keys} d{dim}', tokens, keys, dim)
         for dim in (24, 32) for tokens in (1024, 256, 64)
         for kind, keys in (('self', tokens), ('cross', 77))]


def kernels() -> list[str]:
  if jax.default_backend() == 'cpu':
    return ['einsum', 'xla']
  return ['einsum', 'xla', 'default', 'cudnn']


def attention_fn(kernel: str):
  if kernel == 'default':  # jax.nn.dot_product_attention(implementation=None), 'auto' off CPU
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v)
  return lambda q, k, v: attention.dot_product_attention(q, k, v, kernel)


def timed_seconds(fn, args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def compiled_programs(kernel: str, tokens: int, keys: int, dim: int, dtype):
  """{'forward': (fn, args), 'forward_backward': (fn, args)}, compiled and warmed up; None if the
  kernel cannot run here (cudnn on float32 or without a GPU)."""
  rng = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(rng[0], (BATCH, tokens, HEADS, dim), dtype)
  k, v = (jax.random.normal(r, (BATCH, keys, HEADS, dim), dtype) for r in rng[1:3])
  cotangent = jax.random.normal(rng[3], q.shape, dtype)
  attend = attention_fn(kernel)
  loss = lambda q, k, v: jnp.sum((attend(q, k, v) * cotangent).astype(jnp.float32))
  programs = {'forward': (jax.jit(attend), (q, k, v)),
              'forward_backward': (jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (q, k, v))}
  try:
    for fn, args in programs.values():
      timed_seconds(fn, args)  # compile
      timed_seconds(fn, args)  # warm up
  except Exception as error:  # pylint: disable=broad-except
    print(f'  {kernel}: {type(error).__name__}: {str(error).splitlines()[0][:160]}', flush=True)
    return None
  return programs


def measure_case(tokens: int, keys: int, dim: int, dtype, repeats: int) -> dict:
  """Median and minimum milliseconds per kernel and program; the kernels' runs are interleaved so
  that load from other processes on a shared machine falls on all of them alike."""
  programs = {kernel: compiled_programs(kernel, tokens, keys, dim, dtype) for kernel in kernels()}
  times = {kernel: {name: [] for name in progs} for kernel, progs in programs.items() if progs}
  for _ in range(repeats):
    for kernel, by_name in times.items():
      for name, samples in by_name.items():
        samples.append(1e3 * timed_seconds(*programs[kernel][name]))
  return {kernel: {f'{name}_ms': {'median': statistics.median(samples), 'min': min(samples)}
                   for name, samples in by_name.items()} for kernel, by_name in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  dtype = jnp.dtype(args.dtype)
  report = {'backend': jax.default_backend(), 'device': str(jax.devices()[0].device_kind),
            'jax': jax.__version__, 'dtype': args.dtype, 'batch': BATCH, 'heads': HEADS,
            'auto': attention.resolve_attention_impl('auto'), 'cases': {}}
  for name, tokens, keys, dim in CASES:
    row = measure_case(tokens, keys, dim, dtype, args.repeats)
    report['cases'][name] = row
    cells = '  '.join(f'{kernel} {r["forward_ms"]["median"]:8.2f} / {r["forward_backward_ms"]["median"]:8.2f}'
                      for kernel, r in row.items())
    print(f'{name:22s} median ms fwd / fwd+bwd  {cells}', flush=True)
  text = json.dumps(report, indent=2)
  if args.out:
    Path(args.out).write_text(text + '\n')
  print(text)


if __name__ == '__main__':
  main()
