"""Controllable generation proved against exact answers (scoreflow.guidance; ground truth from scoreflow.testing).

Formula tests compare each guided score with an independent closed form to float64 round-off. Sampling tests
compare samples with an exact Gaussian target: the class distribution, the exact posterior of a linear observation,
or, for methods that are biased by construction, the exact distribution that the sampler must produce with that
score (`affine_score_moments`: for Gaussian data every guided score here is affine in x, so the reverse SDE / ODE
keeps x Gaussian and its moments follow a linear ODE, integrated by RK4 to ~1e-12). The bias of such a method is
then the exact distance between that prediction and the posterior, and the test asserts both that the samples
match the prediction and that the bias is large enough to be seen at this sample size.

Statistics (`gaussian_mismatches`): the samples are whitened with the target's Cholesky factor, u = L^-1 (x - mu),
which is N(0, I) for exact samples; per coordinate the mean (SE 1/sqrt(n)) and variance (SE sqrt(2/(n-1))) and per
pair the covariance (SE 1/sqrt(n)) must lie within Z = 5 standard errors (two-sided false alarm 5.7e-7 per
statistic; at most ~30 statistics per test, so below 2e-5 per test). With n = NUM_SAMPLES = 40000 a 5 % variance
error along one whitened direction has expected z = 0.05 / sqrt(2/n) = 7.1, caught with probability
P(|N(7.1, 1)| > 5) = 0.98; `test_statistics_have_power` shows it caught, and a 0.05-sd shift (z = 10) too.
The samplers' discretisation bias at the step counts used (1000 Euler-Maruyama steps; adaptive Tsit5 at rtol 1e-5)
is below that MC error (as in tests/test_sampling_distributions.py).
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import scoreflow as sf
from scoreflow import sampling
from scoreflow.guidance import (classifier_free_score, classifier_guided_score, colorize_sample, conditional_score,
                                color_decoupling_matrix, couple_colors, decouple_colors, inpaint_sample,
                                linear_inverse_score, masked_inverse_score)
from scoreflow.testing import (GaussianMixture, LabelledGaussianMixture, MultivariateGaussian,
                               affine_score_moments)

NUM_SAMPLES = 40000
Z = 5.0
EPS = 1e-3
VP = sf.VPSDE()
SDES = {"vp": sf.VPSDE(), "ve": sf.VESDE(), "subvp": sf.SubVPSDE()}
REPORT = {}  # Measured numbers, printed by `pytest -s` (they go in the closing note).


def _report(name, **values):
  REPORT[name] = values
  print(f"\n[guidance report] {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()))


# --- Statistics. ----------------------------------------------------------------------------------------------

def gaussian_z(x, mean, cov):
  """z-scores of the whitened sample's mean `[d]`, variance `[d]` and covariances `[d(d-1)/2]` against N(0, I)."""
  x, mean, cov = (np.asarray(a, np.float64) for a in (x, mean, cov))
  n, d = x.shape
  u = np.linalg.solve(np.linalg.cholesky(cov), (x - mean[None]).T).T
  c = np.cov(u, rowvar=False)
  upper = np.triu_indices(d, 1)
  return u.mean(0) * np.sqrt(n), (np.diag(c) - 1) / np.sqrt(2 / (n - 1)), c[upper] * np.sqrt(n)


def gaussian_mismatches(x, mean, cov, z_max=Z):
  failures = []
  for name, z in zip(("mean", "variance", "covariance"), gaussian_z(x, mean, cov)):
    if z.size and np.max(np.abs(z)) > z_max:
      failures.append(f"whitened {name} z-scores {np.round(z, 1)} (threshold {z_max})")
  return failures


def assert_gaussian(x, mean, cov, label=""):
  x = np.asarray(x)
  assert np.all(np.isfinite(x))
  failures = gaussian_mismatches(x, mean, cov)
  assert not failures, f"{label}: " + "; ".join(failures)


def _max_z(x, mean, cov):
  return float(max(np.max(np.abs(z)) for z in gaussian_z(x, mean, cov) if z.size))


def test_statistics_have_power():
  """Exact samples pass; a 5 % variance error along one whitened direction and a 0.05-sd shift are caught."""
  rng = np.random.default_rng(0)
  mean, cov = np.array([0.5, -1.0, 0.2]), np.array([[1.0, 0.8, 0.3], [0.8, 1.0, 0.5], [0.3, 0.5, 0.8]])
  L = np.linalg.cholesky(cov)
  u = rng.normal(size=(NUM_SAMPLES, 3))
  assert not gaussian_mismatches(mean + u @ L.T, mean, cov)
  wide = u * np.array([np.sqrt(1.05), 1.0, 1.0])
  assert any("variance" in f for f in gaussian_mismatches(mean + wide @ L.T, mean, cov))
  shifted = u + np.array([0.0, 0.05, 0.0])
  assert any("mean" in f for f in gaussian_mismatches(mean + shifted @ L.T, mean, cov))
  wrong_correlation = cov.copy()
  wrong_correlation[0, 1] = wrong_correlation[1, 0] = 0.78  # 0.8 in the target.
  assert any("covariance" in f for f in gaussian_mismatches(mean + u @ np.linalg.cholesky(wrong_correlation).T,
                                                            mean, cov))


