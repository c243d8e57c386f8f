"""Both stages, sampling and resuming through main.run, on the churches config with its widths shrunk.

The TFDS path of configs/lsun_churches_f8.py is exercised with tfds.testing.mock_data; the network
structure (KL-f8: four resolutions; U-Net: five levels with attention at ds 1,2,4,8) is the paper's,
only narrower, at 128x128 so that the 16x16 latent passes through all five U-Net levels.
"""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import lsun_churches_f8
from latent_diffusion import main


def shrunk_churches_config(mode: str):
  config = lsun_churches_f8.get_config()
  config.mode = mode
  config.data.image_size = 128
  config.autoencoder.ch = 32
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
  config.sampling.num_samples = 2
  config.sampling.batch_size = 2
  config.sampling.num_steps = 2
  config.log_every_steps = 1
  return config


def checkpoint_steps(directory):
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.fixture(scope='module')
def trained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('churches')
  with tfds.testing.mock_data(num_examples=16):
    main.run(shrunk_churches_config('train'), str(workdir))
  return workdir


def test_train_writes_both_stages_checkpoints_events_samples_and_configs(trained_workdir):
  for stage in ('autoencoder', 'diffusion'):
    directory = trained_workdir / stage
    assert checkpoint_steps(directory / 'checkpoints')[-1] == 2
    assert list(directory.glob('events.out.tfevents.*'))
    config = json.loads((directory / 'config.json').read_text())
    assert config['data']['source'] == 'tfds' and config['unet']['model_channels'] == 32
  grid = Image.open(next((trained_workdir / 'autoencoder' / 'samples').glob('reconstructions_*.png')))
  assert grid.size[1] > 2 * 128  # inputs above reconstructions
  assert (trained_workdir / 'config.json').exists()


def test_sample_mode_writes_a_grid_of_decoded_images(trained_workdir):
  with tfds.testing.mock_data(num_examples=16):
    main.run(shrunk_churches_config('sample'), str(trained_workdir))
  grids = list((trained_workdir / 'diffusion' / 'samples').glob('sample_step2_ddim2_*.png'))
  assert len(grids) == 1
  pixels = np.asarray(Image.open(grids[0]))
  assert pixels.shape == (2 + 128 + 2, 2 * (128 + 2) + 2, 3)  # one row of two 128x128 images


@pytest.mark.slow  # covered by test_fault_tolerance: resuming both stages, and train skipping stage 1
def test_running_train_again_resumes_and_continues_from_the_last_checkpoint(trained_workdir):
  config = shrunk_churches_config('train')
  config.diffusion_train.num_steps = 3
  with tfds.testing.mock_data(num_examples=16):
    main.run(config, str(trained_workdir))
  # Stage 1 was complete and is skipped (still at step 2); stage 2 went on from 2 to 3.
  assert checkpoint_steps(trained_workdir / 'autoencoder' / 'checkpoints')[-1] == 2
  assert checkpoint_steps(trained_workdir / 'diffusion' / 'checkpoints')[-1] == 3
