"""Entry point: flags -> config -> check -> dispatch on config.mode.

  python -m latent_diffusion.main --config=configs/default.py --workdir=/tmp/ldm
"""

import logging as py_logging
import os
import re
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from latent_diffusion.errors import ConfigError, LatentDiffusionError, Preempted
from latent_diffusion.models.layers import REMAT_POLICIES
from latent_diffusion.models import autoencoder as autoencoder_model

MODES = ('train', 'train_autoencoder', 'train_diffusion', 'sample', 'eval_autoencoder', 'eval_conditional',
         'eval_diffusion', 'convert', 'summary')
# Measured on a 2-core CPU: YNNPACK's 3x3 conv weight gradient is ~2-3x slower than XLA's own.
FAST_CPU_CONV_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, events, samples.')


def check_config(config) -> None:
  """Values that would otherwise fail deep inside jax: fail here with the field's name."""
  if config.mode not in MODES:
    raise ConfigError(f'mode: unknown mode {config.mode!r}; expected one of {", ".join(MODES)}')
  for name, allowed in (('autoencoder.kind', ('kl', 'vq', 'identity')), ('autoencoder.attn_type', ('vanilla', 'none')),
                        ('autoencoder_loss.pixel_loss', ('l1', 'l2')),
                        ('autoencoder_loss.disc_loss', ('hinge', 'vanilla')),
                        ('diffusion.parameterization', ('eps', 'x0', 'v')), ('diffusion.loss_type', ('l1', 'l2')),
                        ('diffusion.beta_schedule', ('linear', 'cosine', 'sqrt_linear', 'sqrt')),
                        ('diffusion.conditioning_key', ('', 'concat', 'crossattn', 'hybrid', 'adm')),
                        ('cond_stage.kind', ('', 'class', 'transformer', 'spatial_rescaler', 'first_stage',
                                             'identity')),
                        ('cond_stage.key', ('label', 'caption', 'layout', 'segmentation', 'low_res',
                                            'masked_image')),
                        ('cond_stage.tokenizer', ('wordpiece', 'word')),
                        ('data.degradation', ('bicubic', 'bsrgan_light')),
                        ('sample.sampler', ('ddim', 'ddpm', 'plms', 'dpm_solver')),
                        ('sample.spacing', ('uniform', 'quad', 'leading', 'trailing', 'linspace')),
                        ('unet.attention_impl', ('auto', 'einsum', 'xla', 'cudnn')),
                        ('convert.stage', ('autoencoder', 'diffusion'))):
    section, field = name.split('.')
    if config[section][field] not in allowed:
      raise ConfigError(f'{name}: {config[section][field]!r} is not one of {", ".join(allowed)}')
  if config.remat not in REMAT_POLICIES:
    raise ConfigError(f'remat: {config.remat!r} is not one of {", ".join(REMAT_POLICIES)}')
  for name in ('autoencoder_train.batch_size', 'diffusion_train.batch_size', 'sample.batch_size',
               'sample.num_samples', 'sample.num_steps', 'data.image_size', 'log_every_steps',
               'autoencoder_train.accumulate_grad_batches', 'diffusion_train.accumulate_grad_batches',
               'max_nonfinite_steps', 'eval.batch_size'):
    section, field = name.split('.') if '.' in name else (None, name)
    value = config[section][field] if section else config[field]
    if value <= 0:
      raise ConfigError(f'{name}: must be positive, got {value}')
  # DDPM may walk the whole chain; the others' spacings need a step below T.
  most_steps = config.diffusion.timesteps - (config.sample.sampler != 'ddpm')
  if not 0 < config.sample.num_steps <= most_steps:
    raise ConfigError(f'sample.num_steps: must be in [1, {most_steps}] for sample.sampler='
                      f'{config.sample.sampler!r}, got {config.sample.num_steps}')
  if config.sample.sampler != 'ddpm':
    from latent_diffusion.diffusion import samplers  # pylint: disable=g-import-not-at-top
    timesteps = samplers.dpm_solver_timesteps if config.sample.sampler == 'dpm_solver' else samplers.sampling_timesteps
    try:  # e.g. the paper's 'uniform' spacing of 3 of 1000 steps visits 1, 334, 667 and 1000
      timesteps(config.diffusion.timesteps, config.sample.num_steps, config.sample.spacing)
    except ValueError as e:
      raise ConfigError(f'sample.num_steps: {config.sample.num_steps} steps of {config.diffusion.timesteps} with '
                        f'sample.spacing={config.sample.spacing!r} do not fit: {e}') from e
  if config.sample.keep_known_latents and (config.cond_stage.key != 'masked_image'
                                            or not config.diffusion.conditioning_key
                                            or config.sample.sampler != 'ddim'):
    raise ConfigError('sample.keep_known_latents: needs an inpainting model (cond_stage.key=masked_image) '
                      f'and sample.sampler=ddim, got cond_stage.key={config.cond_stage.key!r}, '
                      f'sample.sampler={config.sample.sampler!r}')
  if config.sample.image_guidance_scale < 0 or (config.sample.image_guidance_scale > 0 and (
      config.cond_stage.key not in ('low_res', 'masked_image') or not config.diffusion.conditioning_key)):
    raise ConfigError('sample.image_guidance_scale: must be >= 0, and > 0 only for a super-resolution or '
                      'inpainting model (cond_stage.key low_res or masked_image), got '
                      f'{config.sample.image_guidance_scale} with cond_stage.key={config.cond_stage.key!r}')
  for section in ('autoencoder', 'unet'):
    widths = ([config.autoencoder.ch * m for m in config.autoencoder.ch_mult] if section == 'autoencoder'
              else [config.unet.model_channels * m for m in config.unet.channel_mult])
    groups = config.autoencoder.norm_num_groups if section == 'autoencoder' else 32
    if any(w % groups for w in widths):
      raise ConfigError(f'{section}: every width ({widths}) must be a multiple of {groups} for GroupNorm')
  f = autoencoder_model.factor_of(config.autoencoder)
  latent = config.data.image_size // f
  levels = 2 ** (len(config.unet.channel_mult) - 1)
  if config.data.image_size % f:
    raise ConfigError(f'data.image_size={config.data.image_size}: needs to be divisible by f={f}')
  if not 0.0 < config.sample.strength <= 1.0:
    raise ConfigError(f'sample.strength: must be in (0, 1], got {config.sample.strength}')
  if config.sample.height < 0 or config.sample.width < 0:
    raise ConfigError(f'sample.height / sample.width: must be >= 0 (0 = data.image_size), got '
                      f'{config.sample.height} / {config.sample.width}')
  if (config.mode in ('train', 'train_diffusion', 'sample', 'eval_conditional', 'eval_diffusion')
      and latent % levels):
    raise ConfigError(f'data.image_size={config.data.image_size}: the latent side {latent} needs to be '
                      f'divisible by 2**(len(unet.channel_mult)-1)={levels}')
  if config.mode == 'eval_diffusion' or (config.mode == 'eval_autoencoder' and config.eval.feature_network):
    from latent_diffusion.evaluate import features  # pylint: disable=g-import-not-at-top
    features.check_config(config)
  if config.mode in ('train', 'train_diffusion', 'sample', 'eval_conditional', 'eval_diffusion', 'summary'):
    from latent_diffusion.train import conditioning  # pylint: disable=g-import-not-at-top
    conditioning.check(config, needs_data=config.mode != 'summary')


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
  from latent_diffusion import evaluate, sample, summary  # pylint: disable=g-import-not-at-top
  from latent_diffusion.train import autoencoder, diffusion, loop, sharding  # pylint: disable=g-import-not-at-top

  if config.mode == 'summary':
    summary.summarize(config, workdir)
    return
  sharding.initialize_distributed(config.distributed, preemption_notices=config.mode.startswith('train'))
  if config.mode == 'sample':
    sample.sample(config, workdir)
    return
  if config.mode == 'eval_autoencoder':
    evaluate.evaluate_autoencoder(config, workdir)
    return
  if config.mode == 'eval_conditional':
    from latent_diffusion.evaluate import conditional  # pylint: disable=g-import-not-at-top
    conditional.evaluate_conditional(config, workdir)
    return
  if config.mode == 'eval_diffusion':
    from latent_diffusion.evaluate import diffusion as eval_diffusion  # pylint: disable=g-import-not-at-top
    eval_diffusion.evaluate_diffusion(config, workdir)
    return
  if config.mode == 'convert':
    (diffusion if config.convert.stage == 'diffusion' else autoencoder).save_converted(config, workdir)
    return
  loop.write_config(Path(workdir).absolute(), config)
  for stage, stage_mode in ((autoencoder, 'train_autoencoder'), (diffusion, 'train_diffusion')):
    if config.mode not in ('train', stage_mode):
      continue
    if config.mode == 'train' and stage.is_complete(config, workdir):
      logging.info('%s: checkpoint is complete; skipping this stage', stage.STAGE)
      continue
    stage.train(config, workdir)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with config mistakes reported as one line (exit 2) instead of a traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    message = str(e)
  except (AttributeError, KeyError) as e:  # config_flags: an override names no existing field
    name = re.match(r'\W*(\w+)', str(e.args[0] if e.args else e)).group(1)
    overrides = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    culprit = next((o for o in overrides if name in o.split('.')), None)
    message = f'config: {culprit or name}: no such field (see configs/base.py for every field)'
  except (OSError, SyntaxError, TypeError, ValueError) as e:
    message = f'config: {" ".join(str(e).split())}'
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    config = FLAGS.config
    _ = config is not None and config.mode
  except OSError as e:  # config_flags defers a failed load of the file to first access
    print(f'error: --config: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(2)
  if config is None:
    print('error: --config is required, e.g. --config=configs/default.py', file=sys.stderr)
    sys.exit(2)
  if not FLAGS.workdir:
    print('error: --workdir is required', file=sys.stderr)
    sys.exit(2)
  configure_logging()
  try:
    run(config, FLAGS.workdir)
  except LatentDiffusionError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except Preempted as e:  # the checkpoint is saved: a clean exit lets the scheduler restart us
    logging.info('%s; run the same command to resume', e)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
