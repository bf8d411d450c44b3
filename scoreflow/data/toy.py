r"""Two-dimensional toy densities that need no download, each standardised to zero mean and unit variance.

Every density is defined by a generative recipe in "raw" coordinates and then shifted and scaled per axis
by its *exact* mean and standard deviation (closed form, or Gauss-Legendre quadrature to machine precision
for the swiss roll), so samples have mean 0 and variance 1 along each axis up to Monte-Carlo error:

* `checkerboard`: uniform on the 8 dark squares of a 4x4 board on :math:`[-2, 2]^2`, scaled by
  :math:`\sqrt 3/2` (each marginal is uniform on :math:`[-\sqrt3, \sqrt3]`). Exact density
  :math:`1/(8 \cdot 3/4) = 1/6` on its support.
* `two_moons`: the two interleaved half circles of scikit-learn's `make_moons` with Gaussian noise of
  standard deviation 0.1 (raw units).
* `eight_gaussians`: 8 equally weighted isotropic Gaussians of standard deviation 0.2 whose means lie evenly
  on a circle of radius :math:`\sqrt{2(1 - 0.2^2)}`, so that each axis has variance
  :math:`r^2/2 + 0.2^2 = 1` exactly. A :class:`~scoreflow.testing.GaussianMixture` (exact score and
  log-density at every diffusion time): :func:`toy_mixture`.
* `swiss_roll`: :math:`(t\cos t, t\sin t)` with :math:`t = 1.5\pi(1 + 2v)`, :math:`v \sim U[0, 1)`, plus
  Gaussian noise of standard deviation 0.5 (raw units).
* `gaussian_mixture`: an asymmetric mixture of three anisotropic Gaussians (weights 0.5, 0.3, 0.2);
  exact log-density through :func:`toy_mixture`.

Samplers use NumPy (the input pipeline runs on the host) and are deterministic given a seed.

Labels. The two Gaussian mixtures label each point with the component it was drawn from (`0 .. K - 1`, taken from
the same draw, so the points are those of :func:`sample_toy`): :func:`sample_toy_labelled`, whose labels the batch
stream carries, and :func:`toy_labelled_mixture`, the exact joint :math:`p(x, y)` with its noisy posteriors
:math:`p_t(y \mid x)`. The other densities have one class, label 0. :data:`TOY_NUM_CLASSES` lists the counts.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from scoreflow.testing.analytic import GaussianMixture, LabelledGaussianMixture

TOY_DATASETS = ("checkerboard", "two_moons", "eight_gaussians", "swiss_roll", "gaussian_mixture")
# The classes of each toy density's labels: a mixture's components; 1 (every label 0) for the others.
TOY_NUM_CLASSES = {"checkerboard": 1, "two_moons": 1, "eight_gaussians": 8, "swiss_roll": 1, "gaussian_mixture": 3}

_TWO_MOONS_NOISE = 0.1
_SWISS_ROLL_NOISE = 0.5
_EIGHT_GAUSSIANS_STD = 0.2


def _standardised_mixture(weights, means, stds):
  """(weights, means, stds) of the mixture shifted and scaled per axis to zero mean and unit variance."""
  weights, means, stds = (np.asarray(a, np.float64) for a in (weights, means, stds))
  mean = weights @ means
  variance = weights @ (stds**2 + (means - mean) ** 2)
  axis_std = np.sqrt(variance)
  return weights, (means - mean) / axis_std, stds / axis_std


def _eight_gaussians_parameters():
  angles = 2 * np.pi * np.arange(8) / 8
  radius = math.sqrt(2 * (1 - _EIGHT_GAUSSIANS_STD**2))
  means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  return _standardised_mixture(np.full(8, 1 / 8), means, np.full((8, 2), _EIGHT_GAUSSIANS_STD))


def _gaussian_mixture_parameters():
  return _standardised_mixture(
      weights=[0.5, 0.3, 0.2],
      means=[[-1.5, -0.5], [1.0, 1.0], [1.5, -1.5]],
      stds=[[0.4, 0.3], [0.3, 0.6], [0.2, 0.2]],
  )


_MIXTURES = {
    "eight_gaussians": _eight_gaussians_parameters(),
    "gaussian_mixture": _gaussian_mixture_parameters(),
}


def _two_moons_moments():
  r"""Exact per-axis mean and std of the raw two moons.

  Outer moon :math:`(\cos\theta, \sin\theta)`, inner moon :math:`(1 - \cos\theta, \tfrac12 - \sin\theta)`,
  :math:`\theta \sim U[0, \pi]`, each with probability 1/2; :math:`E\cos\theta = 0`,
  :math:`E\sin\theta = 2/\pi`, :math:`E\cos^2\theta = E\sin^2\theta = 1/2`.
  """
  mean = np.array([0.5, 0.25])
  second_moment_x = 0.5 * (0.5 + 1.5)
  second_moment_y = 0.5 * (0.5 + (0.25 - 2 / np.pi + 0.5))
  variance = np.array([second_moment_x, second_moment_y]) - mean**2 + _TWO_MOONS_NOISE**2
  return mean, np.sqrt(variance)


def _swiss_roll_moments():
  """Per-axis mean and std of the raw swiss roll by 64-point Gauss-Legendre quadrature (exact to 1e-15)."""
  nodes, weights = np.polynomial.legendre.leggauss(64)
  t = 1.5 * np.pi * (2 + nodes)  # maps [-1, 1] onto [1.5 pi, 4.5 pi]
  weights = weights / 2  # uniform density on the interval
  curve = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
  mean = weights @ curve
  variance = weights @ (curve - mean) ** 2 + _SWISS_ROLL_NOISE**2
  return mean, np.sqrt(variance)


_TWO_MOONS_MEAN, _TWO_MOONS_STD = _two_moons_moments()
_SWISS_ROLL_MEAN, _SWISS_ROLL_STD = _swiss_roll_moments()


def _unlabelled(sampler):
  """A sampler of an unlabelled density as `(points, labels = 0)`."""

  def sample(rng, num_samples):
    return sampler(rng, num_samples), np.zeros((num_samples,), np.int64)

  return sample


def _checkerboard(rng, num_samples):
  x = rng.uniform(-2.0, 2.0, num_samples)
  column = np.floor(x).astype(np.int64) + 2  # 0 .. 3
  row = 2 * rng.integers(0, 2, num_samples) + column % 2  # squares with (row + column) even
  y = row - 2 + rng.uniform(0.0, 1.0, num_samples)
  return (math.sqrt(3) / 2) * np.stack([x, y], axis=1)


def _two_moons(rng, num_samples):
  theta = rng.uniform(0.0, np.pi, num_samples)
  inner = rng.integers(0, 2, num_samples).astype(bool)
  outer_points = np.stack([np.cos(theta), np.sin(theta)], axis=1)
  inner_points = np.stack([1 - np.cos(theta), 0.5 - np.sin(theta)], axis=1)
  points = np.where(inner[:, None], inner_points, outer_points)
  points = points + _TWO_MOONS_NOISE * rng.standard_normal((num_samples, 2))
  return (points - _TWO_MOONS_MEAN) / _TWO_MOONS_STD


def _swiss_roll(rng, num_samples):
  t = 1.5 * np.pi * (1 + 2 * rng.uniform(0.0, 1.0, num_samples))
  points = np.stack([t * np.cos(t), t * np.sin(t)], axis=1)
  points = points + _SWISS_ROLL_NOISE * rng.standard_normal((num_samples, 2))
  return (points - _SWISS_ROLL_MEAN) / _SWISS_ROLL_STD


def _mixture_sampler(name):
  weights, means, stds = _MIXTURES[name]

  def sample(rng, num_samples):
    component = rng.choice(len(weights), size=num_samples, p=weights)
    return means[component] + stds[component] * rng.standard_normal((num_samples, 2)), component

  return sample


# name -> sampler(rng, n) -> (points [n, 2] float64, labels [n] int).
_SAMPLERS = {
    "checkerboard": _unlabelled(_checkerboard),
    "two_moons": _unlabelled(_two_moons),
    "eight_gaussians": _mixture_sampler("eight_gaussians"),
    "swiss_roll": _unlabelled(_swiss_roll),
    "gaussian_mixture": _mixture_sampler("gaussian_mixture"),
}


def _check_name(name: str) -> None:
  if name not in _SAMPLERS:
    raise ValueError(f"toy dataset name must be one of {TOY_DATASETS}, got {name!r}.")


def sample_toy(name: str, seed_or_rng: int | np.random.Generator, num_samples: int) -> np.ndarray:
  """Draws `num_samples` points of a toy density.

  Args:
    name: one of :data:`TOY_DATASETS`.
    seed_or_rng: an integer seed (the same seed gives the same points) or a `np.random.Generator`, which is
      advanced.
    num_samples: number of points, `>= 0`.

  Returns:
    float32 `[num_samples, 2]`, standardised per axis (mean 0, variance 1).

  Raises:
    ValueError: for an unknown name or a negative `num_samples`.

  Example:
    >>> sample_toy("two_moons", 0, 3).shape
    (3, 2)
  """
  return sample_toy_labelled(name, seed_or_rng, num_samples)[0]


def sample_toy_labelled(name: str, seed_or_rng: int | np.random.Generator,
                        num_samples: int) -> tuple[np.ndarray, np.ndarray]:
  """Draws `num_samples` points of a toy density with their labels.

  The points are exactly those of :func:`sample_toy` for the same seed (or generator state); the labels come from
  the same draw: a mixture's component index (`eight_gaussians`: 0..7 counter-clockwise from the positive x-axis;
  `gaussian_mixture`: 0..2 in the order of its weights 0.5, 0.3, 0.2), 0 for the other densities.

  Returns:
    `(points float32 [num_samples, 2], labels int32 [num_samples])`.

  Raises:
    ValueError: for an unknown name or a negative `num_samples`.

  Example:
    >>> points, labels = sample_toy_labelled("eight_gaussians", 0, 3)
    >>> points.shape, labels.dtype
    ((3, 2), dtype('int32'))
  """
  _check_name(name)
  if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 0:
    raise ValueError(f"sample_toy: num_samples must be an int >= 0, got {num_samples!r}.")
  rng = seed_or_rng if isinstance(seed_or_rng, np.random.Generator) else np.random.default_rng(seed_or_rng)
  points, labels = _SAMPLERS[name](rng, int(num_samples))
  return points.astype(np.float32), labels.astype(np.int32)


def toy_mixture(name: str, dtype=jnp.float32) -> GaussianMixture:
  """The exact :class:`~scoreflow.testing.GaussianMixture` of a mixture toy density.

  Its `log_prob`, `score(sde)` and `log_prob_t(sde, x, t)` are the exact data log-density and the exact
  score and log-density of every diffused marginal.

  Args:
    name: `"eight_gaussians"` or `"gaussian_mixture"`.
    dtype: floating dtype of the mixture's arrays.

  Raises:
    ValueError: for a toy density that is not a Gaussian mixture or an unknown name.
  """
  _check_name(name)
  if name not in _MIXTURES:
    raise ValueError(f"toy_mixture: name must be a Gaussian-mixture toy density {tuple(_MIXTURES)}, got "
                     f"{name!r}, which has no closed-form mixture.")
  weights, means, stds = _MIXTURES[name]
  return GaussianMixture(jnp.asarray(weights, dtype), jnp.asarray(means, dtype), jnp.asarray(stds, dtype))


def toy_labelled_mixture(name: str, dtype=jnp.float32) -> LabelledGaussianMixture:
  r"""The exact joint :math:`p(x, y)` of a mixture toy density whose label is the component, as a
  :class:`~scoreflow.testing.LabelledGaussianMixture` (component `k` has label `k`): exact class-conditional scores
  and noisy posteriors :math:`p_t(y \mid x)` at every diffusion time.

  Raises:
    ValueError: for a toy density that is not a Gaussian mixture or an unknown name.
  """
  mixture = toy_mixture(name, dtype)
  return LabelledGaussianMixture(mixture, jnp.arange(mixture.weights.shape[0], dtype=jnp.int32))