# --- Ground truth: a labelled mixture and a correlated Gaussian. ------------------------------------------------

def _labelled_mixture():
  """Class 0: two components; class 1: one; class 2: one (2-D)."""
  mixture = GaussianMixture(jnp.array([0.3, 0.2, 0.3, 0.2]),
                            jnp.array([[-2.0, 0.0], [-1.0, 2.0], [2.0, 0.5], [0.5, -2.5]]),
                            jnp.array([[0.4, 0.5], [0.3, 0.3], [0.5, 0.4], [0.35, 0.45]]))
  return LabelledGaussianMixture(mixture, jnp.array([0, 0, 1, 2]))


def _single_gaussian_classes():
  """Two classes of one Gaussian each (2-D): class-conditional targets with known mean and covariance."""
  mixture = GaussianMixture(jnp.array([0.6, 0.4]), jnp.array([[-1.5, 0.5], [1.5, -0.5]]),
                            jnp.array([[0.4, 0.6], [0.5, 0.3]]))
  return LabelledGaussianMixture(mixture, jnp.array([0, 1]))


CORRELATED = MultivariateGaussian(jnp.array([0.5, -1.0, 0.2]),
                                  jnp.array([[1.0, 0.8, 0.3], [0.8, 1.0, 0.5], [0.3, 0.5, 0.8]]))
ISOTROPIC_STD = 0.8
ISOTROPIC = MultivariateGaussian(jnp.array([0.5, -1.0, 0.2]), ISOTROPIC_STD**2 * jnp.eye(3))
INDEPENDENT = MultivariateGaussian(jnp.array([0.5, -1.0, 0.2]), jnp.diag(jnp.array([1.0, 0.6, 0.8])))


def _points(key, n=7, d=2):
  return 2.0 * jax.random.normal(key, (n, d), jnp.float64)


# --- Formula tests (float64 round-off). -------------------------------------------------------------------------

@pytest.mark.parametrize("process", list(SDES))
@pytest.mark.parametrize("w", [0.0, 1.5])
def test_classifier_free_score_formula(process, w, getkey):
  """(1 + w) s(x|y) - w s(x), with s(x|y) the score of the class's own mixture and s(x) of the joint one."""
  sde, lgm = SDES[process], _labelled_mixture()
  cond_score_fn = lgm.conditional_score(sde)
  x, t = _points(getkey()), jnp.linspace(0.05, 0.9, 7) * sde.T
  labels = jnp.array([0, 1, 2, 0, 1, 2, 0])
  class_scores = jnp.stack([lgm.class_mixture(c).score(sde)(x, t) for c in range(3)])  # [C, B, D]
  expected = (1 + w) * class_scores[labels, jnp.arange(7)] - w * lgm.mixture.score(sde)(x, t)
  for joint_batch in (True, False):
    got = classifier_free_score(cond_score_fn, labels, w, joint_batch=joint_batch)(x, t)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)
  scalar_label = classifier_free_score(cond_score_fn, 2, w)(x, t)
  np.testing.assert_allclose(scalar_label, (1 + w) * lgm.class_mixture(2).score(sde)(x, t)
                             - w * lgm.mixture.score(sde)(x, t), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("process", list(SDES))
def test_classifier_guidance_with_exact_classifier_is_exact_conditional(process, getkey):
  """s(x) + grad log p_t(y | x) = grad log p_t(x | y) (Bayes); scale 2 adds the classifier gradient twice."""
  sde, lgm = SDES[process], _labelled_mixture()
  classifier = lgm.log_prob_label_t(sde)
  x, t = _points(getkey()), jnp.linspace(0.05, 0.9, 7) * sde.T
  for c in range(3):
    labels = jnp.full((7,), c)
    guided = classifier_guided_score(lgm.mixture.score(sde), lambda x, t: classifier(x, t, labels), 1.0)
    np.testing.assert_allclose(guided(x, t), lgm.class_mixture(c).score(sde)(x, t), rtol=1e-9, atol=1e-10)
    twice = classifier_guided_score(lgm.mixture.score(sde), lambda x, t: classifier(x, t, labels), 2.0)
    np.testing.assert_allclose(twice(x, t), 2 * lgm.class_mixture(c).score(sde)(x, t) - lgm.mixture.score(sde)(x, t),
                               rtol=1e-9, atol=1e-10)
  # The general form: a user-supplied likelihood gradient is added as is.
  constraint = conditional_score(lgm.mixture.score(sde), lambda x, t: -x)
  np.testing.assert_allclose(constraint(x, t), lgm.mixture.score(sde)(x, t) - x)


def _perturbed_posterior_score(prior, sde, A, y, noise_std, x, t):
  """The exact score of p_t(x_t | y) = N(alpha mu_post(y), alpha^2 Sigma_post + sigma^2 I), one y per example."""
  def one(x, t, y):
    return prior.condition(A, y, noise_std).score(sde)(x[None], t[None])[0]
  return jax.vmap(one)(x, t, y)


@pytest.mark.parametrize("process", list(SDES))
@pytest.mark.parametrize("noise_std", [0.0, 0.3])
def test_tweedie_linear_inverse_score_is_exact_for_gaussian_data(process, noise_std, getkey):
  sde = SDES[process]
  A = jnp.array([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0]])
  x, t = _points(getkey(), 6, 3), jnp.linspace(0.02, 0.95, 6) * sde.T
  y = jax.random.normal(getkey(), (6, 2), jnp.float64)
  got = jax.jit(linear_inverse_score(CORRELATED.score(sde), sde, A, y, noise_std, method="tweedie"))(x, t)
  expected = jax.jit(lambda x, t: _perturbed_posterior_score(CORRELATED, sde, A, y, noise_std, x, t))(x, t)
  np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("process", list(SDES))
