"""Smoke run of the benchmark runner (benchmarks/run.py) at --quick sizes: every benchmark runs both
sides and records its rows; no timing is asserted."""

import json

import pytest

from benchmarks import compile as compile_times
from benchmarks import run, table

pytestmark = pytest.mark.usefixtures('single_torch_thread')

IN_PROCESS = ('unet_forward', 'unet_train', 'ddim_sample', 'kl_codec', 'latent_vs_pixel', 'input_pipeline')


@pytest.fixture(scope='module')
def quick_results(tmp_path_factory):
  out = tmp_path_factory.mktemp('benchmarks') / 'quick.json'
  run.main(['--quick', f'--only={",".join(IN_PROCESS)}', f'--out={out}'])
  return json.loads(out.read_text())


def test_quick_run_times_ours_and_the_reference_for_every_pair(quick_results):
  assert set(quick_results['benchmarks']) == set(IN_PROCESS)
  for name in ('unet_forward', 'unet_train', 'ddim_sample', 'kl_codec'):
    rows = quick_results['benchmarks'][name]
    assert rows, name
    for case, row in rows.items():
      assert row['ours']['median_s'] > 0 and row['reference']['median_s'] > 0, (name, case)
      assert row['ratio'] == pytest.approx(row['ours']['median_s'] / row['reference']['median_s'])
  assert set(quick_results['machine']) >= {'backend', 'cpu', 'jax', 'torch', 'diffusers'}


def test_timed_unets_compute_the_same_function(quick_results):
  """The diffusers U-Net timed beside ours, with its weights converted into ours, gives our output."""
  (row,) = quick_results['benchmarks']['unet_forward'].values()
  assert row['max_abs_difference'] < 1e-4


def test_latent_vs_pixel_and_pipeline_rows_are_recorded(quick_results):
  (row,) = quick_results['benchmarks']['latent_vs_pixel'].values()
  assert row['latent_samples_per_s'] > 0 and row['pixel_samples_per_s'] > 0
  assert row['speedup'] == pytest.approx(row['latent_samples_per_s'] / row['pixel_samples_per_s'])
  (pipeline,) = quick_results['benchmarks']['input_pipeline'].values()
  assert pipeline['images_per_s'] > 0 and pipeline['images'] == 4


def test_table_has_a_line_per_timed_pair(quick_results):
  lines = table.markdown(quick_results).splitlines()
  pairs = sum(len(quick_results['benchmarks'][name]) for name in ('unet_forward', 'unet_train', 'ddim_sample',
                                                                  'kl_codec'))
  assert sum(line.startswith('| unet_') or line.startswith('| ddim_') or line.startswith('| kl_')
             for line in lines) == pairs
  assert any(line.startswith('Latent vs pixel') for line in lines)


def test_compile_benchmark_times_lowering_and_compiling_in_a_fresh_process(tmp_path):
  timings = compile_times.measure(run.QUICK, 'sampler', batch=1, num_steps=2, cache_dir=str(tmp_path))
  assert timings['lower_s'] > 0 and timings['compile_s'] > 0
  assert timings['total_s'] == pytest.approx(timings['lower_s'] + timings['compile_s'])
  assert any(tmp_path.iterdir()), 'the compiled program goes to the persistent cache'


def test_unknown_benchmark_is_named(capsys):
  with pytest.raises(SystemExit):
    run.main(['--only=unet_forward,flops'])
  assert 'unknown benchmark(s) flops' in capsys.readouterr().err
