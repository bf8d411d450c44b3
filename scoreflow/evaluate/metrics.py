r"""Sample-quality metrics on feature vectors: Fréchet distance (FID), Inception Score, KID; reference statistics.

All functions here are final reductions over features that have already left the accelerator, and they run on
the host in float64 NumPy: the 2048x2048 covariances of FID lose digits in float32 (the covariance of a few
thousand samples is accumulated from sums of products, and the matrix square root amplifies rounding), and
JAX computes in float32 unless x64 is enabled. They are pure functions of their arguments.

* :class:`FeatureMoments` accumulates the mean and covariance of a stream of feature batches exactly (Chan,
  Golub & LeVeque's pairwise update), so no feature matrix needs to be kept for FID.
* :func:`frechet_distance` is the Fréchet (2-Wasserstein) distance between two Gaussians,

  .. math:: d^2 = \lVert\mu_1 - \mu_2\rVert^2 + \operatorname{tr}\Sigma_1 + \operatorname{tr}\Sigma_2
            - 2 \operatorname{tr}\bigl(\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2}\bigr)^{1/2},

  the FID of Heusel et al. (2017) when the moments are those of Inception `pool_3` features.
* :func:`inception_score` is :math:`\exp \mathbb{E}_x \mathrm{KL}(p(y|x)\,\Vert\,p(y))` (Salimans et al.,
  2016), averaged over splits.
* :func:`kernel_inception_distance` is the unbiased :math:`\mathrm{MMD}^2` with the kernel
  :math:`k(x, y) = (x^\top y / d + 1)^3`, averaged over random subsets (Bińkowski et al., 2018).

Reference statistics are `.npz` files with `mu` and `sigma` (the format pytorch-fid writes and reads, so its
precomputed statistics load here), plus `num_examples` and optionally the `features` that KID needs.

References:
  Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", 2017.
  Salimans et al., "Improved Techniques for Training GANs", 2016.
  Bińkowski et al., "Demystifying MMD GANs", ICLR 2018.
  Chan, Golub & LeVeque, "Updating Formulae and a Pairwise Algorithm for Computing Sample Variances", 1979.
  Dowson & Landau, "The Fréchet distance between multivariate normal distributions", 1982.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from scoreflow.io import atomic_savez


def _as_features(argument: str, features, dim: int | None = None) -> np.ndarray:
  """`features` as a float64 `[N, d]` array, with a ValueError naming `argument` otherwise."""
  array = np.asarray(features)
  if array.ndim != 2:
    raise ValueError(f"{argument} must be a [N, d] array of feature vectors, got shape {array.shape}; "
                     "flatten per-example features first.")
  if dim is not None and array.shape[1] != dim:
    raise ValueError(f"{argument} has feature dimension {array.shape[1]}, expected {dim}.")
  array = array.astype(np.float64)
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{argument} contains non-finite values (NaN or inf); check the samples that produced them.")
  return array


class FeatureMoments(NamedTuple):
  r"""Count, mean and scatter matrix of a stream of feature vectors, accumulated exactly in float64.

  `scatter` is :math:`\sum_i (x_i - \bar x)(x_i - \bar x)^\top`; merging two parts uses Chan et al.'s update
  :math:`S = S_a + S_b + \delta\delta^\top n_a n_b / n` with :math:`\delta = \bar x_b - \bar x_a`, which
  avoids the cancellation of :math:`\sum x x^\top - n \bar x \bar x^\top`. Immutable: `update` and `merge`
  return new moments.

  Example:
    >>> moments = FeatureMoments.empty(3)
    >>> for batch in np.split(np.arange(12.0).reshape(4, 3), 2):
    ...   moments = moments.update(batch)
    >>> moments.statistics().num_examples
    4
  """

  count: int  # number of vectors seen
  mean: np.ndarray  # [d] float64
  scatter: np.ndarray  # [d, d] float64

  @classmethod
  def empty(cls, dim: int) -> FeatureMoments:
    """No vectors yet, for `dim`-dimensional features."""
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
      raise ValueError(f"FeatureMoments.empty: dim must be a positive int, got {dim!r}.")
    return cls(0, np.zeros(dim), np.zeros((dim, dim)))

  @classmethod
  def from_features(cls, features) -> FeatureMoments:
    """The moments of `features: [N, d]`."""
    features = _as_features("FeatureMoments: features", features)
    mean = features.mean(axis=0)
    centred = features - mean
    return cls(features.shape[0], mean, centred.T @ centred)

  @property
  def dim(self) -> int:
    return self.mean.shape[0]

  def merge(self, other: FeatureMoments) -> FeatureMoments:
    """The moments of the union of the two streams."""
    if other.dim != self.dim:
      raise ValueError(f"FeatureMoments.merge: feature dimensions differ ({self.dim} and {other.dim}).")
    if other.count == 0:
      return self
    if self.count == 0:
      return other
    count = self.count + other.count
    delta = other.mean - self.mean
    mean = self.mean + delta * (other.count / count)
    scatter = self.scatter + other.scatter + np.outer(delta, delta) * (self.count * other.count / count)
    return FeatureMoments(count, mean, scatter)

  def update(self, features) -> FeatureMoments:
    """The moments after also seeing `features: [N, d]`."""
    features = _as_features("FeatureMoments.update: features", features, self.dim)
    if features.shape[0] == 0:
      return self
    return self.merge(FeatureMoments.from_features(features))

  def statistics(self) -> FeatureStatistics:
    """Mean and unbiased covariance (divisor `N - 1`, as `np.cov` and pytorch-fid use)."""
    if self.count < 2:
      raise ValueError(f"FeatureMoments.statistics: need at least 2 feature vectors for a covariance, got "
                       f"{self.count}.")
    return FeatureStatistics(self.mean.copy(), self.scatter / (self.count - 1), int(self.count))


class FeatureStatistics(NamedTuple):
  """Gaussian summary of a feature set (what FID needs), optionally with the features themselves (for KID)."""

  mu: np.ndarray  # [d] float64
  sigma: np.ndarray  # [d, d] float64, unbiased covariance
  num_examples: int
  features: np.ndarray | None = None  # [N, d] or None


def feature_statistics(features) -> FeatureStatistics:
  """Mean and unbiased covariance of `features: [N, d]` (float64); the features are not kept."""
  return FeatureMoments.from_features(features).statistics()


def _check_gaussian(where: str, argument: str, mu, sigma) -> tuple[np.ndarray, np.ndarray]:
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{where}: {argument} must be a mean [d] and a covariance [d, d], got shapes "
                     f"{mu.shape} and {sigma.shape}.")
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f"{where}: {argument} contains non-finite values.")
  return mu, 0.5 * (sigma + sigma.T)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix (tiny negative eigenvalues -> 0)."""
  eigenvalues, eigenvectors = np.linalg.eigh(matrix)
  return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def trace_sqrt_product(sigma1, sigma2) -> float:
  r""":math:`\operatorname{tr}(\Sigma_1\Sigma_2)^{1/2}` for symmetric PSD matrices, without a general `sqrtm`.

  :math:`\Sigma_1\Sigma_2` is similar to the symmetric PSD :math:`M = \Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2}`,
  so the trace of its square root is :math:`\sum_i \sqrt{\lambda_i(M)}`: two symmetric eigendecompositions,
  real by construction and stable for the singular covariances of fewer samples than dimensions (where a
  general `scipy.linalg.sqrtm` of the non-symmetric product returns complex parts or fails).
  """
  root1 = _psd_sqrt(np.asarray(sigma1, np.float64))
  product = root1 @ np.asarray(sigma2, np.float64) @ root1
  eigenvalues = np.linalg.eigvalsh(0.5 * (product + product.T))
  return float(np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  r"""Squared Fréchet distance between :math:`N(\mu_1, \Sigma_1)` and :math:`N(\mu_2, \Sigma_2)` (FID).

  .. math:: d^2 = \lVert\mu_1 - \mu_2\rVert^2 + \operatorname{tr}\Sigma_1 + \operatorname{tr}\Sigma_2
            - 2 \operatorname{tr}(\Sigma_1\Sigma_2)^{1/2}

  (Dowson & Landau, 1982; Heusel et al., 2017), in float64 with :func:`trace_sqrt_product`. Rounding can
  leave a value of order `1e-12 * tr(Sigma)` below zero for identical statistics; it is not clipped.

  Args:
    mu1, mu2: means `[d]`.
    sigma1, sigma2: covariances `[d, d]` (symmetrized before use).

  Returns:
    The distance as a Python float (FID when the statistics are of Inception `pool_3` features).

  Example:
    >>> frechet_distance(np.zeros(2), np.eye(2), np.ones(2), np.eye(2))
    2.0
  """
  mu1, sigma1 = _check_gaussian("frechet_distance", "(mu1, sigma1)", mu1, sigma1)
  mu2, sigma2 = _check_gaussian("frechet_distance", "(mu2, sigma2)", mu2, sigma2)
  if mu1.shape != mu2.shape:
    raise ValueError(f"frechet_distance: the two feature dimensions differ ({mu1.shape[0]} and {mu2.shape[0]}); "
                     "compare statistics of the same feature extractor.")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def inception_score(logits, num_splits: int = 10) -> tuple[float, float]:
  r"""Inception Score :math:`\exp \mathbb{E}_x \mathrm{KL}(p(y|x) \Vert p(y))`: mean and std over splits.

  As in Salimans et al. (2016)'s code: the `N` examples are cut into `num_splits` contiguous parts; in each,
  :math:`p(y)` is the mean of :math:`p(y|x)` over the part, and the score is the exponential of the mean KL
  divergence. Computed from logits with a stable log-softmax in float64. For Inception-v3 pass all 1008
  logits of :func:`~scoreflow.evaluate.inception.fid_inception_features` (as the original code does).

  Args:
    logits: `[N, K]` classifier logits.
    num_splits: number of parts, `1 <= num_splits <= N` (10 in the paper, with N = 50000).

  Returns:
    `(mean, std)` of the per-split scores (`std` with divisor `num_splits`, 0 for one split). The score lies
    in `[1, K]`: 1 when all predictions are equal, `K` when they are confident and spread evenly.
  """
  logits = _as_features("inception_score: logits", logits)
  if isinstance(num_splits, bool) or not isinstance(num_splits, (int, np.integer)) or not (
      1 <= num_splits <= logits.shape[0]):
    raise ValueError(f"inception_score: num_splits must be an int in [1, N={logits.shape[0]}], got {num_splits!r}.")
  scores = []
  for part in np.array_split(_log_softmax(logits), num_splits):
    log_marginal = np.log(np.mean(np.exp(part), axis=0))
    kl = np.sum(np.exp(part) * (part - log_marginal), axis=-1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


def polynomial_kernel(x, y, *, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> np.ndarray:
  r"""`[N, M]` kernel matrix :math:`k(x, y) = (\gamma\, x^\top y + c_0)^{p}` with :math:`\gamma = 1/d` by default."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  gamma = 1.0 / x.shape[1] if gamma is None else gamma
  return (gamma * (x @ y.T) + coef0) ** degree


def mmd2_unbiased(x, y, *, degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> float:
  r"""Unbiased estimate of :math:`\mathrm{MMD}^2` between the laws of `x: [m, d]` and `y: [n, d]`.

  .. math:: \widehat{\mathrm{MMD}}^2_u = \frac{1}{m(m-1)}\sum_{i \ne j} k(x_i, x_j)
            + \frac{1}{n(n-1)}\sum_{i \ne j} k(y_i, y_j) - \frac{2}{mn}\sum_{i, j} k(x_i, y_j)

  (Gretton et al., 2012, Lemma 6), with :func:`polynomial_kernel`; by default the cubic kernel
  :math:`(x^\top y/d + 1)^3` of KID. Its expectation is exactly :math:`\mathrm{MMD}^2`, so it is zero on
  average (and can be negative) when both samples come from one distribution.
  """
  x = _as_features("mmd2_unbiased: x", x)
  y = _as_features("mmd2_unbiased: y", y, x.shape[1])
  m, n = x.shape[0], y.shape[0]
  if m < 2 or n < 2:
    raise ValueError(f"mmd2_unbiased: need at least 2 vectors in each set, got {m} and {n}.")
  kernel = dict(degree=degree, gamma=gamma, coef0=coef0)
  k_xx = polynomial_kernel(x, x, **kernel)
  k_yy = polynomial_kernel(y, y, **kernel)
  k_xy = polynomial_kernel(x, y, **kernel)
  within_x = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
  within_y = (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
  return float(within_x + within_y - 2.0 * k_xy.mean())


class KernelDistance(NamedTuple):
  """KID estimate: the mean over subsets, their standard deviation, and each subset's estimate."""

  mean: float
  std: float
  values: np.ndarray  # [num_subsets] float64


def kernel_inception_distance(x, y, *, num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> KernelDistance:
  r"""Kernel Inception Distance (Bińkowski et al., 2018): :func:`mmd2_unbiased` averaged over random subsets.

  Each of `num_subsets` rounds draws `min(subset_size, len(x), len(y))` rows of `x` and as many of `y`
  without replacement (independently across rounds) and evaluates the unbiased :math:`\mathrm{MMD}^2` with
  the cubic kernel :math:`(x^\top y/d + 1)^3`, as the paper's reference code does; KID is their mean. The
  mean is unbiased for :math:`\mathrm{MMD}^2`; `std` is the spread of the subset estimates (the paper's
  "± std"), not the standard error of the mean (subsets overlap).

  Args:
    x, y: feature sets `[N, d]` and `[M, d]` (Inception `pool_3` features for KID).
    num_subsets: number of subsets (100 in the paper).
    subset_size: rows per subset (1000 in the paper).
    seed: seed of the subset choice (NumPy's PCG64).

  Returns:
    :class:`KernelDistance`. Cost: `3 * num_subsets` matrix products of `[s, d] x [d, s]` (about 25 s for the
    defaults with d = 2048 on two CPU cores).
  """
  x = _as_features("kernel_inception_distance: x", x)
  y = _as_features("kernel_inception_distance: y", y, x.shape[1])
  for name, value, minimum in (("num_subsets", num_subsets, 1), ("subset_size", subset_size, 2)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
      raise ValueError(f"kernel_inception_distance: {name} must be an int >= {minimum}, got {value!r}.")
  size = min(subset_size, x.shape[0], y.shape[0])
  if size < 2:
    raise ValueError(f"kernel_inception_distance: need at least 2 vectors in each set, got {x.shape[0]} and "
                     f"{y.shape[0]}.")
  rng = np.random.default_rng(seed)
  values = np.empty(num_subsets)
  for subset in range(num_subsets):
    values[subset] = mmd2_unbiased(x[rng.choice(x.shape[0], size, replace=False)],
                                   y[rng.choice(y.shape[0], size, replace=False)])
  return KernelDistance(float(values.mean()), float(values.std()), values)


def save_statistics(path: str | os.PathLike, statistics: FeatureStatistics) -> None:
  """Writes `mu`, `sigma`, `num_examples` (and `features` when present) to `path` (`.npz`), atomically."""
  arrays = {"mu": np.asarray(statistics.mu), "sigma": np.asarray(statistics.sigma),
            "num_examples": np.asarray(statistics.num_examples, np.int64)}
  if statistics.features is not None:
    arrays["features"] = np.asarray(statistics.features)
  atomic_savez(path, arrays)


def load_statistics(path: str | os.PathLike) -> FeatureStatistics:
  """Reads statistics written by :func:`save_statistics` or by pytorch-fid (`mu`, `sigma` only).

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if the archive has no `mu`/`sigma` or they do not fit together.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"load_statistics: no statistics file at {path!r}; compute the reference "
                            "statistics of the dataset first.")
  with np.load(path, allow_pickle=False) as archive:
    missing = {"mu", "sigma"} - set(archive.files)
    if missing:
      raise ValueError(f"load_statistics: {path!r} lacks {sorted(missing)}; it holds {sorted(archive.files)}.")
    mu, sigma = _check_gaussian("load_statistics", f"the statistics in {path!r}", archive["mu"], archive["sigma"])
    num_examples = int(archive["num_examples"]) if "num_examples" in archive.files else -1
    features = archive["features"] if "features" in archive.files else None
  return FeatureStatistics(mu, sigma, num_examples, features)
