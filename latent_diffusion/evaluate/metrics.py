"""Sample-quality and reconstruction metrics.

On feature vectors of a feature network (evaluate/features.py: the FID Inception, or a classifier
trained here, whose distance is then "FD-<dataset>", never FID):

  frechet_distance     ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017), float64
  inception_score      exp(E_x KL(p(y|x) || p(y))) over 10 splits (Salimans et al. 2016)
  kernel_distance      KID: the unbiased MMD^2 with the cubic polynomial kernel over random subsets
                       (Binkowski et al. 2018)
  precision_recall     improved precision and recall with k-NN manifolds, k = 3 (Kynkaanniemi et al. 2019)

On images in [-1, 1]: image_metrics (PSNR on [0, 1] pixels, SSIM with an 11x11 Gaussian window, sigma 1.5);
LPIPS is models/lpips.py (it needs VGG16 weights).
"""

import warnings

import dm_pix
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special


class FewSamplesWarning(UserWarning):
  """Fewer feature vectors than dimensions: the covariance is rank-deficient and FD is biased."""


def check_sample_count(count: int, dim: int, what: str) -> None:
  if count <= dim:
    warnings.warn(f'{what}: {count} feature vectors for {dim}-dimensional features: the covariance needs '
                  f'more than {dim} for full rank, so the Frechet distance is biased (use more samples)',
                  FewSamplesWarning, stacklevel=2)


def feature_statistics(features, what: str = 'features') -> tuple[np.ndarray, np.ndarray]:
  """(mu (D,), sigma (D, D)) in float64 of features (N, D): mean and unbiased covariance."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f'{what}: need features of shape (N >= 2, D), got {features.shape}')
  check_sample_count(len(features), features.shape[1], what)
  return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """The Frechet distance of two Gaussians, as pytorch-fid computes it: scipy's sqrtm of S1 S2, retried
  with eps on the diagonals when the product is singular, and its real part."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f'statistics of different shapes: mu {mu1.shape} vs {mu2.shape}, '
                     f'sigma {sigma1.shape} vs {sigma2.shape}')
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'frechet_distance: sqrtm has an imaginary part of {np.max(np.abs(covmean.imag)):.3g}')
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """(mean, std) over `splits` equal parts of exp(mean KL(p(y|x) || p(y))), p from logits (N, C)."""
  logits = np.asarray(logits, np.float64)
  if len(logits) < splits:
    raise ValueError(f'inception_score: {len(logits)} samples for {splits} splits')
  log_p = scipy.special.log_softmax(logits, axis=-1)
  scores = []
  for part in np.array_split(log_p, splits):
    log_marginal = np.log(np.mean(np.exp(part), axis=0))
    scores.append(np.exp(np.mean(np.sum(np.exp(part) * (part - log_marginal), axis=-1))))
  return float(np.mean(scores)), float(np.std(scores))


def _polynomial_mmd(x, y) -> float:
  """Unbiased MMD^2 of two equal-sized sets with k(a, b) = (a.b / D + 1)^3."""
  dim, n = x.shape[1], len(x)
  k_xx = (x @ x.T / dim + 1.0) ** 3
  k_yy = (y @ y.T / dim + 1.0) ** 3
  k_xy = (x @ y.T / dim + 1.0) ** 3
  off_diagonal = lambda k: (k.sum() - np.trace(k)) / (n * (n - 1))
  return float(off_diagonal(k_xx) + off_diagonal(k_yy) - 2.0 * k_xy.mean())


def kernel_distance(real, fake, num_subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
  """KID (mean, std) over `num_subsets` random subsets of min(subset_size, N_real, N_fake) of each."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  size = min(subset_size, len(real), len(fake))
  if size < 2:
    raise ValueError(f'kernel_distance: need at least 2 real and 2 fake features, got {len(real)} and {len(fake)}')
  rng = np.random.default_rng(seed)
  values = [_polynomial_mmd(real[rng.choice(len(real), size, replace=False)],
                            fake[rng.choice(len(fake), size, replace=False)]) for _ in range(num_subsets)]
  return float(np.mean(values)), float(np.std(values))


def _squared_distances(a, b):
  """(len(a), len(b)) squared Euclidean distances, clipped at 0."""
  return np.maximum(np.sum(a * a, axis=1)[:, None] - 2.0 * a @ b.T + np.sum(b * b, axis=1)[None, :], 0.0)


def _knn_radii(features, k: int, batch_size: int) -> np.ndarray:
  """Squared distance of each vector to its k-th nearest neighbour in the set (itself excluded)."""
  radii = np.empty(len(features))
  for begin in range(0, len(features), batch_size):
    distances = _squared_distances(features[begin:begin + batch_size], features)
    radii[begin:begin + batch_size] = np.partition(distances, k, axis=1)[:, k]  # index 0 is itself
  return radii


def _coverage(manifold, radii, queries, batch_size: int) -> float:
  """Fraction of queries inside at least one ball (manifold[i], radii[i])."""
  inside = 0
  for begin in range(0, len(queries), batch_size):
    distances = _squared_distances(queries[begin:begin + batch_size], manifold)
    inside += int(np.sum(np.any(distances <= radii[None, :], axis=1)))
  return inside / len(queries)


def precision_recall(real, fake, k: int = 3, batch_size: int = 1024) -> dict[str, float]:
  """Improved precision (fake inside the real k-NN manifold) and recall (real inside the fake one)."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if min(len(real), len(fake)) <= k:
    raise ValueError(f'precision_recall: k = {k} needs more than {k} real and fake features, '
                     f'got {len(real)} and {len(fake)}')
  real_radii, fake_radii = _knn_radii(real, k, batch_size), _knn_radii(fake, k, batch_size)
  return {'precision': _coverage(real, real_radii, fake, batch_size),
          'recall': _coverage(fake, fake_radii, real, batch_size)}


def image_metrics(images, reconstructions):
  """Per-image (PSNR, SSIM) of [-1, 1] images (B, H, W, C); reconstructions are clipped first."""
  x = (images + 1.0) / 2.0
  y = (jnp.clip(reconstructions, -1.0, 1.0) + 1.0) / 2.0
  mse = jnp.mean(jnp.square(x - y), axis=(1, 2, 3))
  psnr = 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))
  return psnr, dm_pix.ssim(x, y, max_val=1.0)
