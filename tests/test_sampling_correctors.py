"""The Langevin correctors' step sizes, pinned against hand computations and the papers' algorithms.

With the exact score, a Langevin step keeps p_t for any small step size, so the distribution tests cannot see a
wrong step-size formula; these tests recompute one step by hand.

Song et al. (2021), Algorithms 4 (VE) and 5 (VP), corrector step `j` at level `i`:

    z ~ N(0, I);  g = s(x, t_i);  eps = 2 alpha_i (r ||z|| / ||g||)^2;  x <- x + eps g + sqrt(2 eps) z,

with `alpha_i = 1` for VE and `alpha_i = 1 - beta_i` (the discrete DDPM chain's) for VP. The 2021 code (and this
library) replaces the norms by per-example norms averaged over the batch. Song & Ermon (2019), Algorithm 1 (ALD):
`a_i = delta sigma_i^2 / sigma_L^2`, `x <- x + a_i / 2 g + sqrt(a_i) z`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoreflow as sf
from scoreflow.sampling import correctors


def _noise(key, shape):
  """The normal draw of the corrector's first step (its key plumbing: `key, noise_key = split(key)`)."""
  return np.asarray(jax.random.normal(jax.random.split(key)[1], shape, jnp.float64))


def _linear_score(x, t):
  del t
  return -x / jnp.array([[0.5, 2.0, 1.0]])  # N(0, diag(0.5, 2, 1)): per-example norms differ widely.


def test_langevin_step_size_single_example_matches_algorithm_4():
  """One example (the paper's setting, B = 1), VE (alpha = 1): every number computed by hand."""
  key, sde = jax.random.key(3), sf.VESDE()
  x = np.array([[1.0, -2.0, 0.5]])
  g = -x / np.array([0.5, 2.0, 1.0])  # [[-2, 1, -0.5]], ||g|| = sqrt(5.25)
  z = _noise(key, x.shape)
  r = 0.16
  eps = 2 * (r * np.linalg.norm(z) / np.sqrt(5.25)) ** 2
  x_new, x_mean = correctors.langevin_corrector(key, sde, _linear_score, jnp.asarray(x), jnp.array([0.5]), snr=r,
                                                n_steps=1, alpha=1.0)
  np.testing.assert_allclose(x_mean, x + eps * g, rtol=1e-13)
  np.testing.assert_allclose(x_new, x + eps * g + np.sqrt(2 * eps) * z, rtol=1e-13)


@pytest.mark.parametrize("alpha", [1.0, 0.98])
def test_langevin_step_size_uses_batch_mean_norms_and_alpha(alpha):
  """B = 4 (Algorithm 5 with alpha_i = 0.98): one step size for the batch, from the mean per-example norms."""
  key, sde = jax.random.key(4), sf.VPSDE()
  x = np.array([[1.0, -2.0, 0.5], [0.1, 0.2, -0.1], [3.0, 1.0, 2.0], [-0.5, 0.5, 4.0]])
  g = -x / np.array([0.5, 2.0, 1.0])
  z = _noise(key, x.shape)
  r = 0.3
  eps = 2 * alpha * (r * np.linalg.norm(z, axis=1).mean() / np.linalg.norm(g, axis=1).mean()) ** 2
  x_new, x_mean = correctors.langevin_corrector(key, sde, _linear_score, jnp.asarray(x), jnp.full((4,), 0.5),
                                                snr=r, n_steps=1, alpha=jnp.full((4,), alpha))
  np.testing.assert_allclose(x_mean, x + eps * g, rtol=1e-13)
  np.testing.assert_allclose(x_new, x + eps * g + np.sqrt(2 * eps) * z, rtol=1e-13)
  # Plausible bugs give other step sizes: a per-example ratio, the norm of the whole batch, no alpha, no factor 2.
  per_example = 2 * alpha * (r * np.linalg.norm(z, axis=1) / np.linalg.norm(g, axis=1)) ** 2
  whole_batch = 2 * alpha * (r * np.linalg.norm(z) / np.linalg.norm(g)) ** 2
  for wrong in (per_example[:, None], whole_batch, eps / alpha if alpha != 1 else 2 * eps, eps / 2):
    assert not np.allclose(x_mean, x + wrong * g, rtol=1e-6)