def test_pigdm_is_exact_for_isotropic_data_and_dps_is_not(process, getkey):
  sde, s = SDES[process], 0.7
  isotropic = MultivariateGaussian(jnp.array([0.3, -0.4, 1.0]), s**2 * jnp.eye(3))
  A, noise_std = jnp.array([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0]]), 0.3
  x, t = _points(getkey(), 6, 3), jnp.linspace(0.02, 0.95, 6) * sde.T
  y = jax.random.normal(getkey(), (6, 2), jnp.float64)
  expected = _perturbed_posterior_score(isotropic, sde, A, y, noise_std, x, t)
  pigdm = linear_inverse_score(isotropic.score(sde), sde, A, y, noise_std, method="pigdm", data_std=s)
  np.testing.assert_allclose(pigdm(x, t), expected, rtol=1e-8, atol=1e-8)
  dps = linear_inverse_score(isotropic.score(sde), sde, A, y, noise_std, method="dps")
  assert np.max(np.abs(dps(x, t) - expected)) > 1e-2  # DPS drops Cov[x0 | xt]: a real error, not round-off.


@pytest.mark.parametrize("process", list(SDES))
@pytest.mark.parametrize("method, noise_std", [("pigdm", 0.0), ("pigdm", 0.2), ("dps", 0.2)])
def test_masked_inverse_score_is_the_selection_matrix_form(process, method, noise_std, getkey):
  """The mask form (one VJP, no matrix) equals linear_inverse_score with the explicit selection matrix and its
  solve, and with isotropic data (pigdm's assumption) both equal the exact posterior score."""
  sde = SDES[process]
  x, t = _points(getkey(), 6, 3), jnp.linspace(0.02, 0.95, 6) * sde.T
  y = jax.random.normal(getkey(), (6, 3), jnp.float64)
  mask, A = jnp.array([[1, 0, 1]]), jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
  for prior, data_std in ((CORRELATED, 0.7), (ISOTROPIC, ISOTROPIC_STD)):
    got = jax.jit(masked_inverse_score(prior.score(sde), sde, y, mask, method=method, noise_std=noise_std,
                                       data_std=data_std))(x, t)
    dense = jax.jit(linear_inverse_score(prior.score(sde), sde, A, y[:, ::2], noise_std, method=method,
                                         data_std=data_std))(x, t)
    np.testing.assert_allclose(got, dense, rtol=1e-9, atol=1e-9)
  exact = _perturbed_posterior_score(ISOTROPIC, sde, A, y[:, ::2], noise_std, x, t)
  if method == "pigdm":
    np.testing.assert_allclose(got, exact, rtol=1e-9, atol=1e-9)
  else:  # DPS drops Cov[x0 | xt]: not the posterior score.
    assert np.max(np.abs(got - exact)) > 1e-2


def test_masked_inverse_score_t_max_switches_the_likelihood_off():
  y, mask = jnp.full((4, 3), 0.7), jnp.array([[1, 0, 0]])
  x, prior = jax.random.normal(jax.random.key(0), (4, 3), jnp.float64), CORRELATED.score(VP)
  full = masked_inverse_score(prior, VP, y, mask, data_std=0.8)
  cut = jax.jit(masked_inverse_score(prior, VP, y, mask, data_std=0.8, t_max=0.5))
  t = jnp.array([0.2, 0.5, 0.6, 0.9])
  got = cut(x, t)
  np.testing.assert_allclose(got[:2], full(x, t)[:2], rtol=1e-12)
  np.testing.assert_array_equal(got[2:], prior(x[2:], t[2:]))
  np.testing.assert_array_equal(cut(x, jnp.full(4, 0.7)), prior(x, jnp.full(4, 0.7)))  # The cond's other branch.
  assert np.max(np.abs(full(x, t)[2:] - prior(x[2:], t[2:]))) > 1e-2


def test_color_decoupling_matrix():
  q = np.asarray(color_decoupling_matrix(jnp.float64))
  np.testing.assert_allclose(q @ q.T, np.eye(3), atol=1e-15)
  np.testing.assert_allclose(q[0], np.ones(3) / np.sqrt(3), atol=1e-15)
  # The 2021 code's M (float32 digits) is Q^T.
  reference = np.array([[5.7735014e-01, -8.1649649e-01, 4.7008697e-08], [5.7735026e-01, 4.0824834e-01, 7.0710671e-01],
                        [5.7735026e-01, 4.0824822e-01, -7.0710683e-01]])
  np.testing.assert_allclose(q.T, reference, atol=3e-7)
  x = np.random.default_rng(0).normal(size=(5, 3))
  np.testing.assert_allclose(couple_colors(decouple_colors(jnp.asarray(x))), x, atol=1e-14)
  np.testing.assert_allclose(decouple_colors(jnp.asarray(x))[:, 0], np.sqrt(3) * x.mean(1), atol=1e-14)


