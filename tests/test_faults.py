"""Faults get a clear answer: corrupt checkpoints (real files overwritten and truncated), the workdir lock, one-line
errors of the command-line scripts, the logged loss window."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoreflow import cli
from scoreflow.train import checkpoint as ckpt_lib
from scoreflow.train import state as state_lib

from _train_fixtures import TinyNet, init_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def _state(features=16, seed=0, step=7):
  optimizer = state_lib.make_optimizer(1e-3, warmup_steps=10)
  params = init_params(TinyNet(features=features), (4, 2), seed=seed)
  return state_lib.TrainState.create(params, optimizer, jax.random.key(seed)).replace(
      step=jnp.asarray(step, jnp.int32))


def _abstract(state):
  return jax.eval_shape(lambda: state)


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _data_files(directory):
  # OCDBT data files: the process's own (`ocdbt.process_0/d/`) and the merged database's (`d/`).
  return sorted(glob.glob(os.path.join(directory, "state", "**", "d", "*"), recursive=True), key=os.path.getsize)


def _corrupt(directory, how):
  """The issue's reproductions on a checkpoint's data files: 14 bytes overwritten in the middle (size unchanged, as
  `dd conv=notrunc` does), or truncated to half; in every file, as this tiny state's arrays are spread over
  several."""
  if how == "overwrite":
    for path in _data_files(directory):
      size = os.path.getsize(path)
      with open(path, "r+b") as f:
        f.seek(max(0, size // 2 - 7))
        f.write(b"GARBAGEGARBAGE")
      assert os.path.getsize(path) == size
  else:
    for path in _data_files(directory):
      os.truncate(path, os.path.getsize(path) // 2)


_WRITE_RUN = """
import sys
import jax, jax.numpy as jnp
from scoreflow.train import checkpoint, state
from _train_fixtures import TinyNet, init_params

ckpt = checkpoint.Checkpointer(sys.argv[1], async_save=False)
for seed, step in ((0, 10), (1, 20)):
  params = init_params(TinyNet(features=16), (4, 2), seed=seed)
  ckpt.save(step, state.TrainState.create(params, state.make_optimizer(1e-3, warmup_steps=10), jax.random.key(seed))
            .replace(step=jnp.asarray(step, jnp.int32)))
