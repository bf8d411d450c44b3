"""The evaluation engine's unit of resumable work: a file that is either absent or complete; and how the units
are split over the processes of a multi-process evaluation.

Every piece of an evaluation (a bits/dim batch, a sample shard, the Inception features of a shard, a reference
pass) is one `.npz` file written atomically (:mod:`scoreflow.io`); :func:`resumable_unit` reads it back when it is
there and fits, and computes and writes it otherwise, so a restarted evaluation redoes only what was not
finished. Directories are named by a hash of what determines their content (:func:`task_directory`).

Several processes. Under `jax.distributed` (`run_eval.py --coordinator_address=... --num_processes=P
--process_id=I`) every process runs the same evaluation over a shared filesystem. A loop over units computes
(or reuses) only the units :func:`assigned_units` gives this process, unit `i` going to process `i mod P`; then
:func:`gather` waits for every process (it is the barrier) and the loop reads the other processes' units back
from their files (:func:`read_unit`), so each process ends with the whole result, in unit order, exactly as one
process would have computed it. Process 0 alone writes the shared files (results, grids, `settings.json`) and
prints; :func:`share` hands its values to the others.

The waiting goes through the JAX coordination service's key-value store, not through an XLA collective
(`multihost_utils.sync_global_devices`): on CPU such a barrier hung when the processes reached it minutes apart,
as processes with uneven or partly resumed shares of the work do. A process that fails tells the others
(:func:`announce_failure`), which then stop with a :class:`PeerProcessError` instead of waiting for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np

from scoreflow import io

# The coordination service's keys of this module; a failed process leaves its message under _FAILURE_KEY.
_KEY_PREFIX = "scoreflow/evaluate"
_FAILURE_KEY = f"{_KEY_PREFIX}/failure"
_POLL_MS = 2000  # How long a wait blocks before it looks for a failed process again.
_sequence = itertools.count()  # Numbers every gather and share; all processes make them in the same order.
_alone = False  # Within single_process(): this process does every unit itself and waits for no other.


class PeerProcessError(RuntimeError):
  """Another process of a multi-process evaluation stopped with an error (its message is in this one's)."""


def process_group() -> tuple[int, int]:
  """`(process_index, process_count)` of the evaluation: JAX's, or `(0, 1)` within :func:`single_process`."""
  return (0, 1) if _alone else (jax.process_index(), jax.process_count())


def is_main_process() -> bool:
  """Whether this process writes the shared files and prints (process 0; always true with one process)."""
  return process_group()[0] == 0


def unit_owner(index: int, process_count: int) -> int:
  """The process that computes unit `index`: `index mod process_count`."""
  return index % process_count


def assigned_units(num_units: int, process_index: int | None = None, process_count: int | None = None) -> range:
  """The units `0 .. num_units - 1` that process `process_index` of `process_count` (default: this one, see
  :func:`process_group`) computes: those with :func:`unit_owner` equal to it. Over the processes they cover every
  unit exactly once."""
  if process_index is None or process_count is None:
    process_index, process_count = process_group()
  if not 0 <= process_index < process_count:
    raise ValueError(f"assigned_units: process_index must lie in [0, process_count={process_count}), got "
                     f"{process_index}.")
  return range(process_index, num_units, process_count)


def is_assigned(index: int) -> bool:
  """Whether this process computes unit `index` (see :func:`assigned_units`)."""
  process_index, process_count = process_group()
  return unit_owner(index, process_count) == process_index


@contextlib.contextmanager
def single_process() -> Iterator[None]:
  """Within it this process computes every unit itself and :func:`gather` and :func:`share` wait for nobody: for
  work that process 0 does alone while the others wait for its result (in :func:`share`)."""
  global _alone
  previous, _alone = _alone, True
  try:
    yield
  finally:
    _alone = previous


@contextlib.contextmanager
def main_process_first(name: str) -> Iterator[None]:
  """Process 0 runs the body before the others do (e.g. the first read of a dataset, which may prepare it on
  disk): they wait for it in :func:`gather`, named `name`."""
  if not is_main_process():
    gather(name, None)
  yield
  if is_main_process():
    gather(name, None)


def _client():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  return ocp.multihost.get_jax_distributed_client()


def _wait_for(client, key: str) -> str:
  """The value another process puts under `key`, waiting for it as long as it takes, unless a process fails."""
  while True:
    try:
      return client.blocking_key_value_get(key, _POLL_MS)
    except jax.errors.JaxRuntimeError as error:
      if "DEADLINE_EXCEEDED" not in str(error):
        raise
    try:
      failure = client.key_value_try_get(_FAILURE_KEY)
    except jax.errors.JaxRuntimeError as error:
      if "NOT_FOUND" not in str(error):
        raise
    else:
      raise PeerProcessError(f"{failure} (This process stops too.)")


def gather(name: str, value: Any) -> list[Any]:
  """Every process's JSON-serialisable `value`, in process order, once all of them have called `gather` (a barrier:
  files written before it are visible to every process after it).

  Every process must make the same sequence of `gather` and :func:`share` calls (with the same names); a single
  process (or one within :func:`single_process`) gets `[value]` at once.

  Raises:
    PeerProcessError: another process failed while this one waited.
  """
  index, count = process_group()
  if count == 1:
    return [value]
  client = _client()
  key = f"{_KEY_PREFIX}/{next(_sequence)}/{name}"
  client.key_value_set(f"{key}/{index}", json.dumps(value, default=io.json_default))
  return [json.loads(_wait_for(client, f"{key}/{process}")) for process in range(count)]


def share(name: str, value: Any) -> Any:
  """Process 0's JSON-serialisable `value` on every process (the others' `value` is ignored): they wait for it, so
  what process 0 wrote before sharing is there when they go on. Tuples arrive as lists, NaN as NaN.

  Raises:
    PeerProcessError: another process failed while this one waited.
  """
  index, count = process_group()
  if count == 1:
    return value
  client = _client()
  key = f"{_KEY_PREFIX}/{next(_sequence)}/{name}"
  if index == 0:
    client.key_value_set(key, json.dumps(value, default=io.json_default))
    return value
  return json.loads(_wait_for(client, key))


def announce_failure(error: BaseException) -> None:
  """Tells the other processes that this one stops with `error` (the first failure is kept), so that they stop
  instead of waiting for it in :func:`gather` or :func:`share`. Nothing happens with one process."""
  if jax.process_count() == 1:
    return
  message = str(error) if isinstance(error, PeerProcessError) else (
      f"process {jax.process_index()} of {jax.process_count()} stopped with {type(error).__name__}: {error}")
  try:
    _client().key_value_set(_FAILURE_KEY, message)
  except Exception:  # pylint: disable=broad-except  # Another process announced first, or the service is gone.
    pass


def read_unit(path: str, fits: Callable[[dict[str, np.ndarray]], bool] = lambda arrays: True
              ) -> dict[str, np.ndarray]:
  """The arrays of the finished unit at `path` that another process computed (after :func:`gather`).

  Raises:
    FileNotFoundError: the file is missing, unreadable or does not fit: the processes do not share the output
      directory.
  """
  arrays = io.load_npz(path)
  if arrays is None or not fits(arrays):
    raise FileNotFoundError(f"{path}, which another process of this evaluation wrote, is missing or incomplete "
                            "here; all processes must share one filesystem for the workdir and eval.output_dir.")
  return arrays


def resumable_unit(path: str, compute: Callable[[], dict[str, np.ndarray]],
                   fits: Callable[[dict[str, np.ndarray]], bool] = lambda arrays: True
                   ) -> tuple[dict[str, np.ndarray], bool]:
  """`(arrays, computed)`: the arrays of the finished unit at `path` if it exists, is readable and `fits`;
  else `compute()`, written to `path` atomically first. `computed` says which happened."""
  arrays = io.load_npz(path)
  if arrays is not None and fits(arrays):
    return arrays, False
  arrays = compute()
  io.atomic_savez(path, arrays)
  return arrays, True


def fingerprint(settings: dict) -> str:
  """An 8-hex-digit hash of JSON-serialisable `settings` (names task directories)."""
  text = json.dumps(settings, sort_keys=True, default=io.json_default)
  return hashlib.sha256(text.encode()).hexdigest()[:8]


def task_directory(parent: str, name: str, settings: dict, key_fields: Iterable[str] | None = None) -> str:
  """`parent/name-<hash of settings>` (of its `key_fields` only, if given), created with its `settings.json` on
  first use (by process 0; every process creates the directory)."""
  key = settings if key_fields is None else {field: settings[field] for field in key_fields}
  directory = os.path.join(parent, f"{name}-{fingerprint(key)}")
  os.makedirs(directory, exist_ok=True)
  if is_main_process() and not os.path.exists(os.path.join(directory, "settings.json")):
    io.write_json(os.path.join(directory, "settings.json"), settings)
  return directory


def safe_name(name: str) -> str:
  """`name` with every run of characters other than letters, digits, `_`, `.` and `-` replaced by `_`."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def progress(total: int | None, initial: int, description: str, unit: str, enabled: bool):
  """A tqdm bar (disabled unless `enabled`, and on processes other than 0) that leaves no line behind."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm(total=total, initial=initial, desc=description, unit=unit, dynamic_ncols=True,
              disable=not (enabled and is_main_process()), leave=False)


def say(message: str) -> None:
  """Prints a line without breaking a progress bar (on process 0 only)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  if is_main_process():
    tqdm.write(message)
