"""Training throughput of the compiled train step, against this machine's measured matmul/conv peak.

For each model it builds the real train step (DSM loss on the VP SDE, Adam, EMA, non-finite guard, donated state,
jitted over a mesh of all devices), feeds synthetic batches (no data stack needed) and reports

* compile time of the train step,
* examples/s and steps/s (median of `--repeats` timed windows of `--calls` calls each),
* the step's model FLOPs (XLA's cost analysis of the lowered program) and the achieved FLOP/s,
* that as a fraction of the best FLOP/s this run measured on a large matmul and on a U-Net-like 3x3 convolution
  (the same-run baseline: the achievable peak, not a datasheet number).

Cases: `digits` (the `ddpmpp_digits` preset, 8x8x1), `cifar_small` (DDPM++ at 32x32x3 with a small width),
`cifar10_ddpmpp` (the paper's 61.8 M-parameter DDPM++ configuration; for accelerators, or with a small
`--batch` on a CPU).

    python bench/bench_train.py                              # digits and cifar_small on this machine
    python bench/bench_train.py --cases cifar10_ddpmpp --compute_dtype bfloat16,float32  # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import scoreflow as sf
from scoreflow.models import build_model
from scoreflow.train import sharding
from scoreflow.train.state import TrainState, make_optimizer
from scoreflow.train.step import make_objective, make_train_step

CASES = {
    "digits": dict(spec="ddpmpp_digits", shape=(8, 8, 1), batch=128),
    "cifar_small": dict(spec={"preset": "ddpmpp_cifar10", "nf": 32, "num_res_blocks": 2}, shape=(32, 32, 3),
                        batch=64),
    "cifar10_ddpmpp": dict(spec="ddpmpp_cifar10", shape=(32, 32, 3), batch=128),
}


def flops_of(stage) -> float:
  """FLOPs of one call from XLA's cost analysis of a `Lowered` (model FLOPs) or `Compiled` stage.

  The lowered (unoptimised) HLO counts every convolution and dot of the model on any backend. A compiled GPU
  program hands convolutions to cuDNN as custom calls that its cost analysis does not count (on an H200 it
  reported 1.2 GFLOP for the digits step whose lowered HLO has 12), so utilisation uses the lowered count.
  """
  analysis = stage.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def timed(fn, *args, calls: int, repeats: int):
  """Median seconds per call of `fn(*args)` over `repeats` windows of `calls` calls (after one warm-up)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - started) / calls)
  return statistics.median(times)


def measure_peak(dtype, repeats: int) -> dict[str, float]:
  """Best FLOP/s of a large matmul and of a 3x3 convolution (128 channels), measured now."""
  results = {}
  on_cpu = jax.devices()[0].platform == "cpu"
  n = 1024 if on_cpu else 8192
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  matmul = jax.jit(lambda a: a @ a)
  seconds = timed(matmul, a, calls=3 if on_cpu else 20, repeats=repeats)
  results["matmul"] = 2 * n**3 / seconds
  batch, size, channels = (16, 16, 128) if on_cpu else (128, 32, 256)
  x = jax.random.normal(jax.random.key(1), (batch, size, size, channels), dtype)
  w = jax.random.normal(jax.random.key(2), (3, 3, channels, channels), dtype)
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                           dimension_numbers=("NHWC", "HWIO", "NHWC")))
  seconds = timed(conv, x, w, calls=3 if on_cpu else 20, repeats=repeats)
  results["conv3x3"] = 2 * batch * size * size * channels * channels * 9 / seconds
  return results


def prepare_case(name: str, *, batch: int | None, steps_per_call: int, compute_dtype) -> dict:
  """Builds and compiles one case's train step: everything but the timing (safe to run in a thread)."""
  case = CASES[name]
  batch = batch or case["batch"]
  mesh = sharding.make_mesh()
  sharding.check_batch_size(batch, mesh)
  model = build_model(case["spec"])
  if compute_dtype is not None:
    model = model.clone(dtype=compute_dtype)
  shape = (batch, *case["shape"])
  optimizer = make_optimizer(2e-4, warmup_steps=10)
  objective = make_objective(model.apply, sf.VPSDE(), parameterization=sf.EpsilonParameterization(),
                             reduce_mean=True)
  train_step = sharding.jit_train_step(make_train_step(objective, optimizer, steps_per_call=steps_per_call),
                                       mesh, steps_per_call=steps_per_call)

  def init():
    params = model.init({"params": jax.random.key(0)}, jnp.zeros((1, *case["shape"]), jnp.float32),
                        jnp.zeros((1,), jnp.float32), train=False)["params"]
    return TrainState.create(params, optimizer, jax.random.key(1))

  state = jax.jit(init, out_shardings=sharding.replicated(mesh))()
  num_params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
  local = np.random.default_rng(0).standard_normal(((steps_per_call,) if steps_per_call > 1 else ()) + shape)
  batch_arrays = sharding.global_batch({"x": local.astype(np.float32)}, mesh, steps_axis=steps_per_call > 1)

  lowered = train_step.lower(state, batch_arrays)
  started = time.perf_counter()
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - started
  return {
      "compiled": compiled, "state": state, "batch_arrays": batch_arrays,
      "row": {"case": name, "dtype": "float32" if compute_dtype is None else jnp.dtype(compute_dtype).name,
              "params": int(num_params), "batch": batch, "steps_per_call": steps_per_call,
              "devices": int(mesh.devices.size), "compile_s": compile_seconds,
              "gflop_per_step": flops_of(lowered) / steps_per_call / 1e9,
              "compiled_gflop_per_step": flops_of(compiled) / steps_per_call / 1e9},
  }


