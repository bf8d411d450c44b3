"""Every sampler, driven by the exact score of a Gaussian mixture, draws from that mixture within Monte-Carlo error.

For each sampler x process the samples are split by their most likely mixture component and compared with the
truth statistic by statistic, each with a tolerance of Z standard errors computed from the sample size:

* weight of component k: binomial,          SE = sqrt(w_k (1 - w_k) / n);
* mean of component k along dimension i:     SE = s_ki / sqrt(n_k);
* variance of component k along dimension i: SE = s_ki^2 sqrt(2 / (n_k - 1))   (Gaussian sample variance);
* covariance of dimensions i != j:           SE = s_ki s_kj / sqrt(n_k)         (independent dimensions).

Z = 5 makes a two-sided false alarm 5.7e-7 per statistic; with at most a few hundred statistics per test and a few
dozen tests, the family-wise rate stays below 1e-3. The components are at least 3.9 standard deviations from every
decision boundary, so misassignment (< 1e-4 of the points) moves no statistic by more than a small fraction of its
SE. Step counts are chosen so that each sampler's discretisation bias is below ~1.5 SE at this sample size (measured
at 4x the sample size); the tests therefore fail on any error larger than the Monte-Carlo noise.

On top of the moments, the sliced Wasserstein-2 distance between the samples and an exact sample of the same size
must not exceed the exact-vs-exact distance by more than chance: the threshold is the mean plus 6 standard
deviations of that distance over 20 independent pairs of exact samples (Cantelli's inequality bounds the false
alarm by 1/37 for any distribution; for this nearly Gaussian statistic it is below 1e-6).
"""

import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import scoreflow as sf
from scoreflow import sampling
from scoreflow.testing import GaussianMixture

NUM_SAMPLES = 4000
Z = 5.0
SLICED_W2_SIGMAS = 6.0
NUM_BASELINE_PAIRS = 20


def _mixture_2d():
  weights = np.array([0.5, 0.3, 0.2])
  means = np.array([[-2.5, 0.0], [2.5, 0.0], [0.0, 3.0]])
  stds = np.array([[0.4, 0.4], [0.3, 0.5], [0.5, 0.3]])
  return weights, means, stds


def _mixture_16d():
  rng = np.random.default_rng(0)
  weights = np.array([0.45, 0.35, 0.2])
  directions = rng.normal(size=(3, 16))
  means = 4.0 * directions / np.linalg.norm(directions, axis=1, keepdims=True)
  stds = rng.uniform(0.3, 0.6, size=(3, 16))
  return weights, means, stds


TARGETS = {"2d": _mixture_2d, "16d": _mixture_16d}

PROCESSES = {"vp": sf.VPSDE(), "ve": sf.VESDE(), "subvp": sf.SubVPSDE()}


# --- Statistics (NumPy: no compilation). -----------------------------------------------------------------------

def _exact_samples(target, num, seed):
  weights, means, stds = TARGETS[target]()
  rng = np.random.default_rng(seed)
  component = rng.choice(len(weights), size=num, p=weights)
  return means[component] + stds[component] * rng.normal(size=(num, means.shape[1]))


def _directions(dim, num=64):
  if dim == 2:
    angles = np.linspace(0, np.pi, num, endpoint=False)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)
  d = np.random.default_rng(1).normal(size=(num, dim))
  return d / np.linalg.norm(d, axis=1, keepdims=True)


def sliced_w2(x, y, directions):
  """Sliced Wasserstein-2 distance between two equal-size samples `[n, d]`, over unit `directions [P, d]`."""
  px, py = np.sort(x @ directions.T, axis=0), np.sort(y @ directions.T, axis=0)
  return float(np.sqrt(np.mean((px - py) ** 2)))


@functools.lru_cache(maxsize=None)
def _sliced_w2_threshold(target, num):
  dim = TARGETS[target]()[1].shape[1]
  values = [sliced_w2(_exact_samples(target, num, 100 + 2 * r), _exact_samples(target, num, 101 + 2 * r),
                      _directions(dim)) for r in range(NUM_BASELINE_PAIRS)]
  return float(np.mean(values) + SLICED_W2_SIGMAS * np.std(values, ddof=1)), float(np.mean(values))


def mixture_mismatches(x, target):
  """Lists every statistic of `x [n, d]` further than Z standard errors from the target mixture's."""
  weights, means, stds = TARGETS[target]()
  n = x.shape[0]
  log_joint = np.log(weights)[None] - 0.5 * np.sum(
      ((x[:, None] - means[None]) / stds[None]) ** 2 + np.log(2 * np.pi * stds[None] ** 2), axis=-1)
  assignment = np.argmax(log_joint, axis=1)
  failures = []

  def check(name, value, expected, se):
    z = np.abs(value - expected) / se
    if np.any(z > Z):
      failures.append(f"{name}: got {np.round(value, 4)}, expected {np.round(expected, 4)}, |z| max {z.max():.1f}")

  fractions = np.bincount(assignment, minlength=len(weights)) / n
  check("weights", fractions, weights, np.sqrt(weights * (1 - weights) / n))
  for k in range(len(weights)):
    xk, s = x[assignment == k], stds[k]
    nk = xk.shape[0]
    if nk < 10:
      failures.append(f"component {k}: only {nk} samples")
      continue
    covariance = np.cov(xk, rowvar=False)
    off_diagonal = ~np.eye(len(s), dtype=bool)
    check(f"mean[{k}]", xk.mean(0), means[k], s / np.sqrt(nk))
    check(f"variance[{k}]", np.diag(covariance), s**2, s**2 * np.sqrt(2 / (nk - 1)))
    check(f"covariance[{k}]", covariance[off_diagonal], 0.0, np.outer(s, s)[off_diagonal] / np.sqrt(nk))
  return failures


