"""With x64 off, as the CLI runs: the likelihood and the samplers in float32 against closed forms.

tests/conftest.py enables x64 for the in-process suite, so float32 code paths there can silently borrow float64
(a weak-typed constant, a default dtype). This module runs one fresh Python process with JAX's defaults
(`JAX_ENABLE_X64=0`), where nothing can be float64, and checks its results here.

Tolerances, derived for float32 (unit round-off u = 6e-8):

* log_likelihood, exact trace, rtol = atol = 1e-6: the solver bound of tests/test_likelihood.py,
  `2 num_steps (atol + rtol |Delta log p| / D)` nats/dim, plus round-off. Round-off enters through the input
  (|x| u |score|: the narrow std 0.005 makes it 1.5 u / 0.005^2 x 0.005 ~ 2e-5 nats), the time grid (t = 1e-5
  is exact to u relative) and each of the ~10 x num_steps stage evaluations (u |Delta log p| each, < 1e-4 in
  all): a 1e-4 nats/dim allowance covers it. One component has std 0.005 in one dimension, where float32
  round-off of x is largest relative to the data's scale.
* Samplers: the whitened-moment z-tests of test_sampling_distributions at n = 40000 (threshold 4.75 SE,
  SE 0.005 for a mean, 0.007 for a variance). Float32 round-off over 1000 steps is a random walk of about
  sqrt(1000) u |x| ~ 2e-6 relative, and the float32 grid's bias at most 1000 u ~ 6e-5 relative: both far
  below the SEs, so the float64 thresholds apply unchanged.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # One subprocess of about 20 s CPU (compiling four samplers and three solves).

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_compilation_cache_dir", os.path.join(REPO, ".cache", "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import scoreflow as sf
    from scoreflow.likelihood import log_likelihood
    from scoreflow.testing import GaussianMixture
    import test_sampling_distributions as dist

    out = {"x64": bool(jax.config.jax_enable_x64), "likelihood": [], "samplers": {}}
    data = GaussianMixture(jnp.array([0.3, 0.7]), jnp.array([[1.5, -1.0, 0.5], [-1.0, 1.0, 0.0]]),
                           jnp.array([[0.3, 0.5, 0.005], [0.6, 0.4, 0.3]]))
    for name, sde in (("VP", sf.VPSDE()), ("subVP", sf.SubVPSDE()), ("VE", sf.VESDE(sigma_min=0.01, sigma_max=50.0))):
      x = data.sample(jax.random.key(0), 16)
      terminal = lambda z, sde=sde: data.log_prob_t(sde, z, sde.T)
      logp, z, info = jax.jit(lambda x, sde=sde, terminal=terminal: log_likelihood(
          None, sde, data.score(sde), x, eps=1e-5, divergence="exact", prior_logp_fn=terminal,
          rtol=1e-6, atol=1e-6))(x)
      out["likelihood"].append(dict(
          sde=name, dtype=str(logp.dtype), z_dtype=str(z.dtype), success=bool(info.success.all()),
          logp=np.asarray(logp).tolist(), prior=np.asarray(terminal(z)).tolist(), x=np.asarray(x).tolist(),
          num_steps=np.asarray(info.num_steps).tolist()))
    weights, means, stds = dist.TARGETS["2d"]()
    mixture = GaussianMixture(jnp.asarray(weights, jnp.float32), jnp.asarray(means, jnp.float32),
                              jnp.asarray(stds, jnp.float32))
    cases = {
        "pc-em-vp": (sf.pc_sample, sf.VPSDE(), dict(predictor="euler_maruyama", corrector="none", num_steps=1000)),
        "pc-rd-langevin-ve": (sf.pc_sample, sf.VESDE(), dict(predictor="reverse_diffusion", corrector="langevin",
                                                             num_steps=500)),
        "ode-tsit5-vp": (sf.ode_sample, sf.VPSDE(), dict(method="tsit5")),
        "edm-churn-vp": (sf.edm_sample, sf.VPSDE(), dict(num_steps=64, s_churn=10.0)),
    }
    for case, (sampler, sde, options) in cases.items():
      x, info = jax.jit(lambda key, sampler=sampler, sde=sde, options=options: sampler(
          key, sde, mixture.score(sde), (dist.NUM_SAMPLES, 2), dtype=jnp.float32, **options))(jax.random.key(7))
      x = np.asarray(x)
      out["samplers"][case] = dict(dtype=str(x.dtype), status=int(info.status), finite=bool(np.isfinite(x).all()),
                                   failures=dist.pooled_mismatches(x.astype(np.float64), "2d")
                                   + dist.mixture_mismatches(x.astype(np.float64), "2d"))
    print(json.dumps(out))
    """)


@pytest.fixture(scope="module")
def float32_results():
  env = dict(os.environ, JAX_ENABLE_X64="0", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", f"REPO = {REPO!r}\n" + SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def _exact_log_prob_t(x, t, sde_name):
  """log p_t(x) of the module's mixture in float64 NumPy, from the SDE's closed-form kernel."""
  weights = np.array([0.3, 0.7])
  means = np.array([[1.5, -1.0, 0.5], [-1.0, 1.0, 0.0]])
  stds = np.array([[0.3, 0.5, 0.005], [0.6, 0.4, 0.3]])
  integrated_beta = 0.1 * t + 0.5 * 19.9 * t**2
  if sde_name == "VP":
    alpha, sigma2 = np.exp(-integrated_beta / 2), -np.expm1(-integrated_beta)
  elif sde_name == "subVP":
    alpha, sigma2 = np.exp(-integrated_beta / 2), np.expm1(-integrated_beta) ** 2
  else:
    alpha, sigma2 = 1.0, 0.01**2 * ((50.0 / 0.01) ** (2 * t) - 1)
  variance = alpha**2 * stds**2 + sigma2
  log_components = np.log(weights) - 0.5 * np.sum(
      (x[:, None] - alpha * means) ** 2 / variance + np.log(2 * np.pi * variance), axis=-1)
  peak = log_components.max(1, keepdims=True)
  return (peak + np.log(np.exp(log_components - peak).sum(1, keepdims=True)))[:, 0]


def test_runs_with_x64_off(float32_results):
  assert float32_results["x64"] is False


@pytest.mark.parametrize("sde_name", ["VP", "subVP", "VE"])
def test_float32_likelihood_matches_the_closed_form(float32_results, sde_name):
  record = next(r for r in float32_results["likelihood"] if r["sde"] == sde_name)
  assert record["dtype"] == record["z_dtype"] == "float32" and record["success"]
  x, logp = np.asarray(record["x"], np.float64), np.asarray(record["logp"])
  expected = _exact_log_prob_t(x, 1e-5, sde_name)
  delta = np.abs(logp - np.asarray(record["prior"])) / 3
  bound = 2 * np.asarray(record["num_steps"]) * (1e-6 + 1e-6 * delta) + 1e-4
  np.testing.assert_array_less(np.abs(logp - expected) / 3, bound)


@pytest.mark.parametrize("case", ["pc-em-vp", "pc-rd-langevin-ve", "ode-tsit5-vp", "edm-churn-vp"])
def test_float32_samplers_draw_the_mixture(float32_results, case):
  record = float32_results["samplers"][case]
  assert record["dtype"] == "float32" and record["status"] == 0 and record["finite"]
  assert not record["failures"], "\n".join(record["failures"])
