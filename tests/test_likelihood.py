"""scoreflow.log_likelihood against closed-form densities, its failure reporting and its jit hygiene.

With the exact score of Gaussian-mixture data, the probability-flow ODE transports the true marginals, so
log_likelihood(x) must equal the analytic log p_eps(x) when the terminal density is the true p_T (passed as
`prior_logp_fn`; the default prior N(0, prior_std^2 I) differs from p_T, tested separately where the gap is
provably small). What is left is solver error, bounded per example by `solver_bound` (below), and, for
Hutchinson, Monte-Carlo error that the returned standard error must describe.

Solver error: the step-size controller accepts a step only if its local error estimate in the log-density,
carried per dimension, is at most `atol + rtol |Delta log p / D|` (likelihood.py: the error norm takes the
maximum of the per-leaf RMS, and the exact-trace integral is one scalar per example). Over at most
`info.num_steps` steps these add up to `num_steps (atol + rtol |Delta log p| / D)` nats/dim; the coordinates'
own errors (held to the same tolerance) reach the integral through the divergence's gradient, which doubles it
at most to first order. With rtol = atol = 1e-6 that is 5e-5 to 3e-4 nats/dim here (12 to 34 steps), 3 to 20
times tighter than the former flat 1e-3; the measured errors are 0.6e-6 to 3e-6. (The issue's 1e-6 is what one
run measured, not a bound: the controller guarantees nothing that tight, so the test does not claim it.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoreflow as sf
from scoreflow.likelihood import SolveStatus, log_likelihood
from scoreflow.testing.analytic import GaussianMixture

from _likelihood_fixtures import GAUSSIAN, MIXTURE, SDES, cast, score_fn, terminal_logp_fn

EPS = 1e-5
TOL = dict(rtol=1e-6, atol=1e-6)
NATS_PER_DIM = 1e-3  # The flat accuracy requirement, kept only for the float32 test below.


def solver_bound(info, logp, z, prior_logp_fn, num_dims, tol=1e-6):
  """Per-example bound on the solver's error in nats/dim (module docstring): 2 num_steps (atol + rtol |Delta|)."""
  delta = np.abs(np.asarray(logp) - np.asarray(prior_logp_fn(z))) / num_dims
  return 2 * np.asarray(info.num_steps) * (tol + tol * delta)


@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_exact_trace_matches_analytic_density(getkey, sde_name):
  sde = SDES[sde_name]
  for data in (GAUSSIAN, MIXTURE):
    x = data.sample(getkey(), 8)
    logp, z, info = log_likelihood(None, sde, score_fn(data, sde), x, eps=EPS, divergence="exact",
                                   prior_logp_fn=terminal_logp_fn(data, sde), **TOL)
    expected = data.log_prob_t(sde, x, EPS)
    assert bool(info.success.all()), info.status
    bound = solver_bound(info, logp, z, terminal_logp_fn(data, sde), MIXTURE.num_dims)
    np.testing.assert_array_less(np.abs(logp - expected) / MIXTURE.num_dims, bound)
    assert logp.dtype == z.dtype == jnp.float64 and z.shape == x.shape
    np.testing.assert_array_equal(info.logp_stderr, 0.0)


def test_default_prior_for_zero_mean_vp_data(getkey):
  # Under VP, p_T of N(0, s^2) data is N(0, v) per dimension with v = alpha_T^2 s^2 + sigma_T^2 =
  # 1 + e^{-B(1)} (s^2 - 1), e^{-B(1)} = e^{-10.05} = 4.3e-5. Replacing it by N(0, 1) changes log p by
  # 0.5 (log v + z^2 (1/v - 1)) per dimension, below 4.3e-5 * (s^2 - 1) * (1 + z^2) / 2 < 3e-4 nats/dim for
  # s^2 <= 2.25 and |z| < 5. The test allows exactly that mismatch, computed per example, plus the solver bound.
  sde = SDES["VP"]
  data = GaussianMixture.gaussian(jnp.zeros(3), jnp.array([0.5, 1.5, 1.0]))
  x = data.sample(getkey(), 8)
  logp, z, info = log_likelihood(None, sde, score_fn(data, sde), x, eps=EPS, divergence="exact", **TOL)
  assert bool(info.success.all()) and float(jnp.max(jnp.abs(z))) < 5
  v = 1 + np.exp(-float(sde.integrated_beta(1.0))) * (np.array([0.5, 1.5, 1.0]) ** 2 - 1)
  mismatch = np.sum(0.5 * np.abs(np.log(v) + np.asarray(z) ** 2 * (1 / v - 1)), axis=1) / 3
  bound = solver_bound(info, logp, z, terminal_logp_fn(data, sde), 3) + mismatch
  assert float(mismatch.max()) < 3e-4
  np.testing.assert_array_less(np.abs(logp - data.log_prob_t(sde, x, EPS)) / 3, bound)


