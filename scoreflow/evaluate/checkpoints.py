"""Which checkpoints an evaluation reads, whether they belong to the configured model, and restoring them."""

from __future__ import annotations

import hashlib
import json
import os

from scoreflow.config.evaluation import MODEL_SECTIONS, parse_checkpoint_spec
from scoreflow.config.fields import config_differences, config_to_dict, field_matches
from scoreflow.evaluate import units
from scoreflow.train.checkpoint import (CONFIG_FILE, CheckpointError, CheckpointMismatchError, Checkpointer,
                                       CorruptCheckpointError, WorkdirBusyError, WorkdirLock)


def select_checkpoints(available: dict[str, list[int]], spec: str) -> list[tuple[str, int]]:
  """The `(kind, step)` checkpoints that `spec` (see :func:`parse_checkpoint_spec`) picks, oldest first.

  `available` maps a kind (`"checkpoints"`, `"snapshot"`) to its steps, as `Checkpointer.steps()` gives it; a
  step present in both is taken from the periodic checkpoints.

  Raises:
    CheckpointError: if there is no checkpoint at all, or none that `spec` picks (listing the available ones).
  """
  by_step: dict[int, str] = {}
  for kind in ("snapshot", "checkpoints"):  # Periodic checkpoints win a tie.
    for step in available.get(kind, []):
      by_step[int(step)] = kind
  if not by_step:
    raise CheckpointError("the workdir holds no checkpoint; train first (python run_train.py --config ... "
                          "--workdir ...) or pass the run's --workdir.")
  parsed = parse_checkpoint_spec(spec)
  steps = sorted(by_step)
  if parsed[0] == "latest":
    chosen = steps[-1:]
  elif parsed[0] == "all":
    chosen = steps
  elif parsed[0] == "steps":
    missing = [step for step in parsed[1] if step not in by_step]
    if missing:
      raise CheckpointError(f"config.eval.checkpoints={spec!r}: no checkpoint for step(s) {missing}; available "
                            f"steps: {steps}.")
    chosen = sorted(set(parsed[1]))
  else:
    low, high = parsed[1], parsed[2]
    chosen = [s for s in steps if (low is None or s >= low) and (high is None or s <= high)]
    if not chosen:
      raise CheckpointError(f"config.eval.checkpoints={spec!r}: no checkpoint in that range; available steps: "
                            f"{steps}.")
  return [(by_step[step], step) for step in chosen]



def workdir_config_differences(workdir: str, config) -> dict[str, tuple]:
  """Fields of the model-defining sections that differ between `workdir/config.json` and `config`."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return {}
  with open(path) as file:
    saved = json.load(file)
  return {name: d for name, d in config_differences(saved, config_to_dict(config)).items()
          if field_matches(name, MODEL_SECTIONS)}


def describe_differences(differences: dict[str, tuple]) -> str:
  return "".join(f"\n  config.{name}: {old!r} in the workdir's config.json, {new!r} in --config"
                 for name, (old, new) in differences.items())


def checkpoint_identity(directory: str) -> str:
  """A string that changes whenever a checkpoint directory is written again (another training run, or the same
  step saved anew): the hash of Orbax's commit record `_CHECKPOINT_METADATA` (its timestamps), which a copy of
  the directory keeps; the directory's modification time where there is no such file."""
  try:
    with open(os.path.join(directory, "_CHECKPOINT_METADATA"), "rb") as file:
      return "orbax-" + hashlib.sha256(file.read()).hexdigest()[:16]
  except OSError:
    return f"mtime-{os.stat(directory).st_mtime_ns}"