# --- Sampling: class-conditional generation. --------------------------------------------------------------------

def _class_gaussian(lgm, c):
  component = lgm.class_mixture(c)
  return component.means[0], jnp.diag(component.stds[0] ** 2)


def _class_flow(lgm, score_fn, key):
  """Probability-flow ODE samples, `2 * NUM_SAMPLES` with labels alternating 0, 1, started from the exact
  p_T(x | y) of each example's class (so the exact score must carry them to p_eps(x | y) exactly)."""
  key_T, key_sample = jax.random.split(key)
  x_T = jnp.zeros((2 * NUM_SAMPLES, 2))
  for c in range(2):
    x_T = x_T.at[c::2].set(lgm.class_mixture(c).perturbed(VP, VP.T).sample(jax.random.fold_in(key_T, c),
                                                                            NUM_SAMPLES))
  x, info = jax.jit(lambda key, x_T: sf.ode_sample(key, VP, score_fn, x_T.shape, dtype=jnp.float64, x_T=x_T))(
      key_sample, x_T)
  assert int(info.status) == 0
  return x


def _class_marginal_at_eps(lgm, c):
  component = lgm.class_mixture(c).perturbed(VP, EPS)
  return component.means[0], jnp.diag(component.stds[0] ** 2)


def test_classifier_free_scale_zero_samples_each_class_exactly():
  lgm = _single_gaussian_classes()
  labels = jnp.arange(2 * NUM_SAMPLES) % 2  # Per-example labels: both classes in one batch.
  x = _class_flow(lgm, classifier_free_score(lgm.conditional_score(VP), labels, 0.0), jax.random.key(1))
  for c in range(2):
    assert_gaussian(x[c::2], *_class_marginal_at_eps(lgm, c), label=f"class {c}")
    _report(f"cfg_w0_class{c}", max_z=round(_max_z(x[c::2], *_class_marginal_at_eps(lgm, c)), 2))


def test_classifier_guidance_samples_each_class_exactly():
  lgm = _single_gaussian_classes()
  labels = jnp.arange(2 * NUM_SAMPLES) % 2
  classifier = lgm.log_prob_label_t(VP)
  score_fn = classifier_guided_score(lgm.mixture.score(VP), lambda x, t: classifier(x, t, labels), 1.0)
  x = _class_flow(lgm, score_fn, jax.random.key(2))
  for c in range(2):
    assert_gaussian(x[c::2], *_class_marginal_at_eps(lgm, c), label=f"class {c}")
    _report(f"classifier_guidance_class{c}", max_z=round(_max_z(x[c::2], *_class_marginal_at_eps(lgm, c)), 2))
  # Power: at scale 0.9 (a 10 % too weak classifier gradient) the class checks fail.
  weak = classifier_guided_score(lgm.mixture.score(VP), lambda x, t: classifier(x, t, labels), 0.9)
  x_weak = _class_flow(lgm, weak, jax.random.key(2))
  assert gaussian_mismatches(x_weak[0::2], *_class_marginal_at_eps(lgm, 0))


def test_classifier_free_positive_scale_matches_the_exact_guided_flow():
  """For Gaussian cond/uncond scores the CFG score is affine, so the probability-flow ODE sample is exactly the
  Gaussian that affine_score_moments integrates; it is sharper than the class (reported)."""
  cond, null = GaussianMixture.gaussian(jnp.array([1.0, -1.0]), jnp.array([0.5, 0.4])), \
      GaussianMixture.gaussian(jnp.array([0.0, 0.0]), jnp.array([1.5, 1.2]))

  def cond_score_fn(x, t, label):
    return jnp.where((label == -1)[:, None], null.score(VP)(x, t), cond.score(VP)(x, t))

  w = 2.0
  score_fn = classifier_free_score(cond_score_fn, 0, w)
  mean, cov = affine_score_moments(VP, score_fn, 2, EPS, stochastic=False)
  x, info = jax.jit(lambda key: sf.ode_sample(key, VP, score_fn, (NUM_SAMPLES, 2), dtype=jnp.float64))(
      jax.random.key(3))
  assert int(info.status) == 0
  assert_gaussian(x, mean, cov, label="CFG w=2 ODE")
  # The exact guided flow at w = 0 is the class itself (up to the prior's mismatch with p_T, ~3e-3 here).
  mean0, cov0 = affine_score_moments(VP, classifier_free_score(cond_score_fn, 0, 0.0), 2, EPS, stochastic=False)
  np.testing.assert_allclose(mean0, cond.means[0], atol=5e-3)
  np.testing.assert_allclose(np.diag(cov0), cond.stds[0] ** 2, rtol=1e-3)
  _report("cfg_w2_ode", predicted_std=np.sqrt(np.diag(cov)).round(4).tolist(),
          class_std=cond.stds[0].tolist(), predicted_mean=np.asarray(mean).round(4).tolist(),
          max_z_vs_prediction=round(_max_z(x, mean, cov), 2))


