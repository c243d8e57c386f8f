"""Tests for evaluate/autoencoder.py: per-image PSNR/SSIM, masked batching, and the eval_autoencoder mode on
weights converted from a diffusers AutoencoderKL (convert mode), checked against diffusers itself."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL

from latent_diffusion import evaluate, main
from latent_diffusion.data import pipeline
from latent_diffusion.errors import CheckpointError, ConfigError
import tiny_config


def test_psnr_is_computed_on_unit_range_pixels_per_image():
  x = jnp.zeros((2, 8, 8, 3))
  y = x.at[0].set(0.2).at[1].set(-0.1)  # [0, 1] errors 0.1 and 0.05
  psnr, ssim = evaluate.image_metrics(x, y)
  np.testing.assert_allclose(psnr, [20.0, 10 * np.log10(1 / 0.05 ** 2)], rtol=1e-5)
  assert ssim.shape == (2,)


def reference_ssim(x, y):
  """Wang et al. 2004 on [0, 1] images: 11x11 Gaussian window (sigma 1.5), C1 = 0.01^2, C2 = 0.03^2,
  'valid' filtering, mean over positions and channels; written out with scipy."""
  taps = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5 ** 2))
  window = np.outer(taps, taps) / taps.sum() ** 2
  values = []
  for a, b in zip(np.moveaxis(x, -1, 0), np.moveaxis(y, -1, 0)):
    blur = lambda image: scipy.signal.convolve2d(image, window, mode='valid')
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values.append(((2 * mu_a * mu_b + c1) * (2 * cov + c2))
                  / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
  return float(np.mean(values))


def test_ssim_matches_the_definition_and_is_one_for_identical_images():
  x = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3), minval=-1, maxval=1))
  noisy = np.clip(x + 0.3 * np.asarray(jax.random.normal(jax.random.PRNGKey(1), x.shape)), -1, 1)
  ssim = np.asarray(evaluate.image_metrics(jnp.asarray(x), jnp.asarray(noisy))[1])
  for i in range(2):
    np.testing.assert_allclose(ssim[i], reference_ssim((x[i] + 1) / 2, (noisy[i] + 1) / 2), rtol=1e-4)
  np.testing.assert_allclose(evaluate.image_metrics(jnp.asarray(x), jnp.asarray(x))[1], 1.0, atol=1e-5)


def test_reconstructions_are_clipped_before_the_metrics():
  x = jnp.ones((1, 8, 8, 3))
  np.testing.assert_allclose(evaluate.image_metrics(x, 5.0 * x)[1], 1.0, atol=1e-5)


def eval_config(tmp_path=None):
  config = tiny_config.get_config()
  with config.unlocked():
    config.autoencoder.attn_resolutions = ()
    config.eval.num_images = 10   # 3 batches of 4: the last one padded
    config.eval.batch_size = 4
  return config


def random_diffusers_kl():
  torch.manual_seed(0)
  model = DiffusersAutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                                 down_block_types=('DownEncoderBlock2D',) * 2,
                                 up_block_types=('UpDecoderBlock2D',) * 2, latent_channels=4,
                                 norm_num_groups=32, sample_size=16).eval()
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if 'norm' in name and name.endswith('weight'):
        parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter))
      elif name.endswith('bias'):
        parameter.copy_(0.05 * torch.randn_like(parameter))
  return model


@pytest.fixture(scope='module')
def converted_workdir(tmp_path_factory):
  """(workdir holding a converted diffusers model, the diffusers model, the config)."""
  reference = random_diffusers_kl()
  source = tmp_path_factory.mktemp('diffusers_vae')
  reference.save_pretrained(source)
  workdir = tmp_path_factory.mktemp('work')
  config = eval_config()
  with config.unlocked():
    config.mode, config.convert.source = 'convert', str(source)
  main.run(config, str(workdir))
  return workdir, reference, config


def test_convert_then_eval_reports_the_psnr_and_ssim_of_the_diffusers_model(converted_workdir):
  workdir, reference, config = converted_workdir
  with config.unlocked():
    config.mode = 'eval_autoencoder'
  main.run(config, str(workdir))
  written = json.loads((workdir / 'autoencoder' / 'eval.json').read_text())
  data = pipeline.make_iterator(evaluate.eval_data_config(config), batch_size=10, seed=0, shuffle=False,
                                num_epochs=1, drop_remainder=False, process_index=0, process_count=1)
  images = next(data)['image']
  with torch.no_grad():  # the diffusers model reconstructs from its posterior mode
    x = torch.from_numpy(np.transpose(images, (0, 3, 1, 2)))
    decoded = reference.decode(reference.encode(x).latent_dist.mode()).sample.numpy()
  psnr, ssim = evaluate.image_metrics(jnp.asarray(images), jnp.asarray(np.transpose(decoded, (0, 2, 3, 1))))
  assert written['num_images'] == 10 and written['step'] == config.autoencoder_train.num_steps
  np.testing.assert_allclose(written['psnr'], np.mean(psnr), rtol=1e-4)
  np.testing.assert_allclose(written['ssim'], np.mean(ssim), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(written['psnr_std'], np.std(psnr), rtol=1e-3, atol=1e-4)
  assert 'lpips' not in written  # no VGG16 weights configured


def test_convert_refuses_a_workdir_with_stage_one_checkpoints_and_changes_nothing(converted_workdir):
  workdir, _, config = converted_workdir
  checkpoints = workdir / 'autoencoder' / 'checkpoints'
  before = sorted(str(p.relative_to(checkpoints)) for p in checkpoints.rglob('*'))
  with config.unlocked():
    config.mode = 'convert'
  with pytest.raises(CheckpointError, match='already holds stage-1 checkpoints'):
    main.run(config, str(workdir))
  assert sorted(str(p.relative_to(checkpoints)) for p in checkpoints.rglob('*')) == before


def test_a_folder_source_without_an_eval_path_is_a_config_error():
  config = eval_config()
  with config.unlocked():
    config.data.source, config.data.path = 'folder', '/nonexistent'
  with pytest.raises(ConfigError, match='data.eval_path'):
    evaluate.eval_data_config(config)
