"""Deterministic samplers converge at their order, and the samplers agree where the mathematics says they must.

Convergence: with a fixed batch of prior draws and the exact score of a 2-D Gaussian mixture (float64), the terminal
error of each fixed-step sampler against a tight-tolerance adaptive solve (Dormand-Prince, rtol = atol = 1e-10, so
its own error is ~1e-9, far below the smallest sampler error ~1e-4) is measured over step-count doublings, and the
least-squares slope of log2(error) against log2(N) must equal minus the method's order within 0.2. The error is
C h^p (1 + O(h)), so the fitted slope tends to p as h -> 0 with an O(h) offset; at the step counts used the fits lie
within 0.15 of p (on VP: Euler 0.99, Heun 1.90, DDIM 1.12, DPM-Solver++ 2M 1.88, EDM 2.11), and a band of 0.2
still separates order p from p +- 1 by a wide margin.

Invariants (float64, to rounding): DDIM with eta = 0 is the Euler method for the probability-flow ODE in
(x / alpha, sigma / alpha); DPM-Solver++ of order 1 is DDIM; the ancestral predictor on a VP process whose schedule
matches a DDPM chain is that chain's posterior update, and on a VE process the SMLD posterior update; DDIM with
eta = 1 is the ancestral predictor.
"""

import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import scoreflow as sf
from scoreflow import sampling
from scoreflow.parameterization import score_to_eps, score_to_x0
from scoreflow.sde import AbstractVPSDE
from scoreflow.testing import GaussianMixture

F64 = jnp.float64
BATCH = 64
EPS = 1e-3
ORDER_TOLERANCE = 0.2
MIXTURE = GaussianMixture(jnp.array([0.5, 0.3, 0.2]), jnp.array([[-2.5, 0.0], [2.5, 0.0], [0.0, 3.0]]),
                          jnp.array([[0.4, 0.4], [0.3, 0.5], [0.5, 0.3]]))
PROCESSES = {"vp": sf.VPSDE(), "ve": sf.VESDE()}
# These programs are small and run once: compile time dominates, so they are compiled with XLA's cheap settings.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_jit(fn):
  return jax.jit(fn, compiler_options=FAST_COMPILE)


def _prior_draw(sde):
  return sde.prior_sample(jax.random.key(3), (BATCH, 2), F64)


@functools.lru_cache(maxsize=None)
def _reference(process):
  """The probability-flow ODE from `_prior_draw` solved to eps with rtol = atol = 1e-10."""
  sde = PROCESSES[process]
  x, info = fast_jit(lambda x_T: sampling.ode_sample(
      jax.random.key(0), sde, MIXTURE.score(sde), (BATCH, 2), method="dopri5", rtol=1e-10, atol=1e-10,
      max_steps=100_000, eps=EPS, dtype=F64, x_T=x_T))(_prior_draw(sde))
  assert int(info.status) == 0
  return x


def _tweedie(sde, x, t):
  t = jnp.full((x.shape[0],), t, x.dtype)
  return score_to_x0(sde, MIXTURE.score(sde)(x, t), x, t)


def _sample(sde, method, num_steps, x_T):
  score_fn, key = MIXTURE.score(sde), jax.random.key(0)
  common = dict(eps=EPS, dtype=F64, x_T=x_T)
  if method in ("euler", "heun"):
    return sampling.ode_sample(key, sde, score_fn, (BATCH, 2), method=method, num_steps=num_steps, **common)[0]
  if method == "ddim":
    return sampling.ddim_sample(key, sde, score_fn, (BATCH, 2), num_steps=num_steps, **common)[0]
  if method.startswith("dpm2m"):
    spacing = "uniform" if method.endswith("uniform") else "log_snr"
    return sampling.dpm_solver_pp_sample(key, sde, score_fn, (BATCH, 2), num_steps=num_steps, order=2,
                                         spacing=spacing, **common)[0]
  if method == "edm":
    return sampling.edm_sample(key, sde, score_fn, (BATCH, 2), num_steps=num_steps, **common)[0]
  raise ValueError(method)