def assert_samples_match(x, target):
  x = np.asarray(x, np.float64)
  assert np.all(np.isfinite(x))
  failures = mixture_mismatches(x, target)
  threshold, baseline = _sliced_w2_threshold(target, x.shape[0])
  distance = sliced_w2(x, _exact_samples(target, x.shape[0], seed=7), _directions(x.shape[1]))
  if distance > threshold:
    failures.append(f"sliced W2 {distance:.4f} > threshold {threshold:.4f} (exact-vs-exact mean {baseline:.4f})")
  assert not failures, "\n".join(failures)


def _draw(sampler, process, target, key, **options):
  weights, means, stds = TARGETS[target]()
  mixture = GaussianMixture(jnp.asarray(weights), jnp.asarray(means), jnp.asarray(stds))
  sde = PROCESSES[process]
  score_fn = mixture.score(sde)
  shape = (NUM_SAMPLES, means.shape[1])
  return jax.jit(lambda key: sampler(key, sde, score_fn, shape, dtype=jnp.float64, **options))(key)


# --- The sampler x process table. ------------------------------------------------------------------------------

PC, ODE, DDIM, DPM, EDM = (sampling.pc_sample, sampling.ode_sample, sampling.ddim_sample,
                           sampling.dpm_solver_pp_sample, sampling.edm_sample)
slow = pytest.mark.slow

CASES_2D = [
    pytest.param(PC, "vp", dict(predictor="euler_maruyama", corrector="none", num_steps=1000), id="pc-em-vp"),
    pytest.param(PC, "ve", dict(predictor="reverse_diffusion", corrector="langevin", num_steps=500),
                 id="pc-rd-langevin-ve"),
    pytest.param(PC, "vp", dict(predictor="ancestral", corrector="none", num_steps=1000), id="pc-ancestral-vp"),
    pytest.param(ODE, "vp", dict(method="tsit5"), id="ode-tsit5-vp"),
    pytest.param(DPM, "vp", dict(num_steps=50, spacing="log_snr"), id="dpm2m-logsnr-vp"),
    pytest.param(EDM, "ve", dict(num_steps=32), id="edm-ve"),
    pytest.param(DDIM, "vp", dict(num_steps=200), id="ddim-vp"),
    # Further combinations (run by CI with the slow tests).
    pytest.param(PC, "ve", dict(predictor="none", corrector="ald", num_steps=200, n_corrector_steps=10, snr=0.3),
                 id="pc-ald-ve", marks=slow),
    pytest.param(PC, "ve", dict(predictor="reverse_diffusion", corrector="none", num_steps=1000),
                 id="pc-rd-ve", marks=slow),
    pytest.param(PC, "ve", dict(predictor="ancestral", corrector="none", num_steps=1000), id="pc-ancestral-ve",
                 marks=slow),
    pytest.param(PC, "vp", dict(predictor="reverse_diffusion", corrector="langevin", num_steps=500,
                                corrector_first=True), id="pc-rd-langevin-corrector-first-vp", marks=slow),
    pytest.param(PC, "subvp", dict(predictor="euler_maruyama", corrector="none", num_steps=1000),
                 id="pc-em-subvp", marks=slow),
    pytest.param(ODE, "ve", dict(method="dopri5"), id="ode-dopri5-ve", marks=slow),
    pytest.param(ODE, "subvp", dict(method="tsit5"), id="ode-tsit5-subvp", marks=slow),
    pytest.param(ODE, "ve", dict(method="heun", num_steps=100), id="ode-heun-ve", marks=slow),
    pytest.param(DDIM, "vp", dict(num_steps=500, eta=1.0), id="ddim-eta1-vp", marks=slow),
    pytest.param(DPM, "ve", dict(num_steps=50, spacing="uniform"), id="dpm2m-uniform-ve", marks=slow),
    pytest.param(EDM, "vp", dict(num_steps=64, s_churn=10.0), id="edm-churn-vp", marks=slow),
]


@pytest.mark.parametrize("sampler, process, options", CASES_2D)
def test_samples_match_2d_mixture(sampler, process, options):
  x, info = _draw(sampler, process, "2d", jax.random.key(7), **options)
  assert x.dtype == jnp.float64 and int(info.status) == 0
  assert_samples_match(x, "2d")


@pytest.mark.parametrize("sampler, process, options", [
    pytest.param(DPM, "vp", dict(num_steps=50), id="dpm2m-vp"),
    pytest.param(PC, "ve", dict(predictor="reverse_diffusion", corrector="langevin", num_steps=500),
                 id="pc-rd-langevin-ve", marks=slow),
    pytest.param(ODE, "vp", dict(method="tsit5"), id="ode-tsit5-vp", marks=slow),
])
def test_samples_match_16d_mixture(sampler, process, options):
  x, info = _draw(sampler, process, "16d", jax.random.key(8), **options)
  assert int(info.status) == 0
  assert_samples_match(x, "16d")


def test_statistics_detect_a_wrong_sampler():
  """The checks have power: exact samples pass, samples with the weights or spreads perturbed fail."""
  exact = _exact_samples("2d", NUM_SAMPLES, seed=3)
  assert_samples_match(exact, "2d")
  too_wide = exact * 1.05  # Means move by 5% and variances grow by 10%: well beyond Z standard errors.
  assert mixture_mismatches(too_wide, "2d")
  weights, means, stds = _mixture_2d()
  rng = np.random.default_rng(4)
  component = rng.choice(3, size=NUM_SAMPLES, p=[0.45, 0.35, 0.2])  # Weights off by 0.05 (6 SE).
  reweighted = means[component] + stds[component] * rng.normal(size=(NUM_SAMPLES, 2))
  assert any(f.startswith("weights") for f in mixture_mismatches(reweighted, "2d"))
