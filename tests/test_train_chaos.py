"""Chaos: a real `run_train.py` killed with SIGKILL (before any save, during a save) and stopped with SIGTERM, then
resumed, ends in exactly the state of an uninterrupted run; a second run on a live workdir is refused at once."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from _train_fixtures import read_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".cache", "jax")
STEPS = 400
ARGS = ["--config", "configs/toy_2d.py", f"--compilation_cache_dir={CACHE}", "--config.model.width=64",
        "--config.model.embedding_dim=32", "--config.training.batch_size=256", "--config.optim.warmup_steps=30",
        "--config.training.progress_bar=False", f"--config.training.num_train_steps={STEPS}",
        "--config.training.checkpoint_every=100", "--config.training.snapshot_every=20",
        "--config.training.log_every=20", "--config.sampling.num_samples=16", "--config.sampling.method=ddim",
        "--config.sampling.num_steps=10"]


def _start(workdir, *extra):
  return subprocess.Popen([sys.executable, os.path.join(REPO, "run_train.py"), *ARGS, "--workdir", str(workdir),
                           *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _saving(workdir):
  """Whether Orbax is writing a checkpoint now (its temporary directory exists)."""
  for kind in ("checkpoints", "snapshot"):
    try:
      if any("orbax-checkpoint-tmp" in entry.name for entry in os.scandir(workdir / kind)):
        return True
    except FileNotFoundError:
      pass
  return False


def _logged_steps(workdir):
  try:
    return (workdir / "metrics.jsonl").read_text().count('"loss"')
  except FileNotFoundError:
    return 0


def _lock_holder(workdir):
  try:
    return json.loads((workdir / "train.lock").read_text())["pid"]
  except (FileNotFoundError, ValueError, KeyError):
    return None


def _wait_for(proc, condition, poll=0.001):
  while proc.poll() is None and not condition():
    time.sleep(poll)
  return proc.poll() is None


def _assert_same_final_state(a, b):
  state_a, meta_a = read_checkpoint(a, STEPS)
  state_b, meta_b = read_checkpoint(b, STEPS)
  assert meta_a["data"] == meta_b["data"]
  leaves_a, leaves_b = jax.tree.leaves(state_a), jax.tree.leaves(state_b)
  assert jax.tree.structure(state_a) == jax.tree.structure(state_b) and len(leaves_a) > 20
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("chaos") / "straight"
  proc = _start(workdir)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return workdir


@pytest.mark.slow
def test_sigkill_at_several_moments_resumes_bit_identically(straight, tmp_path):
  workdir = tmp_path / "killed"
  # 1. Killed early (frozen first, while a second run on the live workdir is refused at once, naming it).
  proc = _start(workdir)
  assert _wait_for(proc, lambda: _lock_holder(workdir) == proc.pid)
  proc.send_signal(signal.SIGSTOP)
  second = subprocess.run([sys.executable, os.path.join(REPO, "run_train.py"), *ARGS, "--workdir", str(workdir)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert second.returncode == 1
  assert len(second.stderr.strip().splitlines()) == 1, second.stderr[-2000:]
  assert f"is in use by another run (pid {proc.pid} on host" in second.stderr
  # 2. Killed while Orbax writes a checkpoint (its temporary directory is left behind); the lock file of the killed
  #    process stays on disk, stale, and blocks nothing.
  mid_save = False
  for _ in range(3):  # A save lasts tens of milliseconds; catching one is a matter of polling.
    proc = _start(workdir)
    if _wait_for(proc, lambda: _lock_holder(workdir) == proc.pid and _saving(workdir)):
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      mid_save = True
      break
    assert proc.wait() == 0
  assert mid_save, "no save was caught in progress"
  # 3. SIGTERM: a snapshot (or the checkpoint already at that step) and an exact message.
  proc = _start(workdir)
  logged = _logged_steps(workdir)
  if _wait_for(proc, lambda: _logged_steps(workdir) > logged + 1):
    proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  if "Trained" in out and "preemption" in out:
    stopped = [line for line in out.splitlines() if line.startswith("Preemption requested")]
    assert len(stopped) == 1
    step = int(stopped[0].split("at step ")[1].split(",")[0].split(" ")[0].rstrip(";"))
    if "saved a snapshot" in stopped[0]:
      assert (workdir / "snapshot" / str(step)).is_dir()
    else:
      assert f"checkpoints/{step} already holds" in stopped[0] or f"snapshot/{step} already holds" in stopped[0]
  # 4. The rerun finishes the run: the same final state as the uninterrupted one, every array bit for bit.
  proc = _start(workdir)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  _assert_same_final_state(straight, workdir)


@pytest.mark.slow
def test_sigterm_during_the_final_sampling_exits_promptly(tmp_path):
  """The final sampling (here a 2 M-step sampler that would run for minutes) is abandoned on SIGTERM; the message
  says what was saved and what was not."""
  workdir = tmp_path / "run"
  proc = _start(workdir, "--config.training.num_train_steps=40", "--config.training.checkpoint_every=40",
                "--config.sampling.method=pc", "--config.sampling.num_steps=2000000",
                "--config.sampling.num_samples=256")
  assert _wait_for(proc, lambda: (workdir / "checkpoints" / "40" / "commit_success.txt").exists(), poll=0.05)
  time.sleep(1.0)  # Sampling has been dispatched (or is compiling).
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=90)  # Unbounded before: the process waited for the sampler to end.
  assert proc.returncode == 0, err[-3000:]
  assert ("Preemption requested during the final sampling: training is complete and checkpoint 40 is saved; the "
          "final samples were not drawn (rerun the same command to draw them).") in out
  assert not (workdir / "samples" / "step_40.npz").exists()
