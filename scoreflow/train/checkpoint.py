"""Orbax checkpoints of a training run: periodic ones (keep N), a frequent preemption snapshot, exact resume.

A run's working directory holds

* `checkpoints/<step>/`: periodic checkpoints, the newest `keep` of them kept;
* `snapshot/<step>/`: the latest preemption snapshot only (frequent, cheap to lose);
* `config.json`: the configuration the run was started with.

Each checkpoint is an `ocp.args.Composite` of `state` (the :class:`~scoreflow.train.state.TrainState`, through
`StandardSave`) and `meta` (JSON: the data stream's position and the step, anything small). Saving is
asynchronous; Orbax writes into a temporary directory and renames it when complete, so the latest *complete*
checkpoint is always the one restored. Restoring goes into an abstract target (`jax.eval_shape` of the state,
with shardings), which gives back the exact arrays, dtypes and pytree classes that were saved.

Integrity. Orbax's OCDBT files carry no checksum: a few bytes overwritten inside a data file restore without an
error into arbitrary values. So each save also writes, in `meta`, a 64-bit digest of every array (computed on the
device from the arrays' bits, together with the finiteness check that refuses to save a non-finite state), and a
restore recomputes it and checks finiteness: a mismatch, a non-finite value or an unreadable file raises
:class:`CorruptCheckpointError`. :meth:`Checkpointer.restore_intact` then moves the corrupt checkpoint aside (into
`workdir/corrupt/`, never deleting it) and falls back to the newest intact one.

One run at a time. :class:`WorkdirLock` is an advisory `flock` on `workdir/train.lock`, held for the run's life:
the kernel drops it when the process ends, however it ends, so a stale lock never blocks; a second training run
on the same workdir is refused at once, naming the holder's pid and host.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import json
import os
import socket
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from scoreflow import io
from scoreflow.config.fields import config_differences, field_matches

CHECKPOINTS = "checkpoints"
SNAPSHOT = "snapshot"
CONFIG_FILE = "config.json"
CORRUPT = "corrupt"
LOCK_FILE = "train.lock"
# The key in a checkpoint's `meta` that holds the arrays' digests (removed from the `meta` that restore returns).
INTEGRITY_KEY = "integrity"
DIGEST_ALGORITHM = "mix32x2-v1"


def absolute_workdir(workdir: str | os.PathLike) -> str:
  """`workdir` as an absolute path (Orbax refuses relative ones); URLs such as gs://... are kept as they are."""
  workdir = os.fspath(workdir)
  return workdir if "://" in workdir else os.path.abspath(workdir)


class CheckpointError(ValueError):
  """A checkpoint or working directory that cannot be used as asked (missing, corrupt, mismatched)."""


class CheckpointMismatchError(CheckpointError):
  """A readable checkpoint whose arrays do not fit the model being restored (a configuration difference).

  Attributes:
    differences: one line per mismatched array (see :func:`describe_mismatch`).
  """

  def __init__(self, message: str, differences: list[str]):
    super().__init__(message)
    self.differences = differences


class CorruptCheckpointError(CheckpointError):
  """A checkpoint that cannot be trusted: unreadable, an array whose digest differs from the one written when it was
  saved, or a non-finite value (saves refuse those).

  Attributes:
    kind, step, directory: which checkpoint.
    reason: what is wrong, in a few words (one line).
  """

  def __init__(self, kind: str, step: int, directory: str, reason: str, fix: str, message: str | None = None):
    super().__init__(message or f"checkpoint {directory} is corrupt or incomplete: {reason}. {fix}")
    self.kind, self.step, self.directory, self.reason = kind, step, directory, reason


class WorkdirBusyError(CheckpointError):
  """Another live process holds the workdir's lock."""