@pytest.mark.parametrize("probe, per_example", [("rademacher", False), ("gaussian", True)])
def test_hutchinson_within_its_standard_error(getkey, probe, per_example):
  sde, data, num_probes = SDES["VP"], MIXTURE, 16
  x = data.sample(getkey(), 16)
  logp, z, info = log_likelihood(getkey(), sde, score_fn(data, sde), x, eps=EPS, probe=probe,
                                 num_probes=num_probes, per_example=per_example,
                                 prior_logp_fn=terminal_logp_fn(data, sde), **TOL)
  assert bool(info.success.all())
  error, stderr = logp - data.log_prob_t(sde, x, EPS), info.logp_stderr
  assert bool(jnp.all(stderr > 0))
  # Solver error is below solver_bound * D (previous tests); the rest is Monte-Carlo error with a standard
  # error estimated from 16 probes: (error / stderr) is Student-t with 15 degrees of freedom, P(|t| > 6) =
  # 2e-5 per example. Summed over 16 independent examples, sum(error) / sqrt(sum(stderr^2)) is close to
  # N(0, 1): |z| < 4 fails with probability 6e-5.
  solver_slack = solver_bound(info, logp, z, terminal_logp_fn(data, sde), data.num_dims) * data.num_dims
  np.testing.assert_array_less(np.abs(error), 6 * stderr + solver_slack)
  z_score = float(jnp.sum(error) / jnp.sqrt(jnp.sum(stderr**2)))
  assert abs(z_score) < 4, z_score


def test_per_example_steps_are_independent(getkey):
  # A narrow component (std 0.02) makes its examples stiff near t = eps; in per-example mode the others must
  # not pay for them, and every example still meets the accuracy requirement.
  sde = SDES["VP"]
  data = MIXTURE.__class__(MIXTURE.weights, MIXTURE.means, MIXTURE.stds.at[0].set(0.02))
  x = data.sample(getkey(), 16)
  kwargs = dict(eps=EPS, divergence="exact", prior_logp_fn=terminal_logp_fn(data, sde), **TOL)
  logp, z, info = log_likelihood(None, sde, score_fn(data, sde), x, per_example=True, **kwargs)
  _, _, shared = log_likelihood(None, sde, score_fn(data, sde), x, per_example=False, **kwargs)
  assert bool(info.success.all())
  np.testing.assert_array_less(np.abs(logp - data.log_prob_t(sde, x, EPS)) / 3,
                               solver_bound(info, logp, z, terminal_logp_fn(data, sde), 3))
  assert int(info.nfe.min()) < int(info.nfe.max())
  assert int(info.nfe.min()) < int(shared.nfe[0]), (info.nfe, shared.nfe)
  np.testing.assert_array_equal(shared.nfe, shared.nfe[0])


def test_nfe_is_exact_and_nothing_recompiles(getkey):
  # Every attempted step of an FSAL Runge-Kutta pair (Dormand-Prince 5(4), 7 stages) costs 6 evaluations,
  # plus one at the start; counted at run time by a callback inside the score. Python side effects count
  # traces instead.
  sde, data = SDES["VP"], MIXTURE
  calls, traces = [], []

  def counting_score(x, t):
    traces.append(1)
    jax.debug.callback(lambda: calls.append(1))
    return data.score(sde)(x, t)

  _, _, info = log_likelihood(None, sde, counting_score, data.sample(getkey(), 4), divergence="exact")
  jax.effects_barrier()
  assert int(info.nfe[0]) == len(calls) == 6 * int(info.num_steps[0]) + 1
  assert int(info.num_rejected_steps[0]) <= int(info.num_steps[0])
  # New data, tolerances, start time and SDE hyper-parameters are traced values: the same program runs.
  first = len(traces)
  logp, _, info = log_likelihood(None, sf.VPSDE(beta_max=19.0), counting_score, data.sample(getkey(), 4),
                                 eps=2e-5, rtol=1e-4, atol=1e-4, divergence="exact")
  assert len(traces) == first > 0
  assert bool(info.success.all())


def test_float32_inside_a_user_jit(getkey):
  # dtypes follow the input, and the function composes with jax.jit, here closing over a traced value.
  sde, data = SDES["VP"], cast(MIXTURE, jnp.float32)
  x = data.sample(getkey(), 6)
  assert x.dtype == jnp.float32

  @jax.jit
  def scaled_logp(scale, x):
    scaled_score = lambda y, t: scale * data.score(sde)(y, t)
    return log_likelihood(None, sde, scaled_score, x, eps=1e-3, divergence="exact",
                          prior_logp_fn=terminal_logp_fn(data, sde))

  logp, z, info = scaled_logp(jnp.float32(1.0), x)
  assert logp.dtype == z.dtype == info.logp_stderr.dtype == jnp.float32
  assert info.nfe.dtype == info.status.dtype == jnp.int32
  assert bool(info.success.all())
  # rtol = atol = 1e-5 and float32 round-off (~1e-7 relative per operation) stay far below 1e-3 nats/dim.
  expected = MIXTURE.log_prob_t(sde, x.astype(jnp.float64), 1e-3)
  np.testing.assert_array_less(np.abs(logp - expected) / 3, NATS_PER_DIM)


