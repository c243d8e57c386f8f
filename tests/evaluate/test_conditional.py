"""Tests for evaluate/conditional.py: the SR and inpainting measures and their baselines."""

import numpy as np

from latent_diffusion.evaluate import conditional


def test_masked_psnr_sees_only_the_masked_region():
  truth = np.zeros((2, 8, 8, 3), np.float32)
  images = truth.copy()
  images[:, :4] = 1.0  # wrong (by half the range) outside the mask
  mask = np.zeros((2, 8, 8, 1), np.float32)
  mask[:, 4:] = 1.0
  assert np.all(conditional.masked_psnr(images, truth, mask) >= 99)  # perfect inside
  images[:, 4:] = 1.0
  np.testing.assert_allclose(conditional.masked_psnr(images, truth, mask), 10 * np.log10(1 / 0.25), rtol=1e-6)


def test_bicubic_upsampling_keeps_a_smooth_image_close():
  ys, xs = np.meshgrid(np.linspace(-0.8, 0.8, 64), np.linspace(-0.8, 0.8, 64), indexing='ij')
  image = np.stack([xs, ys, xs * ys], -1)[None].astype(np.float32)
  low = image[:, 1::4, 1::4]  # 16x16
  upsampled = conditional.bicubic_upsample(low, (64, 64))
  assert upsampled.shape == (1, 64, 64, 3)
  assert np.abs(upsampled - image).mean() < 0.03


def test_biharmonic_baseline_fills_a_hole_in_a_smooth_image_and_keeps_the_rest():
  ys, xs = np.meshgrid(np.linspace(-0.5, 0.5, 32), np.linspace(-0.5, 0.5, 32), indexing='ij')
  image = np.stack([xs, ys, xs + ys], -1)[None].astype(np.float32)
  mask = np.zeros((1, 32, 32, 1), np.float32)
  mask[:, 10:20, 12:22] = 1
  holed = np.where(mask > 0, -1.0, image)
  filled = conditional.biharmonic_inpaint(holed, mask)
  assert conditional.masked_psnr(filled, image, mask)[0] > 35
  assert conditional.masked_psnr(holed, image, mask)[0] < 10
  np.testing.assert_allclose(filled[mask[..., 0] == 0], image[mask[..., 0] == 0], atol=1e-5)
