"""End-to-end: `python run_train.py` on the toy config, its errors and help, and a two-process run."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoreflow as sf
from scoreflow import cli
from scoreflow.data.toy import sample_toy, toy_mixture

from _train_fixtures import read_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".cache", "jax")
# A small, quick version of configs/toy_2d.py (the real one trains a 0.7 M-parameter MLP for 3000 steps).
SMALL_TOY = ["--config.model.width=64", "--config.model.embedding_dim=32", "--config.training.batch_size=256",
             "--config.optim.warmup_steps=30", "--config.training.progress_bar=False"]


def run_train(*args, env=None, timeout=300):
  return subprocess.run([sys.executable, os.path.join(REPO, "run_train.py"), *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=env)


def failure(result) -> str:
  """What a failed run printed that says why: its error lines (an XLA fatal check is an `F` line followed by
  pages of thread stacks) and the end of its stderr."""
  lines = result.stderr.splitlines()
  errors = [line for line in lines if line.startswith(("error", "F1", "E1")) or "Error" in line]
  return "\n".join(errors[-20:] + ["..."] + lines[-15:])


def test_toy_training_learns_the_density(tmp_path):
  workdir = tmp_path / "toy"
  result = run_train("--config", "configs/toy_2d.py", "--workdir", str(workdir), f"--compilation_cache_dir={CACHE}",
                     "--cpu_devices=2", "--config.training.num_train_steps=300", "--config.sampling.num_samples=500",
                     *SMALL_TOY)
  assert result.returncode == 0, failure(result)
  assert "Trained 300 steps" in result.stdout
  samples = np.load(workdir / "samples" / "step_300.npz")["samples"]
  assert samples.shape == (500, 2) and np.all(np.isfinite(samples))

  # Distance to the data: the mean exact data log-density of the samples, E_q[log p]. The data themselves give
  # E_p[log p] = -H(p) (about -1.68 nats); N(0, I), which has the data's mean and covariance (the toy data are
  # standardised), gives about -7.35, the best a model that learned only the first two moments could do. The
  # bound is half way between the two (in nats); the Monte-Carlo error of each mean over 500-5000 samples is
  # below 0.1 nat.
  mixture = toy_mixture("eight_gaussians", jnp.float64)
  data_score = float(jnp.mean(mixture.log_prob(jnp.asarray(sample_toy("eight_gaussians", 1, 5000), jnp.float64))))
  gaussian = jax.random.normal(jax.random.key(0), (5000, 2), jnp.float64)
  gaussian_score = float(jnp.mean(mixture.log_prob(gaussian)))
  bound = 0.5 * (data_score + gaussian_score)
  sample_score = float(jnp.mean(mixture.log_prob(jnp.asarray(samples, jnp.float64))))
  assert sample_score > bound, (sample_score, bound, data_score, gaussian_score)
  # The untrained model fails it: its output layer starts at zero (init_scale=0), so its probability-flow ODE
  # is dx/dt = f(t) x and its samples are the prior draws scaled by alpha(eps) / alpha(T) (about e^5).
  sde = sf.VPSDE()
  untrained = gaussian * sde.alpha(jnp.asarray(1e-3, jnp.float64)) / sde.alpha(jnp.asarray(1.0, jnp.float64))
  assert float(jnp.mean(mixture.log_prob(untrained))) < bound

  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["step"] == 300 and summary["compilations"] == 1 and summary["nonfinite_steps"] == 0
  assert summary["num_devices"] == 2  # --cpu_devices split the host; the batch was sharded over both.
  assert (workdir / "loss.png").exists() and (workdir / "samples" / "step_300.png").exists()


def test_a_split_cpu_survives_a_host_that_runs_ahead(tmp_path):
  """A device step far slower than the host's dispatch (a 0.66 M-parameter MLP on batches of 1024, on 2 CPU
  devices): with the train calls unbounded, XLA:CPU deadlocked here in 5 of 5 runs once 32 were queued per
  device (its all-reduce rendezvous timing out, an abort); the loop keeps at most `MAX_CALLS_IN_FLIGHT` queued.
  The rendezvous gives up after 5 s instead of 40, so that a regression fails fast."""
  env = {**os.environ, "XLA_FLAGS": "--xla_cpu_collective_call_terminate_timeout_seconds=5"}
  result = run_train("--config", "configs/toy_2d.py", "--workdir", str(tmp_path / "run"),
                     f"--compilation_cache_dir={CACHE}", "--cpu_devices=2", "--config.training.num_train_steps=400",
                     "--config.optim.warmup_steps=10", "--config.model.width=256", "--config.model.embedding_dim=8",
                     "--config.training.batch_size=1024", "--config.training.log_every=1000",
                     "--config.training.checkpoint_every=0", "--config.training.snapshot_every=0",
                     "--config.sampling.num_samples=4", "--config.training.progress_bar=False", env=env)
  assert result.returncode == 0, failure(result)
  assert "Trained 400 steps" in result.stdout and "on 2 device(s)" in result.stdout


_MALLOC_PROBE = """
import ctypes, os, resource, sys
print("started", os.getpid(), sys.argv[1:], flush=True)
from scoreflow import cli
from scoreflow.train import sharding
cli.tune_glibc_malloc()
sharding.configure_cpu_dispatch(asynchronous=sys.argv[1] == "async")
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
block = libc.malloc(64 << 20)  # Above glibc's mmap threshold, as XLA's temporaries (NumPy madvises on its own).
ctypes.memset(block, 1, 64 << 20)
with open("/proc/self/smaps_rollup") as smaps:
  huge_kib = next(int(line.split()[1]) for line in smaps if line.startswith("AnonHugePages"))