def local_workdir(workdir: str | os.PathLike) -> str:
  """`workdir` as an absolute local path, for the training loop and evaluation.

  Raises:
    CheckpointError: for a URL (gs://, s3://, ...): Orbax could write checkpoints there, but logs, samples and
      `config.json` are written with local file I/O; a mounted bucket works.
  """
  workdir = os.fspath(workdir)
  if "://" in workdir:
    raise CheckpointError(f"workdir {workdir!r} is a URL, but runs write their logs, samples and config.json with "
                          "local file I/O; use a local directory or a mounted bucket (e.g. gcsfuse at /gcs/BUCKET).")
  return os.path.abspath(workdir)


def _path_names(path) -> str:
  names = []
  for entry in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(entry, attribute):
        names.append(str(getattr(entry, attribute)))
        break
    else:
      names.append(str(entry))
  return "/".join(names)


def _leaf_signatures(tree) -> dict[str, tuple]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_names(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name) for path, leaf in leaves}


def describe_mismatch(saved: dict[str, tuple], expected: dict[str, tuple], limit: int = 8) -> list[str]:
  """Human-readable differences between two `{path: (shape, dtype)}` tables (saved vs expected)."""
  lines = []
  for name in sorted(set(saved) | set(expected)):
    if name not in saved:
      lines.append(f"{name}: expected {expected[name]}, missing from the checkpoint")
    elif name not in expected:
      lines.append(f"{name}: in the checkpoint {saved[name]}, not in the model being restored")
    elif saved[name] != expected[name]:
      lines.append(f"{name}: checkpoint has shape/dtype {saved[name]}, the model expects {expected[name]}")
  if len(lines) > limit:
    lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
  return lines


def _words(leaf):
  """The bits of `leaf` as a flat uint32 vector (one word per element; two for 64-bit types)."""
  if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  if leaf.dtype == jnp.bool_:
    return leaf.astype(jnp.uint32).ravel()
  if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
    leaf = jnp.stack([jnp.real(leaf), jnp.imag(leaf)], axis=-1)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[np.dtype(leaf.dtype).itemsize]
  return jax.lax.bitcast_convert_type(leaf, unsigned).astype(jnp.uint32).ravel()


def _digest_words(words, seed: int):
  """An order-independent sum of a position-dependent mix (murmur3's finaliser) of every word, mod 2^32: exact
  whatever the reduction order or sharding, and changed by any altered, moved or swapped word."""
  u32 = lambda c: jnp.asarray(c, jnp.uint32)  # noqa: E731
  index = jax.lax.iota(jnp.uint32, words.size)
  h = words ^ (index * u32(0x9E3779B1) + u32(seed))
  h = (h ^ (h >> 16)) * u32(0x85EBCA6B)
  h = (h ^ (h >> 13)) * u32(0xC2B2AE35)
  h = h ^ (h >> 16)
  return jnp.sum(h, dtype=jnp.uint32)


@jax.jit
def inspect_device(leaves):
  """`(all inexact leaves finite [n], digests [n, 2] uint32)` of a list of arrays: one program per layout."""
  finite = jnp.stack([jnp.all(jnp.isfinite(leaf)) if jnp.issubdtype(leaf.dtype, jnp.inexact) else jnp.bool_(True)
                      for leaf in leaves])
  digests = jnp.stack([jnp.stack([_digest_words(_words(leaf), seed) for seed in (0x243F6A88, 0x13198A2E)])
                       for leaf in leaves])
  return finite, digests


def _host(array) -> np.ndarray:
  # This process's copy of a replicated result (works in multi-process runs too).
  return np.asarray(array.addressable_data(0)) if isinstance(array, jax.Array) else np.asarray(array)


