"""Samplers and the likelihood at the network's speed: time per network evaluation against the bare network.

For a trained score network (`--workdir` of a run and its `--config`: the EMA weights of its newest
checkpoint; without them, the `ddpmpp_digits` U-Net with random weights, whose rough probability-flow ODE
makes the adaptive solvers take many more steps than a trained model) and one batch, this times

* the baselines, each a jitted call repeated `--loop` times back to back: the bare score network
  (`make_score_fn` of the forward pass) and the same with one vector-Jacobian product in `x` (what one
  Hutchinson divergence evaluation costs);
* every sampler and `log_likelihood`, jitted whole, reporting its exact NFE (`info.nfe`, `info.num_steps`).

The overhead ratio is `wall / (NFE x baseline)`: 1.00 means the sampler costs exactly its network
evaluations; everything above is the sampler's own arithmetic, noise draws and control flow. The likelihood is
compared with the forward+VJP baseline, the samplers with the forward baseline.

    python bench/bench_overhead.py --config configs/digits_vp.py --workdir runs/digits_vp   # the README's run
    python bench/bench_overhead.py --batch 64 --repeats 5                                   # random weights
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import scoreflow as sf
from scoreflow.models import build_model


def median_seconds(fn, *, repeats: int, warmup: bool = True) -> float:
  """Median wall seconds of `fn()` (blocked on its result), after one warm-up call if `warmup`."""
  if warmup:
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - started)
  return statistics.median(times)


def random_params(model, shape, seed: int = 0):
  """Initialised parameters with every zero-initialised kernel replaced by a small random one (the U-Nets'
  output layers start at exactly zero, which would make every sampler trivially cheap to control)."""
  params = model.init(jax.random.key(seed), jnp.zeros((1, *shape)), jnp.zeros((1,)))["params"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [jnp.where(leaf == 0, 0.02 * jax.random.normal(k, leaf.shape), leaf) if leaf.ndim > 1 else leaf
            for leaf, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


def trained_params(config_path: str, workdir: str):
  """`(model, EMA params, sde, parameterization, element shape)` of the newest checkpoint of a training run."""
  from scoreflow.config import experiment as config_lib
  from scoreflow.train import sharding  # pylint: disable=import-outside-toplevel
  from scoreflow.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(config_path))))  # `from configs import ...`
  spec = importlib.util.spec_from_file_location("bench_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  experiment = config_lib.build_experiment(module.get_config())
  with open(os.path.join(workdir, "config.json")) as f:
    data = json.load(f)["data"]
  shape = (data["image_size"] or 8, data["image_size"] or 8, 1) if data["name"] == "digits" else None
  if shape is None:
    raise SystemExit("error: --workdir: only digits runs are supported here; pass --preset for other shapes.")
  checkpointer = Checkpointer(workdir, async_save=False)
  try:
    state, _, step = checkpointer.restore(experiment.abstract_train_state(shape, sharding.make_mesh()))
  finally:
    checkpointer.close()
  print(f"restored step {step} of {workdir}")
  return experiment.model, state.ema_params, experiment.sampling_sde, experiment.parameterization, shape


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default=None, help="the run's config file (with --workdir)")
  parser.add_argument("--workdir", default=None, help="a training run whose newest EMA weights are timed")
  parser.add_argument("--preset", default="ddpmpp_digits")
  parser.add_argument("--image_size", type=int, default=8)
  parser.add_argument("--channels", type=int, default=1)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--loop", type=int, default=20, help="network calls per baseline timing")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  if args.workdir:
    model, params, sde, parameterization, shape = trained_params(args.config, args.workdir)
  else:
    shape = (args.image_size, args.image_size, args.channels)
    model = build_model(args.preset, dropout=0.0)
    params = random_params(model, shape)
    sde, parameterization = sf.VPSDE(), sf.EpsilonParameterization()
  batch_shape = (args.batch, *shape)
  score_fn = sf.make_score_fn(lambda p, x, c: model.apply({"params": p}, x, c), params, sde, parameterization)
  x0 = jax.random.normal(jax.random.key(2), batch_shape)
  t0 = jnp.full((args.batch,), 0.5)

  forward = jax.jit(lambda x: score_fn(x, t0))
  cotangent = jnp.ones(batch_shape)
  forward_vjp = jax.jit(lambda x: jax.vjp(lambda y: score_fn(y, t0), x)[1](cotangent)[0])

  def repeated(fn):
    def run():
      for _ in range(args.loop):  # Dispatched asynchronously back to back; blocked on the last.
        out = fn(x0)
      return out
    return run

  forward_s = median_seconds(repeated(forward), repeats=args.repeats) / args.loop
  forward_vjp_s = median_seconds(repeated(forward_vjp), repeats=args.repeats) / args.loop
  device = jax.devices()[0]
  print(f"{args.workdir or args.preset} on {len(jax.devices())} x {device.device_kind}, batch {batch_shape}, "
        f"jax {jax.__version__}", flush=True)
  print(f"baselines ({args.loop} calls): forward {forward_s * 1e3:.2f} ms, forward+VJP "
        f"{forward_vjp_s * 1e3:.2f} ms per call", flush=True)

  key = jax.random.key(3)
  cases = {
      "pc euler_maruyama, 100 steps": lambda: sf.pc_sample(key, sde, score_fn, batch_shape, predictor="euler_maruyama",
                                                           corrector="none", num_steps=100, denoise=True),
      "pc reverse_diffusion + langevin, 50 steps": lambda: sf.pc_sample(key, sde, score_fn, batch_shape,
                                                                        predictor="reverse_diffusion",
                                                                        corrector="langevin", num_steps=50),
      "ode euler, 100 steps": lambda: sf.ode_sample(key, sde, score_fn, batch_shape, method="euler", num_steps=100),
      "ode heun, 50 steps": lambda: sf.ode_sample(key, sde, score_fn, batch_shape, method="heun", num_steps=50),
      "ode tsit5, rtol=atol=1e-3": lambda: sf.ode_sample(key, sde, score_fn, batch_shape, rtol=1e-3, atol=1e-3),
      "ddim, 50 steps": lambda: sf.ddim_sample(key, sde, score_fn, batch_shape, num_steps=50),
      "dpm_solver++(2M), 20 steps": lambda: sf.dpm_solver_pp_sample(key, sde, score_fn, batch_shape, num_steps=20),
      "edm heun, 18 steps": lambda: sf.edm_sample(key, sde, score_fn, batch_shape, num_steps=18),
  }
  print(f"\n{'method':<44}{'NFE':>7}{'seconds':>10}{'samples/s':>11}{'ms/NFE':>9}{'overhead':>10}")
  for name, run in cases.items():
    compiled = jax.jit(run)
    nfe = int(compiled()[1].nfe)  # Also the warm-up call.
    seconds = median_seconds(compiled, repeats=args.repeats, warmup=False)
    print(f"{name:<44}{nfe:>7}{seconds:>10.3f}{args.batch / seconds:>11.1f}{seconds / nfe * 1e3:>9.2f}"
          f"{seconds / (nfe * forward_s):>9.2f}x", flush=True)

  data = jnp.clip(0.5 * jax.random.normal(jax.random.key(4), batch_shape), -1, 1)
  for name, kwargs in {"log_likelihood hutchinson, dopri5 1e-3": dict(rtol=1e-3, atol=1e-3),
                       "log_likelihood hutchinson, dopri5 1e-5": dict(rtol=1e-5, atol=1e-5)}.items():
    compiled = jax.jit(lambda kwargs=kwargs: sf.log_likelihood(key, sde, score_fn, data, **kwargs))
    nfe = float(np.mean(compiled()[2].nfe))
    seconds = median_seconds(compiled, repeats=args.repeats, warmup=False)
    print(f"{name:<44}{nfe:>7.0f}{seconds:>10.3f}{args.batch / seconds:>11.1f}{seconds / nfe * 1e3:>9.2f}"
          f"{seconds / (nfe * forward_vjp_s):>9.2f}x  (vs forward+VJP)", flush=True)


if __name__ == "__main__":
  main()