def measure_case(prepared: dict, *, calls: int, repeats: int) -> dict:
  """Times a prepared case's compiled step (state threaded through, donated) and completes its row."""
  row = dict(prepared["row"])
  holder = {"state": prepared.pop("state")}
  compiled = prepared["compiled"]

  def call(batch_arrays):
    holder["state"], metrics = compiled(holder["state"], batch_arrays)
    return metrics

  seconds_per_call = timed(call, prepared["batch_arrays"], calls=calls, repeats=repeats)
  steps_per_sec = row["steps_per_call"] / seconds_per_call
  row.update(steps_per_s=steps_per_sec, examples_per_s=steps_per_sec * row["batch"],
             achieved_gflops=row["gflop_per_step"] * steps_per_sec)
  return row


def format_row(row: dict) -> str:
  return (f"{row['case']:<16}{row['dtype']:>9}{row['params']:>12,}{row['batch']:>7}{row['compile_s']:>11.1f}"
          f"{row['steps_per_s']:>10.2f}{row['examples_per_s']:>12.1f}{row['gflop_per_step']:>12.2f}"
          f"{row['achieved_gflops']:>10.1f}{row['fraction_of_peak']:>9.1%}")


HEADER = (f"{'case':<16}{'dtype':>9}{'params':>12}{'batch':>7}{'compile s':>11}{'steps/s':>10}{'examples/s':>12}"
          f"{'GFLOP/step':>12}{'GFLOP/s':>10}{'of peak':>9}")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", default="digits,cifar_small", help=f"comma-separated, from {sorted(CASES)}")
  parser.add_argument("--batch", type=int, default=None, help="global batch (default: per case)")
  parser.add_argument("--steps_per_call", type=int, default=1)
  parser.add_argument("--calls", type=int, default=3, help="calls per timed window")
  parser.add_argument("--repeats", type=int, default=2, help="timed windows (the median is reported)")
  parser.add_argument("--compute_dtype", default="float32",
                      help="comma-separated compute dtypes, each run for every case: float32, bfloat16")
  parser.add_argument("--json", default=None, help="also write the results to this file (after every case)")
  args = parser.parse_args()
  dtypes = {"float32": None, "bfloat16": jnp.bfloat16}
  dtype_names = [name.strip() for name in args.compute_dtype.split(",")]
  unknown = sorted(set(dtype_names) - set(dtypes))
  if unknown:
    parser.error(f"--compute_dtype: unknown {unknown}; choose from {sorted(dtypes)}")
  jobs = [(case.strip(), dtype) for case in args.cases.split(",") for dtype in dtype_names]
  unknown = sorted({case for case, _ in jobs} - set(CASES))
  if unknown:
    parser.error(f"--cases: unknown {unknown}; choose from {sorted(CASES)}")

  device = jax.devices()[0]
  print(f"devices: {len(jax.devices())} x {device.device_kind} ({device.platform}); jax {jax.__version__}",
        flush=True)
  peaks = {}
  for name in dtype_names:
    peaks[name] = measure_peak(jnp.float32 if dtypes[name] is None else dtypes[name], args.repeats)
    print(f"measured {name} peak: matmul {peaks[name]['matmul'] / 1e9:.1f} GFLOP/s, conv3x3 "
          f"{peaks[name]['conv3x3'] / 1e9:.1f} GFLOP/s", flush=True)

  rows = []
  for case, dtype in jobs:
    # One case at a time: on an H200, four cases compiled at once in threads took 164 s for the digits step
    # (run_train.py compiles its digits step alone in 22 s); the autotuner times kernels on the one GPU.
    prepared = prepare_case(case, batch=args.batch, steps_per_call=args.steps_per_call,
                            compute_dtype=dtypes[dtype])
    print(f"compiled {case} ({dtype}) in {prepared['row']['compile_s']:.1f} s", flush=True)
    row = measure_case(prepared, calls=args.calls, repeats=args.repeats)
    del prepared
    row["fraction_of_peak"] = row["achieved_gflops"] * 1e9 / max(peaks[dtype].values())
    rows.append(row)
    if len(rows) == 1:
      print(HEADER)
    print(format_row(row), flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"peak_flops": peaks, "rows": rows, "device": device.device_kind, "jax": jax.__version__}, f,
                  indent=2)


if __name__ == "__main__":
  main()
