"""Entry point: flags -> config -> check -> dispatch on config.mode.

  python -m latent_diffusion.main --config=configs/default.py --workdir=/tmp/ldm
"""

import logging as py_logging
import os
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from latent_diffusion.errors import ConfigError, LatentDiffusionError

MODES = ('train', 'train_autoencoder', 'train_diffusion', 'sample', 'summary')
# Measured on a 2-core CPU: YNNPACK's 3x3 conv weight gradient is ~2-3x slower than XLA's own.
FAST_CPU_CONV_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, events, samples.')


def check_config(config) -> None:
  """Values that would otherwise fail deep inside jax: fail here with the field's name."""
  if config.mode not in MODES:
    raise ConfigError(f'mode: unknown mode {config.mode!r}; expected one of {", ".join(MODES)}')
  for name in ('autoencoder_train.batch_size', 'diffusion_train.batch_size', 'sampling.batch_size',
               'sampling.num_samples', 'sampling.num_steps', 'data.image_size', 'log_every_steps'):
    section, field = name.split('.') if '.' in name else (None, name)
    value = config[section][field] if section else config[field]
    if value <= 0:
      raise ConfigError(f'{name}: must be positive, got {value}')
  if not 0 < config.sampling.num_steps < config.diffusion.timesteps:
    raise ConfigError(f'sampling.num_steps: must be in [1, diffusion.timesteps), got '
                      f'{config.sampling.num_steps}')
  for section in ('autoencoder', 'unet'):
    widths = ([config.autoencoder.ch * m for m in config.autoencoder.ch_mult] if section == 'autoencoder'
              else [config.unet.model_channels * m for m in config.unet.channel_mult])
    if any(w % 32 for w in widths):
      raise ConfigError(f'{section}: every width ({widths}) must be a multiple of 32 for GroupNorm(32)')
  f = 2 ** (len(config.autoencoder.ch_mult) - 1)
  latent = config.data.image_size // f
  levels = 2 ** (len(config.unet.channel_mult) - 1)
  if config.data.image_size % f or latent % levels:
    raise ConfigError(f'data.image_size={config.data.image_size}: needs to be divisible by f={f} and the '
                      f'latent side {latent} by 2**(len(unet.channel_mult)-1)={levels}')


class _QuietLibraries(py_logging.Filter):
  """Keep INFO lines of this package only; libraries (orbax, grain, jax) still warn."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or f'{os.sep}latent_diffusion{os.sep}' in record.pathname


def configure_logging() -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())


def configure_jax(config) -> None:
  """Set XLA flags before any computation initialises a backend."""
  if config.xla_cpu_fast_conv and FAST_CPU_CONV_FLAG.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + FAST_CPU_CONV_FLAG).strip()


def run(config, workdir: str) -> None:
  check_config(config)
  configure_jax(config)
  # Deferred so that nothing touches jax before configure_jax.
  from latent_diffusion import sample, summary  # pylint: disable=g-import-not-at-top
  from latent_diffusion.train import autoencoder, diffusion, loop  # pylint: disable=g-import-not-at-top

  if config.mode == 'summary':
    summary.summarize(config, workdir)
    return
  if config.mode == 'sample':
    sample.sample(config, workdir)
    return
  loop.write_config(Path(workdir).absolute(), config)
  if config.mode in ('train', 'train_autoencoder'):
    if config.mode == 'train' and autoencoder.is_complete(config, workdir):
      logging.info('autoencoder: checkpoint at step %d is complete; skipping stage 1',
                   config.autoencoder_train.num_steps)
    else:
      autoencoder.train(config, workdir)
  if config.mode in ('train', 'train_diffusion'):
    if config.mode == 'train' and diffusion.is_complete(config, workdir):
      logging.info('diffusion: checkpoint at step %d is complete; skipping stage 2',
                   config.diffusion_train.num_steps)
    else:
      diffusion.train(config, workdir)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.config is None:
    sys.exit('error: --config is required, e.g. --config=configs/default.py')
  if not FLAGS.workdir:
    sys.exit('error: --workdir is required')
  configure_logging()
  try:
    run(FLAGS.config, FLAGS.workdir)
  except LatentDiffusionError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
