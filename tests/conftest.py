"""Settings and fixtures shared by every test: quiet TensorFlow/XLA logs, the repo root on sys.path,
random parameters without compiling initialisers."""

import os
import sys
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `configs` is a top-level package beside latent_diffusion.
  sys.path.insert(0, str(REPO_ROOT))


def random_params(abstract_params, seed=0):
  """Random float32 numpy values for a tree of ShapeDtypeStructs (jax.eval_shape(model.init, ...)).

  Compiling a model's random initialisers dominates small-model test time on CPU; tests that are
  not about initialisation use these instead. Kernels get std 1/sqrt(fan_in), GroupNorm scales
  1 + small noise, everything else (biases, norm offsets) small noise.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = getattr(path[-1], 'key', '')
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if name == 'kernel':
      return noise / np.float32(np.sqrt(max(1, int(np.prod(leaf.shape[:-1])))))
    if name == 'scale':
      return 1.0 + 0.1 * noise
    return 0.1 * noise

  return jax.tree_util.tree_map_with_path(fill, abstract_params)


@pytest.fixture(scope='session')
def make_random_params():
  """make_random_params(abstract_params, seed=0) -> random numpy params of the same structure."""
  return random_params
