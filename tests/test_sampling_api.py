"""Sampler mechanics: exact NFE, no recompilation, dtypes, vmap over keys, step grids and error messages."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import scoreflow as sf
from scoreflow import sampling
from scoreflow.testing import GaussianMixture

# These programs are tiny: compile time dominates, so they are compiled with XLA's cheap settings.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
SHAPE = (8, 2)


def _mixture(dtype):
  return GaussianMixture(jnp.array([0.6, 0.4], dtype), jnp.array([[-1.0, 0.0], [1.5, 0.5]], dtype),
                         jnp.array([[0.3, 0.4], [0.5, 0.2]], dtype))


# name: (sampler, process, options, expected NFE per call or None when adaptive).
CONFIGS = {
    "pc-rd-langevin": (sampling.pc_sample, "vp", dict(num_steps=4, n_corrector_steps=2), 4 * 3 + 1),
    "pc-ancestral-no-denoise": (sampling.pc_sample, "ve",
                                dict(predictor="ancestral", corrector="none", num_steps=4, denoise=False), 4),
    "pc-ald-only": (sampling.pc_sample, "ve", dict(predictor="none", corrector="ald", num_steps=3,
                                                   n_corrector_steps=2), 3 * 2 + 1),
    "pc-ancestral-ald-corrector-first": (sampling.pc_sample, "vp", dict(predictor="ancestral", corrector="ald",
                                                                        num_steps=3, corrector_first=True), 3 * 2 + 1),
    "pc-custom-predictor": (sampling.pc_sample, "subvp",
                            dict(predictor=sampling.Predictor(sampling.euler_maruyama_predictor, nfe=1),
                                 corrector="langevin", num_steps=3), 3 * 2 + 1),
    "ode-tsit5": (sampling.ode_sample, "vp", dict(rtol=1e-3, atol=1e-3), None),
    "ode-dopri5-max-steps": (sampling.ode_sample, "ve", dict(method="dopri5", rtol=1e-9, atol=1e-9, max_steps=2),
                             1 + 6 * 2),
    "ode-heun-denoise": (sampling.ode_sample, "vp", dict(method="heun", num_steps=4, denoise=True), 2 * 4 + 1),
    "ode-euler-logsnr": (sampling.ode_sample, "ve", dict(method="euler", num_steps=4, spacing="log_snr"), 4),
    "ddim-eta": (sampling.ddim_sample, "vp", dict(num_steps=4, eta=0.5), 4),
    "dpm2m": (sampling.dpm_solver_pp_sample, "vp", dict(num_steps=4), 4),
    "edm-churn": (sampling.edm_sample, "ve", dict(num_steps=4, s_churn=5.0), 2 * 4 - 1),
}
PROCESSES = {"vp": sf.VPSDE(), "ve": sf.VESDE(), "subvp": sf.SubVPSDE()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nfe_is_exact_dtype_is_kept_and_a_second_call_does_not_recompile(name):
  sampler, process, options, expected_nfe = CONFIGS[name]
  sde = PROCESSES[process]
  score_fn = _mixture(jnp.float32).score(sde)
  traces, evaluations = [0], [0]

  def count_evaluation():
    evaluations[0] += 1

  def counted_score(x, t):
    traces[0] += 1
    jax.debug.callback(count_evaluation)
    return score_fn(x, t)

  run = jax.jit(lambda key: sampler(key, sde, counted_score, SHAPE, dtype=jnp.float32, **options),
                compiler_options=FAST_COMPILE)
  x1, info1 = run(jax.random.key(1))
  traces_after_first_call = traces[0]
  x2, info2 = run(jax.random.key(2))
  jax.block_until_ready((x1, x2))
  jax.effects_barrier()

  assert run._cache_size() == 1 and traces[0] == traces_after_first_call
  assert x1.dtype == x2.dtype == jnp.float32 and x1.shape == SHAPE
  assert info1.nfe.dtype == jnp.int32
  assert evaluations[0] == int(info1.nfe) + int(info2.nfe)
  if expected_nfe is not None:
    assert int(info1.nfe) == expected_nfe
  if name == "ode-dopri5-max-steps":
    assert int(info1.status) == 1 and int(info1.num_steps) == 2
  else:
    assert int(info1.status) == 0 and np.all(np.isfinite(x1))
  assert not np.allclose(x1, x2)  # A new key gives new noise (and, for ODE samplers, a new prior draw).


def test_sampler_jitted_with_static_argnames_takes_new_process_parameters_without_recompiling():
  score_fn = _mixture(jnp.float32).score(sf.VPSDE())  # The score's own process is fixed; the sampler's varies.
  run = jax.jit(sampling.pc_sample, static_argnames=("score_fn", "shape", "num_steps", "dtype"),
                compiler_options=FAST_COMPILE)
  x1, _ = run(jax.random.key(0), sf.VPSDE(beta_max=20.0), score_fn, SHAPE, num_steps=3, dtype=jnp.float32)
  x2, _ = run(jax.random.key(0), sf.VPSDE(beta_max=15.0), score_fn, SHAPE, num_steps=3, dtype=jnp.float32)
  assert run._cache_size() == 1
  assert not np.allclose(x1, x2)


@pytest.mark.parametrize("name", ["pc-rd-langevin", "ode-tsit5", pytest.param("ddim-eta", marks=pytest.mark.slow),
                                  pytest.param("edm-churn", marks=pytest.mark.slow)])
def test_vmap_over_keys_equals_separate_calls(name):
  sampler, process, options, _ = CONFIGS[name]
  sde = PROCESSES[process]
  score_fn = _mixture(jnp.float64).score(sde)
  keys = jax.random.split(jax.random.key(3), 3)
  run = lambda key: sampler(key, sde, score_fn, SHAPE, dtype=jnp.float64, **options)  # noqa: E731
  batched_x, batched_info = jax.jit(jax.vmap(run), compiler_options=FAST_COMPILE)(keys)
  single = jax.jit(run, compiler_options=FAST_COMPILE)
  for i, key in enumerate(keys):
    x, info = single(key)
    np.testing.assert_allclose(batched_x[i], x, rtol=1e-9, atol=1e-9)
    assert int(batched_info.nfe[i]) == int(info.nfe)


# --- Step grids. -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sde", [sf.VPSDE(), sf.VESDE(), sf.SubVPSDE(), sf.CosineVPSDE()], ids=lambda sde: type(sde).__name__)
def test_time_grids(sde):
  uniform = sampling.time_grid(sde, 10, 1e-3, "uniform", jnp.float64)
  log_snr = sampling.time_grid(sde, 10, 1e-3, "log_snr", jnp.float64)
  for grid in (uniform, log_snr):
    assert grid.shape == (11,) and grid.dtype == jnp.float64
    assert float(grid[0]) == pytest.approx(sde.T, abs=0) and float(grid[-1]) == 1e-3
    assert np.all(np.diff(grid) < 0)
  np.testing.assert_allclose(np.diff(uniform), -(sde.T - 1e-3) / 10, rtol=1e-12)
  np.testing.assert_allclose(np.diff(sde.log_snr(log_snr)), np.diff(sde.log_snr(log_snr)).mean(), rtol=1e-6)
  assert sampling.time_grid(sde, 4, 1e-3, "uniform", jnp.float32).dtype == jnp.float32


def test_half_precision_samples_keep_float32_times():
  # A bfloat16 grid of 1000 steps would hold 254 distinct times: 747 steps with dt = 0, and NaN from
  # DPM-Solver++(2M), whose step ratio h_{i-1} / h_i divides by such a zero step.
  grid = sampling.time_grid(sf.VPSDE(), 1000, 1e-3, "uniform", jnp.bfloat16)
  assert grid.dtype == jnp.float32 and np.unique(np.asarray(grid)).size == 1001
  sde = sf.VPSDE()
  exact = _mixture(jnp.float32).score(sde)
  seen = []

  def score_fn(x, t):
    seen.append((x.dtype, t.dtype))
    return exact(x.astype(jnp.float32), t)

  for sampler, options in ((sf.dpm_solver_pp_sample, dict(num_steps=300, spacing="uniform")),
                           (sf.pc_sample, dict(num_steps=50)), (sf.ode_sample, dict(method="euler", num_steps=20)),
                           (sf.ddim_sample, dict(num_steps=20)), (sf.edm_sample, dict(num_steps=10))):
    x, info = jax.jit(lambda key: sampler(key, sde, score_fn, (256, 2), dtype=jnp.bfloat16, **options),
                      compiler_options=FAST_COMPILE)(jax.random.key(0))
    assert x.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(x, np.float32))), sampler.__name__
    assert set(seen) == {(jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))}, sampler.__name__


@pytest.mark.parametrize("sde", [sf.VPSDE(), sf.SubVPSDE(), sf.VESDE()], ids=lambda sde: type(sde).__name__)
def test_pc_corrector_step_is_scaled_by_the_signal_one_step_keeps(sde):
  # Song et al. (2021, Algorithm 5) scale the Langevin step by alpha_i = 1 - beta_i on VP. A corrector that
  # multiplies x by the alpha it is given telescopes over the grid to (alpha(T) / alpha(eps))^2.
  def scale_by_alpha(key, sde, score_fn, x, t, *, snr, n_steps, alpha):
    return x * alpha[:, None], x

  corrector = sampling.correctors.Corrector(scale_by_alpha, nfe_per_step=0)
  x, _ = sf.pc_sample(jax.random.key(0), sde, lambda x, t: x, (3, 2), predictor="none", corrector=corrector,
                      num_steps=7, eps=1e-3, denoise=False, dtype=jnp.float64, x_T=jnp.ones((3, 2)))
  expected = np.exp(2 * (sde.log_alpha(1.0) - sde.log_alpha(1e-3)))
  np.testing.assert_allclose(x, expected, rtol=1e-12)
  assert (expected == 1.0) == isinstance(sde, sf.VESDE)
  # One step of the discrete VP chain at N = 1000 keeps 1 - beta_i of the signal (to first order in beta_i).
  step = np.exp(2 * (sf.VPSDE().log_alpha(0.5) - sf.VPSDE().log_alpha(0.5 - 1e-3)))
  beta_i = sf.VPSDE().beta(0.5) * 1e-3
  np.testing.assert_allclose(step, 1 - beta_i, atol=beta_i**2)


def test_langevin_step_size_takes_alpha(getkey):
  x = jax.random.normal(getkey(), (4, 3))
  t = jnp.full((4,), 0.5)
  score_fn = lambda x, t: -x  # noqa: E731
  outputs = [sampling.correctors.langevin_corrector(jax.random.key(1), sf.VPSDE(), score_fn, x, t, snr=0.2,
                                                    n_steps=1, alpha=alpha)[1] for alpha in (1.0, 0.5)]
  # x_mean = x + eps * s = (1 - eps) x with eps = 2 alpha (r |z| / |s|)^2: the step shrinks with alpha.
  eps_full, eps_half = (1 - np.asarray(out[0, 0] / x[0, 0]) for out in outputs)
  np.testing.assert_allclose(eps_half, 0.5 * eps_full, rtol=1e-5)


@pytest.mark.parametrize("sde", [sf.VPSDE(), sf.VESDE()], ids=lambda sde: type(sde).__name__)
def test_edm_sigmas_follow_karras_eq5(sde):
  sigmas = sampling.edm_sigmas(sde, 8, rho=7.0, eps=1e-3, dtype=jnp.float64)
  sigma_tilde = lambda t: float(sde.sigma(t) / sde.alpha(t))  # noqa: E731
  assert sigmas.shape == (9,) and float(sigmas[-1]) == 0.0
  np.testing.assert_allclose([sigmas[0], sigmas[-2]], [sigma_tilde(sde.T), sigma_tilde(1e-3)], rtol=1e-12)
  np.testing.assert_allclose(np.diff(sigmas[:-1] ** (1 / 7)), np.diff(sigmas[:-1] ** (1 / 7)).mean(), rtol=1e-9)


# --- Errors. ---------------------------------------------------------------------------------------------------

def _call(sampler, **options):
  sde = sf.VPSDE()
  return sampler(jax.random.key(0), sde, _mixture(jnp.float32).score(sde), options.pop("shape", SHAPE), **options)


@pytest.mark.parametrize("sampler, options, message", [
    (sampling.pc_sample, dict(predictor="heun"), r"pc_sample: unknown predictor 'heun'; choose one of"),
    (sampling.pc_sample, dict(corrector="hmc"), r"pc_sample: unknown corrector 'hmc'"),
    (sampling.pc_sample, dict(shape=(8,)), r"pc_sample: shape must be a tuple of positive ints \[B, \*D\]"),
    (sampling.pc_sample, dict(num_steps=0), r"pc_sample: num_steps must be a Python int >= 1"),
    (sampling.pc_sample, dict(snr=0.0), r"pc_sample: snr must be a scalar in \(0, inf\], got 0.0"),
    (sampling.pc_sample, dict(eps=0.0), r"pc_sample: eps \(the last sampling time\) must be a scalar in \(0, T\)"),
    (sampling.pc_sample, dict(x_T=jnp.zeros((4, 2))), r"x_T must have the sample shape \(8, 2\), got \(4, 2\)"),
    (sampling.pc_sample, dict(dtype=jnp.int32), r"dtype must be a floating dtype"),
    (sampling.ode_sample, dict(method="rk4"), r"ode_sample: unknown method 'rk4'"),
    (sampling.ode_sample, dict(method="heun"), r"method='heun' is a fixed-step method and needs num_steps"),
    (sampling.ode_sample, dict(rtol=-1.0), r"ode_sample: rtol must be a scalar in \(0, inf\]"),
    (sampling.ode_sample, dict(method="euler", num_steps=3, spacing="cosine"), r"spacing must be 'uniform' or"),
    (sampling.ddim_sample, dict(eta=1.5), r"ddim_sample: eta must be a scalar in \[0, 1\], got 1.5"),
    (sampling.dpm_solver_pp_sample, dict(order=3), r"dpm_solver_pp_sample: order must be 1 or 2"),
    (sampling.edm_sample, dict(rho=0.0), r"edm_sample: rho must be a scalar in \(0, inf\]"),
    (sampling.edm_sample, dict(s_churn=-1.0), r"edm_sample: s_churn must be a scalar in \[0, inf\]"),
])
def test_errors_name_the_argument(sampler, options, message):
  with pytest.raises(ValueError, match=message):
    _call(sampler, **options)


def test_edm_without_churn_is_finite_in_float32_on_vp():
  """Regression: sqrt(sigma_hat^2 - sigma^2) at gamma = 0 rounded to sqrt(-tiny) = NaN on the VP process."""
  sde = sf.VPSDE()
  score_fn = GaussianMixture.gaussian(jnp.zeros(2), 1.0).score(sde)
  x, _ = sf.edm_sample(jax.random.key(0), sde, score_fn, (64, 2), num_steps=8, dtype=jnp.float32)
  assert x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x)))
