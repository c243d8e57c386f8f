"""Low-resolution inputs for super-resolution, made on the host from uint8 images.

Two degradations, as the paper's SR data offers them (ldm/data/imagenet.py ImageNetSR):
  bicubic_downsample  antialiased bicubic (PIL's BICUBIC, the Keys kernel with a = -0.5
                      stretched by the factor when shrinking, as MATLAB's imresize and
                      torch's interpolate(mode='bicubic', antialias=True)).
  bsrgan_light        the light variant of the BSRGAN degradation (Zhang et al. 2021) that the
                      paper's `bsr_sr` model trains on (`degradation: bsrgan_light`): blur,
                      two resizes, noise and JPEG in a random order, then a final JPEG.

Both are deterministic given their inputs (bsrgan_light given its `np.random.Generator`).
"""

import io

import numpy as np
from PIL import Image
from scipy import ndimage

# The paper's resizes pick cv2's INTER_LINEAR, INTER_CUBIC or INTER_AREA at random; ours are
# PIL's bilinear, bicubic and box (area averaging) filters.
_RANDOM_RESIZE_FILTERS = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC,
                          Image.Resampling.BOX)
_JPEG_QUALITY = (80, 95)      # inclusive range of every JPEG step
_MID_JPEG_PROB = 0.9          # the JPEG step inside the shuffled order; the final one always runs
_HALVE_FIRST_PROB = 0.25      # factor 4 only: halve first, then degrade as for factor 2
_RESIZE_DOWNSAMPLE_PROB = 0.8  # downsample step: random resize, else shifted blur + subsampling
_NOISE_LEVELS = (1, 2)        # inclusive range of the Gaussian noise sigma, in 8-bit levels
_SMALLEST_VARIANCE = 1e-6     # floor of kernel variances drawn from U[0, max): no singular kernel

# Step ids of the shuffled order: the paper's list also holds a second blur and a camera (ISP)
# noise step, which its light variant leaves out; the order is drawn over all 7 as it does.
_BLUR, _DOWNSAMPLE, _FINAL_RESIZE, _NOISE, _JPEG = 0, 2, 3, 4, 5
_NUM_STEPS = 7


def _check_factor(image, factor):
  """(height, width) of a uint8 (H, W, 3) image whose sides `factor` divides."""
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f'expected an (H, W, 3) image, got shape {image.shape}')
  height, width = image.shape[:2]
  if int(factor) != factor or factor < 1:
    raise ValueError(f'factor must be a positive integer, got {factor}')
  if height % factor or width % factor:
    raise ValueError(f'image height {height} and width {width} must both be divisible by '
                     f'factor {factor}')
  return height, width