ckpt.close()
"""


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """Checkpoints 10 and 20 of `_state(seed=0, step=10)` and `_state(seed=1, step=20)`, written by another process:
  TensorStore caches what a process wrote, so only a fresh process reads a corrupted file as it is on disk."""
  workdir = tmp_path_factory.mktemp("saved") / "run"
  subprocess.run([sys.executable, "-c", _WRITE_RUN, str(workdir)], cwd=os.path.join(REPO, "tests"), check=True,
                 capture_output=True)
  return workdir


def _copy(saved_run, tmp_path):
  import shutil

  shutil.copytree(saved_run, tmp_path / "run")
  return tmp_path / "run"


def test_misplaced_arrays_are_caught_by_the_digest(saved_run, tmp_path):
  """Checkpoint 20's arrays replaced by checkpoint 10's (a botched copy or restore from backup): every value is
  finite and every shape fits, so only the digests written at save can tell."""
  import shutil

  workdir = _copy(saved_run, tmp_path)
  shutil.rmtree(workdir / "checkpoints" / "20" / "state")
  shutil.copytree(workdir / "checkpoints" / "10" / "state", workdir / "checkpoints" / "20" / "state")
  with pytest.raises(ckpt_lib.CorruptCheckpointError,
                     match=r"checkpoints/20 is corrupt or incomplete: step, params/Dense_0/kernel, .* and others differ from the digests "
                           r"written when it was saved"):
    ckpt_lib.Checkpointer(workdir).restore(_abstract(_state(seed=1, step=20)))


@pytest.mark.parametrize("how", ["overwrite", "truncate"])
def test_corrupt_newest_checkpoint_falls_back_and_is_kept_aside(saved_run, tmp_path, how):
  older, newer = _state(step=10), _state(seed=1, step=20)
  tmp_path = _copy(saved_run, tmp_path)
  files_before = sorted(os.path.relpath(p, tmp_path / "checkpoints" / "20")
                        for p in glob.glob(str(tmp_path / "checkpoints" / "20" / "**"), recursive=True))
  _corrupt(tmp_path / "checkpoints" / "20", how)
  reports = []
  state, _, step, kind = ckpt_lib.Checkpointer(tmp_path).restore_intact(_abstract(newer), report=reports.append)
  assert (kind, step) == ("checkpoints", 10)
  _assert_same(state, older)
  assert len(reports) == 1 and "\n" not in reports[0]
  assert f"checkpoint {tmp_path}/checkpoints/20 is corrupt (" in reports[0]
  assert f"moved it to {tmp_path}/corrupt/checkpoints-20" in reports[0]
  assert "TensorStore" not in reports[0] and len(reports[0]) < 600
  # Kept aside whole, never deleted; the manager no longer lists it.
  kept = sorted(os.path.relpath(p, tmp_path / "corrupt" / "checkpoints-20")
                for p in glob.glob(str(tmp_path / "corrupt" / "checkpoints-20" / "**"), recursive=True))
  assert kept == files_before
  assert ckpt_lib.Checkpointer(tmp_path).steps()["checkpoints"] == [10]


def test_every_checkpoint_corrupt_is_one_error(saved_run, tmp_path):
  workdir = _copy(saved_run, tmp_path)
  for step in (10, 20):
    _corrupt(workdir / "checkpoints" / str(step), "truncate")
  with pytest.raises(ckpt_lib.CorruptCheckpointError, match=r"every checkpoint in .* is corrupt \(.*corrupt/"
                                                            r"checkpoints-20, .*corrupt/checkpoints-10\)\. Restore"):
    ckpt_lib.Checkpointer(workdir).restore_intact(_abstract(_state()), report=lambda line: None)


def test_a_config_mismatch_is_not_corruption(tmp_path):
  """A checkpoint of another model is a configuration error: no fall-back, nothing moved aside."""
  ckpt = ckpt_lib.Checkpointer(tmp_path, async_save=False)
  ckpt.save(1, _state(features=16))
  ckpt.save(2, _state(features=16, step=2))
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as error:
    ckpt_lib.Checkpointer(tmp_path).restore_intact(_abstract(_state(features=8)), report=pytest.fail)
  assert not isinstance(error.value, ckpt_lib.CorruptCheckpointError)
  assert error.value.differences[0] == ("ema_params/Dense_0/bias: checkpoint has shape/dtype ((16,), 'float32'), "
                                        "the model expects ((8,), 'float32')")
  assert not (tmp_path / "corrupt").exists() and ckpt.steps()["checkpoints"] == [1, 2]


def test_evaluation_tells_corruption_from_a_mismatch(saved_run, tmp_path, capsys):
  from scoreflow.evaluate import checkpoints

  older, newer = _state(step=10), _state(seed=1, step=20)
  tmp_path = _copy(saved_run, tmp_path)
  ckpt = ckpt_lib.Checkpointer(tmp_path, async_save=False)
  _corrupt(tmp_path / "checkpoints" / "20", "truncate")
  # Asked for by step: one line saying it is corrupt, not that the configuration differs.
  with pytest.raises(ckpt_lib.CorruptCheckpointError) as error:
    checkpoints.restore_params(ckpt, _abstract(newer), "checkpoints", 20, True, {})
  message = str(error.value)
  assert message.startswith(f"cannot evaluate {tmp_path}/checkpoints/20: it is corrupt or incomplete (its ")
  assert "do not match" not in message and "\n" not in message
  # `latest`: the newest intact one is evaluated, saying which; a training run holding the workdir keeps the
  # corrupt one in place (it moves it itself), otherwise evaluation moves it aside.
  with ckpt_lib.WorkdirLock(tmp_path):
    params, kind, step = checkpoints.restore_params(ckpt, _abstract(newer), "checkpoints", 20, True, {},
                                             newest_intact=True)
  assert (kind, step) == ("checkpoints", 10) and (tmp_path / "checkpoints" / "20").exists()
  _assert_same(params, older.ema_params)
  assert "checkpoints/20 is corrupt (" in capsys.readouterr().out
  params, kind, step = checkpoints.restore_params(ckpt, _abstract(newer), "checkpoints", 20, False, {},
                                           newest_intact=True)
  assert step == 10 and (tmp_path / "corrupt" / "checkpoints-20").exists()
  _assert_same(params, older.params)
  # A real mismatch still names the arrays.
  with pytest.raises(ckpt_lib.CheckpointError, match=r"do not match the model that --config describes(.|\n)*"
                                                     r"params/Dense_0/kernel: checkpoint has shape/dtype"):
    checkpoints.restore_params(ckpt, _abstract(_state(features=8)), "checkpoints", 10, True, {})


# --- The workdir lock. -----------------------------------------------------------------------------------------

def test_second_holder_is_refused_naming_the_first(tmp_path):
  with ckpt_lib.WorkdirLock(tmp_path) as first:
    assert first.held
    with pytest.raises(ckpt_lib.WorkdirBusyError,
                       match=rf"workdir {tmp_path} is in use by another run \(pid {os.getpid()} on host "
                             rf"{socket.gethostname()}, since .*\); wait for it to end or stop it, or use another"):
      ckpt_lib.WorkdirLock(tmp_path).acquire()
  with ckpt_lib.WorkdirLock(tmp_path) as again:  # Released: free again.
    assert again.held


def test_lock_of_a_killed_process_never_blocks(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\nfrom scoreflow.train.checkpoint import WorkdirLock\n"
       f"WorkdirLock({str(tmp_path)!r}).acquire()\nprint('locked', flush=True)\ntime.sleep(120)"],
      cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(ckpt_lib.WorkdirBusyError, match=rf"pid {holder.pid} on host"):
      ckpt_lib.WorkdirLock(tmp_path).acquire()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert json.loads((tmp_path / ckpt_lib.LOCK_FILE).read_text())["pid"] == holder.pid  # The stale file stays...
  with ckpt_lib.WorkdirLock(tmp_path) as lock:  # ...and does not block.
    assert lock.held


# --- One-line errors of the scripts. ---------------------------------------------------------------------------

def _run(script, *args, timeout=120):
  return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.parametrize("script", ["run_train.py", "run_eval.py"])
@pytest.mark.parametrize("args, expected", [
    (["--config", "configs/toy_2d.py", "--config.training.batchsize=4"],
     "error: --config.training.batchsize: the configuration has no field 'batchsize' (did you mean 'batch_size'?); "
     "every field is listed, with its meaning, in configs/default.py."),
    (["--config", "configs/nope.py"],
     f"error: --config configs/nope.py: no such file ({REPO}/configs/nope.py); pass a configuration file such as "
     "configs/toy_2d.py."),
])
def test_config_mistakes_are_one_line(tmp_path, script, args, expected):
  result = _run(script, *args, "--workdir", str(tmp_path / "run"))
  assert result.returncode == 1
  assert result.stderr.strip() == expected, result.stderr[-3000:]
  assert not (tmp_path / "run").exists()


def test_unwritable_workdir_is_one_line(tmp_path):
  """A --workdir below a regular file (root ignores permission bits, so this is the unwritable path every user can
  reproduce): one line naming the path, nothing else."""
  (tmp_path / "file").write_text("")
  result = _run("run_train.py", "--config", "configs/toy_2d.py", "--workdir", str(tmp_path / "file" / "run"))
  assert result.returncode == 1
  assert result.stderr.strip() == (f"error: a path component is a file, not a directory ({tmp_path}/file/run): make "
                                   "it writable or pass another --workdir."), result.stderr[-3000:]


def test_environment_errors_anywhere_in_the_chain():
  with pytest.raises(OSError) as full:
    with open("/dev/full", "w") as f:  # A real ENOSPC from the kernel.
      f.write("x")
  try:
    raise RuntimeError("save failed") from full.value
  except RuntimeError as wrapped:
    assert cli.user_error_message(wrapped).startswith("no space left on the device")
  # TensorStore reports the OS error inside its message (as a failed Orbax save raises it).
  tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "params.x/0" in OCDBT database at local file '
                           '"/w/checkpoints/150.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": '
                           "Failed to write 26000 bytes to file 17: No space left on device [os_error_code='28']")
  assert cli.user_error_message(tensorstore).startswith(
      "no space left on the device (/w/checkpoints/150, a checkpoint being written): free space")
  assert cli.user_error_message(ValueError("inside a library")) is None  # Not scoreflow's, not the environment's.


def _can_mount(path):
  os.makedirs(path, exist_ok=True)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                        capture_output=True).returncode == 0


@pytest.mark.slow
def test_disk_full_during_a_save_is_one_line(tmp_path):
  """A real full disk (a 1 MiB tmpfs) under a training run: Orbax's background save fails inside TensorStore; the
  run ends with one line, no traceback or Orbax error log; the complete checkpoints stay."""
  mount = tmp_path / "small"
  if not _can_mount(mount):
    pytest.skip("needs permission to mount a tmpfs")
  try:
    result = _run("run_train.py", "--config", "configs/toy_2d.py", "--workdir", str(mount / "run"),
                  f"--compilation_cache_dir={REPO}/.cache/jax", "--config.model.width=64",
                  "--config.model.embedding_dim=32", "--config.training.batch_size=64",
                  "--config.training.progress_bar=False", "--config.training.num_train_steps=400",
                  "--config.training.checkpoint_every=20", "--config.training.snapshot_every=0", timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and (lines[0].startswith(f"error: no space left on the device ({mount}/run/checkpoints/") or
                             # The disk can fill on a log write first (its error names no file): the run's directory.
                             lines[0].startswith(f"error: no space left on the device (writing under {mount}/run)")), \
        result.stderr[-3000:]
    assert "rerun the same command; complete checkpoints are kept" in lines[0]
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


# --- The logged loss. ------------------------------------------------------------------------------------------

def _tiny_config(**training):
  from configs import toy_2d

  config = toy_2d.get_config()
  config.model = toy_2d.default.model_config("mlp_toy", width=32, depth=2, embedding_dim=16)
  config.optim.warmup_steps = 5
  config.training.batch_size = 32
  config.training.num_train_steps = 6
  config.training.progress_bar = False
  config.training.checkpoint_every = 0
  config.training.snapshot_every = 0
  config.sampling.method = "ddim"
  config.sampling.num_steps = 2
  config.sampling.num_samples = 4
  for name, value in training.items():
    config.training[name] = value
  return config


def test_logged_loss_averages_every_step_of_its_window(tmp_path):
  """The first record averaged 2 of 3 steps: the first call's metrics (which include its compilation, kept out of
  the throughput) were left out of the loss too."""
  from scoreflow.train import loop

  def losses(workdir):
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}

  loop.train_and_evaluate(_tiny_config(log_every=1), tmp_path / "every")
  loop.train_and_evaluate(_tiny_config(log_every=3), tmp_path / "window")
  each, window = losses(tmp_path / "every"), losses(tmp_path / "window")
  assert sorted(each) == [1, 2, 3, 4, 5, 6] and sorted(window) == [3, 6]
  np.testing.assert_allclose(window[3], np.mean([each[1], each[2], each[3]]), rtol=1e-6)
  np.testing.assert_allclose(window[6], np.mean([each[4], each[5], each[6]]), rtol=1e-6)


@pytest.mark.parametrize("kind", ["Task", "Future"])
def test_asyncio_reports_of_abandoned_work_are_dropped(kind):
  """Both of asyncio's "... exception was never retrieved" reports (a failed Orbax write abandoned when the run
  stops on an error it reports in one line) are dropped; other asyncio errors are kept. CI once saw the Future
  form print 270 lines after a full disk's one-line error."""
  import logging as py_logging
  from scoreflow import cli

  noise = cli._DropAbandonedCoroutineNoise()  # pylint: disable=protected-access

  def record(message):
    return py_logging.LogRecord("asyncio", py_logging.ERROR, "base_events.py", 1, message, None, None)

  assert not noise.filter(record(f"{kind} exception was never retrieved\nfuture: <Future finished ...>"))
  assert noise.filter(record("Unclosed client session"))
