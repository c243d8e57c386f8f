"""The experiment scripts that drive main.run take their --config and --workdir from latent_diffusion.main
(absl refuses a flag defined twice): each command line reaches main.run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


# Each run stops at main.run's first check that these arguments fail: a measuring network's weights,
# or the trained stage 1.
@pytest.mark.parametrize('script, arguments, first_error', [
    ('samplers.py', ['--config=configs/utkface_sr.py', '--steps=2', '--samplers=ddim',
                     '--config.eval.feature_network=classifier'], 'ConfigError: eval.classifier_path: no file at'),
    ('restoration_steps.py', ['--config=configs/utkface_sr.py', '--steps=2', '--selection_path=unused'],
     'CheckpointError: no autoencoder checkpoint in')])
def test_command_line_reaches_main_run(script, arguments, first_error, tmp_path):
  result = subprocess.run([sys.executable, f'experiments/{script}', f'--workdir={tmp_path / "untrained"}',
                           f'--out={tmp_path / "out"}', *arguments], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode != 0 and 'DuplicateFlagError' not in result.stderr
  assert first_error in result.stderr, result.stderr[-2000:]
