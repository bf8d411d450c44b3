r"""Evaluation of a trained run: `evaluate(config, workdir)`, the engine of `run_eval.py`; this module only
orchestrates (restore each chosen checkpoint, run its tasks, print and record the results). The work lives by
idea: settings in :mod:`scoreflow.config.evaluation`, checkpoints in :mod:`~scoreflow.evaluate.checkpoints`,
bits/dim in :mod:`~scoreflow.evaluate.bpd`, sample sets in :mod:`~scoreflow.evaluate.samples`, reference
statistics in :mod:`~scoreflow.evaluate.reference`, resumable units in :mod:`~scoreflow.evaluate.units`, the
printed summary in :mod:`~scoreflow.evaluate.report`, and the tasks themselves in :mod:`~scoreflow.evaluate.tasks`.

For each chosen checkpoint (the latest, a step, a list, a range; EMA or raw parameters) it computes, as the
config's `eval.tasks` ask:

* **bpd**: bits per dimension of a dataset split under the probability-flow ODE
  (:func:`scoreflow.likelihood.log_likelihood`: Hutchinson or exact divergence, tolerances), averaged over
  `num_repeats` uniform dequantizations :math:`x = a(v + u)/L + b` of the integer levels `v`
  (:func:`~scoreflow.likelihood.dequantize`, :func:`~scoreflow.likelihood.bits_per_dim`). It reports the mean, its
  standard error over examples (which includes the dequantization and Hutchinson noise, since each example's
  mean over repeats is an independent draw), the dequantization standard error over repeats, NFE statistics and
  the per-example values (`per_example.npz`). Toy densities are continuous: their "bits/dim" is
  :math:`-\log_2 p(x)/D` without dequantization.
* **samples**: `num_samples` draws with the sampler of `config.sampling` (any method of
  :data:`scoreflow.config.experiment.SAMPLERS`), written in shards (`shard_00000.npz`, ...: `samples` in model
  space and the sampler's NFE and status) with a PNG grid. Samples with a NaN or infinite value are counted
  (`num_nonfinite`), left out of the quality metrics below (an error if no sample is finite) and warned about.
* **fid**: FID, Inception Score and KID of the samples with pytorch-fid's Inception-v3
  (:mod:`scoreflow.evaluate.inception`), whose weights file comes from `eval.fid.inception_path` (nothing is
  downloaded), against reference statistics of a dataset split that are computed once (resumably) and cached:
  the feature moments and, apart, the KID features (:func:`reference_statistics`), named by the dataset, its
  prepared tfds version and `data_dir`, the split, the image size and the weights (:func:`inception_reference_paths`).
* **digits**: the digits domain metric (:mod:`scoreflow.evaluate.digits_metric`): a small classifier trained on
  the digits train split (once, cached) gives a Fréchet distance and class-confidence scores.

`"quality"` in `eval.tasks` means `digits` for the digits dataset and `fid` for other image datasets.

Decoding. Samples live in the space the model was trained in, so they are turned into pixels (the grid, the
Inception images, the digits metric) by the training stream's :class:`~scoreflow.data.AffineScaler`: the one of
`data.scaler` *and* `data.dequantize`. A run trained on dequantized levels :math:`(v + u)/L` decodes a sample
by :math:`\lfloor\cdot\rfloor` of :math:`L` steps, not by rounding to :math:`L - 1` steps. Real images keep
their exact integer levels.

The model that is evaluated. The fields that define what a checkpoint's parameters mean (:data:`MODEL_SECTIONS`:
the model, SDE, parameterization and the data's name, size, scaler and dequantization) must equal those of the
run's `workdir/config.json`; a difference is an error raised before any work, naming the fields, unless
`eval.allow_config_mismatch` is set (then a warning).

Resumable and atomic. Every unit of work is a file written atomically (temporary file, then rename): a bpd
batch (`batch_00003.npz`), a sample shard, the Inception features of a shard, reference statistics (and, every
few batches while they are computed, their partial sums), results. A restarted evaluation reuses the files of
finished units and computes only the rest; each unit's randomness is keyed by its index (`fold_in(key, index)`),
so a resumed evaluation gives the same numbers as an uninterrupted one. Directories are named by a hash of what
determines their content: a checkpoint's directory (`step_2000-ema-1a2b3c4d`) by the model-defining config
fields and the checkpoint's identity (Orbax's commit record of that save, so a checkpoint written again by
another training run in the same workdir gets a new directory), a task's (`samples-pc-5e6f7a8b`) by its
settings; evaluations of other models or with other settings never share files. Random keys do not depend on
the checkpoint: checkpoints are compared on common random numbers.

Compute. The likelihood and sampling programs are compiled once and reused for every batch, shard and checkpoint
(and memoised per process for the likelihood). The examples of a batch (and of a sample shard) are split over the
process's devices when their number divides the batch, which leaves the results unchanged (bits/dim bit-identical
on 1 and 2 CPU devices). tqdm progress bars show each task. Cheap checks come first: the config, the Inception
weights file's arrays and the reference splits are checked before any checkpoint is read.

Several processes. Under `jax.distributed` (`run_eval.py --coordinator_address=HOST:PORT --num_processes=P
--process_id=I`, the flags of `run_train.py`) every process runs `evaluate` with the same config; the workdir and
`eval.output_dir` must be one shared filesystem. Each process restores the parameters onto its own devices and
computes whole units there (no collective runs inside a unit, so a unit's numbers do not depend on the process
that computed it): bits/dim batches, sample shards (also of the class-conditional sets), the Inception
features of sample shards and the batches of inpainting and colorization are split over the processes, unit `i` to process `i mod P`
(:mod:`~scoreflow.evaluate.units`); after each such loop the processes wait for one another and read the
others' units back. Process 0 alone writes the shared files (`settings.json`, per-task and per-checkpoint
`results.json`, grids, `per_example.npz`, `summary.json`, caches of reference statistics), prints, and runs the
tasks that are not split (the digits metric); the others receive its results. With the
same number of devices per process the results equal those of one process bit for bit. A process that fails
stops the others.

Layout under `eval.output_dir` (default `workdir/eval`)::

    step_2000-ema-<hash>/settings.json      the model-defining fields and the checkpoint it was read from
    step_2000-ema-<hash>/bpd-test-<hash>/{settings.json, batch_*.npz, per_example.npz, results.json}
    step_2000-ema-<hash>/samples-<method>-<hash>/{settings.json, shard_*.npz, grid.png, results.json,
                                                  digits.json, inception-<weights>-*.npz, fid-<hash>.json}
    step_2000-ema-<hash>/results.json       this checkpoint's latest results
    cache/                                  digits classifier, reference statistics (`eval.cache_dir`)
    summary.json                            the latest evaluate() call's results, all checkpoints
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax

from scoreflow import io
from scoreflow.config.evaluation import EvalSettings, build_eval_settings, model_fields
from scoreflow.config.experiment import DataSettings, Experiment, build_experiment
from scoreflow.config.fields import ConfigError, config_to_dict
from scoreflow.evaluate import checkpoints, report, tasks, units
from scoreflow.evaluate import reference as reference_lib
from scoreflow.train import sharding
from scoreflow.train.checkpoint import CONFIG_FILE, CheckpointError, Checkpointer

def _check_reference_splits(data: DataSettings, settings: EvalSettings) -> None:
  """Opens the reference splits of the quality tasks, so that a missing or unprepared one fails before the
  checkpoints are evaluated rather than after hours of sampling."""
  splits = []
  if "fid" in settings.tasks:
    splits.append(("fid", settings.fid.reference_split))
  if "digits" in settings.tasks:
    splits.append(("digits", settings.digits.reference_split))
  for section, split in splits:
    try:
      reference_lib.eval_stream(data, split, 1).close()
    except (FileNotFoundError, ValueError) as error:
      raise type(error)(f"config.eval.{section}.reference_split={split!r}: {error}") from None


def evaluate(config, workdir: str | os.PathLike, *, experiment: Experiment | None = None,
             settings: EvalSettings | None = None) -> dict[str, Any]:
  """Evaluates the checkpoints of the run in `workdir` as `config.eval` asks (see the module docstring).

  Args:
    config: the run's `ml_collections` config (the one it was trained with), with an `eval` section.
    workdir: the run's directory (its `checkpoints/` and `snapshot/`).

  Returns:
    `{"workdir", "tasks", "num_processes", "checkpoints": [per-checkpoint results], "summary_file"}`, also
    written to `<output_dir>/summary.json`; each checkpoint's results are in `<output_dir>/step_<N>-<ema|raw>-
    <hash>/results.json`. Every process of a multi-process evaluation returns process 0's results (each
    checkpoint's `seconds` are its own), once `summary.json` is written.

  Raises:
    ValueError: before any checkpoint is read: a bad config field, model-defining fields that differ from the
      workdir's `config.json` (`CheckpointError`, naming them; `eval.allow_config_mismatch` turns it into a
      warning), a workdir without the asked checkpoints, a reference split that does not exist; later, a
      checkpoint that does not match the configured model (`CheckpointError`, naming the mismatched parameters
      and the config fields that differ from the workdir's `config.json`).
    FileNotFoundError: a tfds dataset (or reference split) that is not prepared, before any checkpoint is read.
    PeerProcessError: (multi-process) another process stopped with an error.
  """
  try:
    return _evaluate(config, workdir, experiment, settings)
  except BaseException as error:
    units.announce_failure(error)  # The other processes stop rather than wait for this one.
    raise


def _evaluate(config, workdir, experiment: Experiment | None, settings: EvalSettings | None) -> dict[str, Any]:
  experiment = experiment or build_experiment(config)
  settings = settings or build_eval_settings(config)
  workdir = os.fspath(workdir)
  if settings.init_from:  # Published weights: the workdir only receives the results.
    os.makedirs(workdir, exist_ok=True)
  elif not os.path.isdir(workdir):
    raise CheckpointError(f"workdir {workdir!r} does not exist; pass the --workdir of a training run.")
  differences = checkpoints.workdir_config_differences(workdir, config)
  if differences and not settings.allow_config_mismatch:
    raise CheckpointError(
        f"--config differs from the configuration that trained {workdir} ({CONFIG_FILE}) in fields that define "
        f"what its checkpoints mean:{checkpoints.describe_differences(differences)}\nEvaluate with the run's "
        "configuration, or pass --config.eval.allow_config_mismatch=True to evaluate its checkpoints as --config "
        "describes (the results are kept apart from those of the run's own configuration).")
  output_dir = settings.output_dir or os.path.join(workdir, "eval")
  cache_dir = settings.cache_dir or os.path.join(output_dir, "cache")
  # Opening the checkpoints is a barrier of Orbax's (an XLA collective) that would wait forever for a process that
  # failed the checks above alone: the processes meet here first, where a failure is noticed.
  units.gather("checkpoints opened", None)
  checkpointer = Checkpointer(workdir, async_save=False)
  try:
    chosen = ([("imported", None)] if settings.init_from else
              checkpoints.select_checkpoints(checkpointer.steps(), settings.checkpoints))
    with units.main_process_first("datasets prepared"):  # Reading the digits the first time prepares them.
      _check_reference_splits(experiment.data, settings)
      element_shape, scaler = reference_lib.model_space(experiment.data)
    setup = model_fields(config)
    # This process's devices: a unit runs on them whole, so several processes never meet inside a unit.
    mesh = sharding.make_mesh(jax.local_devices())
    abstract_state = None if settings.init_from else experiment.abstract_train_state(element_shape, mesh)
    runners = tasks.TaskRunners(experiment, settings, element_shape, scaler, cache_dir, mesh)
    results = []
    for name, (old, new) in differences.items():  # Allowed: the model may mean something else.
      units.say(f"warning: config.{name} is {new!r} here but {old!r} in {workdir}/{CONFIG_FILE} "
                "(eval.allow_config_mismatch=True).")
    for kind, step in chosen:
      started = time.perf_counter()
      params_kind = "ema" if settings.use_ema else "raw"
      if settings.init_from:
        source = os.path.abspath(settings.init_from)
        params, step, identity = checkpoints.load_published_weights(
            source, config_to_dict(config)["model"], use_ema=settings.use_ema, element_shape=element_shape)
        name = f"imported_step_{step}-{params_kind}"
      else:
        params, kind, step = checkpoints.restore_params(checkpointer, abstract_state, kind, step, settings.use_ema,
                                                        differences, newest_intact=settings.checkpoints == "latest")
        source = checkpointer.directory(kind, step)
        identity = checkpoints.checkpoint_identity(source)
        name = f"step_{step}-{params_kind}"
      described = {"model": setup, "checkpoint": source, "step": step, "params": params_kind,
                   "checkpoint_identity": identity}
      checkpoint_dir = units.task_directory(output_dir, name, described,
                                            key_fields=("model", "step", "params", "checkpoint_identity"))
      record: dict[str, Any] = {"step": step, "checkpoint": source, "params": params_kind,
                                "directory": checkpoint_dir}
      for task in settings.tasks:
        run_task = getattr(runners, task)
        if task in runners.SPLIT_TASKS:
          result = run_task(params, checkpoint_dir, record)
        elif units.is_main_process():
          with units.single_process():
            result = run_task(params, checkpoint_dir, record)
        else:
          result = None
        record[task] = units.share(f"{name} {task}", result)  # Process 0's, once it has written its files.
      record["seconds"] = time.perf_counter() - started
      if units.is_main_process():
        io.write_json(os.path.join(checkpoint_dir, "results.json"), record)
      units.say(report.format_results(record))
      results.append(record)
  finally:
    checkpointer.close()
  summary = {"workdir": workdir, "tasks": list(settings.tasks), "num_processes": jax.process_count(),
             "checkpoints": results, "summary_file": os.path.join(output_dir, "summary.json")}
  if units.is_main_process():
    io.write_json(summary["summary_file"], summary)
  units.say(f"Results: {summary['summary_file']}")
  units.gather("summary written", None)
  return summary


def compute_reference_statistics(config, workdir: str | os.PathLike, *, experiment: Experiment | None = None,
                                 settings: EvalSettings | None = None) -> dict[str, str]:
  """Computes (or finds cached) the reference statistics that the quality tasks of `config.eval` need.

  The digits metric's classifier and its reference statistics, and/or the Inception reference statistics of
  `eval.fid.reference_split` (the moments and, with KID, the features), are written to `eval.cache_dir` (default
  `workdir/eval/cache`).

  In a multi-process run process 0 computes them while the others wait.

  Returns:
    `{name: path}` of the cached files.
  """
  try:
    if not units.is_main_process():
      return units.share("reference statistics", None)
    with units.single_process():
      paths = _compute_reference_statistics(config, workdir, experiment, settings)
    return units.share("reference statistics", paths)
  except BaseException as error:
    units.announce_failure(error)
    raise


def _compute_reference_statistics(config, workdir, experiment: Experiment | None, settings: EvalSettings | None
                                  ) -> dict[str, str]:
  experiment = experiment or build_experiment(config)
  settings = settings or build_eval_settings(config)
  output_dir = settings.output_dir or os.path.join(os.fspath(workdir), "eval")
  cache_dir = settings.cache_dir or os.path.join(output_dir, "cache")
  element_shape, scaler = reference_lib.model_space(experiment.data)
  runners = tasks.TaskRunners(experiment, settings, element_shape, scaler, cache_dir)
  paths = {}
  if "digits" in settings.tasks:
    _, paths["digits_classifier"], _, paths["digits_reference"] = runners.digits_reference()
  if "fid" in settings.tasks:
    _, _, _, paths["inception_reference"], kid_path = runners.fid_reference()
    if kid_path:
      paths["inception_kid_reference"] = kid_path
  if not paths:
    raise ConfigError(f"config.eval.tasks={','.join(settings.tasks)!r} needs no reference statistics; "
                      "add 'fid', 'digits' or 'quality'.")
  for name, path in paths.items():
    units.say(f"{name}: {path}")
  return paths
