#!/usr/bin/env bash
# Training throughput on an accelerator: one prepared script for a short device lease.
#
# Runs bench/bench_train.py's digits and CIFAR-10 DDPM++ (the paper's configuration) cases in float32 and bfloat16, then a
# short real `run_train.py` job on the digits config (tfds builder, grain, Orbax, sample grid) to show the CLI runs
# end to end on the accelerator. Everything is written under $OUT (default: bench/results/device) so a lease that
# runs out still returns what finished.
#
#   OUT=/tmp/out bash bench/device_train.sh
#
# Packages the accelerator image lacks (ml_collections, tfds, grain, tensorboardX and their dependencies on the
# project's machines) are installed first from wheels in .whl/ when it exists; bench/RESULTS.md lists them.
set -u
OUT=${OUT:-bench/results/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export PYTHONPATH=${PYTHONPATH:-}:$PWD

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
  python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__,
'optax', optax.__version__, 'orbax', o.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"

run() {  # run NAME SECONDS CMD...: one step, time-limited, its output kept even when it fails.
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s): $*"
  local started=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - started)) s"
}

# The CIFAR-10 DDPM++ step compiles for well over 100 s on an H200 (autotuning): give it most of the lease.
run train_step 420 python3 bench/bench_train.py --cases cifar10_ddpmpp,digits --compute_dtype bfloat16,float32 \
  --calls 20 --repeats 3 --json "$OUT/train_step.json"
run digits_cli 80 python3 run_train.py --config configs/digits_vp.py --workdir /tmp/digits_gpu \
  --config.training.num_train_steps=1500 --config.training.progress_bar=False --config.data.data_dir=/tmp/tfds
cp /tmp/digits_gpu/samples/step_1500.png "$OUT/digits_gpu_step_1500.png" 2>/dev/null
cp /tmp/digits_gpu/summary.json "$OUT/digits_gpu_summary.json" 2>/dev/null
cp /tmp/digits_gpu/metrics.jsonl "$OUT/digits_gpu_metrics.jsonl" 2>/dev/null
true