@pytest.mark.parametrize("per_example", [False, True])
def test_failures_are_flagged_never_silent(getkey, per_example):
  # Two failures: the score of example 0 turns NaN half-way (the step-size controller then rejects every step
  # of that solve, which ends at max_steps), and the terminal log-density is -inf at latents with z_0 > 0
  # (a finished solve with a non-finite result). Per-example solves keep them apart; a shared solve fails
  # the whole batch at max_steps.
  sde, data = SDES["VP"], MIXTURE
  x = data.sample(getkey(), 8).at[0, 0].set(10.0)

  def nan_score(y, t):
    bad = (y[:, :1] > 5.0) & (t[:, None] > 0.5)
    return jnp.where(bad, jnp.nan, data.score(sde)(y, t))

  def broken_prior(z):
    return jnp.where(z[:, 0] > 0, -jnp.inf, terminal_logp_fn(data, sde)(z))

  logp, z, info = log_likelihood(None, sde, nan_score, x, eps=EPS, divergence="exact", max_steps=64,
                                 per_example=per_example, prior_logp_fn=broken_prior)
  failed = ~np.asarray(info.success)
  np.testing.assert_array_equal(np.isnan(logp), failed)
  np.testing.assert_array_equal(np.all(np.isnan(z), axis=1), failed)
  assert int(info.status[0]) == SolveStatus.MAX_STEPS_REACHED and int(info.num_steps[0]) == 64
  if per_example:
    rest = np.asarray(info.status[1:])
    nonfinite = rest == SolveStatus.NONFINITE
    assert nonfinite.any() and (rest == SolveStatus.SUCCESS).any()
    assert set(rest.tolist()) <= {SolveStatus.SUCCESS, SolveStatus.NONFINITE}
    ok = np.concatenate([[False], ~nonfinite])
    assert bool(jnp.all(z[ok, 0] <= 0))
    bound = solver_bound(info, logp, z, terminal_logp_fn(data, sde), 3)[ok]
    np.testing.assert_array_less(np.abs(logp[ok] - data.log_prob_t(sde, x[ok], EPS)) / 3, bound)
  else:
    np.testing.assert_array_equal(info.status, SolveStatus.MAX_STEPS_REACHED)
    np.testing.assert_array_equal(info.num_steps, 64)


def _score_fn(x, t):
  return -x


@pytest.mark.parametrize("kwargs, x, match", [
    (dict(), jnp.zeros((4,)), r"x must have shape \[B, \*D\]"),
    (dict(), jnp.zeros((4, 3), jnp.int32), "x must be floating point"),
    (dict(), jnp.zeros((4, 3), jnp.bfloat16), "x must be float32 or float64, got bfloat16"),
    (dict(divergence="trace"), jnp.zeros((4, 3)), "divergence must be 'hutchinson' or 'exact'"),
    (dict(probe="sphere"), jnp.zeros((4, 3)), "probe must be 'rademacher' or 'gaussian'"),
    (dict(num_probes=0), jnp.zeros((4, 3)), "num_probes must be an int >= 1"),
    (dict(eps=0.0), jnp.zeros((4, 3)), r"eps must be a scalar time in \(0, T\)"),
    (dict(rtol=-1.0), jnp.zeros((4, 3)), "rtol must be a positive scalar"),
    (dict(max_steps=0), jnp.zeros((4, 3)), "max_steps must be an int >= 1"),
    (dict(solver="euler"), jnp.zeros((4, 3)), "solver must be one of"),
    (dict(score_fn=lambda x, t: x[:, :2]), jnp.zeros((4, 3)), r"score_fn\(x, t\) must return .* \(4, 3\)"),
    (dict(prior_logp_fn=lambda z: z), jnp.zeros((4, 3)), r"prior_logp_fn\(z\) must return .* \[B\] = \(4,\)"),
    (dict(key=None), jnp.zeros((4, 3)), "needs a PRNG key"),
])
def test_bad_arguments_raise(kwargs, x, match):
  kwargs = dict(kwargs)
  key = kwargs.pop("key", jax.random.key(0))
  score = kwargs.pop("score_fn", _score_fn)
  with pytest.raises(ValueError, match=match):
    log_likelihood(key, SDES["VP"], score, x, **kwargs)
