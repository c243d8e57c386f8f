"""experiments/f_sweep.py: the per-f configs are valid models of the paper's family, the plots and
throughput read its records; the whole quick sweep runs (slow: its parts are eval_diffusion and the
identity first stage, tested in tests/evaluate/test_diffusion.py and tests/train/test_autoencoder.py)."""

import json
import math

import pytest

from experiments import f_sweep
from latent_diffusion import main
from latent_diffusion.models import autoencoder as autoencoder_model
from latent_diffusion.train import diffusion


@pytest.mark.parametrize('side', [64, 32, 16, 8, 4, 2])
def test_unet_layout_halves_the_latent_down_to_a_small_bottom_with_attention_at_4_to_16(side):
  channel_mult, attention = f_sweep.unet_layout(side)
  levels = len(channel_mult)
  assert 2 <= levels <= 4 or side < 4
  assert side % 2 ** (levels - 1) == 0 and side >> (levels - 1) >= (1 if side < 4 else 2)
  assert all(4 <= side // ds <= 16 for ds in attention)
  assert len(attention) == sum(4 <= side >> level <= 16 for level in range(levels))


@pytest.mark.parametrize('budget', [f_sweep.FULL, f_sweep.QUICK], ids=['full', 'quick'])
def test_every_factor_of_the_sweep_is_a_valid_config_with_the_factor_it_names(budget):
  for f in budget.factors:
    config = f_sweep.sweep_config(f, budget, '/data', '/c.msgpack', '/stats')
    main.check_config(config)
    assert autoencoder_model.factor_of(config.autoencoder) == f
    latent = diffusion.latent_shape(config)
    assert latent[:2] == (budget.image_size // f,) * 2
    assert latent[2] == (3 if f == 1 else f_sweep.LATENT_CHANNELS[f])
    # Same U-Net width and steps for every f: only the depth follows the latent side.
    assert config.unet.model_channels == budget.model_channels
    assert config.diffusion_train.num_steps == budget.diffusion_steps


def test_logged_speed_is_the_median_so_a_compiling_interval_does_not_count(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'step': s, 'loss': 1.0, 'steps_per_second': v}) + '\n'
                          for s, v in ((50, 0.1), (100, 5.0), (150, 5.2), (200, 4.8))))
  assert f_sweep.logged_steps_per_second(path) == pytest.approx(4.9)
  assert math.isnan(f_sweep.logged_steps_per_second(tmp_path / 'absent.jsonl'))


def test_plots_draw_both_figures_from_the_records(tmp_path):
  runs = {str(f): {'f': f, 'samples_per_second': 100.0 / f ** -1,
                   'fd_along_training': [{'step': 10, 'FD-utkface64': 50.0 / f}, {'step': 20, 'FD-utkface64': 40.0 / f}]}
          for f in (1, 4)}
  paths = f_sweep.plot({'budget': {'sampler_steps': 25}, 'runs': runs}, tmp_path)
  assert [p.name for p in paths] == ['fd_vs_steps.png', 'fd_vs_throughput.png']
  assert all(p.stat().st_size > 1000 for p in paths)


@pytest.mark.slow
def test_quick_sweep_trains_and_measures_every_factor(tmp_path):
  data_root = f_sweep.parse_args(['--out', str(tmp_path)]).data_root
  results = f_sweep.run_sweep(f_sweep.QUICK, tmp_path, data_root)
  assert sorted(int(f) for f in results['runs']) == list(f_sweep.QUICK.factors)
  for run in results['runs'].values():
    assert len(run['fd_along_training']) == f_sweep.QUICK.diffusion_steps // f_sweep.QUICK.eval_every
    assert run['samples_per_second'] > 0 and run['diffusion']['steps_per_second'] > 0
  assert (tmp_path / 'fd_vs_steps.png').is_file() and (tmp_path / 'results.json').is_file()
  compared = f_sweep.compare_samplers(2, f_sweep.QUICK, tmp_path, data_root, '', [2])
  assert [(run['sampler'], run['num_steps']) for run in compared['runs']] == [('ddim', 2), ('plms', 2), ('dpm_solver', 2)]
  assert (tmp_path / 'samplers' / 'fd_vs_steps.png').is_file()
