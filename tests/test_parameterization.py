"""Parameterizations: exact round trips and agreement with closed-form posterior means."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoreflow as sf
from scoreflow.testing import GaussianMixture

SDES = {
    "vp": sf.VPSDE(),
    "subvp": sf.SubVPSDE(),
    "ve": sf.VESDE(),
    "cosine": sf.CosineVPSDE(),
}
PARAMETERIZATIONS = {
    "score": sf.ScoreParameterization(),
    "eps": sf.EpsilonParameterization(),
    "x0": sf.DataParameterization(),
    "v": sf.VParameterization(),
    "edm": sf.EDMPreconditioning(sigma_data=0.5),
}


@pytest.fixture(params=list(SDES), ids=list(SDES))
def sde(request):
  return SDES[request.param]


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
def test_round_trips_are_exact(sde, name, getkey):
  parameterization = PARAMETERIZATIONS[name]
  x = jax.random.normal(getkey(), (6, 3))
  t = jnp.linspace(0.05, 0.95, 6) * sde.T
  output = jax.random.normal(getkey(), (6, 3))
  score = parameterization.to_score(sde, output, x, t)
  np.testing.assert_allclose(parameterization.from_score(sde, score, x, t), output, rtol=1e-8, atol=1e-9)
  np.testing.assert_allclose(parameterization.to_score(sde, parameterization.from_score(sde, score, x, t), x, t),
                             score, rtol=1e-8, atol=1e-9)


def _gaussian_posterior_means(data, sde, x, t):
  """E[eps | x_t] and E[x0 | x_t] for Gaussian data N(mu, s^2), computed directly from the joint Gaussian."""
  mu, s2 = data.means[:1], data.stds[:1] ** 2
  alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
  var = alpha**2 * s2 + sigma**2
  residual = x - alpha * mu
  return sigma * residual / var, mu + alpha * s2 * residual / var


def test_outputs_of_a_perfect_network_are_posterior_means(sde, getkey):
  """A network trained to optimality predicts E[eps|x_t], E[x0|x_t], and v = alpha E[eps] - sigma E[x0]."""
  data = GaussianMixture.gaussian(jnp.array([1.0, -2.0, 0.5]), jnp.array([0.5, 2.0, 1.0]))
  t = jnp.linspace(0.05, 0.95, 8) * sde.T
  x_t, _ = sde.sample_marginal(getkey(), data.sample(getkey(), 8), t)
  score = data.score(sde)(x_t, t)
  eps_mean, x0_mean = _gaussian_posterior_means(data, sde, x_t, t)
  np.testing.assert_allclose(sf.EpsilonParameterization().from_score(sde, score, x_t, t), eps_mean, rtol=1e-9)
  np.testing.assert_allclose(sf.DataParameterization().from_score(sde, score, x_t, t), x0_mean, rtol=1e-9)
  alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
  np.testing.assert_allclose(sf.VParameterization().from_score(sde, score, x_t, t),
                             alpha * eps_mean - sigma * x0_mean, rtol=1e-8, atol=1e-10)
  # EDM: the preconditioned denoiser D = c_skip x~ + c_out F is the posterior mean of x0.
  edm = sf.EDMPreconditioning(sigma_data=0.5)
  F = edm.from_score(sde, score, x_t, t)
  c_skip, c_out, _, _, alpha_t = edm.coefficients(sde, t)
  denoised = (c_skip / alpha_t)[:, None] * x_t + c_out[:, None] * F
  np.testing.assert_allclose(denoised, x0_mean, rtol=1e-9)


def test_edm_coefficients_match_karras_table_1():
  """For the VE process (alpha = 1) the coefficients are EDM's, as functions of sigma."""
  sde = sf.VESDE(sigma_min=0.002, sigma_max=80.0)
  t = jnp.linspace(0.1, 1.0, 5)
  sigma, sd = sde.sigma(t), 0.5
  c_skip, c_out, c_in, c_noise, alpha = sf.EDMPreconditioning(sigma_data=sd).coefficients(sde, t)
  np.testing.assert_allclose(alpha, 1.0)
  np.testing.assert_allclose(c_skip, sd**2 / (sigma**2 + sd**2), rtol=1e-12)
  np.testing.assert_allclose(c_out, sigma * sd / np.sqrt(sigma**2 + sd**2), rtol=1e-12)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma**2 + sd**2), rtol=1e-12)
  np.testing.assert_allclose(c_noise, np.log(sigma) / 4, rtol=1e-12)


