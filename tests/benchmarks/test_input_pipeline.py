"""The input-pipeline benchmark's command line (benchmarks/input_pipeline.py): one config's pipeline,
its masks included, on a real image folder; no timing is asserted."""

import json

from benchmarks import input_pipeline


def test_command_line_measures_one_configs_pipeline_at_the_asked_size(shared_data, capsys):
  input_pipeline.main(['--config=configs/utkface_inpaint.py', f'--path={shared_data / "utkface64" / "val"}',
                       '--image_size=32', '--batch=4', '--batches=2', '--repeats=2'])
  result = json.loads(capsys.readouterr().out)
  assert result['config'] == 'configs/utkface_inpaint.py' and result['image_size'] == 32
  assert result['source'] == 'folder' and result['worker_count'] == 0
  assert len(result['images_per_s_runs']) == 2 and all(rate > 0 for rate in result['images_per_s_runs'])
  assert min(result['images_per_s_runs']) <= result['images_per_s'] <= max(result['images_per_s_runs'])