import jax, jax.numpy as jnp

@jax.jit
def loop(x):  # 64 MiB temporaries in every call (the loop's carry).
  return jax.lax.fori_loop(0, 3, lambda i, y: jnp.sin(y) + y[::-1], x).sum(axis=0)

x = jax.random.normal(jax.random.key(0), (4096, 4096))
faults = []
for _ in range(6):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(loop(x))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The fewest of calls 3-6: a thread of the runtime touching fresh memory once (8 MiB in 4 KiB pages seen on a busy
# machine) is not what is measured; temporaries faulted in afresh fault in every call.
print("running", os.getpid(), os.environ.get("GLIBC_TUNABLES"), huge_kib, min(faults[2:]), flush=True)
"""


_ALL_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"


def _malloc_probe(tmp_path, dispatch: str, tunables: str | None = None):
  """(pids the probe started with, its final pid, GLIBC_TUNABLES, huge-page KiB after a 64 MiB malloc, the fewest
  page faults in calls 3-6 of a jitted function with 64 MiB of temporaries)."""
  probe = tmp_path / "probe.py"
  probe.write_text(_MALLOC_PROBE)
  env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
  if tunables:
    env["GLIBC_TUNABLES"] = tunables
  result = subprocess.run([sys.executable, str(probe), dispatch], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  started = [tuple(line.split(" ", 2)[1:]) for line in result.stdout.splitlines() if line.startswith("started")]
  (_, pid, final_tunables, huge_kib, faults), = [line.split() for line in result.stdout.splitlines()
                                                 if line.startswith("running")]
  assert all(args == f"['{dispatch}']" for _, args in started), started
  return [p for p, _ in started], pid, final_tunables, int(huge_kib), int(faults)


@pytest.mark.skipif(not cli.glibc_huge_pages_available(), reason="needs Linux, glibc >= 2.35 and transparent huge pages")
def test_the_cli_keeps_xla_temporaries_in_huge_pages_between_calls_and_a_users_tunable_wins(tmp_path):
  """The restart keeps the pid and the arguments and sets the three malloc tunables: a large malloc gets huge
  pages, and with calls on the calling thread the memory of XLA's temporaries is kept (no page faults in a later
  call). Asynchronous dispatch, or glibc's own mmap_max, fault the temporaries in afresh each call (hundreds of
  faults); a user's setting wins (hugetlb=0: no huge pages)."""
  pids, pid, tunables, huge_kib, faults = _malloc_probe(tmp_path, "sync")
  assert pids == [pid, pid] and tunables == _ALL_TUNABLES
  assert huge_kib > 0 and faults < 32, (huge_kib, faults)  # 64 MiB afresh: 32 huge-page faults or more.

  *_, faults = _malloc_probe(tmp_path, "async")
  assert faults > 128, faults
  pids, pid, tunables, _, faults = _malloc_probe(tmp_path, "sync", "glibc.malloc.mmap_max=65536")
  assert pids == [pid, pid] and tunables.startswith("glibc.malloc.mmap_max=65536:") and faults > 128, faults

  users = "glibc.malloc.hugetlb=0:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"
  pids, pid, tunables, huge_kib, faults = _malloc_probe(tmp_path, "sync", users)
  assert pids == [pid] and tunables == users and huge_kib == 0 and faults < 32, (huge_kib, faults)


