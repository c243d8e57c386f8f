"""Both stages, sampling and resuming through main.run on a TFDS source (tfds.testing.mock_data):
tests/tiny_config.py by default; the churches config with its widths shrunk as a slow test (its
network structure, KL-f8 and a five-level U-Net at 128x128, is the paper's, only narrower).
"""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import tiny_config
from configs import lsun_churches_f8
from latent_diffusion import main


def tiny_tfds_config(mode: str):
  config = tiny_config.get_config()
  config.mode = mode
  config.data.source = 'tfds'
  config.data.tfds_name = 'lsun/church_outdoor'
  config.autoencoder_train.num_steps = 2
  config.autoencoder_train.sample_every_steps = 2
  config.autoencoder_train.num_sample_images = 2
  config.diffusion_train.num_steps = 2
  return config


def shrunk_churches_config(mode: str):
  config = lsun_churches_f8.get_config()
  config.mode = mode
  config.data.image_size = 128
  config.autoencoder.ch = 32
  config.autoencoder_loss.perceptual_weight = 0.0  # no VGG16 weights here
  config.unet.model_channels = 32
  config.unet.num_heads = 2
  config.autoencoder_train.batch_size = 2
  config.autoencoder_train.num_steps = 2
  config.autoencoder_train.checkpoint_every_steps = 1
  config.autoencoder_train.num_sample_images = 2
  config.diffusion_train.batch_size = 2
  config.diffusion_train.num_steps = 2
  config.diffusion_train.warmup_steps = 1
  config.diffusion_train.checkpoint_every_steps = 1
  config.diffusion_train.sample_every_steps = 0
  config.sample.num_samples = 2
  config.sample.batch_size = 2
  config.sample.num_steps = 2
  config.log_every_steps = 1
  return config


def checkpoint_steps(directory):
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def train_and_check_both_stages(workdir, make_config, size):
  with tfds.testing.mock_data(num_examples=16):
    main.run(make_config('train'), str(workdir))
  for stage in ('autoencoder', 'diffusion'):
    directory = workdir / stage
    assert checkpoint_steps(directory / 'checkpoints')[-1] == 2
    assert list(directory.glob('events.out.tfevents.*'))
    config = json.loads((directory / 'config.json').read_text())
    assert config['data']['source'] == 'tfds' and config['unet']['model_channels'] == 32
  grid = Image.open(next((workdir / 'autoencoder' / 'samples').glob('reconstructions_*.png')))
  assert grid.size[1] > 2 * size  # inputs above reconstructions
  assert (workdir / 'config.json').exists()


def sample_and_check_the_grid(workdir, make_config, size):
  with tfds.testing.mock_data(num_examples=16):
    main.run(make_config('sample'), str(workdir))
  grids = list((workdir / 'diffusion' / 'samples').glob('sample_step2_ddim*.png'))
  assert len(grids) == 1
  pixels = np.asarray(Image.open(grids[0]))
  assert pixels.shape == (2 + size + 2, 2 * (size + 2) + 2, 3)  # one row of two images


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('tiny_tfds')
  train_and_check_both_stages(workdir, tiny_tfds_config, 16)
  return workdir


def test_train_writes_both_stages_checkpoints_events_samples_and_configs(trained_workdir):
  assert (trained_workdir / 'diffusion' / 'metrics.jsonl').exists()


def test_sample_mode_writes_a_grid_of_decoded_images(trained_workdir):
  sample_and_check_the_grid(trained_workdir, tiny_tfds_config, 16)


@pytest.mark.slow  # the same run as the two tests above, with the paper's (narrowed) churches networks
def test_churches_config_trains_both_stages_and_samples(tmp_path):
  train_and_check_both_stages(tmp_path, shrunk_churches_config, 128)
  sample_and_check_the_grid(tmp_path, shrunk_churches_config, 128)


@pytest.mark.slow  # covered by test_fault_tolerance: resuming both stages, and train skipping stage 1
def test_running_train_again_resumes_and_continues_from_the_last_checkpoint(trained_workdir):
  config = tiny_tfds_config('train')
  config.diffusion_train.num_steps = 3
  with tfds.testing.mock_data(num_examples=16):
    main.run(config, str(trained_workdir))
  # Stage 1 was complete and is skipped (still at step 2); stage 2 went on from 2 to 3.
  assert checkpoint_steps(trained_workdir / 'autoencoder' / 'checkpoints')[-1] == 2
  assert checkpoint_steps(trained_workdir / 'diffusion' / 'checkpoints')[-1] == 3
