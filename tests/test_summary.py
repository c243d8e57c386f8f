"""Tests for summary.py: parameter counts without allocating weights, summary.json."""

import json

import pytest

from configs import default, lsun_churches_f8
from latent_diffusion import summary

# Counts of the paper's own modules (CompVis/latent-diffusion: ldm.models.autoencoder.AutoencoderKL
# with the kl-f8 ddconfig, openaimodel.UNetModel with lsun_churches-ldm-kl-8's unet_config),
# obtained by instantiating them in PyTorch.
CHURCHES_AUTOENCODER = 83_653_863
CHURCHES_UNET = 294_966_916


@pytest.fixture(scope='module')
def churches():
  return summary.network_parameters(lsun_churches_f8.get_config())


def test_network_parameters_of_lsun_churches_equal_the_papers_models(churches):
  assert churches['autoencoder']['parameters'] == CHURCHES_AUTOENCODER
  assert churches['unet']['parameters'] == CHURCHES_UNET


def test_network_parameters_report_input_shapes(churches):
  assert churches['autoencoder']['input'] == [1, 256, 256, 3]
  assert churches['unet']['input'] == [1, 32, 32, 4]  # f = 8 latents


def test_parts_add_up_to_the_total(churches):
  for info in churches.values():
    assert sum(info['parts'].values()) == info['parameters']
  assert set(churches['autoencoder']['parts']) == {'encoder', 'decoder', 'quant_conv',
                                                   'post_quant_conv'}


def test_count_parameters_sums_leaf_sizes():
  import numpy as np  # pylint: disable=g-import-not-at-top
  tree = {'a': np.zeros((3, 4)), 'b': [np.zeros(5), np.zeros(())]}
  assert summary.count_parameters(tree) == 12 + 5 + 1


def test_summarize_prints_a_table_and_writes_integer_counts(tmp_path, capsys):
  config = default.get_config()
  counts = summary.summarize(config, tmp_path / 'work')
  written = json.loads((tmp_path / 'work' / 'summary.json').read_text())
  assert written == counts
  assert set(written) == {'autoencoder', 'unet'}
  assert all(isinstance(v, int) and v > 0 for v in written.values())
  output = capsys.readouterr().out
  assert f'{counts["unet"]:,}' in output and f'{counts["autoencoder"]:,}' in output
  assert 'summary.json' in output