def bicubic_downsample(image, factor):
  """uint8 (H, W, 3) -> uint8 (H/factor, W/factor, 3) by antialiased bicubic."""
  height, width = _check_factor(image, factor)
  factor = int(factor)
  if factor == 1:
    return np.array(image, np.uint8)
  resized = Image.fromarray(np.asarray(image, np.uint8)).resize(
      (width // factor, height // factor), Image.Resampling.BICUBIC)
  return np.asarray(resized, np.uint8)


def bsrgan_light(image, factor, rng):
  """The paper's light BSRGAN degradation: uint8 (H, W, 3) -> uint8 (H/factor, W/factor, 3).

  Our implementation of `degradation_bsrgan_variant` (ldm/modules/image_degradation/
  bsrgan_light.py), on float32 [0, 1] pixels:
    0. factor 4 only, with probability 1/4: halve (a random resize filter, or antialiased
       bicubic), then go on with factor 2.
    then, in a random order in which the downsample comes before the final resize:
    a. blur, half the time by an anisotropic Gaussian (side 5..14, variances U[0, (4 + f)/4),
       angle U[0, pi)), else by an isotropic one (side 5..7, sigma U[0, (2 + 0.2 f)/4)),
       mirrored borders;
    b. downsample, with probability 0.8 a random resize by 1/U[1, 2f), else a 25 px Gaussian
       blur (sigma U[0.1, 0.6 f)) shifted by (f - 1)/2 px towards the top left, then every
       f-th pixel;
    c. final resize to (H/factor, W/factor) with a random filter;
    d. Gaussian noise of sigma 1 or 2 levels: per channel (p 0.4), grey (p 0.4) or with a
       random 3x3 channel covariance (p 0.2);
    e. with probability 0.9, JPEG at quality 80..95;
    and last a JPEG at quality 80..95.
  Where the paper's code resizes with cv2 (INTER_LINEAR, INTER_CUBIC, INTER_AREA) we use PIL's
  bilinear, bicubic and box filters; PIL antialiases bilinear and bicubic when shrinking,
  which cv2 does not, so those downsamples alias less than the paper's. The shifted blur
  kernel is applied as two 1-D passes (the paper's 2-D kernel is their outer product up to
  values below float eps). The correlated noise uses the nearest positive semi-definite
  matrix to the paper's (elementwise absolute) covariance. JPEG by PIL (4:2:0 chroma, as
  cv2's default).

  Args:
    image: uint8 (H, W, 3); H and W divisible by factor.
    factor: the integer downscaling factor f.
    rng: a np.random.Generator; the only source of randomness.

  Returns:
    uint8 (H/factor, W/factor, 3).
  """
  height, width = _check_factor(image, factor)
  factor = int(factor)
  out_size = (height // factor, width // factor)
  x = np.asarray(image, np.float32) / 255.0
  scale = factor
  if scale == 4 and rng.random() < _HALVE_FIRST_PROB:
    half = (height // 2, width // 2)
    if rng.random() < 0.5:
      x = _resize(x, half, _random_filter(rng))
    else:
      x = _resize(x, half, Image.Resampling.BICUBIC)
    x = np.clip(x, 0.0, 1.0)
    scale = 2
  for step in _step_order(rng):
    if step == _BLUR:
      x = _add_blur(x, scale, rng)
    elif step == _DOWNSAMPLE:
      x = np.clip(_downsample(x, scale, rng), 0.0, 1.0)
    elif step == _FINAL_RESIZE:
      x = np.clip(_resize(x, out_size, _random_filter(rng)), 0.0, 1.0)
    elif step == _NOISE:
      x = _add_gaussian_noise(x, rng)
    elif step == _JPEG and rng.random() < _MID_JPEG_PROB:
      x = _jpeg(x, rng)
  return _to_uint8(_jpeg(x, rng))


def _step_order(rng):
  """A random permutation of the step ids, the downsample swapped before the final resize."""
  order = [int(i) for i in rng.permutation(_NUM_STEPS)]
  down, final = order.index(_DOWNSAMPLE), order.index(_FINAL_RESIZE)
  if down > final:
    order[down], order[final] = order[final], order[down]
  return order


def _to_uint8(x):
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _random_filter(rng):
  return _RANDOM_RESIZE_FILTERS[int(rng.integers(len(_RANDOM_RESIZE_FILTERS)))]


def _resize(x, size, resample):
  """float32 (h, w, C) -> (size[0], size[1], C), channel by channel in PIL's 'F' mode."""
  height, width = max(1, int(size[0])), max(1, int(size[1]))
  if x.shape[:2] == (height, width):
    return x
  channels = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c])).resize(
      (width, height), resample)) for c in range(x.shape[2])]
  return np.stack(channels, axis=-1).astype(np.float32)


def anisotropic_gaussian_kernel(size, theta, variances):
  """(size, size) Gaussian with the given eigen-variances, its first axis at angle theta.

  Sampled at offsets arange(size) - (size - 1)/2 (centred between pixels for even sizes, as
  the paper's kernels), normalised to sum 1.
  """
  direction = np.array([np.cos(theta), np.sin(theta)])
  # A reflection whose first column is `direction`: its own inverse.
  basis = np.array([[direction[0], direction[1]], [direction[1], -direction[0]]])
  variances = np.maximum(np.asarray(variances, np.float64), _SMALLEST_VARIANCE)
  precision = basis @ np.diag(1.0 / variances) @ basis
  offsets = np.arange(size) - (size - 1) / 2.0
  x, y = np.meshgrid(offsets, offsets)  # (size, size) each; x along columns
  points = np.stack([x, y], axis=-1)    # (size, size, 2) as (x, y)
  log_density = -0.5 * np.einsum('...i,ij,...j->...', points, precision, points)
  kernel = np.exp(log_density - log_density.max())
  return kernel / kernel.sum()


