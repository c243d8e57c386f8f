"""Settings and fixtures shared by every test: quiet TensorFlow/XLA logs, the repo root on sys.path,
random parameters without compiling initialisers."""

import atexit
import os
import shutil
import sys
import tempfile
import types
from pathlib import Path

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# torchvision (imported by the lpips reference) is built for CUDA torch; beside the CPU torch its
# C++ op registrations fail at import. Its Python models (VGG16) need none of them.
sys.modules.setdefault('torchvision._meta_registrations', types.ModuleType('torchvision._meta_registrations'))
# The XLA flags main.py sets (and one more), so that in-process runs and `python -m latent_diffusion.main`
# subprocesses compile the same programs (bitwise comparisons between them hold) ...
# Tests compare values, not speed: no LLVM optimisation compiles train steps about a third faster.
# The older elemental fusion emitter compiles about a quarter faster than the MLIR one here.
_TEST_XLA_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=-individual_convolution',
                   '--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false')
for _flag in _TEST_XLA_FLAGS:
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_flag}'.strip()
# ... and share one persistent compilation cache: a program compiled once (by any test or
# subprocess) is loaded, not recompiled, by the next train() call or process that builds it.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _CACHE_DIR = tempfile.mkdtemp(prefix='jax_cache_')
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE_DIR,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position

# Start the CPU backend now: main.run in-process then never starts a jax.distributed service here.
jax.devices()

REPO_ROOT = Path(__file__).resolve().parents[1]
# The repo and shared/ sit side by side: /work/main and /work/shared.
SHARED_DATA = REPO_ROOT.parent / 'shared' / 'data'
if str(REPO_ROOT) not in sys.path:  # `configs` is a top-level package beside latent_diffusion.
  sys.path.insert(0, str(REPO_ROOT))

# The files that take minutes (pytest --durations=0 on 2 cores), longest first. xdist hands out whole
# files (--dist loadfile) in collection order (--no-loadscope-reorder), so these start first and the
# short files fill the other worker around them.
LONG_FILES = ('test_fault_tolerance.py', 'test_conditional.py', 'train/test_diffusion.py',
              'evaluate/test_diffusion.py', 'train/test_autoencoder.py', 'benchmarks/test_run.py',
              'models/test_unet.py', 'test_summary.py')


def pytest_collection_modifyitems(items):
  def rank(item):
    path = Path(str(item.path)).relative_to(REPO_ROOT / 'tests').as_posix()
    return LONG_FILES.index(path) if path in LONG_FILES else len(LONG_FILES)
  items.sort(key=rank)  # stable: the order within each file is kept


# Image folders for tests that read real files: two classes of noisy flat colour.
CLASS_COLOURS = {'blue': (40, 60, 200), 'red': (200, 50, 40)}  # folder order: blue = 0, red = 1


def write_folder(root, count, seed, size=32):
  """root/<colour>/<i>.png: noisy images around each class colour."""
  rng = np.random.default_rng(seed)
  for name, colour in CLASS_COLOURS.items():
    (root / name).mkdir(parents=True)
    for i in range(count):
      pixels = np.clip(np.array(colour) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(pixels).save(root / name / f'{i}.png')
  return root


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


@pytest.fixture
def shared_data():
  """Path of ../shared/data (the real images); skips the test when that folder is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'shared data folder not found at {SHARED_DATA}')
  return SHARED_DATA


@pytest.fixture(scope='session')
def make_random_params():
  """make_random_params(abstract_params, seed=0) -> random numpy params of the same structure."""
  return random_params


@pytest.fixture(scope='module')
def single_torch_thread():
  """PyTorch on one thread for a test module (`pytestmark = pytest.mark.usefixtures(...)`): its
  reference models are small, and with two threads on a busy 2-core machine a tiny forward pass took
  seconds (threads waiting on each other) instead of ~0.1 s."""
  import torch  # pylint: disable=g-import-not-at-top
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)
