"""Fréchet distance, Inception Score, unbiased KID and feature statistics against independent formulas.

All metric code runs in float64 NumPy, so exact identities are checked to a few hundred ulps of the
quantities involved, and Monte-Carlo claims (unbiasedness of KID) within four standard errors of the mean over
independent repetitions (a false failure rate below 1e-4 for a normal mean).
"""

import os

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from scoreflow.evaluate import (FeatureMoments, FeatureStatistics, feature_statistics, frechet_distance,
                                inception_score, kernel_inception_distance, load_statistics, mmd2_unbiased,
                                polynomial_kernel, save_statistics, trace_sqrt_product)

RNG_SEED = 20240611


def _random_covariance(rng, dim, rank=None):
  factor = rng.standard_normal((dim, rank or dim)) / np.sqrt(dim)
  return factor @ factor.T + (0.0 if rank else 0.1) * np.eye(dim)


# ----------------------------------------------------------------------------------------------------------
# Streaming moments.


def test_streaming_moments_equal_numpy_in_any_batching():
  rng = np.random.default_rng(RNG_SEED)
  features = rng.standard_normal((203, 7)) @ rng.standard_normal((7, 7)) + 3.0
  moments = FeatureMoments.empty(7)
  for batch in np.split(features, [1, 2, 50, 51, 51, 180]):  # includes a single row and an empty batch
    moments = moments.update(batch)
  statistics = moments.statistics()
  assert statistics.num_examples == 203 and statistics.features is None
  np.testing.assert_allclose(statistics.mu, features.mean(axis=0), rtol=1e-13)
  np.testing.assert_allclose(statistics.sigma, np.cov(features, rowvar=False), rtol=1e-12, atol=1e-14)
  # Merging is associative: (a + b) + c == a + (b + c) == all at once.
  a, b, c = (FeatureMoments.from_features(part) for part in np.split(features, [60, 130]))
  for merged in (a.merge(b).merge(c), a.merge(b.merge(c))):
    np.testing.assert_allclose(merged.statistics().sigma, statistics.sigma, rtol=1e-12, atol=1e-14)
  assert feature_statistics(features).num_examples == 203


def test_streaming_moments_survive_a_large_offset():
  # Features with mean 1e8 and unit spread: the naive E[x x^T] - mu mu^T cancels 16 digits (float64 has 16);
  # the pairwise update of centred scatters keeps them. Reference: np.cov of the data shifted by a constant
  # (covariance is shift invariant and the shifted data are O(1)).
  rng = np.random.default_rng(RNG_SEED + 1)
  spread = rng.standard_normal((400, 3))
  features = spread + 1e8
  moments = FeatureMoments.empty(3)
  for batch in np.split(features, 8):
    moments = moments.update(batch)
  reference = np.cov(features - features[0], rowvar=False)
  np.testing.assert_allclose(moments.statistics().sigma, reference, rtol=1e-7, atol=1e-7)
  naive = features.T @ features / 400 - np.outer(features.mean(0), features.mean(0))
  assert np.max(np.abs(naive * 400 / 399 - reference)) > 1e-3  # the check above is not vacuous


def test_moments_errors():
  with pytest.raises(ValueError, match=r"feature dimension 4, expected 3"):
    FeatureMoments.empty(3).update(np.zeros((2, 4)))
  with pytest.raises(ValueError, match=r"at least 2 feature vectors .* got 1"):
    FeatureMoments.empty(3).update(np.zeros((1, 3))).statistics()
  with pytest.raises(ValueError, match=r"\[N, d\] array .* got shape \(2, 3, 1\)"):
    FeatureMoments.from_features(np.zeros((2, 3, 1)))
  with pytest.raises(ValueError, match=r"non-finite"):
    FeatureMoments.from_features(np.array([[0.0], [np.nan]]))


# ----------------------------------------------------------------------------------------------------------
# Fréchet distance.


