"""The forward processes against their defining equations, simulation, and the discrete chains."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoreflow as sf

CONTINUOUS_SDES = {
    "vp": sf.VPSDE(beta_min=0.1, beta_max=20.0),
    "subvp": sf.SubVPSDE(beta_min=0.1, beta_max=20.0),
    "ve": sf.VESDE(sigma_min=0.01, sigma_max=50.0),
    # The 2021 code's VE kernel: the same SDE started from data perturbed at sigma_min (sigma(0) = sigma_min).
    "ve_reference": sf.VESDE(sigma_min=0.01, sigma_max=50.0, kernel="reference"),
    "cosine": sf.CosineVPSDE(),
}


@pytest.fixture(params=list(CONTINUOUS_SDES), ids=list(CONTINUOUS_SDES))
def sde(request):
  return CONTINUOUS_SDES[request.param]


def _times(sde, n=257, lo=1e-4):
  return jnp.linspace(lo, sde.T, n, dtype=jnp.float64)


def test_coefficients_are_the_derivatives_of_the_kernel(sde):
  """f = d log(alpha)/dt and g^2 = d sigma^2/dt - 2 f sigma^2, by forward-mode autodiff in float64."""
  t = _times(sde)
  ones = jnp.ones_like(t)
  _, dlog_alpha = jax.jvp(sde.log_alpha, (t,), (ones,))
  _, dsigma2 = jax.jvp(lambda t: sde.sigma(t) ** 2, (t,), (ones,))
  np.testing.assert_allclose(sde.f(t), dlog_alpha, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(sde.g2(t), dsigma2 - 2 * sde.f(t) * sde.sigma(t) ** 2, rtol=1e-7, atol=1e-12)
  np.testing.assert_allclose(sde.diffusion(t) ** 2, sde.g2(t), rtol=1e-12)


def test_closed_forms_given_in_the_paper():
  t = jnp.linspace(0.0, 1.0, 11, dtype=jnp.float64)
  vp = CONTINUOUS_SDES["vp"]
  log_mean = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
  np.testing.assert_allclose(vp.log_alpha(t), log_mean, rtol=1e-12)
  np.testing.assert_allclose(vp.sigma(t), np.sqrt(1 - np.exp(2 * log_mean)), rtol=1e-12)
  np.testing.assert_allclose(vp.g2(t), 0.1 + t * (20.0 - 0.1), rtol=1e-12)
  subvp = CONTINUOUS_SDES["subvp"]
  np.testing.assert_allclose(subvp.sigma(t), 1 - np.exp(2 * log_mean), rtol=1e-12)
  np.testing.assert_allclose(subvp.g2(t), (0.1 + t * 19.9) * (1 - np.exp(-2 * 0.1 * t - 19.9 * t**2)), rtol=1e-12)
  ve = CONTINUOUS_SDES["ve"]
  schedule = 0.01 * (50.0 / 0.01) ** t
  np.testing.assert_allclose(ve.sigma_schedule(t), schedule, rtol=1e-12)
  np.testing.assert_allclose(ve.diffusion(t), schedule * np.sqrt(2 * np.log(50.0 / 0.01)), rtol=1e-12)
  np.testing.assert_allclose(ve.sigma(t), np.sqrt(schedule**2 - 0.01**2), rtol=1e-9, atol=1e-15)
  # The 2021 code's kernel: sigma(t) = sigma_min (sigma_max / sigma_min)^t itself (its marginal_prob), the same g.
  reference = CONTINUOUS_SDES["ve_reference"]
  np.testing.assert_allclose(reference.sigma(t), schedule, rtol=1e-12)
  np.testing.assert_allclose(reference.diffusion(t), ve.diffusion(t), rtol=1e-12)
  assert float(reference.sigma(1e-5)) == pytest.approx(0.01 * 5000**1e-5, rel=1e-12)  # 0.0100009: its smallest.
  cosine = CONTINUOUS_SDES["cosine"]
  u = lambda t: (t + 0.008) / 1.008 * np.pi / 2
  t_cos = t * cosine.T
  np.testing.assert_allclose(cosine.alpha(t_cos) ** 2, np.cos(u(t_cos)) ** 2 / np.cos(u(0)) ** 2, rtol=1e-12)


def test_log_snr_is_decreasing_and_inverted_exactly(sde):
  t = _times(sde)
  log_snr = sde.log_snr(t)
  assert jnp.all(jnp.diff(log_snr) < 0)
  np.testing.assert_allclose(sde.t_from_log_snr(log_snr), t, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("s,t", [(0.1, 0.7), (1e-3, 0.002), (0.4, 0.9)])
def test_transition_composes_with_the_marginal(sde, s, t):
  """N(alpha_s x0, sigma_s^2) pushed through x_t | x_s = N(a x_s, v) is N(alpha_t x0, sigma_t^2)."""
  s, t = jnp.float64(s * sde.T), jnp.float64(t * sde.T)
  a, std = sde.transition(s, t)
  np.testing.assert_allclose(a * sde.alpha(s), sde.alpha(t), rtol=1e-12)
  np.testing.assert_allclose(a**2 * sde.sigma(s) ** 2 + std**2, sde.sigma(t) ** 2, rtol=1e-10)
  x = jnp.array([[1.0, -2.0]])
  f, G = sde.discretize(x, t[None], (t - s)[None])
  np.testing.assert_allclose(x + f, a * x, rtol=1e-12)
  np.testing.assert_allclose(G, std[None], rtol=1e-12)


def _euler_maruyama_moments(sde, mean0, var0, t_end, num_steps):
  """Mean and variance of the Euler-Maruyama chain x <- x + f x dt + g sqrt(dt) z, propagated exactly."""
  dt = t_end / num_steps

  def step(carry, t):
    mean, var = carry
    growth = 1 + sde.f(t) * dt
    return (growth * mean, growth**2 * var + sde.g2(t) * dt), None

  times = jnp.arange(num_steps, dtype=jnp.float64) * dt
  (mean, var), _ = jax.lax.scan(step, (mean0, var0), times)
  return mean, var


def test_euler_maruyama_moments_converge_to_the_marginal_at_order_one(sde):
  """The forward SDE's Euler-Maruyama moments approach the closed-form kernel, error halving with dt."""
  x0, t_end = 1.5, 0.8 * sde.T
  var0 = sde.sigma(jnp.float64(0.0)) ** 2  # 0, except for the reference VE kernel (data already at sigma_min).
  errors = []
  for num_steps in (250, 500, 1000, 2000):
    mean, var = _euler_maruyama_moments(sde, jnp.float64(x0), var0, t_end, num_steps)
    errors.append(abs(float(var) - float(sde.sigma(t_end) ** 2)) + abs(float(mean) - x0 * float(sde.alpha(t_end))))
  slopes = np.diff(np.log(errors)) / np.log(2.0)
  np.testing.assert_allclose(slopes, -1.0, atol=0.1)