def inspect_state(tree) -> tuple[list[str], dict[str, str]]:
  """`(non-finite array paths, {path: 16-hex-digit digest})` of every array of `tree`, computed on the device."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  if not leaves:
    return [], {}
  finite, digests = inspect_device([leaf for _, leaf in leaves])
  finite, digests = _host(finite), _host(digests)
  names = [_path_names(path) for path, _ in leaves]
  return ([name for name, ok in zip(names, finite) if not ok],
          {name: f"{int(a):08x}{int(b):08x}" for name, (a, b) in zip(names, digests)})


def _first_line(error: BaseException, limit: int = 240) -> str:
  """`Type: first line of the message` without TensorStore's multi-line spec dump."""
  text = str(error).split(" See full TensorStore details")[0].strip().splitlines()
  text = text[0] if text else ""
  return f"{type(error).__name__}: {text[:limit]}" if text else type(error).__name__


def quiet_abandoned_coroutines(previous):
  """A `sys.unraisablehook` that drops the reports of Orbax's coroutines abandoned after a failed read ("Exception
  ignored in: <coroutine ...>", "Event loop is closed": hundreds of lines per unreadable checkpoint) and passes
  everything else to `previous`."""

  def hook(unraisable):
    if "coroutine" in repr(unraisable.object) or (isinstance(unraisable.exc_value, RuntimeError) and
                                                  "Event loop is closed" in str(unraisable.exc_value)):
      return
    previous(unraisable)

  return hook


@contextlib.contextmanager
def _collecting_abandoned_coroutines():
  """Collects the coroutines a failed Orbax read abandoned now, without their noise, rather than at some later
  point of the run (or at exit)."""
  previous = sys.unraisablehook
  sys.unraisablehook = quiet_abandoned_coroutines(previous)
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = previous


