"""Probability-flow likelihood: scoreflow.log_likelihood against the 2021 host loop and a bare diffrax solve.

Same batch, same drift+divergence function (Hutchinson, one Rademacher probe drawn once), same rtol/atol and
the same Dormand-Prince pair, on

  (a) `mixture`: a 2-D eight-component Gaussian-mixture ring with its exact score under the VP SDE, 4096 points;
  (b) `image`: a random-init score network on 8x8x1 images (the `ddpmpp_digits` U-Net preset of
      scoreflow.models when it builds, else a stand-in conv net defined here), epsilon-parameterized and
      conditioned on t, batch 32 (no float64 reference: the error columns are left out).

Implementations:
  scoreflow            scoreflow.log_likelihood, shared steps (per_example=False), Dopri5 and Tsit5
  scoreflow/per-ex     scoreflow.log_likelihood(per_example=True): each example its own steps (vmapped solve)
  diffrax bare         diffrax.diffeqsolve(Dopri5, PIDController) over the batch, default RMS norm, jitted
  scipy RK45 (2021)    scipy.integrate.solve_ivp(RK45) on the host, calling the jitted drift+divergence
                       once per evaluation with the whole batch flattened (the reference implementation)

Printed per implementation: NFE, median wall time, examples/s, speed-up of scoreflow over it, and the
overhead ratio wall / (NFE x one drift+divergence evaluation), where one evaluation is timed inside a
compiled loop (so the ratio is the cost of everything that is not the model: solver arithmetic, control,
host round trips). The scoreflow norm takes the max over examples (every example meets the tolerance); the
baselines use the RMS over the whole flattened batch, a looser criterion, hence their lower NFE at equal
rtol/atol; the overhead ratio compares them per evaluation.

Run: python bench/bench_likelihood.py [--case mixture|image|all] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import scipy.integrate

jax.config.update("jax_enable_x64", True)  # For the float64 reference solve only; the benchmark runs float32.

import scoreflow as sf  # noqa: E402
from scoreflow import likelihood  # noqa: E402
from scoreflow.testing.analytic import GaussianMixture


def _drift_and_divergence(sde, score_fn, probes):
  """`f(x [B, *D], t scalar) -> (drift [B, *D], divergence [B])`, the function every implementation calls."""

  def f(x, t):
    t_batch = jnp.broadcast_to(t, x.shape[:1]).astype(x.dtype)
    drift_fn = lambda y: sde.probability_flow_drift(score_fn, y, t_batch).astype(y.dtype)
    dx, div = likelihood.hutchinson_divergence(drift_fn, x, probes)
    return dx, div[0]

  return f


def _eval_loop(f, x, evals):
  """A call running `evals` drift+divergence evaluations inside one compiled loop (no dispatch cost)."""

  @jax.jit
  def loop(x):
    def body(_, carry):
      y, acc = carry
      dx, div = f(y, jnp.asarray(0.5, x.dtype))
      return y + 1e-12 * dx, acc + div

    return jax.lax.fori_loop(0, evals, body, (x, jnp.zeros(x.shape[:1], x.dtype)))

  return lambda: loop(x)


def bare_diffrax(f, x, sde, eps, rtol, atol):
  batch = x.shape[0]

  @jax.jit
  def solve(x):
    def vector_field(t, y, args):
      dx, div = f(y[0], t)
      return dx, div

    t0, t1 = jnp.asarray(eps, x.dtype), jnp.asarray(sde.T, x.dtype)
    sol = diffrax.diffeqsolve(diffrax.ODETerm(vector_field), diffrax.Dopri5(), t0, t1, None,
                              (x, jnp.zeros((batch,), x.dtype)), saveat=diffrax.SaveAt(t1=True),
                              stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=4096)
    z, delta = sol.ys[0][0], sol.ys[1][0]
    # 6 evaluations per attempted step plus the first (one more per rejected first attempt, not counted).
    return sde.prior_logp(z) + delta, 6 * sol.stats["num_steps"] + 1

  return lambda: solve(x)


def scipy_rk45(f, x, sde, eps, rtol, atol):
  """The 2021 reference approach: a host-side RK45 driving the jitted drift+divergence each evaluation."""
  shape, dtype = x.shape, x.dtype
  size = math.prod(shape)
  f_jit = jax.jit(f)

  def ode_func(t, y):
    x_t = jnp.asarray(y[:size].reshape(shape), dtype)
    dx, div = f_jit(x_t, jnp.asarray(t, dtype))
    return np.concatenate([np.asarray(dx, np.float64).reshape(-1), np.asarray(div, np.float64)])

  def solve():  # Returns (logp, nfe), like the other candidates.
    y0 = np.concatenate([np.asarray(x, np.float64).reshape(-1), np.zeros(shape[0])])
    sol = scipy.integrate.solve_ivp(ode_func, (eps, sde.T), y0, rtol=rtol, atol=atol, method="RK45")
    z = jnp.asarray(sol.y[:size, -1].reshape(shape), dtype)
    logp = sde.prior_logp(z) + jnp.asarray(sol.y[size:, -1], dtype)
    return logp, sol.nfev

  return solve


sf_log_likelihood = getattr(sf, "log_likelihood", likelihood.log_likelihood)


def run_case(name, sde, score_fn, x, *, reference_score_fn=None, reference_tol=1e-9, eps=1e-5, rtol=1e-5,
             atol=1e-5, repeats=5, per_example_solvers=("dopri5", "tsit5")):
  key = jax.random.key(0)
  probes = likelihood.sample_probes(key, x.shape, 1, "rademacher", x.dtype)
  f = _drift_and_divergence(sde, score_fn, probes)
  batch, num_dims = x.shape[0], math.prod(x.shape[1:])

  # Reference ("err" columns): the same probes (Rademacher draws do not depend on the dtype), float64, tight
  # tolerances.
  reference = None
  if reference_score_fn is not None:
    reference, _, info = sf_log_likelihood(key, sde, reference_score_fn, x.astype(jnp.float64), eps=eps,
                                           rtol=reference_tol, atol=reference_tol, solver="dopri8")
    assert bool(info.success.all()), info.status

  candidates = []  # (label, call returning (logp, nfe [B] or scalar)).

  def ours(solver, per_ex):
    def call():
      logp, _, info = sf_log_likelihood(key, sde, score_fn, x, eps=eps, rtol=rtol, atol=atol, num_probes=1,
                                        probe="rademacher", solver=solver, per_example=per_ex)
      return logp, info.nfe

    candidates.append((f"scoreflow {solver}" + (" per-ex" if per_ex else ""), call))

  for solver in ("dopri5", "tsit5"):
    ours(solver, False)
    if solver in per_example_solvers:
      ours(solver, True)
  candidates.append(("diffrax bare dopri5", bare_diffrax(f, x, sde, eps, rtol, atol)))
  candidates.append(("scipy RK45 (2021)", scipy_rk45(f, x, sde, eps, rtol, atol)))

  results = {}
  for label, call in candidates:  # Warm-up (compilation), and the outputs.
    logp, nfe = jax.block_until_ready(call())
    results[label] = (np.asarray(logp, np.float64), np.broadcast_to(np.asarray(nfe), (batch,)), [])
  evals = max(10, int(np.median([r[1].max() for r in results.values()])) // 2)
  eval_loop, eval_times = _eval_loop(f, x, evals), []
  f_jit, t_mid, call_times = jax.jit(f), jnp.asarray(0.5, x.dtype), []
  jax.block_until_ready((eval_loop(), f_jit(x, t_mid)))
  for _ in range(repeats):  # Interleaved, so that load changes on a shared machine hit all alike.
    for label, call in candidates:
      start = time.perf_counter()
      jax.block_until_ready(call()[0])
      results[label][2].append(time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(eval_loop())
    eval_times.append((time.perf_counter() - start) / evals)
    start = time.perf_counter()
    for _ in range(evals // 4):
      jax.block_until_ready(f_jit(x, t_mid))
    call_times.append((time.perf_counter() - start) / (evals // 4))
  t_eval = statistics.median(eval_times)
  print(f"\n== {name}: batch {batch}, event {x.shape[1:]}, dtype {x.dtype}, rtol=atol={rtol}, eps={eps}; "
        f"one drift+divergence evaluation: {t_eval * 1e3:.3f} ms inside a compiled loop (the overhead "
        f"column's unit), {statistics.median(call_times) * 1e3:.3f} ms as a top-level jitted call")

  base_wall = statistics.median(results[candidates[0][0]][2])
  print(f"{'implementation':22s} {'NFE':>5s} {'NFE avg':>7s} {'wall s':>8s} {'ex/s':>9s} {'rel.time':>8s} "
        f"{'overhead':>8s}" + (f" {'max err/D':>9s} {'mean err/D':>10s}" if reference is not None else ""))
  rows = []
  for label, _ in candidates:
    logp, nfe, times = results[label]
    wall = statistics.median(times)
    # The batched loop runs until its slowest example ends: its cost is the largest NFE.
    overhead = wall / (int(nfe.max()) * t_eval)
    rows.append(dict(label=label, nfe=int(nfe.max()), wall=wall, overhead=overhead))
    errors = ""
    if reference is not None:
      err = np.abs(logp - np.asarray(reference, np.float64)) / num_dims
      errors = f" {err.max():9.2e} {err.mean():10.2e}"
    print(f"{label:22s} {int(nfe.max()):5d} {nfe.mean():7.1f} {wall:8.4f} {batch / wall:9.1f} "
          f"{wall / base_wall:8.2f} {overhead:8.2f}{errors}")
  return rows


def mixture_case(args):
  angles = jnp.arange(8) * (2 * jnp.pi / 8)
  means = 4.0 * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=1)
  data = GaussianMixture(jnp.full((8,), 1 / 8), means, jnp.full((8, 2), 0.5))
  sde = sf.VPSDE()
  x = data.sample(jax.random.key(1), args.batch).astype(jnp.float32)
  data32 = jax.tree.map(lambda a: a.astype(jnp.float32), data)
  return run_case("(a) 2-D 8-component mixture, exact score, VP", sde, data32.score(sde), x,
                  reference_score_fn=data.score(sde), repeats=args.repeats)


def _standin_network():
  import flax.linen as nn

  class StandInUNet(nn.Module):
    """A small conv net with a time embedding, about the size and cost of the digits U-Net preset."""

    nf: int = 64

    @nn.compact
    def __call__(self, x, cond):
      freqs = jnp.exp(-jnp.arange(16) * (math.log(1e4) / 16)).astype(x.dtype)
      emb = jnp.concatenate([jnp.sin(cond[:, None] * freqs), jnp.cos(cond[:, None] * freqs)], axis=1)
      emb = nn.Dense(4 * self.nf)(nn.silu(nn.Dense(4 * self.nf)(emb)))
      h = nn.Conv(self.nf, (3, 3))(x)
      skips = []
      for width in (self.nf, 2 * self.nf):
        for _ in range(2):
          r = nn.Conv(width, (3, 3))(nn.silu(nn.GroupNorm(8)(h)))
          r = r + nn.Dense(width)(emb)[:, None, None, :]
          r = nn.Conv(width, (3, 3))(nn.silu(nn.GroupNorm(8)(r)))
          h = (nn.Conv(width, (1, 1))(h) if h.shape[-1] != width else h) + r
        skips.append(h)
        h = nn.avg_pool(h, (2, 2), (2, 2)) if width == self.nf else h
      h = jax.image.resize(h, (h.shape[0], 8, 8, h.shape[-1]), "nearest")
      h = jnp.concatenate([h, skips[0]], axis=-1)
      h = nn.Conv(self.nf, (3, 3))(nn.silu(nn.GroupNorm(8)(h)))
      return nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))

  return StandInUNet(), "stand-in conv net (defined in this script)"


def image_case(args):
  sde = sf.VPSDE()
  try:
    from scoreflow.models import build_model

    model = build_model("ddpmpp_digits", dropout=0.0, init_scale=1.0)
    description = "scoreflow.models ddpmpp_digits U-Net preset"
  except Exception as error:  # The models module may not exist yet; fall back to the stand-in.
    print(f"(ddpmpp_digits preset unavailable: {type(error).__name__}: {error}; using the stand-in)")
    model, description = _standin_network()
  x = jax.random.uniform(jax.random.key(2), (args.image_batch, 8, 8, 1), jnp.float32, -1.0, 1.0)
  cond = jnp.zeros((x.shape[0],), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(3), x, cond)
  num_params = sum(p.size for p in jax.tree.leaves(params))
  # Conditioned on t itself rather than 999 t: a random network's output then varies with t about as slowly as a
  # trained one's (with 999 t the random features oscillate in t and the solve needs ~1000-1600 NFE).
  parameterization = sf.EpsilonParameterization(sf.NoiseConditioning("time", scale=1.0))
  score_fn = sf.make_score_fn(model.apply, params, sde, parameterization)
  return run_case(f"(b) random-init {description}, {num_params:,} parameters, VP", sde, score_fn, x,
                  repeats=args.image_repeats, per_example_solvers=("dopri5",))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--case", choices=("mixture", "image", "all"), default="all")
  parser.add_argument("--batch", type=int, default=4096)
  parser.add_argument("--image-batch", type=int, default=32)
  parser.add_argument("--image-repeats", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, diffrax {diffrax.__version__}, backend {jax.default_backend()}, "
        f"devices {jax.devices()}")
  if args.case in ("mixture", "all"):
    mixture_case(args)
  if args.case in ("image", "all"):
    image_case(args)


if __name__ == "__main__":
  main()
