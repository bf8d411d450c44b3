"""Files that readers never see half-written: every write goes to a temporary file beside its target, then an
atomic rename (`os.replace`), so an interrupted run leaves either the old file or the new one.

The evaluation engine's resumable units, the training loop's metrics and the run's `config.json` are all written
through these functions; :func:`load_npz` is their reader, which treats an unreadable file as absent (the unit is
computed again).
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from typing import Any, Callable, Mapping

import numpy as np


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *, binary: bool = True) -> None:
  """Calls `write(file)` on a temporary file beside `path` (its directory is created), then renames it to `path`.

  On any exception the temporary file is removed and `path` is left as it was.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  suffix = os.path.splitext(path)[1]
  handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=suffix)
  try:
    with os.fdopen(handle, "wb" if binary else "w") as file:
      write(file)
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def jsonable(obj):
  """`obj` with NaN and infinite floats replaced by None (strict JSON has no NaN), tuples as lists, numpy scalars
  and arrays as Python values."""
  if isinstance(obj, dict):
    return {key: jsonable(value) for key, value in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(value) for value in obj]
  if isinstance(obj, np.ndarray):
    return jsonable(obj.tolist())
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def json_default(value):
  """`json.dumps(default=...)`: numpy values as Python values, anything else by `str`."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)


def write_json(path: str | os.PathLike, obj, *, sort_keys: bool = False) -> None:
  """Writes `obj` as indented strict JSON (see :func:`jsonable`) to `path`, atomically."""

  def write(file):
    json.dump(jsonable(obj), file, indent=2, sort_keys=sort_keys, default=json_default)
    file.write("\n")

  atomic_write(path, write, binary=False)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path`, atomically."""
  atomic_write(path, lambda file: file.write(text), binary=False)


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes a uint8 `[H, W]` or `[H, W, 3]` image as PNG (Pillow), atomically."""
  import PIL.Image  # pylint: disable=g-import-not-at-top

  buffer = io.BytesIO()
  PIL.Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
  atomic_write(path, lambda file: file.write(buffer.getvalue()))


def atomic_savez(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """`np.savez` of `arrays` to `path`, atomically."""
  atomic_write(path, lambda file: np.savez(file, **arrays))


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray] | None:
  """The arrays of an `.npz` file, or None if it does not exist or cannot be read (a unit to compute again)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {name: archive[name] for name in archive.files}
  except (OSError, ValueError, EOFError):
    return None
