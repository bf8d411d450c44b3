"""scoreflow's train step against PyTorch implementations of the same (or a matched) network, timed in one run.

The fair peer is the 2021 reference itself: score_sde_pytorch's `models/ncsnpp.py` built from its
`configs/vp/cifar10_ddpmpp_continuous.py` (DDPM++ cont., VP SDE). Its source is not part of scoreflow; pass the
path of a checkout with `--reference` (its `op/` package compiles CUDA kernels when imported: the benchmark
imports it with the extension build switched off, since DDPM++ never calls those kernels and the CPU path of its
FIR resampler is plain PyTorch).

The pip-installable peer (`--peers diffusers`, the default without `--reference`; `pip install diffusers`, or
`pip install -e '.[bench]'`) is diffusers' `UNet2DModel` configured as near to the same DDPM++ network as its
options allow (`_diffusers_peer.py` lists what matches and what cannot): the same widths, depth, attention, dropout,
GroupNorm and sinusoidal time embedding, within about 1.5 % of the parameter count (both counts are printed).

Every side does the same work per step, as the reference's `losses.get_sde_loss_fn` and
`losses.optimization_manager` do: draw `t ~ U[1e-5, 1]` and Gaussian noise, perturb with the VP kernel,
evaluate the network at `999 t`, the mean-reduced denoising score-matching loss, its gradient, global-norm
clipping at 1, Adam (2e-4, warm-up) and the EMA update (0.9999 with the reference's warm-up).

Timing: each side runs in a process of its own (`--one_process`: all in this one), built one after another;
after warm-up steps on each side, `--repeats` rounds each time one window of `--steps` steps on every side in
turn (interleaved, so a machine that slows down over the run affects all sides alike; the first XLA:CPU step
after an idle spell is slow, so give each window several steps); the table gives
the median examples/s of each side and the ratio scoreflow / peer, then the same for each side's fastest window.
On a CPU shared with other work the two differ: PyTorch's threads slow down far more under contention than XLA's
(`bench/RESULTS.md`), so there the fastest windows, those that caught the machine idle, compare the
implementations, and the medians their tolerance of a busy machine.

    python bench/bench_peer.py --reference ~/score_sde_pytorch                 # digits and CIFAR-10 DDPM++
    python bench/bench_peer.py --reference DIR --torch_compile                 # adds a torch.compile peer
    python bench/bench_peer.py --cases digits                                  # diffusers peer, no checkout
    python bench/bench_peer.py --reference DIR --peers reference,diffusers     # both peers in one run

scoreflow is timed on 1 device and on all `--cpu_devices` (2 by default), and with each `--cpu_ynnpack` choice
(by default `auto`, what run_train.py picks for the model, and XLA's `default` when that differs; a choice other
than `default` on one device only, as run_train.py does), each a side of its own; the ratio column is the fastest
scoreflow side over each side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

import _diffusers_peer
import _reference

PEERS = ("reference", "diffusers")

CASES = {
    # name: (scoreflow preset, image shape (H, W, C), default batch, reference-config overrides)
    "digits": ("ddpmpp_digits", (8, 8, 1), 128,
               dict(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))),
    "cifar10_ddpmpp": ("ddpmpp_cifar10", (32, 32, 3), 16, {}),
}
EPS_T = 1e-5
BETA_MIN, BETA_MAX = 0.1, 20.0
LEARNING_RATE, WARMUP, GRAD_CLIP, EMA_RATE = 2e-4, 5000, 1.0, 0.9999


# --- scoreflow. ----------------------------------------------------------------------------------

def scoreflow_side(case: str, batch: int, devices: int | None = None, ynnpack: str = "default"):
  """`(step(), num_params, compile_s)`: scoreflow's compiled, donated train step on synthetic data, with the
  operations `ynnpack` names (a choice of `sharding.cpu_ynnpack_ops`) handed to YNNPACK."""
  import jax
  import jax.numpy as jnp

  import scoreflow as sf
  from scoreflow.models import build_model
  from scoreflow.train import sharding
  from scoreflow.train.state import TrainState, make_optimizer
  from scoreflow.train.step import make_objective, make_train_step

  preset, shape, _, _ = CASES[case]
  mesh = sharding.make_mesh(jax.devices()[:devices] if devices else None)
  sharding.check_batch_size(batch, mesh)
  model = build_model(preset)
  optimizer = make_optimizer(LEARNING_RATE, warmup_steps=WARMUP, grad_clip=GRAD_CLIP)
  objective = make_objective(model.apply, sf.VPSDE(BETA_MIN, BETA_MAX), parameterization=sf.EpsilonParameterization(),
                             reduce_mean=True, eps=EPS_T)
  train_step = sharding.jit_train_step(make_train_step(objective, optimizer, ema_rate=EMA_RATE, ema_warmup=True),
                                       mesh)

  def init():
    params = model.init({"params": jax.random.key(0)}, jnp.zeros((1, *shape)), jnp.zeros((1,)))["params"]
    return TrainState.create(params, optimizer, jax.random.key(1))

  state = jax.jit(init, out_shardings=sharding.replicated(mesh))()
  num_params = sum(leaf.size for leaf in jax.tree.leaves(state.params))
  x = np.random.default_rng(0).uniform(-1, 1, (batch, *shape)).astype(np.float32)
  batch_arrays = sharding.global_batch({"x": x}, mesh)
  started = time.perf_counter()
  compiled = train_step.lower(state, batch_arrays).compile(
      compiler_options=sharding.cpu_ynnpack_compiler_options(ynnpack) if jax.default_backend() == "cpu" else None)
  compile_s = time.perf_counter() - started
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], batch_arrays)
    return metrics

  def sync(metrics):
    jax.block_until_ready(metrics)

  return step, sync, num_params, compile_s


# --- PyTorch peers. ------------------------------------------------------------------------------

def reference_network(path: str, case: str):
  """score_sde_pytorch's NCSNpp with its `configs/vp/cifar10_ddpmpp_continuous.py` (plus the case's overrides)."""
  _reference.add_reference(path)
  from configs.vp import cifar10_ddpmpp_continuous  # pylint: disable=import-outside-toplevel
  from models import ncsnpp  # pylint: disable=import-outside-toplevel

  _, shape, _, overrides = CASES[case]
  config = cifar10_ddpmpp_continuous.get_config()
  config.data.image_size, config.data.num_channels = shape[0], shape[2]
  for name, value in overrides.items():
    setattr(config.model, name, value)
  return ncsnpp.NCSNpp(config)


def peer_network(peer: str, case: str, reference: str | None):
  """`(network, description)`: the PyTorch network of `peer` ("reference" or "diffusers") for `case`."""
  preset, shape, _, _ = CASES[case]
  if peer == "reference":
    return reference_network(reference, case), f"score_sde_pytorch's NCSNpp from {os.path.abspath(reference)}"
  return _diffusers_peer.diffusers_network(preset, shape)


def torch_side(network, case: str, batch: int, *, compile_model: bool = False):
  """`(step(), sync, num_params, compile_s)`: the reference's training step for `network` in PyTorch."""
  import torch  # pylint: disable=import-outside-toplevel

  _, shape, _, _ = CASES[case]
  torch.manual_seed(0)
  model = network.train()
  num_params = sum(p.numel() for p in model.parameters())
  optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8)
  shadow = [p.detach().clone() for p in model.parameters()]
  forward = torch.compile(model) if compile_model else model
  x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (batch, shape[2], shape[0], shape[1])).astype(
      np.float32))
  counter = {"step": 0}

  def call(perturbed, labels):
    out = forward(perturbed, labels)
    return out.sample if hasattr(out, "sample") else out

  def step():
    t = torch.rand(batch) * (1 - EPS_T) + EPS_T
    z = torch.randn_like(x)
    log_mean = -0.25 * t**2 * (BETA_MAX - BETA_MIN) - 0.5 * t * BETA_MIN
    mean = torch.exp(log_mean)[:, None, None, None] * x
    std = torch.sqrt(1.0 - torch.exp(2.0 * log_mean))[:, None, None, None]
    score = -call(mean + std * z, t * 999) / std
    loss = torch.mean(torch.mean(torch.square(score * std + z).reshape(batch, -1), dim=1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    counter["step"] += 1
    for group in optimizer.param_groups:
      group["lr"] = LEARNING_RATE * min(counter["step"] / WARMUP, 1.0)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=GRAD_CLIP)
    optimizer.step()
    decay = min(EMA_RATE, (1 + counter["step"]) / (10 + counter["step"]))
    with torch.no_grad():
      for s, p in zip(shadow, model.parameters()):
        s.sub_((1 - decay) * (s - p))
    return loss

  started = time.perf_counter()
  step()  # torch.compile compiles on the first call.
  compile_s = time.perf_counter() - started if compile_model else 0.0
  return step, lambda loss: float(loss.detach()), num_params, compile_s


# --- Timing. -------------------------------------------------------------------------------------

def interleaved(sides: dict, *, steps: int, repeats: int, warmup: int) -> dict[str, list[float]]:
  """Seconds per step of each side over `repeats` rounds of one `steps`-step window per side."""
  for step, sync in sides.values():
    for _ in range(warmup):
      out = step()
    sync(out)
  seconds = {name: [] for name in sides}
  for _ in range(repeats):
    for name, (step, sync) in sides.items():
      started = time.perf_counter()
      for _ in range(steps):
        out = step()
      sync(out)
      seconds[name].append((time.perf_counter() - started) / steps)
  return seconds


def _build_side(spec: tuple):
  """`(step, sync, num_params, compile_s)` of the side `spec` names (see :func:`isolated_sides`)."""
  kind, case, batch, *rest = spec
  if kind == "scoreflow":
    from scoreflow.train import sharding  # pylint: disable=import-outside-toplevel

    sharding.unroll_cpu_threefry()  # A registration in this process (the XLA_FLAGS come from the parent).
    sharding.configure_cpu_dispatch()  # As run_train.py does (a setting of this process's backend).
    count, ynnpack = rest
    return scoreflow_side(case, batch, count, ynnpack)
  peer, reference, compile_model = rest
  network, _ = peer_network(peer, case, reference)
  return torch_side(network, case, batch, compile_model=compile_model)


def _side_worker(connection, spec: tuple) -> None:
  """Builds one side, reports `(num_params, compile_s)`, then runs `steps` steps on request (answering when they
  have finished) until it receives None."""
  step, sync, num_params, compile_s = _build_side(spec)
  connection.send((num_params, compile_s))
  while (steps := connection.recv()) is not None:
    for _ in range(steps):
      out = step()
    sync(out)
    connection.send(True)


def isolated_sides(specs: dict):
  """Each side in a process of its own (spawned; the environment, XLA_FLAGS and GLIBC_TUNABLES included, is this
  one's): `(sides, params, compile_s, close)`, where each side's `step()` runs one step in its process and
  `sync(out)` waits for it, as :func:`interleaved` expects. A side's window then runs while the others wait on a
  pipe, and no side shares a heap, thread pools or caches with another (in one process PyTorch's windows slowed
  the CIFAR-10 DDPM++ step of scoreflow by about 30 %: bench/RESULTS.md)."""
  import multiprocessing  # pylint: disable=import-outside-toplevel

  context = multiprocessing.get_context("spawn")
  workers, sides, params, compile_s = {}, {}, {}, {}
  for name, spec in specs.items():  # One at a time: building (compiling) is timed too.
    connection, child = context.Pipe()
    process = context.Process(target=_side_worker, args=(child, spec), daemon=True)
    process.start()
    params[name], compile_s[name] = connection.recv()
    workers[name] = (process, connection)
    queued = [0]  # Steps asked for since the last sync.

    def step(queued=queued):
      queued[0] += 1

    def sync(_, connection=connection, queued=queued):
      connection.send(queued[0])
      queued[0] = 0
      connection.recv()

    sides[name] = (step, sync)

  def close():
    for process, connection in workers.values():
      connection.send(None)
      process.join(timeout=60)

  return sides, params, compile_s, close


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", default="digits,cifar10_ddpmpp", help=f"comma-separated, from {sorted(CASES)}")
  parser.add_argument("--reference", default=None,
                      help="path of a score_sde_pytorch checkout (the 'reference' peer's network)")
  parser.add_argument("--peers", default=None,
                      help=f"comma-separated PyTorch peers, from {list(PEERS)}: 'reference' is score_sde_pytorch's "
                      "NCSNpp (needs --reference), 'diffusers' a matched diffusers UNet2DModel (needs "
                      f"{_diffusers_peer.PIP_HINT}). Default: reference with --reference, diffusers without")
  parser.add_argument("--torch_compile", action="store_true", help="also time torch.compile of each peer")
  parser.add_argument("--batch", type=int, default=None, help="global batch (default: per case)")
  parser.add_argument("--cpu_devices", type=int, default=2,
                      help="JAX devices to split the CPU into (as run_train.py's --cpu_devices)")
  parser.add_argument("--devices", default=None,
                      help="comma-separated device counts, one scoreflow side each (default: 1 and all)")
  parser.add_argument("--cpu_ynnpack", default=None,
                      help="comma-separated choices of run_train.py's --cpu_ynnpack, one scoreflow side each "
                      "(default: auto, and default when auto picks otherwise)")
  parser.add_argument("--steps", type=int, default=None, help="steps per timed window (default: per case)")
  parser.add_argument("--repeats", type=int, default=5,
                      help="interleaved rounds (the median and the fastest are reported)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
  parser.add_argument("--json", default=None, help="also write the rows to this file (after every case)")
  parser.add_argument("--one_process", action="store_true",
                      help="run every side in this process (by default each runs in a process of its own, windows "
                      "still interleaved: sharing a process, PyTorch's windows slow scoreflow's down)")
  args = parser.parse_args()
  peers = (args.peers or ("reference" if args.reference else "diffusers")).split(",")
  if set(peers) - set(PEERS):
    parser.error(f"--peers: unknown {sorted(set(peers) - set(PEERS))}; choose from {list(PEERS)}.")
  if "reference" in peers and not args.reference:
    parser.error("--peers reference needs --reference PATH (a score_sde_pytorch checkout); without one use "
                 "--peers diffusers.")
  if "diffusers" in peers:
    _diffusers_peer.import_diffusers()  # A missing package fails here, before anything is compiled.

  from scoreflow import cli  # pylint: disable=import-outside-toplevel
  from scoreflow.train import sharding  # pylint: disable=import-outside-toplevel

  cli.tune_glibc_malloc()  # As run_train.py does (a restart; the sides' processes inherit its GLIBC_TUNABLES).
  sharding.configure_cpu_devices(args.cpu_devices)
  sharding.unroll_cpu_threefry()  # As run_train.py does.
  sharding.configure_cpu_vector_width()  # As run_train.py does.
  sharding.configure_cpu_dispatch()  # As run_train.py does.
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  device_counts = sorted({1, len(jax.devices())}) if args.devices is None else [
      int(n) for n in args.devices.split(",")]

  print(f"jax {jax.__version__}: {len(jax.devices())} x {jax.devices()[0].device_kind}; torch {torch.__version__}: "
        f"{torch.get_num_threads()} threads; {os.cpu_count()} cores", flush=True)
  rows = []
  for case in args.cases.split(","):
    batch = args.batch or CASES[case][2]
    steps = args.steps or (10 if case == "digits" else 2)
    sides, params, compile_s = {}, {}, {}
    from scoreflow.models import build_model  # pylint: disable=import-outside-toplevel

    model = build_model(CASES[case][0])
    chosen = sharding.cpu_ynnpack_ops("auto", model)
    choices = [sharding.cpu_ynnpack_ops(c, model) for c in (args.cpu_ynnpack or "auto,default").split(",")]
    specs, ours, descriptions = {}, [], {}
    for ynnpack in dict.fromkeys(choices):
      # Eigen's convolutions only on one device: XLA:CPU miscomputes them in loops on a split CPU.
      for count in (device_counts if ynnpack == "default" else [n for n in device_counts if n == 1]):
        specs[f"scoreflow ({count} dev, {ynnpack})"] = ("scoreflow", case, batch, count, ynnpack)
        ours.append(f"scoreflow ({count} dev, {ynnpack})")
    for peer in peers:
      descriptions[peer] = (f"score_sde_pytorch's NCSNpp from {os.path.abspath(args.reference)}"
                            if peer == "reference" else peer_network(peer, case, args.reference)[1])
      for name, compile_model in [(peer, False)] + ([(f"{peer}+compile", True)] if args.torch_compile else []):
        specs[name] = ("torch", case, batch, peer, args.reference, compile_model)
    if args.one_process:
      close = lambda: None
      for name, spec in specs.items():
        step, sync, params[name], compile_s[name] = _build_side(spec)
        sides[name] = (step, sync)
    else:
      sides, params, compile_s, close = isolated_sides(specs)
    seconds = interleaved(sides, steps=steps, repeats=args.repeats, warmup=args.warmup)
    close()
    rates = {name: batch / statistics.median(seconds[name]) for name in sides}
    fastest = {name: batch / min(seconds[name]) for name in sides}
    best = max(ours, key=rates.get)
    where = "all sides in one process" if args.one_process else "each side in a process of its own"
    print(f"\n{case}: batch {batch}, {steps} steps x {args.repeats} interleaved rounds, {where}; ratio = {best} / "
          "side")
    for peer, description in descriptions.items():
      print(f"  {peer}: {description}")
    print(f"  scoreflow sides: devices, operations handed to YNNPACK (--cpu_ynnpack; auto picks {chosen!r})")
    print(f"  {'side':<34}{'params':>13}{'compile s':>11}{'examples/s':>12}{'ratio':>9}{'fastest':>10}{'ratio':>9}")
    for name in sides:
      row = {"case": case, "side": name, "params": int(params[name]), "batch": batch, "compile_s": compile_s[name],
             "examples_per_s": rates[name], "scoreflow_ratio": rates[best] / rates[name],
             "fastest_examples_per_s": fastest[name], "fastest_ratio": max(fastest[n] for n in ours) / fastest[name],
             "window_examples_per_s": [batch / s for s in seconds[name]]}
      if name.split("+")[0] in descriptions:
        row["network"] = descriptions[name.split("+")[0]]
      rows.append(row)
      print(f"  {name:<34}{row['params']:>13,}{row['compile_s']:>11.1f}{rates[name]:>12.1f}"
            f"{row['scoreflow_ratio']:>8.2f}x{fastest[name]:>10.1f}{row['fastest_ratio']:>8.2f}x", flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"jax": jax.__version__, "torch": torch.__version__, "peers": peers,
                   "one_process": args.one_process,
                   "cpu_devices": len(jax.devices()), "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": rows},
                  f, indent=2)


if __name__ == "__main__":
  main()
