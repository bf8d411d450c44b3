"""The evaluation engine's unit of resumable work: a file that is either absent or complete.

Every piece of an evaluation (a bits/dim batch, a sample shard, the Inception features of a shard, a reference
pass) is one `.npz` file written atomically (:mod:`scoreflow.io`); :func:`resumable_unit` reads it back when it is
there and fits, and computes and writes it otherwise, so a restarted evaluation redoes only what was not
finished. Directories are named by a hash of what determines their content (:func:`task_directory`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Callable, Iterable

import numpy as np

from scoreflow import io


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
  first use."""
  key = settings if key_fields is None else {field: settings[field] for field in key_fields}
  directory = os.path.join(parent, f"{name}-{fingerprint(key)}")
  os.makedirs(directory, exist_ok=True)
  if not os.path.exists(os.path.join(directory, "settings.json")):
    io.write_json(os.path.join(directory, "settings.json"), settings)
  return directory


def safe_name(name: str) -> str:
  """`name` with every run of characters other than letters, digits, `_`, `.` and `-` replaced by `_`."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def progress(total: int, initial: int, description: str, unit: str, enabled: bool):
  """A tqdm bar (disabled unless `enabled`) that leaves no line behind."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm(total=total, initial=initial, desc=description, unit=unit, dynamic_ncols=True, disable=not enabled,
              leave=False)


def say(message: str) -> None:
  """Prints a line without breaking a progress bar."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  tqdm.write(message)
