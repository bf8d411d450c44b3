"""Reproduces an XLA:CPU deadlock: a host that queues 32 or more sharded computations per device on a CPU split
into devices hangs in an all-reduce until XLA's rendezvous timeout aborts the process.

    python bench/xla_cpu_runahead_deadlock.py                 # unbounded: aborts (SIGABRT) on a 2-core machine
    python bench/xla_cpu_runahead_deadlock.py --in_flight 32  # at most 32 calls in flight: finishes
    python bench/xla_cpu_runahead_deadlock.py --in_flight 33  # aborts

What happens (jax/jaxlib 0.10.2, 2 cores, 2 host devices; thread stacks taken with gdb at the hang): PjRt's CPU
client launches each device's part of a call on a pool of max(cores, devices) threads, and a launch first takes
one of the device's 32 in-flight slots (a semaphore), blocking its pool thread while none is free. Once the host
runs 32 calls ahead, the launch of a new call blocks one of the 2 threads; the other runs device 0's part of an
earlier call, which waits in an all-reduce for device 1's part; that part is queued behind them with no thread
left to run it, and nothing frees a slot. So 32 calls in flight run, and a 33rd deadlocks. `scoreflow.train.loop` keeps at most `MAX_CALLS_IN_FLIGHT` (2) calls
queued, which avoids it. A pool with more threads (`PJRT_NPROC=4`, read when the backend starts) also avoids it.
"""

import argparse
import os
import sys
import time


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--in_flight", type=int, default=0,
                      help="calls in flight at most: before each new call, wait for the one this many back (0: never wait)")
  parser.add_argument("--calls", type=int, default=5000)
  parser.add_argument("--devices", type=int, default=2)
  parser.add_argument("--timeout_s", type=int, default=10,
                      help="XLA's collective rendezvous timeout (its default is 40 s)")
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                             f"--xla_force_host_platform_device_count={args.devices} "
                             f"--xla_cpu_collective_call_terminate_timeout_seconds={args.timeout_s}")
  import collections  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  mesh = Mesh(jax.devices(), ("data",))
  weights = jax.device_put(jnp.ones((64, 64)), NamedSharding(mesh, PartitionSpec()))
  batch = jax.device_put(jnp.ones((256, 64)), NamedSharding(mesh, PartitionSpec("data")))

  @jax.jit
  def step(weights, batch):
    gradient = jnp.mean(jnp.tanh(batch @ weights), axis=0)  # A mean over the sharded batch: an all-reduce.
    return weights - 1e-3 * gradient, jnp.sum(gradient)

  queued = collections.deque()
  started = time.perf_counter()
  for _ in range(args.calls):
    if args.in_flight and len(queued) >= args.in_flight:
      queued.popleft().block_until_ready()
    weights, metric = step(weights, batch)
    queued.append(metric)
  jax.block_until_ready(weights)
  print(f"{args.calls} calls on {len(jax.devices())} devices, at most {args.in_flight or 'unbounded'} in flight: "
        f"finished in {time.perf_counter() - started:.2f} s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