# --- Sampling: linear inverse problems. -------------------------------------------------------------------------

A_DENSE = jnp.array([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0]])
Y_DENSE = jnp.array([0.3, -0.2])


def test_tweedie_guidance_samples_the_exact_posterior():
  noise_std = 0.3
  posterior = CORRELATED.condition(A_DENSE, Y_DENSE, noise_std)
  score_fn = linear_inverse_score(CORRELATED.score(VP), VP, A_DENSE, Y_DENSE, noise_std, method="tweedie")
  x, info = jax.jit(lambda key: sf.ode_sample(key, VP, score_fn, (NUM_SAMPLES, 3), dtype=jnp.float64))(
      jax.random.key(4))
  assert int(info.status) == 0
  assert_gaussian(x, posterior.mean, posterior.cov, label="tweedie ODE")
  _report("tweedie_ode", max_z_vs_exact_posterior=round(_max_z(x, posterior.mean, posterior.cov), 2),
          mean_error=np.round(np.asarray(x.mean(0) - posterior.mean), 4).tolist())


def test_dps_is_biased_by_the_predicted_amount():
  """DPS's samples match the exact distribution its (affine) score implies, which is measurably off the posterior."""
  noise_std = 0.3
  posterior = CORRELATED.condition(A_DENSE, Y_DENSE, noise_std)
  score_fn = linear_inverse_score(CORRELATED.score(VP), VP, A_DENSE, Y_DENSE, noise_std, method="dps")
  mean, cov = affine_score_moments(VP, score_fn, 3, EPS, stochastic=False)
  x, info = jax.jit(lambda key: sf.ode_sample(key, VP, score_fn, (NUM_SAMPLES, 3), dtype=jnp.float64))(
      jax.random.key(5))
  assert int(info.status) == 0
  # With the probability-flow ODE, DPS collapses one direction (predicted variance ~1e-11, against the exact
  # posterior's smallest eigenvalue of ~0.06): compare the samples with the prediction on the other two
  # eigendirections, and check the collapse itself.
  eigenvalues, eigenvectors = np.linalg.eigh(np.asarray(cov))
  assert eigenvalues[0] < 1e-9 * eigenvalues[-1] and eigenvalues[1] > 1e-3
  live = eigenvectors[:, 1:]
  projected = (np.asarray(x) - np.asarray(mean)) @ live
  assert_gaussian(projected, np.zeros(2), np.diag(eigenvalues[1:]), label="DPS vs its prediction")
  assert np.std(np.asarray(x) @ eigenvectors[:, 0]) < 1e-3
  bias_z = _max_z(x, posterior.mean, posterior.cov)
  assert bias_z > 2 * Z  # The bias is real and large at this n.
  _report("dps_ode_bias", predicted_mean_minus_posterior=np.round(np.asarray(mean - posterior.mean), 4).tolist(),
          predicted_std_over_posterior_std=np.round(np.sqrt(np.diag(cov) / np.diag(posterior.cov)), 4).tolist(),
          predicted_eigenvalues=np.round(eigenvalues, 12).tolist(),
          posterior_eigenvalues=np.round(np.linalg.eigvalsh(np.asarray(posterior.cov)), 4).tolist(),
          max_z_samples_vs_posterior=round(bias_z, 1),
          max_z_samples_vs_prediction_live=round(_max_z(projected, np.zeros(2), np.diag(eigenvalues[1:])), 2))


# --- Sampling: inpainting and colorization by replacement. ------------------------------------------------------

Y_OBSERVED = 0.7  # The observed first coordinate.


def _inpaint(prior, key, **options):
  options = dict(dict(predictor="euler_maruyama", corrector="none", num_steps=1000), **options)
  y = jnp.zeros((NUM_SAMPLES, 3)).at[:, 0].set(Y_OBSERVED)
  mask = jnp.array([[1, 0, 0]])
  return jax.jit(lambda key: inpaint_sample(key, VP, prior.score(VP), y, mask, **options))(key)


def _replacement_limit(prior):
  """The exact law of the unobserved coordinates when the score sees x_obs = alpha_t y (the continuous-time
  limit of replacement: the fresh observation noise of each step averages out)."""
  full_score = prior.score(VP)

  def score_u(x_u, t):
    x = jnp.concatenate([VP.alpha(t)[:, None] * Y_OBSERVED, x_u], axis=1)
    return full_score(x, t)[:, 1:]

  return affine_score_moments(VP, score_u, 2, EPS, stochastic=True, denoise=True)


def test_inpainting_is_exact_for_independent_coordinates():
  x, info = _inpaint(INDEPENDENT, jax.random.key(6))
  assert np.all(np.asarray(x[:, 0]) == Y_OBSERVED)
  posterior = INDEPENDENT.condition(jnp.array([[1.0, 0.0, 0.0]]), jnp.array([Y_OBSERVED]))
  assert_gaussian(x[:, 1:], posterior.mean[1:], posterior.cov[1:, 1:], label="independent inpainting")
  assert int(info.nfe) == 1001