def test_simulated_forward_sde_matches_the_marginal(sde, getkey):
  """Monte-Carlo paths of the SDE (Euler-Maruyama, 2000 steps) against the closed-form kernel.

  With n paths, the sample mean has standard error sigma/sqrt(n) and the sample variance sigma^2 sqrt(2/n);
  the time-discretisation bias is taken from the exact EM moment recursion (order-one test above), so the
  tolerance is 4 standard errors plus that bias.
  """
  num_paths, num_steps, t_end = 20000, 2000, 0.7 * sde.T
  x0 = jnp.array([1.5, -0.5], dtype=jnp.float64)
  dt = t_end / num_steps

  def step(x, inputs):
    t, key = inputs
    noise = jax.random.normal(key, x.shape, x.dtype)
    drift, diffusion = sde.sde(x, jnp.full(x.shape[:1], t))
    return x + drift * dt + diffusion[:, None] * math.sqrt(dt) * noise, None

  times = jnp.arange(num_steps, dtype=jnp.float64) * dt
  keys = jax.random.split(getkey(), num_steps)
  std0 = sde.sigma(jnp.float64(0.0))  # 0, except for the reference VE kernel (data already at sigma_min).
  start = x0[None] + std0 * jax.random.normal(getkey(), (num_paths, 2), jnp.float64)
  x, _ = jax.lax.scan(step, start, (times, keys))
  mean, std = sde.marginal(x0[None], jnp.array([t_end]))
  em_mean, em_var = _euler_maruyama_moments(sde, x0, jnp.full(2, std0**2), t_end, num_steps)
  var = std[0] ** 2
  np.testing.assert_allclose(x.mean(0), mean[0], atol=4 * float(std[0]) / math.sqrt(num_paths)
                             + float(jnp.max(jnp.abs(em_mean - mean[0]))))
  np.testing.assert_allclose(x.var(0), var, atol=4 * float(var) * math.sqrt(2 / num_paths)
                             + float(jnp.max(jnp.abs(em_var - var))))


