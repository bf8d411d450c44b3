"""Toy 2-D densities: determinism, exact standardisation, and agreement with their exact mixtures."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from scoreflow.data import TOY_DATASETS, sample_toy, toy_mixture

MIXTURES = ("eight_gaussians", "gaussian_mixture")
NUM_SAMPLES = 200_000
Z = 5.0  # Monte-Carlo bounds at 5 standard errors: a false failure has probability < 1e-6 per check.


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_shape_dtype_and_determinism(name):
  x = sample_toy(name, 3, 1000)
  assert x.shape == (1000, 2) and x.dtype == np.float32
  np.testing.assert_array_equal(x, sample_toy(name, 3, 1000))
  assert not np.array_equal(x, sample_toy(name, 4, 1000))
  rng = np.random.default_rng(3)
  first, second = sample_toy(name, rng, 10), sample_toy(name, rng, 10)
  assert not np.array_equal(first, second)  # a Generator is advanced, not reseeded
  assert sample_toy(name, 0, 0).shape == (0, 2)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_standardised_to_zero_mean_unit_variance(name):
  # The standardisation constants are exact (closed forms / quadrature), so the sample mean and variance
  # differ from 0 and 1 only by Monte-Carlo error: se(mean) = std / sqrt(N), se(var) = std((x - m)^2) / sqrt(N).
  x = sample_toy(name, 0, NUM_SAMPLES).astype(np.float64)
  mean = x.mean(axis=0)
  squared = (x - mean) ** 2
  variance = squared.mean(axis=0)
  np.testing.assert_array_less(np.abs(mean), Z * x.std(axis=0) / math.sqrt(NUM_SAMPLES))
  np.testing.assert_array_less(np.abs(variance - 1), Z * squared.std(axis=0) / math.sqrt(NUM_SAMPLES))


@pytest.mark.parametrize("name", MIXTURES)
def test_mixture_log_density_integrates_to_one(name):
  # Trapezoid rule on [-8, 8]^2 with h = 0.025: every component std is >= 0.14 (> 5 h); the trapezoid error
  # on a Gaussian of std s is about 2 exp(-2 pi^2 s^2 / h^2) < 1e-200, and the mass outside the box < 1e-12.
  mixture = toy_mixture(name, jnp.float64)
  grid = np.linspace(-8, 8, 641)
  xx, yy = np.meshgrid(grid, grid, indexing="ij")
  density = np.exp(np.asarray(jax.jit(mixture.log_prob)(jnp.asarray(np.stack([xx.ravel(), yy.ravel()], 1)))))
  total = np.trapezoid(np.trapezoid(density.reshape(xx.shape), grid, axis=1), grid)
  assert abs(total - 1) < 1e-9


def _independent_mixture(name):
  """(weights, means, stds) written from the densities' definitions (scoreflow/data/toy.py's docstring), not
  from the table that generates the samples: eight Gaussians of std 0.2 on a circle of radius
  sqrt(2 (1 - 0.2^2)) (unit variance per axis by construction); the three-component mixture from its raw
  parameters, standardised here per axis from its closed-form mean and variance."""
  if name == "eight_gaussians":
    angles = np.pi / 4 * np.arange(8)
    radius = math.sqrt(2 * (1 - 0.2**2))
    return np.full(8, 0.125), radius * np.stack([np.cos(angles), np.sin(angles)], 1), np.full((8, 2), 0.2)
  weights = np.array([0.5, 0.3, 0.2])
  means = np.array([[-1.5, -0.5], [1.0, 1.0], [1.5, -1.5]])
  stds = np.array([[0.4, 0.3], [0.3, 0.6], [0.2, 0.2]])
  centre = weights @ means
  scale = np.sqrt(weights @ (stds**2 + (means - centre) ** 2))
  return weights, (means - centre) / scale, stds / scale


@pytest.mark.parametrize("name", MIXTURES)
def test_mixture_table_matches_the_definitions(name):
  mixture = toy_mixture(name, jnp.float64)
  for got, expected in zip((mixture.weights, mixture.means, mixture.stds), _independent_mixture(name)):
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", MIXTURES)
def test_samples_follow_the_exact_mixture(name):
  weights, means, stds = _independent_mixture(name)  # Not the sampler's own table.
  x = sample_toy(name, 1, NUM_SAMPLES).astype(np.float64)
  # Mean and covariance against the mixture's closed forms (5 standard errors per entry).
  np.testing.assert_array_less(np.abs(x.mean(0) - weights @ means), Z * x.std(0) / math.sqrt(NUM_SAMPLES))
  mean = weights @ means
  covariance = np.einsum("k,kd,ke->de", weights, means - mean, means - mean) + np.diag(weights @ stds**2)
  centred = x - mean
  products = centred[:, :, None] * centred[:, None, :]
  np.testing.assert_array_less(np.abs(products.mean(0) - covariance),
                               Z * products.std(0) / math.sqrt(NUM_SAMPLES))
  # Each marginal against the mixture's exact CDF (Kolmogorov-Smirnov; float32 rounding is far below the
  # KS resolution of 1/sqrt(N)).
  for axis in range(2):
    cdf = lambda v, a=axis: np.sum(weights * scipy.stats.norm.cdf((v[:, None] - means[:, a]) / stds[:, a]), 1)
    assert scipy.stats.kstest(x[:, axis], cdf).pvalue > 1e-4


@pytest.mark.parametrize("name", MIXTURES)
def test_mixture_dtype_follows_request(name):
  assert toy_mixture(name).means.dtype == jnp.float32
  assert toy_mixture(name, jnp.float64).stds.dtype == jnp.float64


def test_checkerboard_is_uniform_on_its_eight_squares():
  x = sample_toy("checkerboard", 2, NUM_SAMPLES).astype(np.float64) / (math.sqrt(3) / 2)  # raw [-2, 2)^2
  column, row = np.floor(x[:, 0]).astype(int) + 2, np.floor(x[:, 1]).astype(int) + 2
  assert np.all((column + row) % 2 == 0)  # exact support
  counts = np.bincount(column * 4 + row, minlength=16)[[c * 4 + r for c in range(4) for r in range(4)
                                                         if (c + r) % 2 == 0]]
  assert counts.sum() == NUM_SAMPLES
  assert scipy.stats.chisquare(counts).pvalue > 1e-4


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match="toy dataset name must be one of"):
    sample_toy("moons", 0, 3)
  with pytest.raises(ValueError, match="num_samples must be an int >= 0, got -1"):
    sample_toy("two_moons", 0, -1)
  with pytest.raises(ValueError, match="no closed-form mixture"):
    toy_mixture("swiss_roll")
