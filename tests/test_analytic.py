"""The ground-truth toolkit checked against itself: scores are gradients, densities integrate, samples match."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoreflow as sf
from scoreflow.testing import GaussianMixture

MIXTURE = GaussianMixture(
    weights=jnp.array([0.2, 0.5, 0.3]),
    means=jnp.array([[-2.0, 0.0], [1.0, 1.5], [2.0, -1.0]]),
    stds=jnp.array([[0.3, 0.5], [0.6, 0.2], [0.4, 0.4]]),
)


@pytest.mark.parametrize("sde", [sf.VPSDE(), sf.SubVPSDE(), sf.VESDE(), sf.CosineVPSDE()],
                         ids=["vp", "subvp", "ve", "cosine"])
def test_score_is_the_gradient_of_the_log_density(sde, getkey):
  x = jax.random.normal(getkey(), (16, 2)) * 2
  t = jnp.linspace(0.01, 1.0, 16) * sde.T
  autodiff = jax.grad(lambda x: jnp.sum(MIXTURE.log_prob_t(sde, x, t)))(x)
  np.testing.assert_allclose(MIXTURE.score(sde)(x, t), autodiff, rtol=1e-9, atol=1e-12)
  # The scalar-time marginal as a mixture agrees with the per-example form.
  np.testing.assert_allclose(MIXTURE.perturbed(sde, t[5]).log_prob(x), MIXTURE.log_prob_t(sde, x, t[5]), rtol=1e-12)


def test_density_integrates_to_one_and_samples_match_moments(getkey):
  grid = jnp.linspace(-6, 6, 801)
  xx, yy = jnp.meshgrid(grid, grid, indexing="ij")
  density = jnp.exp(MIXTURE.log_prob(jnp.stack([xx.ravel(), yy.ravel()], axis=1))).reshape(xx.shape)
  cell = (grid[1] - grid[0]) ** 2
  np.testing.assert_allclose(jnp.sum(density) * cell, 1.0, atol=1e-6)
  samples = MIXTURE.sample(getkey(), 50000)
  cov = MIXTURE.covariance()
  standard_error = jnp.sqrt(jnp.diag(cov) / samples.shape[0])
  np.testing.assert_array_less(jnp.abs(samples.mean(0) - MIXTURE.mean()), 4.5 * standard_error)
  # Variance of a sample variance is about (kurtosis - 1) var^2 / n; 3 var^2 / n bounds it for this mixture.
  np.testing.assert_array_less(jnp.abs(jnp.var(samples, 0) - jnp.diag(cov)),
                               4.5 * jnp.sqrt(3 / samples.shape[0]) * jnp.diag(cov))


def test_gaussian_entropy_and_kl():
  gaussian = GaussianMixture.gaussian(jnp.array([1.0, -1.0]), jnp.array([0.5, 2.0]))
  np.testing.assert_allclose(gaussian.entropy(), 0.5 * np.sum(np.log(2 * np.pi * np.e * np.array([0.25, 4.0]))))
  kl = gaussian.kl_to_isotropic_gaussian(2.0)
  expected = 0.5 * np.sum(np.array([0.25, 4.0]) / 4 + np.array([1.0, 1.0]) / 4 - 1 - np.log(np.array([0.25, 4.0]) / 4))
  np.testing.assert_allclose(kl, expected, rtol=1e-12)
  with pytest.raises(ValueError, match=r"closed form only for a single Gaussian \(K = 1\); this mixture has K = 3"):
    MIXTURE.entropy()


def test_image_shaped_events(getkey):
  """Events of any rank: a Gaussian over 4x4x1 images."""
  images = GaussianMixture.gaussian(jnp.zeros((4, 4, 1)), 0.5)
  x = images.sample(getkey(), 3)
  assert x.shape == (3, 4, 4, 1)
  sde = sf.VPSDE()
  t = jnp.array([0.1, 0.5, 0.9])
  score = images.score(sde)(x, t)
  variance = sde.alpha(t) ** 2 * 0.25 + sde.sigma(t) ** 2
  np.testing.assert_allclose(score, -x / variance[:, None, None, None], rtol=1e-12)
  assert math.isclose(images.num_dims, 16)
