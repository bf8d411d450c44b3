"""Shared ground truth for the likelihood tests: Gaussian and mixture data with exact scores and densities.

Scores and terminal densities are `jax.tree_util.Partial`s of module-level functions, so the data and the
process are traced arrays rather than constants: every dataset of the same shapes under the same kind of
process runs through one compiled program, which keeps the suite's compile time down.
"""

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

import scoreflow as sf
from scoreflow.testing.analytic import GaussianMixture

# Two components in three dimensions, unequal and anisotropic, so that the Hessian of log p_t has off-diagonal
# entries (the Hutchinson estimator then has a non-zero variance even with Rademacher probes).
MIXTURE = GaussianMixture(jnp.array([0.3, 0.7]), jnp.array([[1.5, -1.0, 0.5], [-1.0, 1.0, 0.0]]),
                          jnp.array([[0.3, 0.5, 0.2], [0.6, 0.4, 0.3]]))
# N(mu, diag s^2) written as a mixture of two identical components: exactly that Gaussian, with the shapes of
# MIXTURE (one compiled program serves both).
GAUSSIAN = GaussianMixture(jnp.array([0.5, 0.5]), jnp.array([[1.0, -0.5, 2.0]] * 2), jnp.array([[0.5, 1.5, 0.2]] * 2))

SDES = {"VE": sf.VESDE(sigma_min=0.01, sigma_max=50.0), "VP": sf.VPSDE(), "subVP": sf.SubVPSDE()}


def _score(data, sde, x, t):
  return data.score(sde)(x, t)


def _log_prob_T(data, sde, z):
  return data.log_prob_t(sde, z, sde.T)


def score_fn(data, sde):
  """The exact score of `data` under `sde`, as a pytree callable."""
  return Partial(_score, data, jax.tree.map(jnp.asarray, sde))


def terminal_logp_fn(data, sde):
  """The exact terminal marginal log p_T, as a pytree callable (the ODE ends on p_T, not on the prior)."""
  return Partial(_log_prob_T, data, jax.tree.map(jnp.asarray, sde))


def cast(data, dtype):
  return jax.tree.map(lambda a: a.astype(dtype), data)
