"""Losses at and around the exact score of Gaussian data, where every expectation is closed form.

Monte-Carlo tolerances: a batch mean of n per-example values is compared with its expectation within
Z standard errors, the standard error being the per-example sample standard deviation over sqrt(n). With
Z = 4.5 a single check fails by chance with probability below 1e-5; keys are fixed, so the suite is
deterministic.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoreflow as sf
from scoreflow.testing import GaussianMixture

Z = 4.5
NUM = 20000
DATA = GaussianMixture.gaussian(jnp.array([1.0, -2.0, 0.5]), jnp.array([0.5, 2.0, 1.0]))
SDES = {
    "vp": sf.VPSDE(),
    "subvp": sf.SubVPSDE(),
    "ve": sf.VESDE(),
    "cosine": sf.CosineVPSDE(),
}


@pytest.fixture(params=list(SDES), ids=list(SDES))
def sde(request):
  return SDES[request.param]


def assert_mean_within_standard_error(values, expected, z=Z, inflate=1.0):
  values = np.asarray(values)
  mean, standard_error = values.mean(0), values.std(0) / math.sqrt(values.shape[0])
  np.testing.assert_array_less(np.abs(mean - expected), z * inflate * standard_error + 1e-12)


# Each variant: (loss(key, x0, score_fn, sde) -> (loss, aux), weight(sde, t) multiplying ||score error||^2
# in the per-example loss, written from the papers independently of the library).
EPS = 1e-3


def _importance_weight(sde, t):
  log_snr_range = sde.log_snr(jnp.float64(EPS)) - sde.log_snr(jnp.float64(sde.T))
  return log_snr_range / (sde.T - EPS) * sde.sigma(t) ** 2


def _edm_weight(sde, t):
  scaled_sigma = sde.sigma(t) / sde.alpha(t)
  return (scaled_sigma**2 + 0.5**2) / 0.5**2 * sde.sigma(t) ** 2


CONTINUOUS_VARIANTS = {
    "sigma2": (lambda k, x, s, sde: sf.dsm_loss(k, x, s, sde, eps=EPS), lambda sde, t: sde.sigma(t) ** 2),
    "likelihood": (lambda k, x, s, sde: sf.dsm_loss(k, x, s, sde, weighting="likelihood", eps=EPS),
                   lambda sde, t: sde.g2(t)),
    "likelihood_is": (lambda k, x, s, sde: sf.dsm_loss(k, x, s, sde, weighting="likelihood",
                                                       importance_sampling=True, eps=EPS), _importance_weight),
    "edm": (lambda k, x, s, sde: sf.edm_loss(k, x, s, sde, eps=EPS), _edm_weight),
}


@pytest.mark.parametrize("variant", list(CONTINUOUS_VARIANTS))
def test_exact_score_minimises_continuous_losses(sde, variant, getkey):
  """loss(s* + c) - loss(s*) = E[w(t)] ||c||^2 / D and d loss / dc = 0 at c = 0, within Monte-Carlo error.

  The cross term 2 w <c, s* + eps/sigma> has zero mean because E[eps/sigma | x_t] = -s*(x_t) (Tweedie); with
  common random numbers it is the only random part of the difference, conditional on the sampled times.
  """
  loss_fn, weight_fn = CONTINUOUS_VARIANTS[variant]
  x0 = DATA.sample(getkey(), NUM)
  key = getkey()
  exact = DATA.score(sde)

  def per_example(c):
    _, aux = loss_fn(key, x0, lambda x, t: exact(x, t) + c[None], sde)
    return aux.per_example, aux.t

  at_exact, t = jax.jit(per_example)(jnp.zeros(3))
  c = jnp.array([0.3, -0.2, 0.1])
  perturbed, t_again = jax.jit(per_example)(c)
  np.testing.assert_array_equal(t, t_again)
  expected_increase = weight_fn(sde, t) * jnp.sum(c**2) / 3
  assert_mean_within_standard_error(perturbed - at_exact - expected_increase, 0.0)
  assert float(jnp.mean(perturbed)) > float(jnp.mean(at_exact))
  per_example_gradient = jax.jit(jax.jacfwd(lambda c: per_example(c)[0]))(jnp.zeros(3))
  assert_mean_within_standard_error(per_example_gradient, np.zeros(3))


def test_exact_score_minimises_discrete_losses(getkey):
  x0 = DATA.sample(getkey(), NUM)
  chain = sf.DDPMChain(num_steps=100)

  def exact_eps(x, i):
    _, std = chain.marginal(x, i)
    alpha = jnp.exp(0.5 * chain.log_alphas_cumprod[i])
    return -std[:, None] * DATA.score_at(x, alpha, std)

  key = getkey()
  c = jnp.array([0.3, -0.2, 0.1])
  _, at_exact = sf.ddpm_loss(key, x0, exact_eps, chain)
  _, perturbed = sf.ddpm_loss(key, x0, lambda x, i: exact_eps(x, i) + c[None], chain)
  assert_mean_within_standard_error(perturbed.per_example - at_exact.per_example - jnp.sum(c**2) / 3, 0.0)
  # At the exact noise prediction the expected loss is E||eps - E[eps|x_i]||^2 / D, per dimension
  # sigma_i^2 s^2 / (alpha_i^2 s^2 + sigma_i^2)... averaged: strictly below the trivial predictor's 1.
  assert float(jnp.mean(at_exact.per_example)) < 1.0

  ladder = sf.SMLDChain(sigma_min=0.01, sigma_max=50.0, num_scales=100)

  def exact_score(x, i):
    sigma = ladder.sigmas[i]
    return DATA.score_at(x, jnp.ones_like(sigma), sigma)

  _, at_exact = sf.smld_loss(key, x0, exact_score, ladder)
  _, perturbed = sf.smld_loss(key, x0, lambda x, i: exact_score(x, i) + c[None], ladder)
  expected = ladder.sigmas[at_exact.t] ** 2 * jnp.sum(c**2) / 3
  assert_mean_within_standard_error(perturbed.per_example - at_exact.per_example - expected, 0.0)


def _expected_likelihood_loss(sde, eps):
  """Closed form of E[g^2 ||s* + eps/sigma||^2] averaged over t ~ U[eps, T], summed over dimensions.

  For data N(mu, s^2) per dimension, E||sigma s* + eps||^2 = alpha^2 s^2 / (alpha^2 s^2 + sigma^2)
  = sigmoid(lambda + log s^2), and g^2 / sigma^2 dt = -d lambda, so the time integral is
  softplus(lambda(eps) + log s^2) - softplus(lambda(T) + log s^2).
  """
  log_s2 = 2 * jnp.log(DATA.stds[0])
  lam_eps, lam_T = sde.log_snr(jnp.float64(eps)), sde.log_snr(jnp.float64(sde.T))
  return float(jnp.sum(jax.nn.softplus(lam_eps + log_s2) - jax.nn.softplus(lam_T + log_s2)) / (sde.T - eps))


def test_importance_sampling_keeps_the_expectation_and_lowers_the_variance(sde, getkey):
  eps = 1e-2  # Uniform t has a heavy-tailed weight g^2/sigma^2 ~ 1/t near 0; eps keeps its variance finite.
  x0 = DATA.sample(getkey(), NUM)
  exact = DATA.score(sde)
  expected = _expected_likelihood_loss(sde, eps)
  stds = {}
  for importance_sampling in (False, True):
    _, aux = sf.dsm_loss(getkey(), x0, exact, sde, weighting="likelihood", importance_sampling=importance_sampling,
                         reduce_mean=False, eps=eps)
    assert_mean_within_standard_error(aux.per_example, expected)
    stds[importance_sampling] = float(jnp.std(aux.per_example))
  assert stds[True] < stds[False], stds


def test_importance_sampled_times_have_uniform_log_snr(sde, getkey):
  _, aux = sf.dsm_loss(getkey(), DATA.sample(getkey(), NUM), DATA.score(sde), sde, weighting="likelihood",
                       importance_sampling=True, eps=EPS)
  lam = sde.log_snr(aux.t)
  lam_min, lam_max = float(sde.log_snr(jnp.float64(sde.T))), float(sde.log_snr(jnp.float64(EPS)))
  u = (lam - lam_min) / (lam_max - lam_min)
  # Kolmogorov-Smirnov distance to U[0, 1]; its 99.9% quantile is about 1.95 / sqrt(n).
  u = np.sort(np.asarray(u))
  grid = np.arange(1, NUM + 1) / NUM
  assert np.max(np.abs(u - grid)) < 1.95 / math.sqrt(NUM)


def test_likelihood_bound_at_the_exact_score_is_entropy_plus_prior_mismatch(sde, getkey):
  """E[bound] = H(p_eps) + KL(p_T || prior) when the score is exact (the variational gap vanishes)."""
  eps = 1e-5
  x0 = DATA.sample(getkey(), NUM)
  expected = float(DATA.perturbed(sde, eps).entropy()
                   + DATA.perturbed(sde, sde.T).kl_to_isotropic_gaussian(sde.prior_std))
  bound = jax.jit(lambda k, x: sf.dsm_likelihood_bound(k, x, DATA.score(sde), sde, eps=eps))(getkey(), x0)
  assert bound.shape == (NUM,)
  assert_mean_within_standard_error(bound, expected)


def test_likelihood_bound_is_the_likelihood_loss_plus_a_constant(sde, getkey):
  """bound = (T - eps)/2 * likelihood-weighted DSM (summed over dims) + a function of x0 alone."""
  x0 = DATA.sample(getkey(), 64)
  key = getkey()
  score_a = DATA.score(sde)
  score_b = lambda x, t: score_a(x, t) + 0.1
  bounds = [sf.dsm_likelihood_bound(key, x0, s, sde, importance_sampling=False) for s in (score_a, score_b)]
  losses = [sf.dsm_loss(key, x0, s, sde, weighting="likelihood", reduce_mean=False)[1].per_example
            for s in (score_a, score_b)]
  np.testing.assert_allclose(bounds[1] - bounds[0], 0.5 * (sde.T - 1e-5) * (losses[1] - losses[0]), rtol=1e-9)


def test_reduce_mean_is_the_sum_over_dimensions_divided_by_d(sde, getkey):
  x0 = DATA.sample(getkey(), 16)
  key = getkey()
  _, mean_aux = sf.dsm_loss(key, x0, DATA.score(sde), sde)
  _, sum_aux = sf.dsm_loss(key, x0, DATA.score(sde), sde, reduce_mean=False)
  np.testing.assert_allclose(sum_aux.per_example, 3 * mean_aux.per_example, rtol=1e-12)


def test_variance_reduced_time_sampling(getkey):
  u = sf.sample_uniform(getkey(), 64, "stratified")
  np.testing.assert_array_equal(np.sort(np.floor(np.asarray(u) * 64)), np.arange(64))
  u = sf.sample_uniform(getkey(), 64, "antithetic")
  np.testing.assert_allclose(u[:32] + u[32:], 1.0)
  # Both stay unbiased: the stratified batch mean varies less than an iid one, the antithetic one at most
  # twice as much, so the iid standard error (inflated by sqrt 2) bounds their error.
  sde = SDES["vp"]
  x0 = DATA.sample(getkey(), NUM)
  expected = _expected_likelihood_loss(sde, 1e-2)
  for method in ("stratified", "antithetic"):
    _, aux = sf.dsm_loss(getkey(), x0, DATA.score(sde), sde, weighting="likelihood", importance_sampling=True,
                         reduce_mean=False, eps=1e-2, t_sampling=method)
    assert_mean_within_standard_error(aux.per_example, expected, inflate=math.sqrt(2))


@pytest.mark.parametrize("name, p_mean, p_std", [("ve", -1.2, 1.2), ("vp", -0.5, 0.8)])
def test_edm_noise_levels_are_log_normal(name, p_mean, p_std):
  """ln(sigma_t / alpha_t) of the times edm_loss draws is N(P_mean, P_std^2) (Karras et al. 2022, Sec. 5).

  Kolmogorov-Smirnov on n = 100000 draws (the clipping to [eps, T] moves less than 1e-5 of the mass: the clip
  points are more than 4.6 P_std from P_mean). A false alarm has probability 1e-4; the same draws against
  N(P_mean, (1.05 P_std)^2) or N(P_mean + 0.05 P_std, P_std^2) give a KS statistic near 0.012 and 0.02, i.e.
  sqrt(n) D of about 3.8 and 6, p-values below 1e-10: the test sees a 5 % error in either parameter.
  """
  import scipy.stats
  sde = {"ve": sf.VESDE(sigma_min=0.002, sigma_max=80.0), "vp": sf.VPSDE()}[name]
  n = 100_000
  x0 = jnp.zeros((n, 1))
  _, aux = sf.edm_loss(jax.random.key(11), x0, lambda x, t: -x, sde, p_mean=p_mean, p_std=p_std, eps=1e-5)
  log_sigma = np.log(np.asarray(sde.sigma(aux.t) / sde.alpha(aux.t)))
  assert scipy.stats.kstest(log_sigma, scipy.stats.norm(p_mean, p_std).cdf).pvalue > 1e-4
  assert scipy.stats.kstest(log_sigma, scipy.stats.norm(p_mean, 1.05 * p_std).cdf).pvalue < 1e-6
  assert scipy.stats.kstest(log_sigma, scipy.stats.norm(p_mean + 0.05 * p_std, p_std).cdf).pvalue < 1e-6


def test_jit_grad_and_no_recompilation_when_hyperparameters_change(getkey):
  traces = []
  x0 = DATA.sample(getkey(), 32)

  @jax.jit
  def loss_and_grad(params, sde, key):
    traces.append(1)

    def loss(params):
      score_fn = sf.make_score_fn(lambda p, x, c: p * x, params, sde, sf.EpsilonParameterization())
      return sf.dsm_loss(key, x0, score_fn, sde, weighting="likelihood", importance_sampling=True)[0]

    return jax.value_and_grad(loss)(params)

  for sde in (sf.VPSDE(0.1, 20.0), sf.VPSDE(0.2, 15.0)):
    value, grad = loss_and_grad(jnp.float64(0.5), sde, getkey())
    assert np.isfinite(value) and np.isfinite(grad)
  assert len(traces) == 1


@pytest.mark.parametrize("loss_name", ["dsm", "edm", "ddpm", "smld", "bound"])
def test_float32_in_float32_out(loss_name, getkey):
  x0 = jnp.ones((8, 3), jnp.float32)
  sde = sf.VPSDE()
  score = lambda x, t: -x
  calls = {
      "dsm": lambda: sf.dsm_loss(getkey(), x0, score, sde, weighting="likelihood", importance_sampling=True),
      "edm": lambda: sf.edm_loss(getkey(), x0, score, sde),
      "ddpm": lambda: sf.ddpm_loss(getkey(), x0, score, sf.DDPMChain()),
      "smld": lambda: sf.smld_loss(getkey(), x0, score, sf.SMLDChain()),
      "bound": lambda: (sf.dsm_likelihood_bound(getkey(), x0, score, sde), None),
  }
  loss, _ = calls[loss_name]()
  assert loss.dtype == jnp.float32


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, s: sf.dsm_loss(jax.random.key(0), x[:, 0], s, sf.VPSDE()),
         r"dsm_loss: x0 must have shape \[B, \*D\] with at least one data axis, got shape \(8,\)"),
        (lambda x, s: sf.dsm_loss(jax.random.key(0), jnp.ones((8, 3), jnp.int32), s, sf.VPSDE()),
         r"dsm_loss: x0 must be floating point, got dtype int32"),
        (lambda x, s: sf.dsm_loss(jax.random.key(0), x, s, sf.VPSDE(), weighting="sigma"),
         r"weighting must be 'sigma2' or 'likelihood', got 'sigma'"),
        (lambda x, s: sf.dsm_loss(jax.random.key(0), x, s, sf.VPSDE(), importance_sampling=True),
         r"needs weighting='likelihood', got weighting='sigma2'"),
        (lambda x, s: sf.dsm_loss(jax.random.key(0), x, s, sf.VPSDE(), eps=1.0),
         r"dsm_loss: expected 0 < eps < T, got eps=1.0, T=1.0"),
        (lambda x, s: sf.dsm_loss(jax.random.key(0), x[:7], s, sf.VPSDE(), t_sampling="antithetic"),
         r"antithetic time sampling needs an even batch size, got 7"),
        (lambda x, s: sf.dsm_loss(jax.random.key(0), x, s, sf.VPSDE(), t_sampling="sobol"),
         r"must be 'iid', 'stratified' or 'antithetic', got 'sobol'"),
        (lambda x, s: sf.edm_loss(jax.random.key(0), x, s, sf.VESDE(), p_std=-1.0),
         r"edm_loss: expected p_std > 0 and sigma_data > 0"),
    ],
)
def test_bad_inputs_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call(jnp.ones((8, 3)), lambda x, t: -x)