@pytest.mark.parametrize("process, method, order, step_counts", [
    ("vp", "euler", 1, (64, 128, 256)),
    ("vp", "heun", 2, (32, 64, 128)),
    ("vp", "ddim", 1, (64, 128, 256)),
    ("vp", "dpm2m-logsnr", 2, (32, 64, 128)),
    ("vp", "edm", 2, (16, 32, 64)),
    pytest.param("vp", "dpm2m-uniform", 2, (64, 128, 256), marks=pytest.mark.slow),
    pytest.param("ve", "heun", 2, (32, 64, 128), marks=pytest.mark.slow),
    pytest.param("ve", "ddim", 1, (64, 128, 256), marks=pytest.mark.slow),
    pytest.param("ve", "dpm2m-logsnr", 2, (64, 128, 256), marks=pytest.mark.slow),
    pytest.param("ve", "edm", 2, (16, 32, 64), marks=pytest.mark.slow),
])
def test_convergence_order(process, method, order, step_counts):
  sde = PROCESSES[process]
  x_T = _prior_draw(sde)
  reference = _reference(process)
  if method == "edm":  # EDM ends with an Euler step to sigma = 0 from sigma(eps): Tweedie's denoiser at eps.
    reference = _tweedie(sde, reference, EPS)
  errors = [float(jnp.max(jnp.abs(fast_jit(lambda x_T: _sample(sde, method, n, x_T))(x_T) - reference)))
            for n in step_counts]
  slope = np.polyfit(np.log2(step_counts), np.log2(errors), 1)[0]
  assert abs(-slope - order) < ORDER_TOLERANCE, f"errors {errors}: observed order {-slope:.3f}, expected {order}"


# --- Invariants. -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("process, spacing", [
    ("vp", "uniform"), ("ve", "log_snr"),
    pytest.param("vp", "log_snr", marks=pytest.mark.slow), pytest.param("ve", "uniform", marks=pytest.mark.slow)])
