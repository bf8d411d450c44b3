"""Variational bounds against closed forms: Gaussian data with exact (and deliberately wrong) models.

Ground truth comes from `scoreflow.testing.analytic` (Song et al.'s decomposition of the continuous bound, the
linear posterior-mean noise predictor of Gaussian data for DDPM) and from SciPy quadrature, never from the
estimators themselves.

Monte-Carlo tolerances: a mean of n independent per-example values is compared with its expectation within Z
standard errors (sample std / sqrt(n)); with Z = 4.5 a single check fails by chance with probability below 1e-5,
and the keys are fixed, so the suite is deterministic. Power: each test also shows that a deliberately broken
variant (a 5 % score or noise-prediction error, a sign flip of the decoder term, a missing Jacobian) lies outside
the same tolerance.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

import scoreflow as sf
from scoreflow.bounds import (continuous_bound_bpd, continuous_nll_bound, ddpm_kl_term, ddpm_vlb_bpd,
                              ddpm_vlb_terms, discretized_gaussian_log_prob)
from scoreflow.testing import GaussianMixture, ddpm_eps_fn, expected_continuous_bound, expected_ddpm_kl_terms

Z = 4.5
LN2 = math.log(2.0)
DATA = GaussianMixture.gaussian(jnp.array([1.0, -2.0, 0.5]), jnp.array([0.5, 2.0, 1.0]))
SDES = {"vp": sf.VPSDE(), "ve": sf.VESDE(), "subvp": sf.SubVPSDE()}


def mean_and_se(values):
  values = np.asarray(values, np.float64)
  return values.mean(), values.std() / math.sqrt(values.size)


def assert_matches(values, expected, what):
  mean, se = mean_and_se(values)
  assert abs(mean - expected) < Z * se, f"{what}: mean {mean:.6f} vs expected {expected:.6f} (Z se = {Z * se:.2e})"
  return se


def assert_rejects(values, wrong, what):
  mean, se = mean_and_se(values)
  assert abs(mean - wrong) > Z * se, f"{what}: the test cannot tell {wrong:.6f} from the mean {mean:.6f}"


def exact_score(data, sde, scale=1.0):
  score = data.score(sde)
  return lambda x, t: scale * score(x, t)


# --- The continuous-time bound. --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SDES))
def test_continuous_bound_matches_closed_form(name):
  """At the paper's eps = 1e-5: E[bound at eps] = H(p_eps) + KL(p_T || pi); with the decoder the gap to the exact
  NLL H(p_0) is its closed form (>= 0); a score scaled by 0.95 raises the bound by 1/2 int g^2 E||ds||^2 dt."""
  sde, eps, n = SDES[name], 1e-5, 2**18
  x0 = DATA.sample(jax.random.key(1), n)
  bound = jax.jit(lambda key, x, c, decoder: continuous_nll_bound(key, x, exact_score(DATA, sde, c), sde, eps=eps,
                                                                   decoder=decoder), static_argnums=3)
  key = jax.random.key(2)  # The same key for all three: paired differences cancel most of the noise.
  at_eps = np.asarray(bound(key, x0, 1.0, False))
  full = np.asarray(bound(key, x0, 1.0, True))
  wrong = np.asarray(bound(key, x0, 0.95, True))

  closed_at_eps = expected_continuous_bound(DATA, DATA, sde, eps, decoder=False)
  closed = expected_continuous_bound(DATA, DATA, sde, eps)
  closed_wrong = expected_continuous_bound(DATA, DATA, sde, eps, score_scale=0.95)
  entropy_eps = float(DATA.perturbed(sde, eps).entropy())
  prior_kl = float(DATA.perturbed(sde, sde.T).kl_to_isotropic_gaussian(sde.prior_std))
  np.testing.assert_allclose([closed_at_eps.entropy, closed_at_eps.prior_kl], [entropy_eps, prior_kl], rtol=1e-10)
  assert float(closed_at_eps.score_error) < 1e-12  # The exact score has no score error.

  assert_matches(at_eps, entropy_eps + prior_kl, "bound at eps")
  nll = float(DATA.entropy())
  gap = float(closed.total) - nll
  assert gap >= 0
  assert_matches(full - nll, gap, "gap to the exact NLL")
  mean, se = mean_and_se(full)
  assert mean + Z * se >= nll

  extra = float(closed_wrong.total - closed.total)
  assert extra > 0
  assert_matches(wrong - full, extra, "extra cost of a 5% score error")
  assert_rejects(wrong - full, 0.0, "5% score error")


DECODER_EPS = {"vp": 0.1, "subvp": 0.1, "ve": 0.5}  # Coarse enough for the decoder term to be measurable.


@pytest.mark.parametrize("name", list(DECODER_EPS))
def test_decoder_term_matches_closed_form(name):
  """The Gaussian decoder for [0, eps] (paired with the same key, so the bound at eps cancels)."""
  sde, eps, n = SDES[name], DECODER_EPS[name], 2**16
  x0 = DATA.sample(jax.random.key(3), n)
  bound = jax.jit(lambda key, x, decoder: continuous_nll_bound(key, x, exact_score(DATA, sde), sde, eps=eps,
                                                               decoder=decoder), static_argnums=2)
  key = jax.random.key(4)
  decoder = np.asarray(bound(key, x0, True)) - np.asarray(bound(key, x0, False))
  expected = float(expected_continuous_bound(DATA, DATA, sde, eps).decoder)
  assert_matches(decoder, expected, "decoder term")
  assert_rejects(-decoder, expected, "sign-flipped decoder term")
  # Its excess over the exact posterior is KL(p(x0 | x_eps) || decoder) >= 0, so the bound stays above H(p_0).
  closed = expected_continuous_bound(DATA, DATA, sde, eps)
  assert float(closed.total) >= float(DATA.entropy())


def test_bound_exceeds_exact_nll_by_the_prior_gap():
  """A VE process that stops at sigma_max = 1 leaves p_T far from the prior: the bound sits visibly above H(p_0)."""
  sde, eps, n = sf.VESDE(sigma_max=1.0), 1e-5, 2**16
  x0 = DATA.sample(jax.random.key(5), n)
  values = np.asarray(jax.jit(lambda key, x: continuous_nll_bound(key, x, exact_score(DATA, sde), sde,
                                                                  eps=eps))(jax.random.key(6), x0))
  nll = float(DATA.entropy())
  closed = expected_continuous_bound(DATA, DATA, sde, eps)
  assert_matches(values, float(closed.total), "bound with a mismatched prior")
  mean, se = mean_and_se(values)
  assert mean - Z * se > nll + 1.0


# --- Dequantization: the bound on the discrete data's NLL. -----------------------------------------------------

SCALE, SHIFT = 2 / 256, -1.0  # The centred dequantized scaler: x = 2 (k + u) / 256 - 1.
LEVELS = np.array([[128, 100], [0, 255], [150, 40], [90, 127]])


def discrete_nll_bits(model_mean, model_std, levels):
  """-log2 P(k) per dimension of a Gaussian model in model space, with P(k) its mass on the cell of k."""
  lower = (SCALE * levels + SHIFT - model_mean) / model_std
  upper = (SCALE * (levels + 1) + SHIFT - model_mean) / model_std
  log_p = np.log(stats.norm.cdf(upper) - stats.norm.cdf(lower))
  return -log_p.sum(axis=-1) / (levels.shape[-1] * LN2)


@pytest.mark.parametrize("smooth", [True, False], ids=["smooth", "rough"])
def test_dequantized_bound_upper_bounds_discrete_nll(smooth):
  """For each example: E[bpd] = the closed form of the cell (moment-matched), which is >= -log2 P(k) / D, and
  within 1e-3 bits of it when the density is smooth on the scale of a cell (Jensen's gap ~ cell^2 / sigma^2)."""
  model_mean = np.array([0.1, -0.3])
  model_std = np.array([0.4, 0.35]) if smooth else np.array([0.6, 0.5]) * SCALE
  model = GaussianMixture.gaussian(jnp.asarray(model_mean), jnp.asarray(model_std))
  levels = LEVELS if smooth else np.array([[141, 88], [142, 90], [139, 87], [143, 91]])  # 1-4 sigma off the mean
  sde, eps, reps = sf.VPSDE(), 1e-5, 2**15
  x_raw = jnp.asarray(np.repeat(levels, reps, axis=0), jnp.int32)
  bpd_fn = jax.jit(lambda key, x: continuous_bound_bpd(key, x, exact_score(model, sde), sde, scale=SCALE, shift=SHIFT,
                                                       eps=eps, dtype=jnp.float64))
  bpd = np.asarray(bpd_fn(jax.random.key(7), x_raw)).reshape(len(levels), reps)
  exact = discrete_nll_bits(model_mean, model_std, levels)
  for k, values, exact_k in zip(levels, bpd, exact):
    # The bound of one example is quadratic in x0: its mean over the cell needs only the cell's mean and variance.
    cell = GaussianMixture.gaussian(jnp.asarray(SCALE * (k + 0.5) + SHIFT), jnp.full(2, SCALE / math.sqrt(12)))
    closed = (float(expected_continuous_bound(cell, model, sde, eps).total) - 2 * math.log(SCALE)) / (2 * LN2)
    assert_matches(values, closed, f"bits/dim of level {k}")
    assert closed >= exact_k
    if smooth:
      assert closed - exact_k < 1e-3
    else:
      mean, se = mean_and_se(values)
      assert mean - Z * se > exact_k + 0.1  # A rough density shows Jensen's gap (0.5-2.3 bits here).
    assert_rejects(values + math.log2(SCALE), closed, "bits/dim without the Jacobian")


# --- The DDPM bound. -------------------------------------------------------------------------------------------

CHAIN = sf.DDPMChain(beta_min=0.1, beta_max=10.0, num_steps=20)
MODEL = GaussianMixture.gaussian(jnp.array([0.1, -0.2]), jnp.array([0.3, 0.5]))


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_ddpm_kl_terms_match_closed_form(variance):
  """L_{t-1} for Gaussian data and the exact posterior-mean noise predictor (linear in x_t), and for a predictor
  off by 5 %, whose closed form the exact predictor's estimate rejects."""
  n = 2**16
  x0 = MODEL.sample(jax.random.key(8), n)
  kl = jax.jit(lambda key, x, i, c: ddpm_kl_term(key, x, lambda y, j: c * ddpm_eps_fn(MODEL, CHAIN)(y, j), CHAIN, i,
                                                 variance=variance))
  closed = expected_ddpm_kl_terms(MODEL, MODEL, CHAIN, variance=variance).kl
  closed_wrong = expected_ddpm_kl_terms(MODEL, MODEL, CHAIN, variance=variance, eps_scale=0.95).kl
  for i in (1, 10, CHAIN.num_steps - 1):
    key = jax.random.fold_in(jax.random.key(9), i)
    exact = np.asarray(kl(key, x0, jnp.int32(i), 1.0))
    assert_matches(exact, closed[i - 1], f"L at level {i}")
    assert_matches(np.asarray(kl(key, x0, jnp.int32(i), 0.95)), closed_wrong[i - 1], f"5%-off L at level {i}")
    if i > 1:  # At level 1 the posterior variance dominates and 5 % moves the KL by less than its noise.
      assert_rejects(exact, closed_wrong[i - 1], f"5% noise-prediction error at level {i}")


def expected_decoder_nll(x_raw, variance_at_level1):
  """E_{x_1 | x_0}[-log p(x_0 | x_1)] by Gauss-Hermite quadrature over x_1 with SciPy's normal CDF."""
  n = CHAIN.num_steps
  betas = np.linspace(CHAIN.beta_min / n, CHAIN.beta_max / n, n)
  mu, s = np.asarray(MODEL.means[0]), np.asarray(MODEL.stds[0])
  x0 = 2 * x_raw / 255 - 1
  a, b = math.sqrt(1 - betas[0]), math.sqrt(betas[0])
  z, w = np.polynomial.hermite_e.hermegauss(61)
  w = w / math.sqrt(2 * math.pi)
  x1 = a * x0[None] + b * z[:, None]
  mean = (x1 - b * b * (x1 - a * mu) / (a * a * s * s + b * b)) / a  # x0-prediction of the linear eps predictor
  sd = math.sqrt(variance_at_level1)
  lower = np.where(x_raw == 0, -np.inf, (x0 - 1 / 255 - mean) / sd)
  upper = np.where(x_raw == 255, np.inf, (x0 + 1 / 255 - mean) / sd)
  prob = np.where(lower + upper > 0, stats.norm.sf(lower) - stats.norm.sf(upper),
                  stats.norm.cdf(upper) - stats.norm.cdf(lower))
  return -np.sum(w[:, None] * np.log(prob))


def test_ddpm_vlb_matches_closed_form():
  """The whole bound of fixed 8-bit examples (N = 20): exact sum and one-step estimate both match L_T + sum of
  closed-form L_{t-1} + the quadrature of L_0, and agree with each other within their standard errors."""
  levels = np.array([[128, 100], [0, 255], [140, 60]])
  reps = 2**13
  x_raw = jnp.asarray(np.repeat(levels, reps, axis=0), jnp.uint8)
  eps_fn = ddpm_eps_fn(MODEL, CHAIN)
  n = CHAIN.num_steps
  betas = np.linspace(CHAIN.beta_min / n, CHAIN.beta_max / n, n)
  abar = np.cumprod(1 - betas)
  beta_tilde_1 = betas[1] * (1 - abar[0]) / (1 - abar[1])
  terms = {estimator: jax.jit(lambda key, x, estimator=estimator: ddpm_vlb_terms(
      key, x, eps_fn, CHAIN, estimator=estimator, dtype=jnp.float64))(jax.random.key(10), x_raw)
           for estimator in ("exact", "sampled")}
  for row, k in enumerate(levels):
    part = slice(row * reps, (row + 1) * reps)
    example = GaussianMixture.gaussian(jnp.asarray(2 * k / 255 - 1.0), jnp.zeros(2))
    closed = expected_ddpm_kl_terms(example, MODEL, CHAIN)
    decoder = expected_decoder_nll(k, beta_tilde_1)
    total = float(closed.prior) + float(np.sum(closed.kl)) + decoder
    exact, sampled = terms["exact"], terms["sampled"]
    np.testing.assert_allclose(np.asarray(exact.prior[part]), closed.prior, rtol=1e-10)
    assert_matches(exact.decoder[part], decoder, f"L_0 of {k}")
    assert_rejects(-np.asarray(exact.decoder[part]), decoder, f"sign-flipped L_0 of {k}")
    se_exact = assert_matches(exact.total[part], total, f"exact-sum bound of {k}")
    se_sampled = assert_matches(sampled.total[part], total, f"one-step bound of {k}")
    difference = float(np.mean(exact.total[part]) - np.mean(sampled.total[part]))
    assert abs(difference) < Z * math.hypot(se_exact, se_sampled)
    broken = np.asarray(exact.prior[part] + exact.diffusion[part] - exact.decoder[part])
    assert_rejects(broken, total, f"bound with a sign-flipped decoder of {k}")


def test_discretized_gaussian_log_prob_matches_quadrature():
  """Against the integral of the normal density over each bin (to +-inf at the ends), and P sums to one."""
  levels = np.array([0, 1, 37, 127, 128, 200, 254, 255])
  log_prob = jax.jit(lambda k, mean, std: discretized_gaussian_log_prob(k, jnp.full(k.shape, mean), std))
  for mean, std in [(0.0, 0.3), (0.6, 0.004), (-0.99, 0.02), (0.9, 1e-3)]:
    log_p = np.asarray(log_prob(jnp.asarray(levels), mean, std))
    for k, value in zip(levels, log_p):
      lower = -np.inf if k == 0 else 2 * k / 255 - 1 - 1 / 255
      upper = np.inf if k == 255 else 2 * k / 255 - 1 + 1 / 255
      z_lo, z_hi = (lower - mean) / std, (upper - mean) / std
      if z_lo > 30 or z_hi < -30:  # Beyond quad's reach: SciPy's log-CDF on the tail side.
        expected = (stats.norm.logsf(z_lo) + np.log(-np.expm1(stats.norm.logsf(z_hi) - stats.norm.logsf(z_lo)))
                    if z_lo > 0 else stats.norm.logcdf(z_hi) + np.log(-np.expm1(stats.norm.logcdf(z_lo)
                                                                                - stats.norm.logcdf(z_hi))))
      else:
        points = [np.clip(mean, lower, upper)] if np.isfinite(lower) and np.isfinite(upper) else None
        mass, _ = integrate.quad(stats.norm(mean, std).pdf, lower, upper, epsabs=0, epsrel=1e-11, limit=200,
                                 points=points)
        expected = np.log(mass)
      np.testing.assert_allclose(value, expected, rtol=1e-7, err_msg=f"level {k}, N({mean}, {std}^2)")
    total = jax.nn.logsumexp(log_prob(jnp.arange(256), mean, std))
    np.testing.assert_allclose(total, 0.0, atol=1e-12)


def test_clip_x0_clips_the_implied_data_prediction():
  """clip_x0=True equals running an unclipped model whose noise prediction implies the clipped x0 (same key)."""
  x_raw = jnp.asarray(np.repeat([[3, 250], [128, 0]], 4, axis=0), jnp.int32)
  wild = lambda x, i: 3.0 * jnp.sin(7 * x) + 2.0  # Implies x0 predictions far outside [-1, 1].

  def clipped(x, i):
    log_abar = CHAIN.log_alphas_cumprod[i][:, None]
    a, b = jnp.exp(0.5 * log_abar), jnp.sqrt(-jnp.expm1(log_abar))
    x0_hat = jnp.clip((x - b * wild(x, i)) / a, -1.0, 1.0)
    return (x - a * x0_hat) / b

  key = jax.random.key(11)
  got = jax.jit(lambda k, x: ddpm_vlb_bpd(k, x, wild, CHAIN, clip_x0=True, dtype=jnp.float64))(key, x_raw)
  want = jax.jit(lambda k, x: ddpm_vlb_terms(k, x, clipped, CHAIN, dtype=jnp.float64))(key, x_raw)
  np.testing.assert_allclose(got, want.total / (2 * LN2), rtol=1e-9)
  unclipped = jax.jit(lambda k, x: ddpm_vlb_bpd(k, x, wild, CHAIN, dtype=jnp.float64))(key, x_raw)
  assert np.all(np.asarray(unclipped) > np.asarray(got))


# --- Estimator options, jit hygiene, dtypes and errors. --------------------------------------------------------


def test_num_samples_averages_independent_draws():
  sde, eps, n = sf.VPSDE(), 1e-5, 2**13
  model = GaussianMixture.gaussian(jnp.array([0.1, -0.3]), jnp.array([0.4, 0.35]))
  x_raw = jnp.asarray(np.repeat(LEVELS[:1], n, axis=0))
  bpd = jax.jit(lambda key, x, num: continuous_bound_bpd(key, x, exact_score(model, sde), sde, scale=SCALE,
                                                         shift=SHIFT, eps=eps, num_samples=num, dtype=jnp.float64),
                static_argnums=2)
  one, four = np.asarray(bpd(jax.random.key(12), x_raw, 1)), np.asarray(bpd(jax.random.key(13), x_raw, 4))
  cell = GaussianMixture.gaussian(jnp.asarray(SCALE * (LEVELS[0] + 0.5) + SHIFT), jnp.full(2, SCALE / math.sqrt(12)))
  closed = (float(expected_continuous_bound(cell, model, sde, eps).total) - 2 * math.log(SCALE)) / (2 * LN2)
  assert_matches(four, closed, "mean of four draws")
  assert four.var() < 0.5 * one.var()


def _bpd_functions():
  sde_model = GaussianMixture.gaussian(jnp.zeros((2, 2, 1)), jnp.full((2, 2, 1), 0.5))

  def continuous(key, x_raw, sde):
    return continuous_bound_bpd(key, x_raw, exact_score(sde_model, sde), sde, scale=SCALE, shift=SHIFT)

  def ddpm(key, x_raw, chain):
    return ddpm_vlb_bpd(key, x_raw, ddpm_eps_fn(sde_model, chain), chain, estimator="sampled")

  return {"continuous": (continuous, sf.VPSDE(), sf.VPSDE(beta_min=0.2, beta_max=15.0)),
          "ddpm": (ddpm, CHAIN, sf.DDPMChain(beta_min=0.2, beta_max=8.0, num_steps=20))}


@pytest.mark.parametrize("kind", ["continuous", "ddpm"])
def test_jit_without_recompilation_vmap_and_dtypes(kind):
  fn, process, other_process = _bpd_functions()[kind]
  jitted = jax.jit(fn)
  images = jax.random.randint(jax.random.key(14), (3, 5, 2, 2, 1), 0, 256).astype(jnp.uint8)
  first = jitted(jax.random.key(15), images[0], process)
  assert first.shape == (5,) and first.dtype == jnp.float32 and np.all(np.isfinite(first))
  jitted(jax.random.key(16), images[1], other_process)  # New data, key and process leaves: no new trace.
  assert jitted._cache_size() == 1
  keys = jax.random.split(jax.random.key(17), 3)
  batched = jax.jit(jax.vmap(fn, in_axes=(0, 0, None)))(keys, images, process)
  looped = np.stack([jitted(keys[m], images[m], process) for m in range(3)])
  np.testing.assert_allclose(batched, looped, rtol=1e-4)
  assert jitted(jax.random.key(15), images[0].astype(jnp.float64), process).dtype == jnp.float64


def test_per_dimension_scale_and_shift():
  """A scale and shift given per dimension (broadcasting to [*D]) act like the equal scalars."""
  sde, model = sf.VPSDE(), GaussianMixture.gaussian(jnp.zeros((2, 2, 1)), jnp.full((2, 2, 1), 0.5))
  images = jnp.asarray(np.arange(16).reshape(4, 2, 2, 1) * 16, jnp.uint8)
  bpd = jax.jit(lambda key, x, scale, shift: continuous_bound_bpd(key, x, exact_score(model, sde), sde, scale=scale,
                                                                  shift=shift))
  key = jax.random.key(19)
  scalar = bpd(key, images, SCALE, SHIFT)
  per_dim = bpd(key, images, jnp.full((2, 2, 1), SCALE), jnp.full((2, 1), SHIFT))
  np.testing.assert_allclose(per_dim, scalar, rtol=1e-6)


@pytest.mark.parametrize("kind", ["continuous", "ddpm"])
def test_invalid_levels_are_nan_under_jit(kind):
  fn, process, _ = _bpd_functions()[kind]
  images = jnp.full((4, 2, 2, 1), 100.0, jnp.float64)
  images = images.at[1, 0, 0, 0].set(256.0).at[2, 1, 1, 0].set(-1.0).at[3, 0, 1, 0].set(12.5)
  values = np.asarray(jax.jit(fn)(jax.random.key(18), images, process))
  assert np.isfinite(values[0]) and np.all(np.isnan(values[1:]))


def _continuous(x_raw, **kwargs):
  sde = sf.VPSDE()
  options = dict(scale=SCALE, shift=SHIFT) | kwargs
  score_fn = options.pop("score_fn", lambda x, t: -x)
  return continuous_bound_bpd(jax.random.key(0), x_raw, score_fn, sde, **options)


def _ddpm(x_raw, **kwargs):
  eps_fn = kwargs.pop("eps_fn", lambda x, i: jnp.zeros_like(x))
  return ddpm_vlb_bpd(jax.random.key(0), x_raw, eps_fn, CHAIN, **kwargs)


GOOD = np.full((2, 3), 7, np.uint8)
BAD_INPUTS = {
    "scaled data": (_continuous, (np.linspace(-1, 1, 6).reshape(2, 3),), {}, "integer levels in 0 .. 255"),
    "level 256": (_ddpm, (np.full((2, 3), 256),), {}, "integer levels in 0 .. 255"),
    "negative level": (_continuous, (np.full((2, 3), -3),), {}, "outside that set"),
    "no batch axis": (_continuous, (np.arange(3),), {}, r"shape \[B, \*D\]"),
    "no batch axis ddpm": (_ddpm, (np.arange(3),), {}, r"shape \[B, \*D\]"),
    "bool data": (_ddpm, (np.ones((2, 3), bool),), {}, "integer levels"),
    "few levels": (_continuous, (GOOD,), {"num_levels": 1}, "num_levels must be an int >= 2"),
    "zero scale": (_continuous, (GOOD,), {"scale": 0.0}, "scale must be nonzero"),
    "scale shape": (_continuous, (GOOD,), {"scale": np.ones(4)}, "broadcast to the event shape"),
    "shift shape": (_continuous, (GOOD,), {"shift": np.ones(2)}, "shift must be a scalar or broadcast"),
    "eps": (_continuous, (GOOD,), {"eps": 0.0}, "0 < eps < T"),
    "num_samples": (_continuous, (GOOD,), {"num_samples": 0}, "num_samples must be an int >= 1"),
    "score shape": (_continuous, (GOOD,), {"score_fn": lambda x, t: x[:, :2]}, r"score_fn\(x, t\) must return"),
    "eps_fn shape": (_ddpm, (GOOD,), {"eps_fn": lambda x, i: x[:, None]}, r"eps_fn\(x, t\) must return"),
    "variance": (_ddpm, (GOOD,), {"variance": "learned"}, "variance must be 'beta'"),
    "estimator": (_ddpm, (GOOD,), {"estimator": "importance"}, "estimator must be 'exact'"),
    "ddpm scale": (_ddpm, (GOOD,), {"scale": -2 / 255}, "bin width"),
    "ddpm scale shape": (_ddpm, (GOOD,), {"scale": np.ones(3)}, "must be scalars"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(case):
  fn, args, kwargs, match = BAD_INPUTS[case]
  with pytest.raises(ValueError, match=match):
    fn(*args, **kwargs)


def test_kl_term_level_and_decoder_errors():
  x0 = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=r"levels i must lie in 1 \.\. 19"):
    ddpm_kl_term(jax.random.key(0), x0, lambda x, i: x, CHAIN, 0)
  with pytest.raises(ValueError, match="same shape"):
    discretized_gaussian_log_prob(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 2)), 0.1)
  with pytest.raises(ValueError, match="mean must be floating"):
    discretized_gaussian_log_prob(jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.int32), 0.1)