def _frechet_distance_scipy(mu1, sigma1, mu2, sigma2):
  """pytorch-fid's formula: a general matrix square root of the product (an independent implementation)."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("dim", [1, 5, 64])
def test_frechet_distance_matches_scipy_sqrtm(dim):
  # Both sides in float64 on matrices with condition number < 1e3: sqrtm and eigh agree to ~1e-13 relative;
  # 1e-9 relative leaves a wide margin.
  rng = np.random.default_rng(RNG_SEED + dim)
  mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
  sigma1, sigma2 = _random_covariance(rng, dim), _random_covariance(rng, dim)
  expected = _frechet_distance_scipy(mu1, sigma1, mu2, sigma2)
  assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
  assert frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(expected, rel=1e-9)  # symmetric


@pytest.mark.parametrize("rank", [None, 3])
def test_frechet_distance_closed_form_for_commuting_covariances(rank):
  # Covariances with common eigenvectors V: tr (S1 S2)^(1/2) = sum sqrt(l1 l2), so
  # FD = |mu1 - mu2|^2 + sum (sqrt(l1) - sqrt(l2))^2 (the 2-Wasserstein distance of the Gaussians). With
  # rank=3 of 8 dimensions both covariances are singular (as for fewer samples than features).
  rng = np.random.default_rng(RNG_SEED)
  dim = 8
  basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
  eig1, eig2 = rng.uniform(0.1, 4.0, dim), rng.uniform(0.1, 4.0, dim)
  if rank:
    eig1[rank:] = 0.0
    eig2[rank + 2:] = 0.0
  sigma1, sigma2 = (basis * eig1) @ basis.T, (basis * eig2) @ basis.T
  mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(eig1) - np.sqrt(eig2)) ** 2)
  # The square roots of eigenvalues computed as ~1e-16 instead of 0 contribute up to ~1e-8 each.
  assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-7, abs=1e-6)
  assert trace_sqrt_product(sigma1, sigma2) == pytest.approx(np.sum(np.sqrt(eig1 * eig2)), rel=1e-7, abs=1e-6)


def test_frechet_distance_of_a_set_against_itself_and_known_perturbations():
  # On sample statistics these are algebraic identities: a shift by delta leaves the covariance unchanged
  # (FD = |delta|^2); scaling by c gives mean c mu and covariance c^2 Sigma, so
  # FD = (1 - c)^2 (|mu|^2 + tr Sigma). Tolerance: float64 rounding of traces of size ~dim.
  rng = np.random.default_rng(RNG_SEED + 2)
  dim = 32
  features = rng.standard_normal((500, dim)) @ rng.standard_normal((dim, dim)) / np.sqrt(dim) + 0.5
  base = feature_statistics(features)
  trace = np.trace(base.sigma)
  self_distance = frechet_distance(base.mu, base.sigma, base.mu, base.sigma)
  assert abs(self_distance) <= 1e-10 * trace
  for scale in (0.1, 1.0):
    delta = scale * rng.standard_normal(dim)
    shifted = feature_statistics(features + delta)
    assert frechet_distance(base.mu, base.sigma, shifted.mu, shifted.sigma) == pytest.approx(
        delta @ delta, rel=1e-8, abs=1e-10 * trace)
  for factor in (0.5, 0.9, 1.5):
    scaled = feature_statistics(factor * features)
    expected = (1 - factor) ** 2 * (base.mu @ base.mu + trace)
    assert frechet_distance(base.mu, base.sigma, scaled.mu, scaled.sigma) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_errors():
  with pytest.raises(ValueError, match=r"feature dimensions differ \(2 and 3\)"):
    frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match=r"\(mu1, sigma1\) must be a mean \[d\] and a covariance \[d, d\]"):
    frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match=r"\(mu2, sigma2\) contains non-finite"):
    frechet_distance(np.zeros(2), np.eye(2), np.array([0.0, np.inf]), np.eye(2))


# ----------------------------------------------------------------------------------------------------------
# Inception Score.


def _inception_score_reference(logits, num_splits):
  """Salimans et al.'s loop: softmax, then scipy.stats.entropy(p(y|x), p(y)) per example and split."""
  probabilities = scipy.special.softmax(logits, axis=1)
  scores = []
  for part in np.array_split(probabilities, num_splits):
    marginal = part.mean(axis=0)
    scores.append(np.exp(np.mean([scipy.stats.entropy(row, marginal) for row in part])))
  return np.mean(scores), np.std(scores)


def test_inception_score_matches_reference_loop():
  rng = np.random.default_rng(RNG_SEED + 3)
  logits = 3.0 * rng.standard_normal((103, 12))
  for num_splits in (1, 4, 10):
    mean, std = inception_score(logits, num_splits)
    expected_mean, expected_std = _inception_score_reference(logits, num_splits)
    assert mean == pytest.approx(expected_mean, rel=1e-12)
    assert std == pytest.approx(expected_std, rel=1e-9, abs=1e-13)