def test_reverse_and_probability_flow_drifts(sde):
  x = jnp.array([[0.3, -1.0], [2.0, 0.5]])
  t = jnp.array([0.2, 0.6]) * sde.T
  score_fn = lambda x, t: -2.0 * x
  g2 = sde.g2(t)[:, None]
  np.testing.assert_allclose(sde.reverse_drift(score_fn, x, t), sde.f(t)[:, None] * x + g2 * 2 * x, rtol=1e-12)
  np.testing.assert_allclose(sde.probability_flow_drift(score_fn, x, t), sde.f(t)[:, None] * x + g2 * x,
                             rtol=1e-12)


def test_prior(sde, getkey):
  z = sde.prior_sample(getkey(), (20000, 3), jnp.float64)
  np.testing.assert_allclose(z.std(), sde.prior_std, rtol=4 * math.sqrt(2 / z.size) / 2 * 2)
  x = jnp.array([[0.5, -1.0, 2.0]])
  s = sde.prior_std
  expected = -1.5 * np.log(2 * np.pi * s**2) - np.sum(np.asarray(x) ** 2) / (2 * s**2)
  np.testing.assert_allclose(sde.prior_logp(x), [expected], rtol=1e-12)
  images = jnp.zeros((2, 4, 4, 3))
  assert sde.prior_logp(images).shape == (2,)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_outputs_keep_the_data_dtype(sde, dtype):
  x = jnp.ones((2, 3), dtype)
  t = jnp.array([0.1, 0.5], jnp.float32)
  mean, std = sde.marginal(x, t)
  assert mean.dtype == dtype and std.dtype == dtype
  assert sde.drift(x, t).dtype == dtype
  f, G = sde.discretize(x, t, jnp.float32(0.01))
  assert f.dtype == dtype and G.dtype == dtype
  x_t, noise = sde.sample_marginal(jax.random.key(0), x, t)
  assert x_t.dtype == dtype and noise.dtype == dtype
  assert sde.prior_sample(jax.random.key(0), (2, 3), dtype).dtype == dtype


def test_hyperparameters_are_leaves_and_do_not_recompile():
  traces = []

  @jax.jit
  def marginal_std(sde, t):
    traces.append(1)
    return sde.marginal(jnp.ones((1, 2)), t)[1]

  t = jnp.array([0.5])
  for sde in (sf.VPSDE(0.1, 20.0), sf.VPSDE(0.2, 10.0), sf.VPSDE(0.05, 30.0)):
    np.testing.assert_allclose(marginal_std(sde, t), sde.sigma(t), rtol=1e-6)
  assert len(traces) == 1
  assert jax.tree.leaves(sf.VESDE(0.02, 30.0)) == [0.02, 30.0]
  assert jax.tree.leaves(sf.CosineVPSDE()) == [0.008, 0.9946]
  # The number of steps of a chain fixes shapes: static, not a leaf.
  assert jax.tree.leaves(sf.DDPMChain(num_steps=100)) == [0.1, 20.0]
  assert jax.tree.structure(sf.DDPMChain(num_steps=100)) != jax.tree.structure(sf.DDPMChain(num_steps=200))