def test_ddim_is_euler_in_scaled_variables_and_equals_dpm_solver_order_one(process, spacing):
  sde = PROCESSES[process]
  score_fn = MIXTURE.score(sde)
  num_steps, key = 12, jax.random.key(5)

  def all_three(x_T):
    # Euler for dx_bar / dsigma_bar = eps_hat(x, t), with x_bar = x / alpha and sigma_bar = sigma / alpha.
    def euler_step(x, times):
      t, t_next = jnp.full((BATCH,), times[0]), jnp.full((BATCH,), times[1])
      eps_hat = score_to_eps(sde, score_fn(x, t), t)
      sigma_bar, sigma_bar_next = sde.sigma(t) / sde.alpha(t), sde.sigma(t_next) / sde.alpha(t_next)
      x_bar = x / sde.alpha(t)[:, None] + (sigma_bar_next - sigma_bar)[:, None] * eps_hat
      return sde.alpha(t_next)[:, None] * x_bar, None

    times = sampling.time_grid(sde, num_steps, EPS, spacing, F64)
    x, _ = jax.lax.scan(euler_step, x_T, jnp.stack([times[:-1], times[1:]], axis=1))
    ddim = sampling.ddim_sample(key, sde, score_fn, (BATCH, 2), num_steps=num_steps, eta=0.0, spacing=spacing,
                                eps=EPS, dtype=F64, x_T=x_T)
    dpm1 = sampling.dpm_solver_pp_sample(key, sde, score_fn, (BATCH, 2), num_steps=num_steps, order=1,
                                         spacing=spacing, eps=EPS, dtype=F64, x_T=x_T)
    return x, ddim, dpm1

  euler, (ddim, ddim_info), (dpm1, dpm_info) = fast_jit(all_three)(_prior_draw(sde))
  np.testing.assert_allclose(ddim, euler, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(dpm1, ddim, rtol=1e-10, atol=1e-10)
  assert int(ddim_info.nfe) == int(dpm_info.nfe) == num_steps


class _ChainMatchedVPSDE(AbstractVPSDE):
  """A VP process whose integrated beta interpolates a DDPM chain: B(i / N) = -log alphabar_{i-1}, B(0) = 0."""

  def __init__(self, chain: sf.DDPMChain):
    self.knots_t = jnp.linspace(0.0, 1.0, chain.num_steps + 1)
    self.knots_B = jnp.concatenate([jnp.zeros(1), -chain.log_alphas_cumprod])

  @property
  def T(self):
    return 1.0

  def beta(self, t):
    index = jnp.clip(jnp.floor(t * (len(self.knots_t) - 1)).astype(int), 0, len(self.knots_t) - 2)
    return (self.knots_B[index + 1] - self.knots_B[index]) * (len(self.knots_t) - 1)

  def integrated_beta(self, t):
    return jnp.interp(t, self.knots_t, self.knots_B)

  def t_from_integrated_beta(self, integrated_beta):
    return jnp.interp(integrated_beta, self.knots_B, self.knots_t)


def test_ancestral_vp_predictor_is_the_ddpm_posterior_update():
  chain = sf.DDPMChain(num_steps=50)
  sde = _ChainMatchedVPSDE(chain)
  score_fn = MIXTURE.score(sde)
  levels = jnp.arange(chain.num_steps)  # One example per level i, stepping from t = (i+1)/N to i/N.
  t, t_next = chain.time(levels), levels / chain.num_steps
  key = jax.random.key(1)

  def both(x):
    x_next, x_mean = sampling.ancestral_predictor(key, sde, score_fn, x, t, t_next)
    # Ho et al. (2020): x0_hat from the chain's own marginals, then q(x_{i-1} | x_i, x0_hat).
    mean_coefficient, std = chain.marginal(jnp.ones_like(x), levels)
    eps_hat = score_to_eps(sde, score_fn(x, t), t)
    x0_hat = (x - std[:, None] * eps_hat) / mean_coefficient
    ddpm_mean, ddpm_std = chain.posterior(x0_hat, x, levels)
    ddpm_next = ddpm_mean + ddpm_std[:, None] * jax.random.normal(key, x.shape, F64)
    return x_next, x_mean, ddpm_next, ddpm_mean, ddpm_std, std

  x = jax.random.normal(jax.random.key(0), (chain.num_steps, 2), F64)
  x_next, x_mean, ddpm_next, ddpm_mean, ddpm_std, chain_std = fast_jit(both)(x)
  np.testing.assert_allclose(chain_std, sde.sigma(t), rtol=1e-12)  # The process matches the chain.
  np.testing.assert_allclose(x_mean, ddpm_mean, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(x_next, ddpm_next, rtol=1e-9, atol=1e-12)
  assert float(ddpm_std[0]) == 0.0  # Level 0 steps to the data: no noise.


def test_ancestral_ve_predictor_is_the_smld_posterior_update():
  sde = PROCESSES["ve"]
  score_fn = MIXTURE.score(sde)
  t = jnp.linspace(0.05, 1.0, BATCH)
  t_next = t - 0.01

  def both(x):
    _, x_mean = sampling.ancestral_predictor(jax.random.key(1), sde, score_fn, x, t, t_next)
    _, std = sampling.ancestral_posterior(sde, x, x, t, t_next)
    s2, prev_s2 = sde.sigma(t) ** 2, sde.sigma(t_next) ** 2  # SMLD posterior with the exact noise levels.
    x0_hat = x + s2[:, None] * score_fn(x, t)
    smld_mean = x0_hat + (prev_s2 / s2)[:, None] * (x - x0_hat)
    return x_mean, smld_mean, std, jnp.sqrt(prev_s2 * (s2 - prev_s2) / s2)

  x_mean, smld_mean, std, smld_std = fast_jit(both)(jax.random.normal(jax.random.key(0), (BATCH, 2), F64) * 3)
  np.testing.assert_allclose(x_mean, smld_mean, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(std, smld_std, rtol=1e-10)


@pytest.mark.parametrize("process", ["vp", "ve"])
def test_ddim_with_eta_one_is_the_ancestral_predictor(process):
  sde = PROCESSES[process]
  score_fn = MIXTURE.score(sde)
  x = sde.prior_sample(jax.random.key(0), (BATCH, 2), F64) * 0.1
  t = jnp.linspace(0.05, 1.0, BATCH)
  t_next = t * 0.9
  key = jax.random.key(2)
  ddim, ancestral = fast_jit(lambda x: (sampling.ddim_step(key, sde, score_fn, x, t, t_next, eta=1.0),
                                        sampling.ancestral_predictor(key, sde, score_fn, x, t, t_next)))(x)
  np.testing.assert_allclose(ddim[0], ancestral[0], rtol=1e-9, atol=1e-10)
  np.testing.assert_allclose(ddim[1], ancestral[1], rtol=1e-9, atol=1e-10)