class WorkdirLock:
  """An advisory, exclusive lock on a run's workdir (`workdir/train.lock`), held until :meth:`release` or exit.

  `flock` locks belong to the open file, so the kernel releases this one when the process ends, however it ends
  (a `kill -9` included): a stale lock file never blocks. On NFS, Linux implements `flock` with POSIX byte-range
  locks, which the server arbitrates between hosts. The file holds the holder's pid, host and start time, for the
  message a second run gets. On a filesystem without locks (some FUSE mounts) the run goes on without one.

  Args:
    workdir: the run's directory (created if needed).

  Raises:
    WorkdirBusyError: (from :meth:`acquire`) another live process holds the lock.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.path = os.path.join(os.fspath(workdir), LOCK_FILE)
    self._fd = None
    self.supported = True

  def acquire(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirBusyError(
          f"workdir {os.path.dirname(self.path)} is in use by another run ({holder}); wait for it to end "
          f"or stop it, or use another --workdir.") from None
    except OSError as error:
      os.close(fd)
      if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        raise
      self.supported = False  # This filesystem has no locks: nothing guards the workdir.
      return self
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _read_holder(fd: int) -> str:
  try:
    holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    return f"pid {holder['pid']} on host {holder['host']}, since {holder['since']}"
  except (OSError, ValueError, KeyError, TypeError):
    return "a process that is still starting"


class Checkpointer:
  """Periodic checkpoints and a preemption snapshot under one working directory.

  Args:
    workdir: the run's directory (created if needed).
    keep: how many periodic checkpoints to keep (the snapshot always keeps one).
    async_save: write in a background thread; call :meth:`wait` (or :meth:`close`) before reading them.

  Example:
    >>> ckpt = Checkpointer(workdir, keep=3)                           # doctest: +SKIP
    >>> ckpt.save(1000, state, {"data": it.get_state()})                # doctest: +SKIP
    >>> state, meta, step = ckpt.restore(jax.eval_shape(init_state))    # doctest: +SKIP
  """

  def __init__(self, workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    if not isinstance(keep, int) or keep < 1:
      raise ValueError(f"Checkpointer: keep must be an int >= 1, got {keep!r}.")
    self.workdir = absolute_workdir(workdir)
    self._managers = {}
    for kind, max_to_keep in ((CHECKPOINTS, keep), (SNAPSHOT, 1)):
      options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                             create=True)
      handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
      self._managers[kind] = ocp.CheckpointManager(os.path.join(self.workdir, kind), options=options,
                                                   item_handlers=handlers)

  def directory(self, kind: str, step: int) -> str:
    return os.path.join(self.workdir, kind, str(step))

  def manager(self, kind: str) -> ocp.CheckpointManager:
    """The Orbax `CheckpointManager` of `kind` (`"checkpoints"` or `"snapshot"`), for reading a checkpoint's
    items directly (e.g. onto another device topology)."""
    return self._managers[kind]

  def steps(self) -> dict[str, list[int]]:
    """The complete checkpoints on disk, by kind."""
    return {kind: list(manager.all_steps()) for kind, manager in self._managers.items()}

  def latest(self) -> tuple[str, int] | None:
    """`(kind, step)` of the newest complete checkpoint (a periodic one wins a tie), or None."""
    best = None
    for kind in (CHECKPOINTS, SNAPSHOT):
      step = self._managers[kind].latest_step()
      if step is not None and (best is None or step > best[1]):
        best = (kind, step)
    return best

  def save(self, step: int, state, meta: dict[str, Any] | None = None, *, snapshot: bool = False) -> bool:
    """Saves `state` and the JSON-serialisable `meta` as checkpoint `step` (asynchronously), with the digest of
    every array of `state` (checked by :meth:`restore`).

    A snapshot at a step that already has a periodic checkpoint is skipped. Every process of a multi-process run
    must call this with the same arguments.

    Returns:
      Whether a checkpoint was written.

    Raises:
      CheckpointError: if the state holds a non-finite value (nothing is written), or `meta` is not JSON.
    """
    kind = SNAPSHOT if snapshot else CHECKPOINTS
    if snapshot and step in self._managers[CHECKPOINTS].all_steps():
      return False
    if step in self._managers[kind].all_steps():
      return False
    nonfinite, digests = inspect_state(state)
    if nonfinite:
      raise CheckpointError(f"refusing to write checkpoint {step} to {self.workdir}: the train state holds "
                            f"non-finite values (in {', '.join(nonfinite[:4])}).")
    meta = {} if meta is None else meta
    try:
      json.dumps(meta)
    except TypeError as error:
      raise CheckpointError(f"checkpoint meta must be JSON-serialisable: {error}.") from None
    meta = {**meta, INTEGRITY_KEY: {"algorithm": DIGEST_ALGORITHM, "arrays": digests}}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    return bool(self._managers[kind].save(step, args=args, force=True))

  def restore(self, abstract_state, *, step: int | None = None, kind: str | None = None):
    """Restores the newest complete checkpoint (or the given one) into `abstract_state`, and verifies it.

    Args:
      abstract_state: the target: a pytree of `jax.ShapeDtypeStruct` (with shardings for a mesh), e.g.
        `jax.eval_shape(init_state)`; its structure, shapes and dtypes must match the checkpoint.
      step, kind: a specific checkpoint (`kind` is `"checkpoints"` or `"snapshot"`; found if omitted).

    Returns:
      `(state, meta, step)`, or None when the directory holds no checkpoint and none was asked for.

    Raises:
      CheckpointMismatchError: a checkpoint whose arrays do not match `abstract_state` (listing the differences).
      CorruptCheckpointError: a checkpoint that cannot be read, whose arrays differ from the digests written when
        it was saved, or that holds a non-finite value (see :meth:`restore_intact` to fall back).
      CheckpointError: a requested checkpoint that does not exist.
    """
    if step is None:
      found = self.latest()
      if found is None:
        return None
      kind, step = found
    elif kind is None:
      kind = next((k for k, manager in self._managers.items() if step in manager.all_steps()), None)
    if kind not in self._managers or step not in self._managers[kind].all_steps():
      raise CheckpointError(f"no complete checkpoint for step {step} in {self.workdir}; available: {self.steps()}.")
    directory = self.directory(kind, step)

    def corrupt(reason):
      return CorruptCheckpointError(kind, step, directory, reason,
                                    "Rerun the same command to move it aside and resume from the newest intact "
                                    f"checkpoint (available: {self.steps()}).")

    try:
      with _collecting_abandoned_coroutines():
        saved = self._managers[kind].item_metadata(step)["state"]
      saved = _leaf_signatures(saved.tree if hasattr(saved, "tree") else saved)
    except Exception as error:  # Orbax raises many types for unreadable metadata.
      raise corrupt(f"its metadata cannot be read ({_first_line(error)})") from None
    mismatch = describe_mismatch(saved, _leaf_signatures(abstract_state))
    if mismatch:
      raise CheckpointMismatchError(
          f"checkpoint {directory} does not match the model being trained (a different model or optimizer "
          "configuration?):\n  " + "\n  ".join(mismatch) +
          "\nTrain in a fresh --workdir, or restore with the configuration that wrote it.", mismatch)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    try:
      with _collecting_abandoned_coroutines():
        restored = self._managers[kind].restore(step, args=args)
    except Exception as error:  # TensorStore and Orbax raise many types for unreadable data.
      raise corrupt(f"its data cannot be read ({_first_line(error)})") from None
    state, meta = restored["state"], dict(restored["meta"] or {})
    integrity = meta.pop(INTEGRITY_KEY, None)
    nonfinite, digests = inspect_state(state)
    # Checkpoints written before digests existed are checked for finiteness only.
    if isinstance(integrity, dict) and integrity.get("algorithm") == DIGEST_ALGORITHM:
      expected = integrity.get("arrays", {})
      changed = [name for name in digests if expected.get(name) != digests[name]]
      if changed:
        raise corrupt(f"{', '.join(changed[:3])}{' and others' if len(changed) > 3 else ''} differ from the "
                      "digests written when it was saved")
    if nonfinite:
      raise corrupt(f"{', '.join(nonfinite[:3])} hold non-finite values, which are never saved")
    return state, meta, step

  def restore_intact(self, abstract_state, *, report: Callable[[str], None] = print, move_aside: bool = True):
    """Restores the newest checkpoint that passes :meth:`restore`'s checks, setting corrupt ones aside.

    Each corrupt checkpoint is reported in one line through `report` and, with `move_aside`, renamed into
    `workdir/corrupt/` (never deleted: a user may want to inspect or salvage it); otherwise it is only skipped.

    Returns:
      `(state, meta, step, kind)` of the newest intact checkpoint, or None when the workdir holds no checkpoint.

    Raises:
      CheckpointMismatchError: the newest checkpoint does not fit `abstract_state` (no fall-back: the
        configuration is wrong, not the checkpoint).
      CorruptCheckpointError: every checkpoint is corrupt (all moved aside).
    """
    skipped = []
    for kind, step in self.candidates():
      try:
        state, meta, step = self.restore(abstract_state, step=step, kind=kind)
      except CorruptCheckpointError as error:
        where = self.move_aside(kind, step) if move_aside else None
        report(f"warning: checkpoint {error.directory} is corrupt ({error.reason}); "
               + (f"moved it to {where}" if where else "skipping it") + "; falling back to an earlier checkpoint.")
        skipped.append(where or error.directory)
        continue
      return state, meta, step, kind
    if skipped:
      reason = f"every checkpoint in {self.workdir} is corrupt"
      raise CorruptCheckpointError(
          "all", -1, self.workdir, reason, "", message=f"{reason} (" + ", ".join(skipped) + "). " + (
              "Restore them from a backup, or rerun the same command to train from step 0." if move_aside else
              "Restore them from a backup."))
    return None

  def candidates(self) -> list[tuple[str, int]]:
    """Every complete checkpoint as `(kind, step)`, newest first (a periodic one before a snapshot at one step)."""
    found = [(kind, step) for kind in (CHECKPOINTS, SNAPSHOT) for step in self._managers[kind].all_steps()]
    return sorted(found, key=lambda item: (-item[1], item[0] != CHECKPOINTS))

  def move_aside(self, kind: str, step: int) -> str:
    """Renames checkpoint `(kind, step)` to `workdir/corrupt/<kind>-<step>[-N]` and returns the new path.

    In a multi-process run process 0 renames; every process must call this.
    """
    target = os.path.join(self.workdir, CORRUPT, f"{kind}-{step}")
    suffix = 1
    while os.path.exists(target if suffix == 1 else f"{target}-{suffix}"):
      suffix += 1
    target = target if suffix == 1 else f"{target}-{suffix}"
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.rename(self.directory(kind, step), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"scoreflow_move_aside_{kind}_{step}")
    self._managers[kind].reload()
    return target

  def wait(self) -> None:
    """Blocks until every asynchronous save has finished."""
    for manager in self._managers.values():
      manager.wait_until_finished()

  def close(self) -> None:
    for manager in self._managers.values():
      manager.wait_until_finished()
      manager.close()


# --- The run's configuration, kept beside its checkpoints. -----------------------------------------------------

def check_workdir_config(workdir: str | os.PathLike, config: dict, *, allowed_changes=(), notes=None,
                         resuming: bool = True, allow_config_change: bool = False,
                         write: bool = True) -> dict[str, tuple]:
  """Refuses to continue a run in `workdir` with a configuration different from the one that started it.

  The first run writes `workdir/config.json`; later runs that resume its checkpoints compare against it.
  Differences in fields listed in `allowed_changes` (e.g. `"training.num_train_steps"`, to train longer) or any
  difference with `allow_config_change=True` are returned (for the caller to log) and the file is updated. A
  run that does not resume (the workdir holds no checkpoint, e.g. an earlier attempt failed before saving)
  replaces the file.

  Args:
    workdir: the run's directory.
    config: the configuration as a JSON-compatible nested dict.
    allowed_changes: dotted field names (or prefixes ending in ".") that may change between runs.
    notes: `{field: why it cannot change}`, added to the error for those fields.
    resuming: whether the run continues from a checkpoint in `workdir`.
    allow_config_change: accept any difference.
    write: write the file (process 0 only in a multi-process run).

  Returns:
    The differences `{field: (old, new)}` that were accepted.

  Raises:
    CheckpointError: the workdir was started with a different configuration, naming the differing fields.
  """
  path = os.path.join(os.fspath(workdir), CONFIG_FILE)
  config = json.loads(json.dumps(config))  # Tuples become lists, as they are on disk.
  notes = notes or {}
  diffs = {}
  if resuming and os.path.exists(path):
    try:
      with open(path) as f:
        old = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
      raise CheckpointError(f"{path} cannot be read ({error}); delete it or use a fresh --workdir.") from None
    diffs = config_differences(old, config)
    blocking = {name: d for name, d in diffs.items() if not field_matches(name, allowed_changes)}
    if blocking and not allow_config_change:
      def describe(name, old, new):
        return f"{name}: {old!r} in the workdir, {new!r} now" + (f" ({notes[name]})" if name in notes else "")

      shown = "\n  ".join(describe(name, *values) for name, values in list(blocking.items())[:12])
      more = f"\n  ... and {len(blocking) - 12} more" if len(blocking) > 12 else ""
      raise CheckpointError(f"workdir {workdir} holds a run with a different configuration:\n  {shown}{more}\n"
                            "Use a fresh --workdir, or pass --allow_config_change to resume this run with the new "
                            "configuration.")
  if write and (diffs or not resuming or not os.path.exists(path)):
    io.write_json(path, config, sort_keys=True)
  return diffs


def gather_json(obj) -> list:
  """Every process's JSON-serialisable `obj`, in process order (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([data.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[: data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(gathered, np.ravel(lengths))]
