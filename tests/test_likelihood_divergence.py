"""Divergence estimators: the exact trace against the Jacobian, Hutchinson's mean and its 1/K variance.

The function is the probability-flow drift of the Gaussian-mixture fixture under VP at t = 0.3, whose Jacobian
is symmetric (a Hessian plus a multiple of I) with non-zero off-diagonal entries. For a symmetric Jacobian A the
one-probe variance is 2 ||A||_F^2 for Gaussian probes and 2 (||A||_F^2 - sum_i A_ii^2) for Rademacher probes, so
both the mean and the spread of the estimator are known in closed form.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoreflow.likelihood import exact_divergence, hutchinson_divergence, sample_probes

from _likelihood_fixtures import MIXTURE, SDES


def _drift_fn(t=0.3):
  sde = SDES["VP"]

  def drift(x):
    return sde.probability_flow_drift(MIXTURE.score(sde), x, jnp.full(x.shape[:1], t, x.dtype))

  return drift


@jax.jit(static_argnums=0)
def _jacobians(fn, x):
  """Per-example Jacobians [B, D, D] of a per-example function on x: [B, D]."""
  return jax.vmap(jax.jacfwd(lambda y: fn(y[None])[0]))(x)


# Compiled, because op-by-op execution of the mixture score is slow.
_exact_divergence = jax.jit(exact_divergence, static_argnums=0)
_hutchinson_divergence = jax.jit(hutchinson_divergence, static_argnums=0)


def test_exact_divergence_is_the_jacobian_trace(getkey):
  fn = _drift_fn()
  x = MIXTURE.sample(getkey(), 5)
  fx, div = _exact_divergence(fn, x)
  np.testing.assert_allclose(fx, fn(x), rtol=1e-12)
  np.testing.assert_allclose(div, jnp.trace(_jacobians(fn, x), axis1=1, axis2=2), rtol=1e-10)
  # Any event shape: the same function on x reshaped to [B, 3, 1].
  _, div_3d = _exact_divergence(lambda y: fn(y.reshape(-1, 3)).reshape(y.shape), x.reshape(5, 3, 1))
  np.testing.assert_allclose(div_3d, div, rtol=1e-12)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_and_its_error_shrinks_as_one_over_sqrt_probes(getkey, probe):
  fn = _drift_fn()
  x = MIXTURE.sample(getkey(), 4)
  jacobian = _jacobians(fn, x)
  exact = jnp.trace(jacobian, axis1=1, axis2=2)
  frobenius2 = jnp.sum(jacobian**2, axis=(1, 2))
  diagonal2 = jnp.sum(jnp.diagonal(jacobian, axis1=1, axis2=2) ** 2, axis=1)
  np.testing.assert_allclose(jacobian, jnp.swapaxes(jacobian, 1, 2), atol=1e-12)  # Symmetric, as assumed.
  variance = 2 * (frobenius2 - diagonal2) if probe == "rademacher" else 2 * frobenius2
  assert bool(jnp.all(variance > 1e-3))

  replicates = 8000
  probes = sample_probes(getkey(), (replicates * 16,) + x.shape, probe=probe, dtype=x.dtype)[0]
  _, estimates = _hutchinson_divergence(fn, x, probes)  # [R * 16, B]: one-probe estimates.
  estimates = estimates.reshape(replicates, 16, x.shape[0])
  for num_probes in (1, 4, 16):
    k_probe = jnp.mean(estimates[:, :num_probes], axis=1)  # [R, B] estimates with K probes each.
    expected_var = variance / num_probes
    # Unbiased: the mean of R replicates is within 4 standard errors sqrt(var / (K R)) of the trace.
    np.testing.assert_array_less(jnp.abs(jnp.mean(k_probe, axis=0) - exact), 4 * jnp.sqrt(expected_var / replicates))
    # Variance var / K, i.e. error ~ 1/sqrt(K): the sample variance of R draws has relative standard error
    # sqrt((2 + kappa) / R), with kappa <= 12 the excess kurtosis of a quadratic form in the probes: 4.2%
    # at R = 8000, so 4 standard errors allow 17%.
    ratio = jnp.var(k_probe, axis=0, ddof=1) / expected_var
    np.testing.assert_array_less(jnp.abs(ratio - 1), 4 * np.sqrt(14 / replicates))


def test_probes(getkey):
  rademacher = sample_probes(getkey(), (3, 2, 2), num_probes=5, dtype=jnp.float32)
  assert rademacher.shape == (5, 3, 2, 2) and rademacher.dtype == jnp.float32
  assert set(np.unique(rademacher).tolist()) == {-1.0, 1.0}
  gaussian = sample_probes(getkey(), (4000, 3), probe="gaussian", dtype=jnp.float64)[0]
  np.testing.assert_allclose(gaussian.T @ gaussian / 4000, np.eye(3), atol=0.1)  # E[v v^T] = I; 4 s.e. = 0.09.
  with pytest.raises(ValueError, match="probes must have shape"):
    hutchinson_divergence(lambda y: y, jnp.zeros((4, 3)), jnp.zeros((4, 3)))
  with pytest.raises(ValueError, match="probe must be"):
    sample_probes(getkey(), (4, 3), probe="uniform")
