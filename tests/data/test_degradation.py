"""Tests for the super-resolution degradations: bicubic against torch, the light BSRGAN model."""

import numpy as np
import pytest

from latent_diffusion.data import degradation


def smooth_image(size=64, seed=0):
  """uint8 (size, size, 3): smooth colour gradients plus texture, like a photo crop."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:size, 0:size] / size
  channels = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y + rng.random()))
              for _ in range(3)]
  image = 127.5 + 90 * np.stack(channels, -1) + rng.normal(0, 15, (size, size, 3))
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64))**2)
  return 10 * np.log10(255.0**2 / mse) if mse else np.inf


# Bicubic.


@pytest.mark.parametrize('factor', [2, 4])
def test_bicubic_downsample_matches_torch_antialiased_bicubic(factor, single_torch_thread):
  torch = pytest.importorskip('torch')
  image = np.random.default_rng(factor).integers(0, 256, (48, 64, 3), dtype=np.uint8)
  ours = degradation.bicubic_downsample(image, factor)
  pixels = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
  theirs = torch.nn.functional.interpolate(pixels, size=(48 // factor, 64 // factor), mode='bicubic',
                                           antialias=True, align_corners=False)
  theirs = np.clip(theirs[0].permute(1, 2, 0).numpy(), 0, 255)
  assert ours.shape == (48 // factor, 64 // factor, 3) and ours.dtype == np.uint8
  # PIL resizes in 8-bit fixed point and clips between its horizontal and vertical passes, torch
  # works in float32 (on noise, an unantialiased bicubic would be ~25 levels off).
  difference = np.abs(ours - theirs)
  assert difference.max() < 3
  assert difference.mean() < 0.4


def test_bicubic_downsample_keeps_a_constant_image():
  image = np.full((32, 32, 3), (10, 128, 250), np.uint8)
  np.testing.assert_array_equal(degradation.bicubic_downsample(image, 4), image[:8, :8])


# Light BSRGAN.


@pytest.mark.parametrize('factor, shape', [(4, (64, 64)), (2, (32, 48)), (8, (64, 64)), (3, (48, 36))])
def test_bsrgan_light_output_has_the_downscaled_shape_and_uint8(factor, shape):
  image = smooth_image(max(shape))[:shape[0], :shape[1]]
  for seed in range(8):  # Different seeds take different branches.
    out = degradation.bsrgan_light(image, factor, np.random.default_rng(seed))
    assert out.shape == (shape[0] // factor, shape[1] // factor, 3)
    assert out.dtype == np.uint8


def test_bsrgan_light_is_deterministic_given_the_seed_and_differs_across_seeds():
  image = smooth_image()
  first = degradation.bsrgan_light(image, 4, np.random.default_rng(7))
  np.testing.assert_array_equal(degradation.bsrgan_light(image, 4, np.random.default_rng(7)), first)
  others = [degradation.bsrgan_light(image, 4, np.random.default_rng(s)) for s in range(8, 12)]
  assert all(not np.array_equal(other, first) for other in others)


def test_bsrgan_light_is_a_degraded_but_recognisable_downsample():
  image = smooth_image(128, seed=3)
  reference = degradation.bicubic_downsample(image, 4)
  scores = []
  for seed in range(16):
    out = degradation.bsrgan_light(image, 4, np.random.default_rng(seed))
    assert out.std() > 20  # Not a flat image.
    scores.append(psnr(out, reference))
  scores = np.array(scores)
  assert np.all(np.isfinite(scores))  # Never the clean bicubic downsample itself.
  assert scores.min() > 15  # Still the same picture.
  assert scores.mean() < 35  # Blur, noise and JPEG cost detail.
  assert scores.max() - scores.min() > 1  # Degradations vary by seed.


def test_bsrgan_light_order_keeps_downsample_before_the_final_resize():
  # pylint: disable=protected-access
  for seed in range(50):
    order = degradation._step_order(np.random.default_rng(seed))
    assert sorted(order) == list(range(7))
    assert order.index(degradation._DOWNSAMPLE) < order.index(degradation._FINAL_RESIZE)


def test_anisotropic_kernel_is_normalised_and_elongated_along_theta():
  kernel = degradation.anisotropic_gaussian_kernel(11, theta=0.0, variances=(6.0, 0.5))
  assert np.isclose(kernel.sum(), 1.0)
  assert kernel[5, 5] == kernel.max()
  assert kernel[5, 8] > 10 * kernel[8, 5]  # Wide along x (columns), narrow along y.
  rotated = degradation.anisotropic_gaussian_kernel(11, theta=np.pi / 2, variances=(6.0, 0.5))
  np.testing.assert_allclose(rotated, kernel.T, atol=1e-12)
  assert np.all(np.isfinite(degradation.anisotropic_gaussian_kernel(6, 1.0, (0.0, 0.0))))


@pytest.mark.parametrize('size', [5, 6])
def test_gaussian_profile_is_normalised_even_for_a_vanishing_sigma(size):
  for sigma in (0.0, 1e-3, 0.8, 3.0):
    profile = degradation.gaussian_kernel_1d(size, sigma)
    assert np.all(np.isfinite(profile)) and np.isclose(profile.sum(), 1.0)
    np.testing.assert_allclose(profile, profile[::-1])


@pytest.mark.parametrize('function', ['bicubic_downsample', 'bsrgan_light'])
def test_sides_not_divisible_by_the_factor_raise_value_error_naming_both(function):
  image = np.zeros((30, 40, 3), np.uint8)
  call = getattr(degradation, function)
  with pytest.raises(ValueError, match=r'height 30 and width 40.*factor 4'):
    call(image, 4, np.random.default_rng(0)) if function == 'bsrgan_light' else call(image, 4)