def test_inpainting_is_biased_for_correlated_coordinates_as_predicted():
  x, _ = _inpaint(CORRELATED, jax.random.key(7))
  assert np.all(np.asarray(x[:, 0]) == Y_OBSERVED)
  posterior = CORRELATED.condition(jnp.array([[1.0, 0.0, 0.0]]), jnp.array([Y_OBSERVED]))
  mean, cov = _replacement_limit(CORRELATED)
  assert_gaussian(x[:, 1:], mean, cov, label="correlated inpainting vs replacement limit")
  bias_z = _max_z(x[:, 1:], posterior.mean[1:], posterior.cov[1:, 1:])
  assert bias_z > 2 * Z
  _report("inpainting_correlated_bias",
          predicted_mean_minus_posterior=np.round(np.asarray(mean - posterior.mean[1:]), 4).tolist(),
          predicted_var_over_posterior_var=np.round(np.diag(cov) / np.diag(posterior.cov[1:, 1:]), 3).tolist(),
          max_z_samples_vs_posterior=round(bias_z, 1),
          max_z_samples_vs_prediction=round(_max_z(x[:, 1:], mean, cov), 2))
  # The guidance-based alternative with a selection matrix is exact here (noise-free observation).
  A = jnp.array([[1.0, 0.0, 0.0]])
  score_fn = linear_inverse_score(CORRELATED.score(VP), VP, A, jnp.array([Y_OBSERVED]), 0.0)
  np.testing.assert_allclose(
      score_fn(jnp.ones((2, 3)), jnp.array([0.1, 0.6])),
      _perturbed_posterior_score(CORRELATED, VP, A, jnp.full((2, 1), Y_OBSERVED), 0.0, jnp.ones((2, 3)),
                                 jnp.array([0.1, 0.6])), rtol=1e-8)


def test_reconstruction_guidance_samples_its_predicted_law_and_reduces_the_replacement_bias():
  """Replacement + pigdm guidance (inpaint_sample(guidance="pigdm")) on correlated data: the samples match the law
  that its affine score implies (replacement limit, as above) and that law is closer to the posterior than
  replacement alone."""
  posterior = CORRELATED.condition(jnp.array([[1.0, 0.0, 0.0]]), jnp.array([Y_OBSERVED]))
  target_mean, target_cov = posterior.mean[1:], posterior.cov[1:, 1:]
  options = dict(guidance="pigdm", data_std=0.8)  # Not the default 1, so a dropped data_std is seen.
  x, _ = _inpaint(CORRELATED, jax.random.key(9), **options)
  assert np.all(np.asarray(x[:, 0]) == Y_OBSERVED)
  guided_prior = MaskedPrior(CORRELATED, **options)
  mean, cov = _replacement_limit(guided_prior)
  assert_gaussian(x[:, 1:], mean, cov, label="guided inpainting vs its replacement limit")
  plain_mean, plain_cov = _replacement_limit(CORRELATED)

  def distance(mean, cov):  # KL(law || posterior) of the unobserved coordinates.
    inverse = np.linalg.inv(np.asarray(target_cov))
    diff = np.asarray(target_mean - mean)
    return 0.5 * (np.trace(inverse @ cov) + diff @ inverse @ diff - 2 + np.log(np.linalg.det(target_cov) /
                                                                             np.linalg.det(cov)))

  guided_kl, plain_kl = distance(mean, cov), distance(plain_mean, plain_cov)
  assert guided_kl < 0.5 * plain_kl
  _report("reconstruction_guidance_correlated", kl_guided=round(float(guided_kl), 5),
          kl_replacement=round(float(plain_kl), 5),
          guided_mean_minus_posterior=np.round(np.asarray(mean - target_mean), 4).tolist(),
          max_z_samples_vs_prediction=round(_max_z(x[:, 1:], mean, cov), 2))


class MaskedPrior:
  """A prior whose `score(sde)` is the reconstruction-guided score of CORRELATED for the observation Y_OBSERVED
  of the first coordinate (what inpaint_sample(guidance=...) samples with)."""

  def __init__(self, prior, **options):
    self.prior, self.options = prior, options

  def score(self, sde):
    def score_fn(x, t):
      y = jnp.zeros_like(x).at[:, 0].set(Y_OBSERVED)
      return masked_inverse_score(self.prior.score(sde), sde, y, jnp.array([[1, 0, 0]]), method=self.options[
          "guidance"], data_std=self.options["data_std"])(x, t)
    return score_fn


def test_colorization_is_exact_when_grey_and_chroma_are_independent():
  """Sigma = a I + b 11^T is diagonal in the grey/chroma basis, so replacement samples the exact posterior."""
  prior = MultivariateGaussian(jnp.array([0.2, -0.3, 0.5]), 0.3 * jnp.eye(3) + 0.5 * jnp.ones((3, 3)))
  grey = jnp.full((NUM_SAMPLES, 1), 0.25)
  x, _ = jax.jit(lambda key: colorize_sample(key, VP, prior.score(VP), grey, predictor="euler_maruyama",
                                             corrector="none", num_steps=1000))(jax.random.key(8))
  np.testing.assert_allclose(x.mean(1), 0.25, rtol=0, atol=1e-15)
  posterior = prior.condition(jnp.ones((1, 3)) / 3, jnp.array([0.25]))
  q = color_decoupling_matrix(jnp.float64)
  chroma_mean, chroma_cov = (q @ posterior.mean)[1:], (q @ posterior.cov @ q.T)[1:, 1:]
  assert_gaussian(decouple_colors(x)[:, 1:], chroma_mean, chroma_cov, label="colorization chroma")