def test_inception_score_extremes():
  num_classes = 7
  # Confident, evenly spread predictions: KL(p(y|x) || p(y)) = log K for every x, so the score is K (up to the
  # e^-60 mass off the predicted class).
  confident = 60.0 * np.tile(np.eye(num_classes), (3, 1))
  assert inception_score(confident, num_splits=3) == pytest.approx((num_classes, 0.0), abs=1e-12)
  # Identical predictions: p(y|x) = p(y), the score is exactly 1.
  identical = np.tile(np.arange(num_classes, dtype=float), (20, 1))
  assert inception_score(identical, num_splits=2)[0] == pytest.approx(1.0, abs=1e-12)
  with pytest.raises(ValueError, match=r"num_splits must be an int in \[1, N=20\], got 21"):
    inception_score(identical, num_splits=21)


# ----------------------------------------------------------------------------------------------------------
# Unbiased MMD^2 and KID.


def _mmd2_unbiased_double_loop(x, y):
  """Gretton et al.'s U-statistic written out pair by pair with k(a, b) = (a.b/d + 1)^3."""
  dim = x.shape[1]
  kernel = lambda a, b: (float(np.dot(a, b)) / dim + 1.0) ** 3  # noqa: E731
  m, n = len(x), len(y)
  within_x = sum(kernel(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  within_y = sum(kernel(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  between = sum(kernel(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return within_x + within_y - 2 * between


def test_mmd2_unbiased_matches_double_loop():
  rng = np.random.default_rng(RNG_SEED + 4)
  x, y = rng.standard_normal((7, 5)), rng.standard_normal((9, 5)) + 0.3
  assert mmd2_unbiased(x, y) == pytest.approx(_mmd2_unbiased_double_loop(x, y), rel=1e-12)
  np.testing.assert_allclose(polynomial_kernel(x, y), (x @ y.T / 5 + 1) ** 3, rtol=1e-14)


def _cubic_kernel_mean(alpha, a_cov, beta, b_cov):
  r"""E k(a, b) for independent a ~ N(alpha, A), b ~ N(beta, B), k = (a.b/d + 1)^3 = 1 + 3s + 3s^2 + s^3.

  With t = a.b: E t = alpha.beta; E t^2 = tr((A + alpha alpha^T)(B + beta beta^T)); and, since t | b is
  normal with mean alpha.b and variance b^T A b (E z^3 = m^3 + 3 m v),
  E t^3 = (alpha.beta)^3 + 3 (alpha.beta)(alpha^T B alpha) + 3 [(alpha.beta)(beta^T A beta + tr(A B))
  + 2 alpha^T B A beta].
  """
  dim = alpha.shape[0]
  mean_dot = alpha @ beta
  t1 = mean_dot
  t2 = np.trace((a_cov + np.outer(alpha, alpha)) @ (b_cov + np.outer(beta, beta)))
  t3 = (mean_dot ** 3 + 3 * mean_dot * (alpha @ b_cov @ alpha)
        + 3 * (mean_dot * (beta @ a_cov @ beta + np.trace(a_cov @ b_cov)) + 2 * alpha @ b_cov @ a_cov @ beta))
  return 1 + 3 * t1 / dim + 3 * t2 / dim ** 2 + t3 / dim ** 3


@pytest.mark.parametrize("shift", [0.0, 0.4])
def test_kid_is_unbiased_for_gaussians(shift):
  # x ~ N(0, A), y ~ N(shift * 1, B) with B = A (shift 0: identical laws, MMD^2 = 0) or a different B.
  # The population MMD^2 = E k(x,x') + E k(y,y') - 2 E k(x,y) is exact (_cubic_kernel_mean). Over 300
  # independent repetitions the mean of the estimates must lie within 4 standard errors of it; the biased
  # V-statistic (diagonals included) must not, which shows the check has power.
  rng = np.random.default_rng(RNG_SEED + int(10 * shift))
  dim, size, repetitions = 4, 30, 300
  a_cov = _random_covariance(rng, dim)
  b_cov = a_cov if shift == 0.0 else _random_covariance(rng, dim)
  alpha, beta = np.zeros(dim), np.full(dim, shift)
  population = (_cubic_kernel_mean(alpha, a_cov, alpha, a_cov) + _cubic_kernel_mean(beta, b_cov, beta, b_cov)
                - 2 * _cubic_kernel_mean(alpha, a_cov, beta, b_cov))
  if shift == 0.0:
    assert population == pytest.approx(0.0, abs=1e-12)
  else:
    assert population > 0.05
  chol_a, chol_b = np.linalg.cholesky(a_cov), np.linalg.cholesky(b_cov)
  unbiased, biased, kid = [], [], []
  for _ in range(repetitions):
    x = rng.standard_normal((size, dim)) @ chol_a.T + alpha
    y = rng.standard_normal((size, dim)) @ chol_b.T + beta
    unbiased.append(mmd2_unbiased(x, y))
    biased.append(polynomial_kernel(x, x).mean() + polynomial_kernel(y, y).mean()
                  - 2 * polynomial_kernel(x, y).mean())
    kid.append(kernel_inception_distance(x, y, num_subsets=3, subset_size=20, seed=len(kid)).mean)
  for estimates in (unbiased, kid):
    standard_error = np.std(estimates, ddof=1) / np.sqrt(repetitions)
    assert abs(np.mean(estimates) - population) < 4 * standard_error
  assert np.mean(biased) - population > 4 * np.std(biased, ddof=1) / np.sqrt(repetitions)


def test_kid_subsets_and_errors():
  rng = np.random.default_rng(RNG_SEED + 5)
  x, y = rng.standard_normal((50, 3)), rng.standard_normal((40, 3)) + 1.0
  result = kernel_inception_distance(x, y, num_subsets=6, subset_size=100, seed=1)
  assert result.values.shape == (6,)
  assert result.mean == pytest.approx(np.mean(result.values)) and result.std == pytest.approx(np.std(result.values))
  # subset_size is capped at the smaller set (40): each subset of y is a permutation of all of y, and each
  # value is the unbiased MMD^2 of some 40 rows of x against y.
  x_rows = np.random.default_rng(1).choice(50, 40, replace=False)
  assert result.values[0] == pytest.approx(mmd2_unbiased(x[x_rows], y), rel=1e-12)
  np.testing.assert_array_equal(kernel_inception_distance(x, y, num_subsets=6, subset_size=100, seed=1).values,
                                result.values)  # the seed fixes the subsets
  assert np.all(result.values > 0)  # a shift of one standard deviation per coordinate is plainly visible
  with pytest.raises(ValueError, match=r"feature dimension 4, expected 3"):
    kernel_inception_distance(x, np.zeros((5, 4)))
  with pytest.raises(ValueError, match=r"num_subsets must be an int >= 1, got 0"):
    kernel_inception_distance(x, y, num_subsets=0)
  with pytest.raises(ValueError, match=r"at least 2 vectors in each set, got 1 and 9"):
    mmd2_unbiased(x[:1], y[:9])


# ----------------------------------------------------------------------------------------------------------
# Reference statistics files.


def test_statistics_round_trip_and_pytorch_fid_format(tmp_path):
  rng = np.random.default_rng(RNG_SEED + 6)
  features = rng.standard_normal((20, 4))
  statistics = feature_statistics(features)._replace(features=features.astype(np.float32))
  path = tmp_path / "stats" / "reference.npz"
  save_statistics(path, statistics)
  assert sorted(os.listdir(path.parent)) == ["reference.npz"]  # written atomically: no temporary file left
  loaded = load_statistics(path)
  assert isinstance(loaded, FeatureStatistics) and loaded.num_examples == 20
  np.testing.assert_array_equal(loaded.mu, statistics.mu)
  np.testing.assert_array_equal(loaded.sigma, statistics.sigma)
  np.testing.assert_array_equal(loaded.features, statistics.features)
  # pytorch-fid's precomputed statistics hold only mu and sigma.
  np.savez(tmp_path / "pytorch_fid.npz", mu=statistics.mu, sigma=statistics.sigma)
  loaded = load_statistics(tmp_path / "pytorch_fid.npz")
  assert loaded.num_examples == -1 and loaded.features is None
  np.testing.assert_array_equal(loaded.sigma, statistics.sigma)


def test_statistics_file_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no statistics file at .*missing.npz"):
    load_statistics(tmp_path / "missing.npz")
  np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
  with pytest.raises(ValueError, match=r"lacks \['mu', 'sigma'\]; it holds \['mean'\]"):
    load_statistics(tmp_path / "bad.npz")
