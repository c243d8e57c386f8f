"""Tests for main.py: the command line, run as `python -m latent_diffusion.main` in a subprocess,
and its config checks in-process. A user mistake ends in one line naming the field or path and exit
status 2, never a traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import default
from latent_diffusion import main
from latent_diffusion.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]

CASES = {
    'unknown_field': ['--config.nonexistent=1'],
    'unknown_nested_field': ['--config.data.image_sise=32'],
    'bad_value_type': ['--config.data.image_size=abc'],
    'unknown_mode': ['--config.mode=bogus'],
    'missing_data_path': ['--config.data.source=folder', '--config.data.path=/nonexistent/images'],
    'summary': ['--config.mode=summary'],
    'lpips_unset': ['--config.mode=train_autoencoder', '--config.autoencoder_loss.perceptual_weight=1.0'],
    'missing_vgg': ['--config.mode=train_autoencoder', '--config.autoencoder_loss.perceptual_weight=1.0',
                    '--config.autoencoder_loss.lpips_vgg_path=/nonexistent/vgg16-397923af.pth',
                    '--config.autoencoder_loss.lpips_heads_path=/nonexistent/vgg.pth'],
    'missing_checkpoint': ['--config.mode=convert', '--config.convert.source=/nonexistent/model.ckpt'],
}


@pytest.fixture(scope='module')
def cli(tmp_path_factory):
  """{case: (CompletedProcess-like result, workdir)}; the cases run concurrently to save time."""
  env = {**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', 'JAX_PLATFORMS': 'cpu',
         'PYTHONPATH': os.pathsep.join([str(REPO_ROOT), os.environ.get('PYTHONPATH', '')])}
  running = {}
  for case, flags in CASES.items():
    workdir = tmp_path_factory.mktemp(case)
    command = [sys.executable, '-m', 'latent_diffusion.main', '--config=configs/default.py',
               f'--workdir={workdir}', *flags]
    running[case] = (subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True), workdir)
  results = {}
  for case, (process, workdir) in running.items():
    stdout, stderr = process.communicate(timeout=300)
    results[case] = (subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr),
                     workdir)
  return results


def error_lines(result):
  return [line for line in result.stderr.splitlines() if line.strip()]


def assert_one_line_error(result, *names):
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  lines = error_lines(result)
  assert len(lines) == 1, lines
  for name in names:
    assert name in lines[0], lines[0]


def test_unknown_config_field_is_one_line_naming_it_with_exit_2(cli):
  result, _ = cli['unknown_field']
  assert_one_line_error(result, 'nonexistent')


def test_unknown_nested_config_field_is_one_line_naming_it_with_exit_2(cli):
  result, _ = cli['unknown_nested_field']
  assert_one_line_error(result, 'data.image_sise')
  assert '\\n' not in result.stderr  # no escaped newlines inside the line


def test_value_of_the_wrong_type_is_one_line_naming_the_field_with_exit_2(cli):
  result, _ = cli['bad_value_type']
  assert_one_line_error(result, 'data.image_size', 'abc')


def test_unknown_mode_is_one_line_naming_it_with_exit_2(cli):
  result, _ = cli['unknown_mode']
  assert_one_line_error(result, 'mode', 'bogus')


def test_missing_data_path_is_one_line_naming_it_with_exit_2(cli):
  result, _ = cli['missing_data_path']
  assert_one_line_error(result, 'data.path', '/nonexistent/images')


def test_lpips_without_its_weights_configured_is_one_line_naming_the_field_with_exit_2(cli):
  result, _ = cli['lpips_unset']
  assert_one_line_error(result, 'autoencoder_loss.lpips_vgg_path', 'perceptual_weight=0')


def test_missing_vgg_weights_is_one_line_naming_the_path_with_exit_2(cli):
  result, _ = cli['missing_vgg']
  assert_one_line_error(result, '/nonexistent/vgg16-397923af.pth')


def test_converting_a_missing_checkpoint_is_one_line_naming_it_with_exit_2(cli):
  result, workdir = cli['missing_checkpoint']
  assert_one_line_error(result, '/nonexistent/model.ckpt')
  assert not list((workdir / 'autoencoder' / 'checkpoints').glob('[0-9]*'))


def test_summary_mode_writes_integer_parameter_counts(cli):
  result, workdir = cli['summary']
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  counts = json.loads((workdir / 'summary.json').read_text())
  assert set(counts) == {'autoencoder', 'discriminator', 'unet'}
  assert all(isinstance(v, int) and v > 0 for v in counts.values())
  assert f'{counts["unet"]:,}' in result.stdout


@pytest.mark.parametrize('flags, name', [
    (['--config=configs/default.py'], '--workdir'),
    (['--workdir=/tmp/unused'], '--config'),
])
def test_missing_required_flag_is_one_line_naming_it_with_exit_2(flags, name):
  result = subprocess.run([sys.executable, '-m', 'latent_diffusion.main', *flags],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'PYTHONPATH': str(REPO_ROOT)})
  assert_one_line_error(result, name)


# check_config in-process: each bad value raises ConfigError naming its field.


def config_with(**fields):
  config = default.get_config()
  for dotted, value in fields.items():
    section, _, field = dotted.rpartition('__')
    (config[section] if section else config)[field] = value
  return config


def test_default_config_passes_the_checks():
  main.check_config(default.get_config())


def test_ddpm_may_walk_the_whole_chain_but_ddim_may_not():
  main.check_config(config_with(sample__sampler='ddpm', sample__num_steps=1000))
  with pytest.raises(ConfigError, match='sample.num_steps'):
    main.check_config(config_with(sample__sampler='ddim', sample__num_steps=1000))


def test_a_step_count_the_uniform_spacing_cannot_place_is_a_config_error():
  main.check_config(config_with(sample__num_steps=4))
  main.check_config(config_with(sample__num_steps=3, sample__spacing='trailing'))
  with pytest.raises(ConfigError, match=r"sample.num_steps: 3 steps of 1000 with sample.spacing='uniform'.*1000\]"):
    main.check_config(config_with(sample__num_steps=3))


@pytest.mark.parametrize('fields, name', [
    (dict(mode='bogus'), 'mode'),
    (dict(autoencoder_train__batch_size=0), 'autoencoder_train.batch_size'),
    (dict(sample__num_steps=1000), 'sample.num_steps'),
    (dict(log_every_steps=-1), 'log_every_steps'),
    (dict(autoencoder__ch=48), 'autoencoder'),           # 48 channels: not GroupNorm(32)-able
    (dict(unet__model_channels=40), 'unet'),
    (dict(data__image_size=66), 'data.image_size'),      # not divisible by f
    (dict(remat='some'), 'remat'),
    (dict(diffusion_train__accumulate_grad_batches=0), 'diffusion_train.accumulate_grad_batches'),
    (dict(max_nonfinite_steps=0), 'max_nonfinite_steps'),
    (dict(sample__sampler='euler'), 'sample.sampler'),
    (dict(sample__spacing='random'), 'sample.spacing'),
    (dict(diffusion__parameterization='score'), 'diffusion.parameterization'),
    (dict(diffusion__conditioning_key='film'), 'diffusion.conditioning_key'),
    (dict(diffusion__conditioning_key='adm'), 'diffusion.conditioning_key'),  # no label embedding
    (dict(diffusion__cond_drop_prob=0.1), 'diffusion.cond_drop_prob'),      # unconditional model
    (dict(unet__attention_impl='flash'), 'unet.attention_impl'),
    (dict(sample__keep_known_latents=True), 'sample.keep_known_latents'),  # not an inpainting model
    (dict(sample__image_guidance_scale=2.0), 'sample.image_guidance_scale'),  # not a restoration model
    (dict(sample__image_guidance_scale=-1.0), 'sample.image_guidance_scale'),
    (dict(sample__strength=0.0), 'sample.strength'),
    (dict(sample__strength=1.2), 'sample.strength'),
])
def test_check_config_rejects_bad_values_naming_the_field(fields, name):
  with pytest.raises(ConfigError) as error:
    main.check_config(config_with(**fields))
  assert str(error.value).startswith(name) and '\n' not in str(error.value)


def test_configure_jax_adds_the_cpu_conv_flag_once(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_dump_to=/tmp/x')
  config = default.get_config()
  main.configure_jax(config)
  main.configure_jax(config)
  flags = os.environ['XLA_FLAGS'].split()
  assert flags.count(main.FAST_CPU_CONV_FLAG) == 1 and '--xla_dump_to=/tmp/x' in flags
  monkeypatch.setenv('XLA_FLAGS', '')
  with config.unlocked():
    config.xla_cpu_fast_conv = False
  main.configure_jax(config)
  assert os.environ['XLA_FLAGS'] == ''