def test_works_inside_vmap_over_examples(sde):
  x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
  t = jnp.array([0.3, 0.6]) * sde.T
  batched_mean, batched_std = sde.marginal(x, t)
  mean, std = jax.vmap(sde.marginal)(x, t)
  np.testing.assert_allclose(mean, batched_mean)
  np.testing.assert_allclose(std, batched_std)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: sf.VPSDE(beta_min=-0.1), r"VPSDE: expected 0 <= beta_min <= beta_max.*beta_min=-0.1"),
        (lambda: sf.VPSDE(beta_min=5.0, beta_max=1.0), r"VPSDE: expected .*beta_max=1.0"),
        (lambda: sf.SubVPSDE(beta_max=-1.0), r"SubVPSDE: expected"),
        (lambda: sf.VESDE(sigma_min=50.0, sigma_max=0.01), r"VESDE: expected 0 < sigma_min < sigma_max"),
        (lambda: sf.VESDE(sigma_min=0.0), r"VESDE: expected 0 < sigma_min"),
        (lambda: sf.CosineVPSDE(T=1.0), r"CosineVPSDE: expected s > 0 and 0 < T < 1"),
        (lambda: sf.DDPMChain(num_steps=1), r"DDPMChain: num_steps must be an int >= 2"),
        (lambda: sf.DDPMChain(beta_max=2000.0, num_steps=1000), r"every beta_i < 1"),
        (lambda: sf.SMLDChain(sigma_min=1.0, sigma_max=0.5), r"SMLDChain: expected 0 < sigma_min < sigma_max"),
    ],
)
def test_bad_hyperparameters_raise(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_time_outside_the_interval_raises(sde):
  x = jnp.ones((2, 2))
  with pytest.raises(ValueError, match=r"time t must lie in \[0, T\].*got \[1.5\]"):
    sde.marginal(x, jnp.array([0.5, 1.5]))
  with pytest.raises(ValueError, match=r"time t must lie in \[0, T\]"):
    sde.drift(x, -0.1)
  with pytest.raises(ValueError, match=r"does not match the leading \(batch\) dimensions"):
    sde.marginal(x, jnp.array([0.1, 0.2, 0.3]))


# --- Discrete chains. -----------------------------------------------------------------------------


def test_ddpm_chain_tables_match_ho_et_al():
  chain = sf.DDPMChain(beta_min=0.1, beta_max=20.0, num_steps=1000)
  np.testing.assert_allclose(chain.betas[jnp.array([0, -1])], [1e-4, 0.02], rtol=1e-12)
  np.testing.assert_allclose(jnp.exp(chain.log_alphas_cumprod), np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)),
                             rtol=1e-10)


@pytest.mark.parametrize("chain", [sf.DDPMChain(num_steps=50), sf.SMLDChain(sigma_min=0.05, sigma_max=5.0,
                                                                             num_scales=50)],
                         ids=["ddpm", "smld"])