def restore_params(checkpointer: Checkpointer, abstract_state, kind: str, step: int, use_ema: bool,
                    differences: dict[str, tuple], *, newest_intact: bool = False):
  """The EMA or raw parameters of checkpoint `(kind, step)`, with the `(kind, step)` they come from.

  With `newest_intact` (`eval.checkpoints=latest`), a corrupt checkpoint is reported in one line and the newest
  intact one is evaluated instead; the corrupt one is moved aside into `workdir/corrupt/` when no training run holds
  the workdir (a running one moves it itself when it next resumes). A corrupt checkpoint asked for by step is an
  error, told apart from a configuration mismatch.

  In a multi-process evaluation every process calls this (each restores onto the devices of `abstract_state`'s
  shardings, its own); process 0 takes the lock and moves corrupt checkpoints aside for all."""
  # Orbax ends a restore with a barrier that is an XLA collective, where a process would wait forever for one that
  # failed: the processes meet here first, where a failure is noticed (units.PeerProcessError).
  units.gather(f"restore {checkpointer.directory(kind, step)}", None)
  try:
    if newest_intact:
      lock = WorkdirLock(checkpointer.workdir)
      try:
        if units.is_main_process():
          lock.acquire()
      except WorkdirBusyError:
        pass
      try:
        # Every process moves aside or none: Checkpointer.move_aside waits for all of them.
        move_aside = units.share(f"lock {checkpointer.workdir}", lock.held)
        state, _, step, kind = checkpointer.restore_intact(abstract_state, report=units.say, move_aside=move_aside)
      finally:
        lock.release()
    else:
      state, _, _ = checkpointer.restore(abstract_state, step=step, kind=kind)
  except CorruptCheckpointError as error:
    if newest_intact:
      raise
    raise CorruptCheckpointError(error.kind, error.step, error.directory, error.reason, "", message=(
        f"cannot evaluate {error.directory}: it is corrupt or incomplete ({error.reason}); evaluate other "
        f"checkpoints (available: {checkpointer.steps()}) or restore it from a backup.")) from None
  except CheckpointMismatchError as error:
    named = describe_differences(differences)
    hint = f"\nThe configuration differs from the one that trained this run in:{named}" if named else ""
    raise CheckpointError(f"cannot evaluate {checkpointer.directory(kind, step)}: its parameters do not match "
                          f"the model that --config describes.{hint}\nMismatched arrays (checkpoint vs model):\n"
                          + "\n".join("  " + line for line in error.differences) + "\nEvaluate with the "
                          "configuration the run was trained with (its config.json).") from None
  return (state.ema_params if use_ema else state.params), kind, step


def load_published_weights(path: str, model_spec: dict, *, use_ema: bool, element_shape) -> tuple[dict, int, str]:
  """`(params, step, identity)` of published weights imported for `model_spec` (a config's `model` section):
  a score_sde_pytorch `.pth` checkpoint (:func:`~scoreflow.models.importers.from_score_sde_pytorch`) or a
  score_sde (Flax) `checkpoint_N` file or directory (:func:`~scoreflow.models.importers.from_score_sde_flax`).
  `step` is the checkpoint's training step (0 where it does not say); `identity` changes when the file does.

  Raises:
    CheckpointError: the file does not hold the weights of `model_spec` (naming the mismatched keys and shapes).
  """
  from scoreflow.models import importers  # pylint: disable=g-import-not-at-top

  spec = {key: value for key, value in model_spec.items() if not (key == "preset" and value is None)}
  shape = dict(image_size=int(element_shape[0]), channels=int(element_shape[-1]))
  try:
    if os.path.isfile(path) and path.endswith((".pth", ".pt")):
      state = importers.load_torch_checkpoint(path)
      step = int(state.get("step", 0)) if isinstance(state, dict) else 0
      params = importers.from_score_sde_pytorch(state, spec, ema=use_ema, **shape)
    else:
      state = importers.read_flax_checkpoint(path)
      step = int(state.get("step", 0)) if isinstance(state, dict) and "step" in state else 0
      params = importers.from_score_sde_flax(state, spec, ema=use_ema, **shape)
  except ValueError as error:
    raise CheckpointError(f"config.eval.init_from={path!r} cannot be evaluated as config.model describes: {error}") \
        from None
  stat = os.stat(path)
  return params, step, f"file-{stat.st_size}-{stat.st_mtime_ns}"
