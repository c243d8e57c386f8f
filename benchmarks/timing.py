"""Timing and machine facts shared by the benchmarks: warm-up, repeats, median and spread."""

import os
import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def measure(fn: Callable[[], object], repeats: int, warmup: int = 1) -> dict:
  """Seconds per call of fn() (which must block until its result is ready): median, min, max and
  every repeat, after `warmup` untimed calls."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {'median_s': statistics.median(times), 'min_s': min(times), 'max_s': max(times),
          'repeats': len(times), 'times_s': times}


def random_params(init_fn: Callable[..., object], *args, seed: int = 0):
  """Parameters of init_fn(*args)'s shapes (jax.eval_shape: nothing compiles), as small float32
  noise: times do not depend on the values, and compiling initialisers would dominate short runs."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda leaf: jnp.asarray(0.02 * rng.standard_normal(leaf.shape), leaf.dtype),
                      jax.eval_shape(init_fn, *args))


def blocking(fn: Callable[..., object]) -> Callable[..., object]:
  """fn whose jax results are waited for."""
  return lambda *args, **kwargs: jax.block_until_ready(fn(*args, **kwargs))


def compared(ours: dict, reference: dict | None) -> dict:
  """A benchmark row: both timings and ours / reference of the medians."""
  row = {'ours': ours}
  if reference is not None:
    row['reference'] = reference
    row['ratio'] = ours['median_s'] / reference['median_s']
  return row


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict:
  """What the numbers were measured on."""
  import flax  # pylint: disable=g-import-not-at-top
  facts = {'backend': jax.default_backend(), 'devices': [d.device_kind for d in jax.devices()],
           'cpu': cpu_model(), 'cpu_count': os.cpu_count(), 'python': platform.python_version(),
           'jax': jax.__version__, 'flax': flax.__version__, 'xla_flags': os.environ.get('XLA_FLAGS', '')}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    facts.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    if torch.cuda.is_available():
      facts['torch_device'] = torch.cuda.get_device_name()
  except ImportError:
    pass
  try:
    import diffusers  # pylint: disable=g-import-not-at-top
    facts['diffusers'] = diffusers.__version__
  except Exception:  # pylint: disable=broad-except  (absent, or its imports fail: no reference side)
    pass
  return facts
