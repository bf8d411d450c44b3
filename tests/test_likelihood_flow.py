"""encode/decode through the probability-flow ODE: the exact Gaussian flow map and the round trip.

For N(mu, diag s^2) data, p_t is N(alpha_t mu, v_t) per dimension with v_t = alpha_t^2 s^2 + sigma_t^2, and the
probability-flow ODE moves every point along x_t = alpha_t mu + sqrt(v_t) xi with xi fixed: the flow map from
eps to T is z = alpha_T mu + sqrt(v_T / v_eps) (x - alpha_eps mu), exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoreflow as sf
from scoreflow.likelihood import SolveStatus, decode, encode
from scoreflow.testing import GaussianMixture

from _likelihood_fixtures import GAUSSIAN, MIXTURE, SDES, score_fn

EPS = 1e-5


def _flow_map(data, sde, x, s, t):
  mu, std = data.means[:1], data.stds[:1]
  v_s = sde.alpha(s) ** 2 * std**2 + sde.sigma(s) ** 2
  v_t = sde.alpha(t) ** 2 * std**2 + sde.sigma(t) ** 2
  return sde.alpha(t) * mu + jnp.sqrt(v_t / v_s) * (x - sde.alpha(s) * mu)


@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_encode_and_decode_are_the_exact_gaussian_flow(getkey, sde_name):
  sde, tol = SDES[sde_name], 1e-6
  x = GAUSSIAN.sample(getkey(), 8)
  z, info = encode(sde, score_fn(GAUSSIAN, sde), x, eps=EPS, rtol=tol, atol=tol)
  assert bool(info.success.all()) and z.dtype == x.dtype
  expected = _flow_map(GAUSSIAN, sde, x, EPS, sde.T)
  # The global error of an adaptive solve is a modest multiple of its per-step tolerance atol + rtol |y|
  # (here ~10 accepted steps on a linear, non-stiff ODE); 100x leaves room for the accumulation.
  scale = tol * (1 + jnp.abs(expected))
  np.testing.assert_array_less(jnp.abs(z - expected), 100 * scale)
  z_prior = jax.random.normal(getkey(), x.shape, x.dtype) * sde.prior_std
  x_back, info_back = decode(sde, score_fn(GAUSSIAN, sde), z_prior, eps=EPS, rtol=tol, atol=tol)
  assert bool(info_back.success.all())
  expected_back = _flow_map(GAUSSIAN, sde, z_prior, sde.T, EPS)
  np.testing.assert_array_less(jnp.abs(x_back - expected_back), 100 * tol * (1 + jnp.abs(expected_back)))


@pytest.mark.parametrize("per_example", [False, True])
def test_round_trip_and_failures_on_a_mixture(getkey, per_example):
  sde, tol = SDES["VP"], 1e-6
  x = MIXTURE.sample(getkey(), 8)
  kwargs = dict(eps=EPS, rtol=tol, atol=tol, per_example=per_example)
  z, info = encode(sde, score_fn(MIXTURE, sde), x, **kwargs)
  x_back, info_back = decode(sde, score_fn(MIXTURE, sde), z, **kwargs)
  assert bool(info.success.all()) and bool(info_back.success.all())
  # Two solves, each with global error a modest multiple of its tolerance (see above).
  np.testing.assert_array_less(jnp.abs(x_back - x), 200 * tol * (1 + jnp.abs(x)))
  assert info.nfe.shape == (8,) and info.nfe.dtype == jnp.int32
  # Latent interpolation decodes to finite points.
  mid, _ = decode(sde, score_fn(MIXTURE, sde), 0.5 * (z[:4] + z[4:]), **kwargs)
  assert bool(jnp.all(jnp.isfinite(mid)))
  # A corrupt input (NaN) makes the controller reject every step until max_steps: flagged, never returned.
  z_bad, info_bad = encode(sde, score_fn(MIXTURE, sde), x.at[0, 1].set(jnp.nan), **kwargs)
  assert int(info_bad.status[0]) == SolveStatus.MAX_STEPS_REACHED and bool(jnp.all(jnp.isnan(z_bad[0])))
  if per_example:  # The other examples are untouched.
    assert bool(info_bad.success[1:].all())
    np.testing.assert_array_equal(z_bad[1:], z[1:])
  else:
    np.testing.assert_array_equal(info_bad.status, SolveStatus.MAX_STEPS_REACHED)
    assert bool(jnp.all(jnp.isnan(z_bad)))


def test_bad_arguments():
  sde = SDES["VP"]
  with pytest.raises(ValueError, match=r"decode: z must have shape \[B, \*D\]"):
    decode(sde, score_fn(MIXTURE, sde), jnp.zeros(3))
  with pytest.raises(ValueError, match=r"encode/decode: score_fn\(x, t\) must return"):
    encode(sde, lambda x, t: x[:, :1], jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="per_example must be True or False"):
    encode(sde, score_fn(MIXTURE, sde), jnp.zeros((2, 3)), per_example="yes")


@pytest.mark.parametrize("method", ["tsit5", "dopri5"])
def test_decode_and_ode_sample_solve_the_same_ode_the_same_way(method):
  """One probability-flow core: decode(z) and ode_sample(x_T=z) with the same solver, tolerances and end time give
  the same samples (they used to differ in error norm, first step and status codes), and the batch's NFE is the
  solve's."""
  sde = sf.VPSDE()
  data = GaussianMixture(jnp.array([0.3, 0.7]), jnp.array([[-1.0, 0.5], [1.5, -0.5]]), jnp.array([[0.3, 0.2],
                                                                                                   [0.4, 0.6]]))
  score_fn = data.score(sde)
  z = jax.random.normal(jax.random.key(0), (64, 2))
  decoded, decode_info = sf.decode(sde, score_fn, z, eps=1e-3, rtol=1e-4, atol=1e-4, solver=method)
  sampled, sample_info = sf.ode_sample(jax.random.key(1), sde, score_fn, z.shape, method=method, rtol=1e-4,
                                       atol=1e-4, eps=1e-3, x_T=z, dtype=z.dtype)
  np.testing.assert_allclose(sampled, decoded, rtol=1e-6, atol=1e-6)
  assert int(sample_info.nfe) == int(decode_info.nfe[0]) and int(sample_info.status) == 0
  # The batch-RMS control (the 2021 code's) is a different solve: fewer steps, and not the same samples.
  loose, loose_info = sf.ode_sample(jax.random.key(1), sde, score_fn, z.shape, method=method, rtol=1e-4, atol=1e-4,
                                    eps=1e-3, x_T=z, dtype=z.dtype, error_control="batch")
  assert int(loose_info.num_steps) < int(sample_info.num_steps)
  assert not np.allclose(loose, decoded, rtol=1e-6, atol=1e-6)
