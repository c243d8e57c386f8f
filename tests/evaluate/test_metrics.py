"""Feature-space metrics: FD against pytorch-fid's own function, IS/KID/precision-recall against their
definitions on cases whose answer is known."""

import itertools
import warnings

import numpy as np
import pytest

from latent_diffusion.evaluate import metrics


def _statistics_as_pytorch_fid(features):
  # pytorch_fid.fid_score.calculate_activation_statistics after the network: mean and np.cov.
  return np.mean(features, axis=0), np.cov(features, rowvar=False)


@pytest.mark.parametrize('num_fake', [400, 40])  # full-rank and rank-deficient fake covariance
def test_frechet_distance_matches_pytorch_fid(num_fake):
  from pytorch_fid.fid_score import calculate_frechet_distance  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  real = rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64)) * 0.3
  fake = rng.normal(size=(num_fake, 64)) * 1.2 + 0.4
  expected = calculate_frechet_distance(*_statistics_as_pytorch_fid(fake), *_statistics_as_pytorch_fid(real))
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', metrics.FewSamplesWarning)
    ours = metrics.frechet_distance(*metrics.feature_statistics(fake), *metrics.feature_statistics(real))
  np.testing.assert_allclose(ours, expected, rtol=1e-6)


def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift():
  sigma = np.diag([1.0, 2.0, 3.0])
  shift = np.array([1.0, -2.0, 0.5])
  assert metrics.frechet_distance(np.zeros(3), sigma, shift, sigma) == pytest.approx(np.sum(shift ** 2), rel=1e-9)
  # Different covariances: Tr(S1 + S2 - 2 (S1 S2)^(1/2)) = sum (sqrt(a) - sqrt(b))^2 for diagonal ones.
  other = np.diag([4.0, 2.0, 1.0])
  expected = np.sum((np.sqrt(np.diag(sigma)) - np.sqrt(np.diag(other))) ** 2)
  assert metrics.frechet_distance(np.zeros(3), sigma, np.zeros(3), other) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_refuses_statistics_of_different_dimensions():
  with pytest.raises(ValueError, match='different shapes'):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_warns_with_both_numbers_when_samples_do_not_exceed_the_dimension():
  with pytest.warns(metrics.FewSamplesWarning, match=r'50 feature vectors for 128-dimensional'):
    metrics.feature_statistics(np.random.default_rng(0).normal(size=(50, 128)), 'samples')
  with warnings.catch_warnings():
    warnings.simplefilter('error', metrics.FewSamplesWarning)
    metrics.feature_statistics(np.random.default_rng(0).normal(size=(200, 128)))


def test_inception_score_is_one_for_uninformative_and_num_classes_for_confident_even_predictions():
  assert metrics.inception_score(np.zeros((100, 10)))[0] == pytest.approx(1.0)
  confident = np.full((100, 10), -50.0)
  confident[np.arange(100), np.arange(100) % 10] = 50.0  # each split: 10 images, one per class
  mean, std = metrics.inception_score(confident, splits=10)
  assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
  # Confident but always the same class: no diversity, score 1.
  same = np.full((100, 10), -50.0)
  same[:, 3] = 50.0
  assert metrics.inception_score(same)[0] == pytest.approx(1.0, rel=1e-6)


def test_inception_score_matches_its_definition_per_split():
  logits = np.random.default_rng(1).normal(size=(40, 5)) * 2
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = []
  for part in (p[:20], p[20:]):
    marginal = part.mean(0)
    scores.append(np.exp(np.mean([sum(q[c] * np.log(q[c] / marginal[c]) for c in range(5)) for q in part])))
  mean, std = metrics.inception_score(logits, splits=2)
  assert mean == pytest.approx(np.mean(scores), rel=1e-9) and std == pytest.approx(np.std(scores), rel=1e-9)


def test_kernel_distance_equals_the_unbiased_mmd_written_out():
  rng = np.random.default_rng(2)
  real, fake = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)) + 0.5
  kernel = lambda a, b: (a @ b / 4 + 1) ** 3
  pairs = lambda x: np.mean([kernel(x[i], x[j]) for i, j in itertools.permutations(range(6), 2)])
  cross = np.mean([kernel(a, b) for a in real for b in fake])
  expected = pairs(real) + pairs(fake) - 2 * cross
  mean, std = metrics.kernel_distance(real, fake, num_subsets=3, subset_size=6)
  assert mean == pytest.approx(expected, rel=1e-9) and std == pytest.approx(0.0, abs=1e-12)


def test_kernel_distance_is_near_zero_for_one_distribution_and_grows_with_a_shift():
  rng = np.random.default_rng(3)
  same = metrics.kernel_distance(rng.normal(size=(400, 16)), rng.normal(size=(400, 16)), subset_size=200)
  shifted = metrics.kernel_distance(rng.normal(size=(400, 16)), rng.normal(size=(400, 16)) + 1.0, subset_size=200)
  assert abs(same[0]) < 0.05 < shifted[0]


def test_precision_recall_of_a_set_against_itself_and_against_a_distant_set():
  rng = np.random.default_rng(4)
  real = rng.normal(size=(200, 8))
  assert metrics.precision_recall(real, real.copy(), batch_size=64) == {'precision': 1.0, 'recall': 1.0}
  assert metrics.precision_recall(real, real + 100.0) == {'precision': 0.0, 'recall': 0.0}


def test_precision_recall_uses_the_kth_neighbour_other_than_the_point_itself():
  real = np.arange(10, dtype=np.float64)[:, None]  # points 0..9: each k = 3 radius is 2 (ends: 3)
  fake = np.array([[4.5], [11.5], [12.5], [-3.5]])  # inside; inside the end ball (9 + 3); two outside
  result = metrics.precision_recall(real, fake, k=3)
  assert result['precision'] == pytest.approx(0.5)
  # Fake radii (k = 3 among 4 points): each ball reaches its 3rd neighbour, so they cover 0..9 entirely.
  assert result['recall'] == pytest.approx(1.0)
  assert metrics.precision_recall(real, fake, k=1)['precision'] == pytest.approx(0.25)