def test_annealed_langevin_step_matches_ncsn_algorithm_1():
  """ALD: eps = 2 alpha (r sigma_t)^2 per example; NCSN's step with delta = 4 r^2 sigma_L^2 is the same update."""
  key, sde = jax.random.key(5), sf.VESDE(sigma_min=0.01, sigma_max=50.0)
  x = np.array([[1.0, -2.0, 0.5], [0.1, 0.2, -0.1], [3.0, 1.0, 2.0]])
  t = np.array([0.1, 0.5, 0.9])
  sigma = 0.01 * np.sqrt((50.0 / 0.01) ** (2 * t) - 1)  # VE kernel std: sigma_min^2 ((max / min)^(2t) - 1).
  g = -x / np.array([0.5, 2.0, 1.0])
  z = _noise(key, x.shape)
  r, alpha = 0.2, 0.9
  eps = 2 * alpha * (r * sigma[:, None]) ** 2
  x_new, x_mean = correctors.annealed_langevin_corrector(key, sde, _linear_score, jnp.asarray(x), jnp.asarray(t),
                                                         snr=r, n_steps=1, alpha=alpha)
  np.testing.assert_allclose(x_mean, x + eps * g, rtol=1e-12)
  np.testing.assert_allclose(x_new, x + eps * g + np.sqrt(2 * eps) * z, rtol=1e-12)
  # Song & Ermon (2019), Algorithm 1 with sigma_L = 0.01 and delta = 4 r^2 sigma_L^2 (alpha = 1).
  delta, sigma_l = 4 * r**2 * 0.01**2, 0.01
  a = delta * sigma[:, None] ** 2 / sigma_l**2
  x_ald, _ = correctors.annealed_langevin_corrector(key, sde, _linear_score, jnp.asarray(x), jnp.asarray(t), snr=r,
                                                    n_steps=1)
  np.testing.assert_allclose(x_ald, x + a / 2 * g + np.sqrt(a) * z, rtol=1e-12)


def _recording_corrector():
  """A corrector that shifts the `alpha` it is given into a `[1, N]` state: after N levels it holds every one."""

  def update(key, sde, score_fn, x, t, *, snr, n_steps, alpha):
    del key, sde, score_fn, t, snr, n_steps
    x = jnp.concatenate([x[:, 1:], jnp.reshape(alpha, (-1, 1)).astype(x.dtype)], axis=1)
    return x, x

  return correctors.Corrector(update, nfe_per_step=1)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_pc_sample_passes_alpha_of_algorithm_5(name):
  """pc_sample gives the corrector alpha_i = 1 - beta_i (VP, DDPM's beta_i, up to O((beta dt)^2)) or 1 (VE)."""
  sde = {"vp": sf.VPSDE(), "ve": sf.VESDE()}[name]
  n, eps = 50, 1e-3
  x, _ = sf.pc_sample(jax.random.key(0), sde, lambda x, t: x, (1, n), predictor="none",
                      corrector=_recording_corrector(), num_steps=n, denoise=False, dtype=jnp.float64,
                      x_T=jnp.zeros((1, n)))
  alphas = np.asarray(x[0])
  times = np.linspace(1.0, eps, n + 1)
  if name == "ve":
    np.testing.assert_allclose(alphas, 1.0, rtol=1e-14)
    return
  beta_min, beta_max = 0.1, 20.0
  # Level i+1 follows the step t_i -> t_{i+1}: exp(-int beta) over it, beta(t) = beta_min + t (beta_max - beta_min).
  integral = beta_min * (times[:-1] - times[1:]) + 0.5 * (beta_max - beta_min) * (times[:-1] ** 2 - times[1:] ** 2)
  np.testing.assert_allclose(alphas, np.exp(-integral), rtol=1e-12)
  # The 2021 code's alpha_i = 1 - beta_i with beta_i = beta(t_i) / N: equal up to (beta dt)^2 / 2 + beta' dt^2 / 2
  # + beta eps / N, all below (beta_max / N)^2.
  ddpm_beta = (beta_min + times[:-1] * (beta_max - beta_min)) / n
  np.testing.assert_array_less(np.abs(alphas - (1 - ddpm_beta)), (beta_max / n) ** 2)
  assert np.all(np.abs(alphas - 1) > 1e-3)  # Not the VE value.