@pytest.mark.parametrize("name", ["vp", "subvp"])
def test_edm_coefficients_on_vp_and_subvp_match_karras_table_1(name, getkey):
  """On VP and sub-VP the coefficients are Table 1's EDM column at the scaled level sigma~ = sigma_t / alpha_t,
  with Table 1's VP schedule sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) and scaling
  s(t) = 1 / sqrt(1 + sigma(t)^2); for sub-VP, sigma~ = (1 - e^{-B}) / e^{-B/2} = 2 sinh(B/2) and
  alpha = e^{-B/2}, with B(t) = beta_min t + beta_d t^2 / 2 (Song et al. 2021, Eq. 29 and Appendix B)."""
  sde = {"vp": sf.VPSDE(beta_min=0.1, beta_max=20.0), "subvp": sf.SubVPSDE(beta_min=0.1, beta_max=20.0)}[name]
  t = np.linspace(0.02, 1.0, 7)
  integrated_beta = 0.1 * t + 0.5 * 19.9 * t**2
  if name == "vp":
    sigma = np.sqrt(np.exp(integrated_beta) - 1)
    scale = 1 / np.sqrt(1 + sigma**2)
  else:
    sigma, scale = 2 * np.sinh(integrated_beta / 2), np.exp(-integrated_beta / 2)
  sd = 0.5
  edm = sf.EDMPreconditioning(sigma_data=sd)
  c_skip, c_out, c_in, c_noise, alpha = edm.coefficients(sde, jnp.asarray(t))
  np.testing.assert_allclose(alpha, scale, rtol=1e-12)
  np.testing.assert_allclose(c_skip, sd**2 / (sigma**2 + sd**2), rtol=1e-11)
  np.testing.assert_allclose(c_out, sigma * sd / np.sqrt(sigma**2 + sd**2), rtol=1e-11)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma**2 + sd**2), rtol=1e-11)
  np.testing.assert_allclose(c_noise, np.log(sigma) / 4, rtol=1e-11, atol=1e-13)
  # The network sees c_in x / alpha and c_noise; its output F maps to D = c_skip x / alpha + c_out F.
  x, output = jax.random.normal(getkey(), (7, 3)), jax.random.normal(getkey(), (7, 3))
  x_in, noise_in = edm.network_inputs(sde, x, jnp.asarray(t))
  np.testing.assert_allclose(x_in, (c_in / alpha)[:, None] * x, rtol=1e-12)
  np.testing.assert_allclose(noise_in, c_noise, rtol=1e-12)
  denoised = ((sd**2 / (sigma**2 + sd**2) / scale)[:, None] * x
              + (sigma * sd / np.sqrt(sigma**2 + sd**2))[:, None] * output)
  np.testing.assert_allclose(sf.score_to_x0(sde, edm.to_score(sde, output, x, jnp.asarray(t)), x, jnp.asarray(t)),
                             denoised, rtol=1e-10, atol=1e-12)


def test_edm_network_input_has_unit_variance_for_data_of_variance_sigma_data(getkey):
  """c_in makes Var(c_in x~) = 1 when the data has std sigma_data (the point of the preconditioning)."""
  sde, sd = sf.VPSDE(), 0.5
  x0 = sd * jax.random.normal(getkey(), (20000, 4))
  for t_value in (0.05, 0.5, 0.95):
    t = jnp.full((20000,), t_value)
    x_t, _ = sde.sample_marginal(getkey(), x0, t)
    x_in, _ = sf.EDMPreconditioning(sigma_data=sd).network_inputs(sde, x_t, t)
    # Sample variance of 80000 unit-variance values: standard error sqrt(2 / 80000) = 0.005.
    np.testing.assert_allclose(jnp.var(x_in), 1.0, atol=0.025)


def test_noise_conditioning(getkey):
  sde = sf.VPSDE()
  t = jnp.array([0.0, 0.25, 1.0])
  np.testing.assert_allclose(sf.NoiseConditioning("time", scale=999.0)(sde, t), 999 * t)
  np.testing.assert_allclose(sf.NoiseConditioning("sigma")(sde, t), sde.sigma(t))
  np.testing.assert_allclose(sf.NoiseConditioning("log_sigma")(sde, t[1:]), jnp.log(sde.sigma(t[1:])))
  np.testing.assert_allclose(sf.NoiseConditioning("log_snr")(sde, t[1:]), sde.log_snr(t[1:]))
  index = sf.NoiseConditioning("index", num_steps=1000)(sde, t)
  assert index.dtype == jnp.int32
  np.testing.assert_array_equal(index, [0, 250, 999])
  with pytest.raises(ValueError, match=r"NoiseConditioning: kind must be one of .* got 'sigmas'"):
    sf.NoiseConditioning("sigmas")
  with pytest.raises(ValueError, match=r"EDMPreconditioning: expected sigma_data > 0"):
    sf.EDMPreconditioning(sigma_data=0.0)


def test_make_score_fn_is_pure_and_differentiable(getkey):
  sde = sf.VPSDE()
  parameterization = sf.EpsilonParameterization()
  apply_fn = lambda params, x, cond: params["w"] * x + params["b"] * cond[:, None]
  params = {"w": jnp.float64(0.3), "b": jnp.float64(1e-3)}
  x = jax.random.normal(getkey(), (4, 2))
  t = jnp.linspace(0.1, 0.9, 4)

  def loss(params):
    score_fn = sf.make_score_fn(apply_fn, params, sde, parameterization)
    return jnp.sum(score_fn(x, t) ** 2)

  score = sf.make_score_fn(apply_fn, params, sde, parameterization)(x, t)
  expected = -(0.3 * x + 1e-3 * 999 * t[:, None]) / sde.sigma(t)[:, None]
  np.testing.assert_allclose(score, expected, rtol=1e-12)
  grads = jax.jit(jax.grad(loss))(params)
  eps_grad = jax.grad(lambda w: jnp.sum((-(w * x + 1e-3 * 999 * t[:, None]) / sde.sigma(t)[:, None]) ** 2))(0.3)
  np.testing.assert_allclose(grads["w"], eps_grad, rtol=1e-10)
  # A scalar time is broadcast over the batch before reaching the network.
  np.testing.assert_allclose(sf.make_score_fn(apply_fn, params, sde, parameterization)(x, 0.5),
                             sf.make_score_fn(apply_fn, params, sde, parameterization)(x, jnp.full((4,), 0.5)))


@pytest.mark.parametrize("name", list(PARAMETERIZATIONS))
def test_float32_stays_float32(name):
  sde = sf.VPSDE()
  parameterization = PARAMETERIZATIONS[name]
  x = jnp.ones((2, 3), jnp.float32)
  t = jnp.array([0.3, 0.7], jnp.float32)
  assert parameterization.to_score(sde, x, x, t).dtype == jnp.float32
  assert parameterization.from_score(sde, x, x, t).dtype == jnp.float32
  x_in, _ = parameterization.network_inputs(sde, x, t)
  assert x_in.dtype == jnp.float32