def test_chain_marginals_match_simulating_the_chain(chain, getkey):
  """q(x_i | x_0) in closed form against n simulated chains: 4 standard errors on mean and variance."""
  num_paths, num_levels = 20000, 50
  x0 = jnp.array([[1.0, -2.0]], dtype=jnp.float64)

  def step(x, inputs):
    i, key = inputs
    x = chain.step(key, x, jnp.full(x.shape[:1], i))
    return x, x

  keys = jax.random.split(getkey(), num_levels)
  _, path = jax.lax.scan(step, jnp.broadcast_to(x0, (num_paths, 2)), (jnp.arange(num_levels), keys))
  for i in (0, 10, 49):
    mean, std = chain.marginal(x0, jnp.array([i]))
    var = float(std[0]) ** 2
    np.testing.assert_allclose(path[i].mean(0), mean[0], atol=4 * math.sqrt(var / num_paths))
    np.testing.assert_allclose(path[i].var(0), var, atol=4 * var * math.sqrt(2 / num_paths))
    direct, _ = chain.sample_marginal(getkey(), jnp.broadcast_to(x0, (num_paths, 2)),
                                      jnp.full((num_paths,), i))
    np.testing.assert_allclose(direct.var(0), var, atol=4 * var * math.sqrt(2 / num_paths))


def test_ddpm_chain_converges_to_the_vp_sde():
  """Level i of an N-step chain is the VP SDE at t = (i+1)/N up to O(1/N)."""
  vp = sf.VPSDE(0.1, 20.0)
  errors = []
  for n in (100, 200, 400, 800):
    chain = sf.DDPMChain(0.1, 20.0, num_steps=n)
    levels = jnp.arange(n)
    _, std = chain.marginal(jnp.ones((n, 1)), levels)
    errors.append(float(jnp.max(jnp.abs(std - vp.sigma(chain.time(levels))))))
  slopes = np.diff(np.log(errors)) / np.log(2.0)
  np.testing.assert_allclose(slopes, -1.0, atol=0.1)
  assert errors[-1] < 2e-3


def test_smld_ladder_is_the_ve_sde_started_at_sigma_min():
  ve, ladder = sf.VESDE(0.01, 50.0), sf.SMLDChain(0.01, 50.0, num_scales=10)
  levels = jnp.arange(10)
  t = ladder.time(levels)
  np.testing.assert_allclose(ladder.sigmas, ve.sigma_schedule(t), rtol=1e-12)
  np.testing.assert_allclose(ladder.sigmas**2, ve.sigma(t) ** 2 + 0.01**2, rtol=1e-10)


@pytest.mark.parametrize("chain", [sf.DDPMChain(num_steps=40), sf.SMLDChain(0.1, 10.0, num_scales=20)],
                         ids=["ddpm", "smld"])
def test_chain_posterior_is_bayes_rule(chain):
  """q(x_{i-1} | x_i, x_0) from the joint Gaussian of (x_{i-1}, x_i) given x_0."""
  x0 = jnp.array([[0.7, -1.2]])
  x = jnp.array([[1.5, 0.3]])
  for i in (1, 7, 19):
    index = jnp.array([i])
    prev_mean, prev_std = chain.marginal(x0, index - 1)
    f, G = chain.discretize(jnp.ones((1, 1)), index)
    a = 1 + f[0, 0]  # x_i = a x_{i-1} + G z
    prior_var, noise_var = prev_std[0] ** 2, G[0] ** 2
    post_var = 1 / (1 / prior_var + a**2 / noise_var)
    post_mean = post_var * (prev_mean / prior_var + a * x / noise_var)
    mean, std = chain.posterior(x0, x, index)
    np.testing.assert_allclose(mean, post_mean, rtol=1e-9)
    np.testing.assert_allclose(std[0] ** 2, post_var, rtol=1e-9)
  mean, std = chain.posterior(x0, x, jnp.array([0]))
  np.testing.assert_allclose(mean, x0, atol=1e-12)
  np.testing.assert_allclose(std, [0.0], atol=1e-12)


def test_chain_index_out_of_range_raises():
  with pytest.raises(ValueError, match=r"DDPMChain: step index must lie in \[0, 99\], got \[100\]"):
    sf.DDPMChain(num_steps=100).marginal(jnp.ones((1, 2)), jnp.array([100]))
  with pytest.raises(ValueError, match=r"SMLDChain: step index must lie in \[0, 9\]"):
    sf.SMLDChain(num_scales=10).marginal(jnp.ones((1, 2)), jnp.array([-1]))
