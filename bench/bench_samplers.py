"""Distributional error of every sampler against its number of score evaluations (NFE), with the exact score.

For a fixed Gaussian-mixture target (2-D with 3 components, and 64-D with 8 components) under the VP SDE, each
sampler is driven by the exact score of the perturbed mixture, so the only errors are the sampler's own
(discretisation, prior mismatch, finite-sample noise). All samplers start from the same prior draw x_T, so the
deterministic ones converge to the same point set. The table reports the maximum mean discrepancy (MMD, the biased
V-statistic, with a sum of Gaussian kernels at the within-component and between-component length scales) between
the samples and an exact sample of the same size; the exact-vs-exact MMD printed above each table (mean +- sd over
independent exact samples, same run) is the floor that a perfect sampler reaches at this sample size.

Usage:
  python bench/bench_samplers.py                 # both targets, NFE 10, 20, 50, 100, 1000 (about 5 minutes on a busy 2-core CPU)
  python bench/bench_samplers.py --targets 2d --nfe 10 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import jax
import jax.numpy as jnp

import scoreflow as sf
from scoreflow import sampling
from scoreflow.testing import GaussianMixture

EPS = 1e-3


def make_target(name):
  if name == "2d":
    weights = np.array([0.5, 0.3, 0.2])
    means = np.array([[-2.5, 0.0], [2.5, 0.0], [0.0, 3.0]])
    stds = np.array([[0.4, 0.4], [0.3, 0.5], [0.5, 0.3]])
    return weights, means, stds, 8000
  rng = np.random.default_rng(0)
  weights = rng.dirichlet(np.full(8, 5.0))
  means = rng.normal(size=(8, 64))
  stds = rng.uniform(0.2, 0.6, size=(8, 64))
  return weights, means, stds, 2000


def exact_samples(target, num, seed):
  weights, means, stds, _ = target
  rng = np.random.default_rng(seed)
  component = rng.choice(len(weights), size=num, p=weights)
  return means[component] + stds[component] * rng.normal(size=(num, means.shape[1]))


def bandwidths(target):
  """Half and one times the typical within-component distance mean(s) sqrt(2D), and the median pairwise distance."""
  _, means, stds, _ = target
  within = float(np.mean(stds)) * np.sqrt(2 * means.shape[1])
  x = exact_samples(target, 2000, seed=1)
  median = float(np.median(np.linalg.norm(x[:1000, None] - x[None, 1000:], axis=-1)))
  return jnp.asarray([0.5 * within, within, median], jnp.float64)


_BLOCK = 500


@jax.jit
def mean_kernel(a, b, widths):
  """Mean over all pairs of sum_h exp(-|a_i - b_j|^2 / 2h^2) / len(h), in row blocks.

  Kernel values in float32 (relative error ~1e-7 each), sums in float64, so that the difference of means in the
  MMD (~1e-4 of each mean) keeps five significant digits.
  """
  a, b, widths = a.astype(jnp.float32), b.astype(jnp.float32), widths.astype(jnp.float32)

  def block(a_block):
    d2 = jnp.sum(a_block**2, 1)[:, None] + jnp.sum(b**2, 1)[None] - 2 * a_block @ b.T
    kernel = jnp.exp(-jnp.maximum(d2, 0)[None] / (2 * widths[:, None, None] ** 2))
    return jnp.sum(kernel, dtype=jnp.float64)

  blocks = a.reshape(-1, _BLOCK, a.shape[1])
  return jnp.sum(jax.lax.map(block, blocks)) / (a.shape[0] * b.shape[0] * widths.shape[0])


def mmd(x, reference, widths, reference_kernel_mean):
  """The biased MMD between samples `x` and `reference`, both `[n, d]`, n a multiple of 500."""
  x = jnp.asarray(x, jnp.float64)
  squared = mean_kernel(x, x, widths) + reference_kernel_mean - 2 * mean_kernel(x, reference, widths)
  return float(jnp.sqrt(jnp.maximum(squared, 0)))


# name: function of the nominal NFE -> (sampler, options), chosen so that the sampler's NFE is at most the nominal.
SAMPLERS = {
    "Euler-Maruyama": lambda nfe: (sampling.pc_sample, dict(predictor="euler_maruyama", corrector="none",
                                                            num_steps=nfe, denoise=False)),
    "ancestral (DDPM)": lambda nfe: (sampling.pc_sample, dict(predictor="ancestral", corrector="none",
                                                              num_steps=nfe, denoise=False)),
    "RD + Langevin (snr 0.16)": lambda nfe: (sampling.pc_sample, dict(num_steps=nfe // 2, snr=0.16,
                                                                      denoise=False)),
    "PF-ODE Euler": lambda nfe: (sampling.ode_sample, dict(method="euler", num_steps=nfe)),
    "PF-ODE Heun": lambda nfe: (sampling.ode_sample, dict(method="heun", num_steps=nfe // 2)),
    "DDIM (eta 0)": lambda nfe: (sampling.ddim_sample, dict(num_steps=nfe)),
    "DPM-Solver++ 2M, logSNR": lambda nfe: (sampling.dpm_solver_pp_sample, dict(num_steps=nfe, spacing="log_snr")),
    "DPM-Solver++ 2M, uniform t": lambda nfe: (sampling.dpm_solver_pp_sample,
                                               dict(num_steps=nfe, spacing="uniform")),
    "EDM Heun (rho 7)": lambda nfe: (sampling.edm_sample, dict(num_steps=(nfe + 1) // 2)),
}
ADAPTIVE_TOLERANCES = (1e-1, 1e-2, 1e-3, 1e-5)
# Programs whose run is short (NFE x samples x dimensions below this) are compiled with XLA's cheap settings:
# compilation dominates them, while long runs need the optimised code (about 3x faster per evaluation).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
FAST_COMPILE_MAX_WORK = 2_000_000


def run_target(name, nfes, num_baseline=8):
  start = time.time()
  target = make_target(name)
  weights, means, stds, num = target
  dim = means.shape[1]
  mixture = GaussianMixture(jnp.asarray(weights, jnp.float32), jnp.asarray(means, jnp.float32),
                            jnp.asarray(stds, jnp.float32))
  sde = sf.VPSDE()
  score_fn = mixture.score(sde)
  widths = bandwidths(target)
  reference = jnp.asarray(exact_samples(target, num, seed=12345))
  reference_kernel_mean = mean_kernel(reference, reference, widths)
  baseline = [mmd(exact_samples(target, num, seed), reference, widths, reference_kernel_mean)
              for seed in range(num_baseline)]
  key = jax.random.key(0)
  x_T = sde.prior_sample(jax.random.key(1), (num, dim), jnp.float32)

  def measure(sampler, options, nominal_nfe):
    fast = nominal_nfe * num * dim <= FAST_COMPILE_MAX_WORK
    run = jax.jit(lambda key, x_T: sampler(key, sde, score_fn, (num, dim), eps=EPS, dtype=jnp.float32, x_T=x_T,
                                           **options), compiler_options=FAST_COMPILE if fast else None)
    x, info = run(key, x_T)
    return mmd(x, reference, widths, reference_kernel_mean), int(info.nfe), int(info.status)

  print(f"\n## {name}: {len(weights)}-component Gaussian mixture in {dim}-D, VP SDE (beta 0.1..20), eps {EPS}, "
        f"{num} samples, float32")
  print(f"MMD to an exact sample (kernel widths {np.round(np.asarray(widths), 2).tolist()}); exact-vs-exact: "
        f"{np.mean(baseline):.4f} +- {np.std(baseline, ddof=1):.4f} ({num_baseline} exact samples)\n")
  print("| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |")
  print("|---|" + "---|" * len(nfes))
  for label, make in SAMPLERS.items():
    cells = []
    for nominal in nfes:
      sampler, options = make(nominal)
      distance, nfe, _ = measure(sampler, options, nominal)
      cells.append(f"{distance:.4f}" + ("" if nfe == nominal else f" ({nfe})"))
    print(f"| {label} | " + " | ".join(cells) + " |", flush=True)

  print("\nAdaptive PF-ODE (Tsit5, PID controller; NFE counts rejected steps):\n")
  print("| rtol = atol | NFE | MMD |")
  print("|---|---|---|")
  for tolerance in ADAPTIVE_TOLERANCES:
    distance, nfe, status = measure(sampling.ode_sample, dict(method="tsit5", rtol=tolerance, atol=tolerance),
                                    nominal_nfe=100)
    print(f"| {tolerance:g} | {nfe} | {distance:.4f}{'' if status == 0 else f' (status {status})'} |", flush=True)
  print(f"\n({name}: {time.time() - start:.0f} s)")


def main():
  jax.config.update("jax_enable_x64", True)  # For the MMD sums; the samplers run in float32 (dtype=jnp.float32).
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--targets", nargs="+", default=["2d", "64d"], choices=["2d", "64d"])
  parser.add_argument("--nfe", nargs="+", type=int, default=[10, 20, 50, 100, 1000])
  args = parser.parse_args()
  start = time.time()
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; cells show the MMD to exact samples, with the "
        "actual NFE in parentheses where it is below the column's")
  for name in args.targets:
    run_target(name, args.nfe)
  print(f"\ntotal time {time.time() - start:.0f} s")


if __name__ == "__main__":
  main()