# --- Exact preservation, jit hygiene, vmap, every sampler. ------------------------------------------------------

def test_inpainting_preserves_observed_pixels_bitwise_for_every_predictor_and_corrector():
  prior = MultivariateGaussian(jnp.zeros(4, jnp.float32), jnp.eye(4, dtype=jnp.float32))
  y = jax.random.normal(jax.random.key(0), (3, 2, 2), jnp.float32)
  mask = jnp.array([[[1, 0], [0, 1]]])

  def score_fn(x, t):
    return prior.score(VP)(x.reshape(3, 4), t).reshape(x.shape)

  # Op by op (24 tiny programs compile slower than they run); jit is covered by the other tests.
  with jax.disable_jit():
    results = {(p, c, denoise): inpaint_sample(jax.random.key(1), VP, score_fn, y, mask, predictor=p, corrector=c,
                                               num_steps=3, n_corrector_steps=2, denoise=denoise)[0]
               for p in sampling.PREDICTORS for c in sampling.CORRECTORS for denoise in (True, False)}

  for (p, c, denoise), x in results.items():
    assert x.dtype == jnp.float32 and np.all(np.isfinite(x)), (p, c)
    assert np.array_equal(np.asarray(x)[:, 0, 0], np.asarray(y)[:, 0, 0]), (p, c)
    assert np.array_equal(np.asarray(x)[:, 1, 1], np.asarray(y)[:, 1, 1]), (p, c)
    if p != "none" or c != "none":
      assert not np.array_equal(np.asarray(x)[:, 0, 1], np.asarray(y)[:, 0, 1]), (p, c)


def test_colorization_keeps_the_grey_channel_in_float32():
  prior = MultivariateGaussian(jnp.zeros(3, jnp.float32), jnp.eye(3, dtype=jnp.float32))
  grey = jax.random.uniform(jax.random.key(0), (16, 1), jnp.float32, -1, 1)
  for p in ("reverse_diffusion", "ancestral"):
    x, _ = colorize_sample(jax.random.key(1), VP, prior.score(VP), grey, predictor=p, num_steps=20)
    assert x.dtype == jnp.float32 and x.shape == (16, 3)
    # Latent grey channel exact; pixel-space channel mean within float32 round-off of a 3x3 product.
    np.testing.assert_allclose(np.asarray(x).mean(1, dtype=np.float64), np.asarray(grey)[:, 0], rtol=0, atol=1e-6)


def test_jit_does_not_recompile_and_vmap_over_keys():
  traces = []

  def score_fn(x, t):
    traces.append(1)
    return -x

  y, mask = jnp.ones((4, 3)), jnp.array([[1, 0, 1]])
  run = jax.jit(lambda key, y: inpaint_sample(key, VP, score_fn, y, mask, num_steps=5))
  first, _ = run(jax.random.key(0), y)
  count = len(traces)
  second, _ = run(jax.random.key(1), 2 * y)  # New key and new observation: same program.
  assert len(traces) == count and run._cache_size() == 1
  assert not np.array_equal(first[:, 1], second[:, 1]) and np.all(second[:, 0] == 2)
  batched, info = jax.vmap(lambda key: inpaint_sample(key, VP, score_fn, y, mask, num_steps=5))(
      jax.random.split(jax.random.key(2), 3))
  assert batched.shape == (3, 4, 3) and np.all(batched[..., 0] == 1) and np.all(batched[..., 2] == 1)
  assert not np.array_equal(batched[0], batched[1]) and info.nfe.shape == (3,)
  colorize = jax.jit(lambda key, grey: colorize_sample(key, VP, lambda x, t: -x, grey, num_steps=5))
  colorize(jax.random.key(0), jnp.zeros((2, 1)))
  colorize(jax.random.key(1), jnp.ones((2, 1)))
  assert colorize._cache_size() == 1


@pytest.mark.parametrize("sampler, options", [
    (sf.pc_sample, dict(num_steps=5)), (sf.ode_sample, dict(method="euler", num_steps=5)),
    (sf.ddim_sample, dict(num_steps=5)), (sf.edm_sample, dict(num_steps=5)),
    (sf.dpm_solver_pp_sample, dict(num_steps=5))], ids=["pc", "ode", "ddim", "edm", "dpm"])
def test_guided_scores_run_in_every_sampler(sampler, options):
  lgm = _single_gaussian_classes()
  classifier = lgm.log_prob_label_t(VP)
  labels = jnp.array([0, 1, 1, 0])
  scores = [classifier_free_score(lgm.conditional_score(VP), labels, 1.0),
            classifier_guided_score(lgm.mixture.score(VP), lambda x, t: classifier(x, t, labels), 2.0),
            linear_inverse_score(lgm.mixture.score(VP), VP, jnp.array([[1.0, 0.0]]), jnp.array([0.5]), 0.1)]
  samples = jax.jit(lambda key: [sampler(key, VP, score_fn, (4, 2), **options)[0] for score_fn in scores])(
      jax.random.key(0))
  for x in samples:
    assert x.shape == (4, 2) and np.all(np.isfinite(x))