def test_help_lists_the_flags():
  result = run_train("--help")
  assert result.returncode in (0, 1)  # absl exits with 1 after printing the help.
  assert "Trains a score-based generative model" in result.stdout and "configs/default.py" in result.stdout
  for flag in ("--config", "--workdir", "allow_config_change", "--coordinator_address", "--compilation_cache_dir",
               "--cpu_devices", "--cpu_ynnpack", "cpu_async_dispatch"):
    assert flag in result.stdout


def test_bad_override_fails_fast_naming_the_field(tmp_path):
  result = run_train("--config", "configs/toy_2d.py", "--workdir", str(tmp_path), "--config.sde.name=vpx")
  assert result.returncode != 0
  assert "config.sde.name must be one of ['cosine_vp', 'ddpm', 'smld', 'subvp', 've', 'vp'], got 'vpx'" in result.stderr
  assert not (tmp_path / "checkpoints").exists()
  result = run_train("--config", "configs/toy_2d.py", "--workdir", str(tmp_path), "--config.training.batch_sizee=3")
  assert result.returncode != 0 and "batch_sizee" in result.stderr


def test_only_scoreflows_own_errors_lose_their_traceback():
  from scoreflow import cli
  from scoreflow.config import experiment as config_lib

  with pytest.raises(ValueError) as own:
    config_lib.config_field({}, "training.batch_size")
  assert cli.raised_by_own_check(own.value)
  with pytest.raises(ValueError) as foreign:  # Raised inside JAX: its traceback is what a user needs.
    jnp.split(jnp.ones(5), 2)
  assert not cli.raised_by_own_check(foreign.value)


def test_missing_dataset_fails_fast_with_one_line(tmp_path):
  """An unprepared tfds dataset stops the run within seconds, before the model is built or compiled, with the
  command that prepares it and no traceback; the workdir gets no checkpoint."""
  result = run_train("--config", "configs/cifar10_ddpmpp_continuous.py", "--workdir", str(tmp_path / "run"),
                     f"--config.data.data_dir={tmp_path / 'no_data'}")
  assert result.returncode == 1, result.stderr[-2000:]
  assert "error: Dataset 'cifar10' is not prepared" in result.stderr and "tfds build cifar10" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _final_params(workdir, step):
  return read_checkpoint(workdir, step)[0]["params"]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  """2 processes x 2 CPU devices over 127.0.0.1 train the same model as 1 process x 4 devices."""
  args = ["--config", "configs/toy_2d.py", f"--compilation_cache_dir={CACHE}", "--config.training.num_train_steps=40",
          "--config.training.checkpoint_every=20", "--config.sampling.num_samples=16",
          "--config.sampling.method=pc", "--config.sampling.num_steps=10", *SMALL_TOY]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  single = run_train(*args, "--workdir", str(tmp_path / "single"),
                     env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  assert single.returncode == 0, single.stderr[-3000:]

  port = _free_port()
  env2 = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "run_train.py"), *args, "--workdir",
                             str(tmp_path / "multi"), f"--coordinator_address=127.0.0.1:{port}",
                             "--num_processes=2", f"--process_id={i}"], cwd=REPO, env=env2,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=400) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "on 4 device(s)" in outputs[0][0] and "Trained" not in outputs[1][0]  # Only process 0 reports.
  summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
  assert summary["num_processes"] == 2 and summary["num_devices"] == 4

  a, b = _final_params(tmp_path / "single", 40), _final_params(tmp_path / "multi", 40)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    # Same data, same keys; only the order of the cross-device gradient sums differs (see
    # test_train_sharding): 40 Adam steps of size <= 3e-3 leave differences of a few float32 ulps.
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5)