def gaussian_kernel_1d(size, sigma):
  """(size,) isotropic Gaussian profile, normalised; its outer square is MATLAB's fspecial."""
  offsets = np.arange(size) - (size - 1) / 2.0
  log_profile = -offsets**2 / (2.0 * max(float(sigma), _SMALLEST_VARIANCE)**2)
  profile = np.exp(log_profile - log_profile.max())  # even sizes with a tiny sigma: two taps
  return profile / profile.sum()


def _add_blur(x, scale, rng):
  """Blur step: an anisotropic or isotropic Gaussian kernel, mirrored borders."""
  max_variance = (4.0 + scale) / 4.0
  max_sigma = (2.0 + 0.2 * scale) / 4.0
  if rng.random() < 0.5:
    size = int(rng.integers(5, 15))
    theta = rng.random() * np.pi
    variances = max_variance * rng.random(2)
    kernel = anisotropic_gaussian_kernel(size, theta, variances)
  else:
    size = int(rng.integers(5, 8))
    profile = gaussian_kernel_1d(size, max_sigma * rng.random())
    kernel = np.outer(profile, profile)
  return ndimage.convolve(x, kernel[:, :, None].astype(np.float32), mode='mirror')


def _downsample(x, scale, rng):
  """Downsample step: a random resize by 1/U[1, 2 scale), or a shifted blur + subsampling."""
  height, width = x.shape[:2]
  if rng.random() < _RESIZE_DOWNSAMPLE_PROB:
    shrink = rng.uniform(1.0, 2.0 * scale)
    size = (int(height / shrink), int(width / shrink))
    return _resize(x, size, _random_filter(rng))
  profile = _shift_towards_start(gaussian_kernel_1d(25, rng.uniform(0.1, 0.6 * scale)),
                                 (scale - 1) / 2.0)
  x = ndimage.convolve1d(x, profile.astype(np.float32), axis=0, mode='mirror')
  x = ndimage.convolve1d(x, profile.astype(np.float32), axis=1, mode='mirror')
  return x[::scale, ::scale]


def _shift_towards_start(profile, shift):
  """profile sampled at i + shift (linear interpolation, clamped to its ends), renormalised."""
  positions = np.clip(np.arange(profile.size) + shift, 0, profile.size - 1)
  shifted = np.interp(positions, np.arange(profile.size), profile)
  return shifted / shifted.sum()


def _add_gaussian_noise(x, rng):
  """Noise step: sigma of 1 or 2 levels per channel, grey, or channel-correlated."""
  level = int(rng.integers(_NOISE_LEVELS[0], _NOISE_LEVELS[1] + 1)) / 255.0
  kind = rng.random()
  if kind > 0.6:
    noise = rng.normal(0.0, level, x.shape)
  elif kind < 0.4:
    noise = rng.normal(0.0, level, x.shape[:2] + (1,))
  else:
    largest = _NOISE_LEVELS[1] / 255.0
    rotation = np.linalg.qr(rng.random((3, 3)))[0]  # a random orthonormal basis
    covariance = np.abs(largest**2 * rotation.T @ np.diag(rng.random(3)) @ rotation)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    factor = eigenvectors * np.sqrt(np.maximum(eigenvalues, 0.0))  # cov ~= factor @ factor.T
    noise = rng.standard_normal(x.shape[:2] + (3,)) @ factor.T
  return np.clip(x + noise.astype(np.float32), 0.0, 1.0)


def _jpeg(x, rng):
  """JPEG round trip at a random quality in 80..95; float32 [0, 1] in and out."""
  quality = int(rng.integers(_JPEG_QUALITY[0], _JPEG_QUALITY[1] + 1))
  buffer = io.BytesIO()
  Image.fromarray(_to_uint8(x)).save(buffer, format='JPEG', quality=quality)
  buffer.seek(0)
  with Image.open(buffer) as decoded:
    return np.asarray(decoded.convert('RGB'), np.float32) / 255.0
