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
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINTS = "checkpoints"
SNAPSHOT = "snapshot"
CONFIG_FILE = "config.json"


def absolute_workdir(workdir: str | os.PathLike) -> str:
  """`workdir` as an absolute path (Orbax refuses relative ones); URLs such as gs://... are kept as they are."""
  workdir = os.fspath(workdir)
  return workdir if "://" in workdir else os.path.abspath(workdir)


class CheckpointError(ValueError):
  """A checkpoint or working directory that cannot be used as asked (missing, corrupt, mismatched)."""


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


@jax.jit
def _all_finite_device(leaves):
  return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]).all()


def _all_finite(tree) -> bool:
  # One module-level jitted reduction: compiled once per state layout, not on every save.
  leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
  if not leaves:
    return True
  return bool(_all_finite_device(leaves))


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
    """Saves `state` and the JSON-serialisable `meta` as checkpoint `step` (asynchronously).

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
    if not _all_finite(state):
      raise CheckpointError(f"refusing to write checkpoint {step} to {self.workdir}: the train state holds "
                            "non-finite values.")
    meta = {} if meta is None else meta
    try:
      json.dumps(meta)
    except TypeError as error:
      raise CheckpointError(f"checkpoint meta must be JSON-serialisable: {error}.") from None
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    return bool(self._managers[kind].save(step, args=args, force=True))

  def restore(self, abstract_state, *, step: int | None = None, kind: str | None = None):
    """Restores the newest complete checkpoint (or the given one) into `abstract_state`.

    Args:
      abstract_state: the target: a pytree of `jax.ShapeDtypeStruct` (with shardings for a mesh), e.g.
        `jax.eval_shape(init_state)`; its structure, shapes and dtypes must match the checkpoint.
      step, kind: a specific checkpoint (`kind` is `"checkpoints"` or `"snapshot"`; found if omitted).

    Returns:
      `(state, meta, step)`, or None when the directory holds no checkpoint and none was asked for.

    Raises:
      CheckpointError: a requested checkpoint that does not exist, a checkpoint whose arrays do not match
        `abstract_state` (listing the differences), or one that cannot be read (corrupt or truncated).
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
    try:
      saved = self._managers[kind].item_metadata(step)["state"]
      saved = _leaf_signatures(saved.tree if hasattr(saved, "tree") else saved)
    except Exception as error:  # Orbax raises many types for unreadable metadata.
      raise CheckpointError(f"checkpoint {directory} cannot be read ({type(error).__name__}: {error}); it may be "
                            "corrupt or incomplete. Delete that directory to resume from an earlier checkpoint "
                            f"(available: {self.steps()}).") from error
    mismatch = describe_mismatch(saved, _leaf_signatures(abstract_state))
    if mismatch:
      raise CheckpointError(f"checkpoint {directory} does not match the model being trained (a different "
                            "model or optimizer configuration?):\n  " + "\n  ".join(mismatch) +
                            "\nTrain in a fresh --workdir, or restore with the configuration that wrote it.")
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    try:
      restored = self._managers[kind].restore(step, args=args)
    except Exception as error:
      raise CheckpointError(f"checkpoint {directory} cannot be read ({type(error).__name__}: "
                            f"{str(error)[:500]}); it may be corrupt or incomplete. Delete that directory to "
                            f"resume from an earlier checkpoint (available: {self.steps()}).") from error
    return restored["state"], restored["meta"] or {}, step

  def wait(self) -> None:
    """Blocks until every asynchronous save has finished."""
    for manager in self._managers.values():
      manager.wait_until_finished()

  def close(self) -> None:
    for manager in self._managers.values():
      manager.wait_until_finished()
      manager.close()


# --- The run's configuration, kept beside its checkpoints. -----------------------------------------------------

def flatten_config(tree, prefix="") -> dict:
  """`{"a.b": value}` for every leaf field of a nested dict (a config as JSON)."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(flatten_config(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def field_matches(name: str, patterns) -> bool:
  """Whether dotted field `name` is one of `patterns`, or lies in one of them that ends in "." (a section)."""
  return any(name == p or (p.endswith(".") and name.startswith(p)) for p in patterns)


def config_differences(old: dict, new: dict) -> dict[str, tuple]:
  """`{"a.b": (old, new)}` for every leaf field that differs between two nested dicts."""
  old_flat, new_flat = flatten_config(old), flatten_config(new)
  missing = object()
  diffs = {}
  for name in sorted(set(old_flat) | set(new_flat)):
    a, b = old_flat.get(name, missing), new_flat.get(name, missing)
    if a != b:
      diffs[name] = (None if a is missing else a, None if b is missing else b)
  return diffs


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
    os.makedirs(os.fspath(workdir), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
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