# --- Bad input. -------------------------------------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
  key, y = jax.random.key(0), jnp.zeros((4, 3))
  score_fn = lambda x, t: -x  # noqa: E731
  with pytest.raises(ValueError, match="mask must have the shape of x_observed"):
    inpaint_sample(key, VP, score_fn, y, jnp.ones((4, 2)), num_steps=2)
  with pytest.raises(ValueError, match="mask must have the shape of x_observed"):
    inpaint_sample(key, VP, score_fn, y, jnp.ones(3), num_steps=2)
  with pytest.raises(ValueError, match="mask must be binary"):
    inpaint_sample(key, VP, score_fn, y, jnp.full((4, 3), 0.5), num_steps=2)
  with pytest.raises(ValueError, match="unknown predictor"):
    inpaint_sample(key, VP, score_fn, y, jnp.ones((4, 3)), predictor="heun", num_steps=2)
  with pytest.raises(ValueError, match="num_steps must be a Python int"):
    inpaint_sample(key, VP, score_fn, y, jnp.ones((4, 3)), num_steps=0)
  with pytest.raises(ValueError, match=r"snr must be a scalar in \(0"):
    inpaint_sample(key, VP, score_fn, y, jnp.ones((4, 3)), num_steps=2, snr=-1.0)
  with pytest.raises(ValueError, match="eps"):
    inpaint_sample(key, VP, score_fn, y, jnp.ones((4, 3)), num_steps=2, eps=2.0)
  with pytest.raises(ValueError, match="grey must have shape"):
    colorize_sample(key, VP, score_fn, jnp.zeros((4, 3)), num_steps=2)
  cond = lambda x, t, label: -x  # noqa: E731
  with pytest.raises(ValueError, match="label must be an integer"):
    classifier_free_score(cond, 1.0, 1.0)
  with pytest.raises(ValueError, match="label must be an integer"):
    classifier_free_score(cond, jnp.zeros((2, 2), jnp.int32), 1.0)
  with pytest.raises(ValueError, match="label has shape"):
    classifier_free_score(cond, jnp.zeros(3, jnp.int32), 1.0)(y, jnp.ones(4))
  with pytest.raises(ValueError, match="null_label must be a Python int"):
    classifier_free_score(cond, 0, 1.0, null_label=None)
  with pytest.raises(ValueError, match="guidance_scale must be"):
    classifier_free_score(cond, 0, jnp.ones(3))(y, jnp.ones(4))
  with pytest.raises(ValueError, match="t must be a scalar or have shape"):
    classifier_free_score(cond, 0, 1.0)(y, jnp.ones(3))
  with pytest.raises(ValueError, match="one log-probability per example"):
    classifier_guided_score(score_fn, lambda x, t: jnp.sum(x), 1.0)(y, jnp.ones(4))
  with pytest.raises(ValueError, match="must return the shape of x"):
    conditional_score(score_fn, lambda x, t: x[:, :1])(y, jnp.ones(4))
  with pytest.raises(ValueError, match="unknown method"):
    linear_inverse_score(score_fn, VP, jnp.ones((1, 3)), jnp.ones(1), 0.1, method="ddrm")
  with pytest.raises(ValueError, match="A must be a matrix"):
    linear_inverse_score(score_fn, VP, jnp.ones(3), jnp.ones(1), 0.1)
  with pytest.raises(ValueError, match="y must have shape"):
    linear_inverse_score(score_fn, VP, jnp.ones((2, 3)), jnp.ones(3), 0.1)
  with pytest.raises(ValueError, match="noise_std must be a scalar >= 0"):
    linear_inverse_score(score_fn, VP, jnp.ones((1, 3)), jnp.ones(1), -0.1)
  with pytest.raises(ValueError, match="'dps' needs noise_std > 0"):
    linear_inverse_score(score_fn, VP, jnp.ones((1, 3)), jnp.ones(1), 0.0, method="dps")
  with pytest.raises(ValueError, match="choose 'pigdm' or 'dps'"):
    masked_inverse_score(score_fn, VP, y, jnp.ones((1, 3)), method="tweedie")
  with pytest.raises(ValueError, match="mask must be binary"):
    masked_inverse_score(score_fn, VP, y, jnp.full((1, 3), 0.5))
  with pytest.raises(ValueError, match="'dps' needs noise_std > 0"):
    masked_inverse_score(score_fn, VP, y, jnp.ones((1, 3)), method="dps")
  with pytest.raises(ValueError, match="t_max must be a positive time"):
    masked_inverse_score(score_fn, VP, y, jnp.ones((1, 3)), t_max=0.0)
  with pytest.raises(ValueError, match="x has shape"):
    masked_inverse_score(score_fn, VP, y, jnp.ones((1, 3)))(jnp.zeros((2, 3)), jnp.ones(2))
  with pytest.raises(ValueError, match="unknown method"):
    inpaint_sample(key, VP, score_fn, y, jnp.ones((1, 3)), num_steps=2, guidance="ddrm")
  with pytest.raises(ValueError, match="A has 2 columns"):
    linear_inverse_score(score_fn, VP, jnp.ones((1, 2)), jnp.ones(1), 0.1)(y, jnp.ones(4))
