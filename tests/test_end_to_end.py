"""Both stages, sampling and resuming through main.run on a TFDS source (tfds.testing.mock_data):
tests/tiny_config.py by default; the churches config with its widths shrunk as a slow test (its
network structure, KL-f8 and a five-level U-Net at 128x128, is the paper's, only narrower).
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import tiny_config
from configs import lsun_churches_f8
from latent_diffusion import main
from latent_diffusion.errors import ConfigError
from latent_diffusion.train import autoencoder as stage1


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


def test_sample_mode_img2img_starts_from_the_encoded_image_and_shows_it_beside_each_sample(trained_workdir,
                                                                                           tmp_path):
  """At the least strength (1 of the 4 DDIM steps, from t = 1) a sample is the stage-1 reconstruction of
  the start image up to that one step; plain samples from the same seed are far from it."""
  start = np.zeros((16, 16, 3), np.uint8)
  start[:, :8] = (200, 40, 40)
  start[4:12, 8:] = (30, 90, 220)
  Image.fromarray(start).save(tmp_path / 'start.png')
  config = tiny_tfds_config('sample')
  config.sample.init_image, config.sample.strength = str(tmp_path / 'start.png'), 0.25
  main.run(config, str(trained_workdir))
  directory = trained_workdir / 'diffusion' / 'samples'
  grid = np.asarray(Image.open(directory / 'sample_step2_ddim4_eta0_seed0_img2img0.25.png'))
  assert grid.shape == (2 + 128 + 2, 4 * (128 + 2) + 2, 3)  # [start | sample] twice, shown at 128
  shown = np.asarray(Image.fromarray(start).resize((128, 128), Image.Resampling.NEAREST))
  np.testing.assert_array_equal(grid[2:130, 2:130], shown)
  np.testing.assert_array_equal(grid[2:130, 262:390], shown)

  read = lambda name: np.stack([np.asarray(Image.open(p), np.float32) / 127.5 - 1
                                for p in sorted((directory / name).glob('*.png'))])
  autoencoder, params = stage1.load_params(config, trained_workdir)
  mode = autoencoder.apply({'params': params}, jnp.asarray(start[None], jnp.float32) / 127.5 - 1,
                           method=autoencoder.encode).mode()
  decode = lambda z: np.clip(autoencoder.apply({'params': params}, z, method=autoencoder.decode), -1, 1)
  img2img = read('sample_step2_ddim4_eta0_seed0_img2img0.25')
  config.sample.init_image = ''
  main.run(config, str(trained_workdir))  # the same seed from noise
  near = np.abs(img2img - decode(mode)).mean()
  assert near < np.abs(read('sample_step2_ddim4_eta0_seed0') - decode(mode)).mean() / 2

  config.sample.init_image, config.sample.strength = str(tmp_path / 'start.png'), 0.2  # none of the 4 steps
  with pytest.raises(ConfigError, match='sample.strength: .* the least that runs one is 0.25'):
    main.run(config, str(trained_workdir))


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
