r"""Evaluation of a trained run: `evaluate(config, workdir)`, the engine of `run_eval.py`; this module only
orchestrates (restore each chosen checkpoint, run its tasks, print and record the results). The work lives by
idea: settings in :mod:`scoreflow.config.evaluation`, checkpoints in :mod:`~scoreflow.evaluate.checkpoints`,
bits/dim in :mod:`~scoreflow.evaluate.bpd`, sample sets in :mod:`~scoreflow.evaluate.samples`, reference
statistics in :mod:`~scoreflow.evaluate.reference`, resumable units in :mod:`~scoreflow.evaluate.units`, the
printed summary in :mod:`~scoreflow.evaluate.report`.

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
(and memoised per process for the likelihood). Evaluation runs in one process; the examples of a batch (and of
a sample shard) are split over its devices when their number divides the batch, which leaves the results
unchanged (bits/dim bit-identical on 1 and 2 CPU devices). tqdm progress bars show each task. Cheap checks come
first: the config, the Inception weights file's arrays and the reference splits are checked before any
checkpoint is read.

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

import dataclasses
import json
import os
import time
from typing import Any

import jax
import numpy as np

from scoreflow import io
from scoreflow.config.evaluation import EvalSettings, build_eval_settings, model_fields
from scoreflow.config.experiment import DataSettings, Experiment, build_experiment
from scoreflow.config.fields import ConfigError
from scoreflow.evaluate import bpd as bpd_lib
from scoreflow.evaluate import checkpoints, digits_metric, inception, report, units
from scoreflow.evaluate import reference as reference_lib
from scoreflow.evaluate import samples as samples_lib
from scoreflow.train import sharding
from scoreflow.train.checkpoint import CONFIG_FILE, CheckpointError, Checkpointer

_BPD_KEY, _SAMPLES_KEY = 0, 1  # fold_in tags: independent streams for the two random tasks.


def _sampler_description(experiment: Experiment) -> dict[str, Any]:
  return {"method": experiment.sampler.method, "options": dict(experiment.sampler.kwargs)}


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
    `{"workdir", "checkpoints": [per-checkpoint results], "summary_file"}`, also written to
    `<output_dir>/summary.json`; each checkpoint's results are in `<output_dir>/step_<N>-<ema|raw>-<hash>/
    results.json`.

  Raises:
    ValueError: before any checkpoint is read: a bad config field, model-defining fields that differ from the
      workdir's `config.json` (`CheckpointError`, naming them; `eval.allow_config_mismatch` turns it into a
      warning), a workdir without the asked checkpoints, a reference split that does not exist; later, a
      checkpoint that does not match the configured model (`CheckpointError`, naming the mismatched parameters
      and the config fields that differ from the workdir's `config.json`).
    FileNotFoundError: a tfds dataset (or reference split) that is not prepared, before any checkpoint is read.
  """
  if jax.process_count() > 1:
    raise ValueError("evaluate runs in a single process; start run_eval.py without --coordinator_address.")
  experiment = experiment or build_experiment(config)
  settings = settings or build_eval_settings(config)
  workdir = os.fspath(workdir)
  if not os.path.isdir(workdir):
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
  checkpointer = Checkpointer(workdir, async_save=False)
  try:
    chosen = checkpoints.select_checkpoints(checkpointer.steps(), settings.checkpoints)
    _check_reference_splits(experiment.data, settings)
    element_shape, scaler = reference_lib.model_space(experiment.data)
    setup = model_fields(config)
    mesh = sharding.make_mesh()
    abstract_state = experiment.abstract_train_state(element_shape, mesh)
    runners = _TaskRunners(experiment, settings, element_shape, scaler, cache_dir, mesh)
    results = []
    for name, (old, new) in differences.items():  # Allowed: the model may mean something else.
      units.say(f"warning: config.{name} is {new!r} here but {old!r} in {workdir}/{CONFIG_FILE} "
                "(eval.allow_config_mismatch=True).")
    for kind, step in chosen:
      started = time.perf_counter()
      params, kind, step = checkpoints.restore_params(checkpointer, abstract_state, kind, step, settings.use_ema,
                                                      differences, newest_intact=settings.checkpoints == "latest")
      source = checkpointer.directory(kind, step)
      params_kind = "ema" if settings.use_ema else "raw"
      described = {"model": setup, "checkpoint": source, "step": step, "params": params_kind,
                   "checkpoint_identity": checkpoints.checkpoint_identity(source)}
      checkpoint_dir = units.task_directory(output_dir, f"step_{step}-{params_kind}", described,
                                            key_fields=("model", "step", "params", "checkpoint_identity"))
      record: dict[str, Any] = {"step": step, "checkpoint": source, "params": params_kind,
                                "directory": checkpoint_dir}
      for task in settings.tasks:
        record[task] = getattr(runners, task)(params, checkpoint_dir, record)
      record["seconds"] = time.perf_counter() - started
      io.write_json(os.path.join(checkpoint_dir, "results.json"), record)
      units.say(report.format_results(record))
      results.append(record)
  finally:
    checkpointer.close()
  summary = {"workdir": workdir, "tasks": list(settings.tasks), "checkpoints": results,
             "summary_file": os.path.join(output_dir, "summary.json")}
  io.write_json(summary["summary_file"], summary)
  units.say(f"Results: {summary['summary_file']}")
  return summary


class _TaskRunners:
  """One method per task: `task(params, checkpoint_dir, record) -> results dict`; compiled functions are built
  once and reused for every checkpoint. `scaler` is the training stream's (:func:`model_space`): it decodes
  samples."""

  def __init__(self, experiment, settings: EvalSettings, element_shape, scaler, cache_dir, mesh=None):
    self.experiment, self.settings = experiment, settings
    self.element_shape, self.scaler, self.cache_dir = element_shape, scaler, cache_dir
    self.mesh = mesh
    self._sample_fn = None

  def _batch_sharding(self, batch_size: int):
    """Examples split over the devices when they divide the batch (else None: replicated computation)."""
    if self.mesh is None or self.mesh.devices.size == 1 or batch_size % self.mesh.devices.size:
      return None
    return sharding.batch_sharding(self.mesh)

  # --- bits/dim ---
  def bpd(self, params, checkpoint_dir, record):
    experiment, bpd = self.experiment, self.settings.bpd
    data = experiment.data
    batch_size = self.settings.batch_size
    stream = reference_lib.eval_stream(data, bpd.split, batch_size, seed=self.settings.seed)
    discrete = stream.scaler is not None
    num_examples = bpd.num_examples
    if discrete:
      num_examples = min(num_examples or stream.num_examples, stream.num_examples)
    described = {"dataset": data.name, "split": bpd.split, "num_examples": num_examples,
                 "batch_size": batch_size, "seed": self.settings.seed, "num_repeats": bpd.num_repeats,
                 "image_size": data.image_size, "scaler": data.scaler, **bpd.likelihood_kwargs()}
    directory = units.task_directory(checkpoint_dir, f"bpd-{units.safe_name(bpd.split)}", described)
    if discrete:
      # The real data's integer levels (the stream's levels scaler), dequantized here by the bpd convention.
      unit = stream.scaler.as_dequantized()
      levels = (("num_levels", unit.num_levels), ("scale", float(unit.unit_cube_scale)), ("shift", float(unit.shift)))
    else:
      levels = (("num_levels", None),)
    bpd_fn = bpd_lib.model_bpd_fn(experiment.model, experiment.sampling_sde, experiment.parameterization, levels,
                                  tuple(sorted(bpd.likelihood_kwargs().items())))
    to_values = (lambda batch: stream.scaler.to_levels(batch["x"])) if discrete else (lambda batch: batch["x"])
    batches = bpd_lib.bpd_batches((to_values(batch) for batch in stream), num_examples)
    split_examples = self._batch_sharding(batch_size)
    if split_examples is not None:
      batches = ((index, jax.device_put(values, split_examples), num_valid) for index, values, num_valid in batches)
    started = time.perf_counter()
    try:
      result = bpd_lib.evaluate_bpd(lambda key, values: bpd_fn(params, key, values), batches, directory,
                                    key=jax.random.fold_in(jax.random.key(self.settings.seed), _BPD_KEY),
                                    num_examples=num_examples, num_repeats=bpd.num_repeats,
                                    progress_bar=self.settings.progress_bar)
    finally:
      stream.close()
    out = {**result.to_dict(), "split": bpd.split, "divergence": bpd.divergence, "num_probes": bpd.num_probes,
           "rtol": bpd.rtol, "atol": bpd.atol, "eps": bpd.eps, "dequantized": discrete,
           "seconds": time.perf_counter() - started, "compilations": bpd_fn._cache_size()}
    io.write_json(os.path.join(directory, "results.json"), out)
    return out

  # --- samples ---
  def _sample_directory(self, checkpoint_dir):
    sampler = _sampler_description(self.experiment)
    described = {"sampler": sampler, "shard_size": self.settings.samples.shard_size, "seed": self.settings.seed,
                 "element_shape": list(self.element_shape)}
    return units.task_directory(checkpoint_dir, f"samples-{sampler['method']}", described)

  def samples(self, params, checkpoint_dir, record):
    settings = self.settings.samples
    directory = self._sample_directory(checkpoint_dir)
    if self._sample_fn is None:
      sample = self.experiment.make_sample_fn()
      shape = (settings.shard_size, *self.element_shape)
      split_examples = self._batch_sharding(settings.shard_size)
      self._sample_fn = jax.jit(lambda key, params: sample(key, params, shape),
                                out_shardings=None if split_examples is None else (split_examples, None))
    sample_fn = self._sample_fn
    key = jax.random.fold_in(jax.random.key(self.settings.seed), _SAMPLES_KEY)

    def sample_shard(index):
      x, info = sample_fn(jax.random.fold_in(key, index), params)
      return np.asarray(x), {name: np.asarray(value) for name, value in info._asdict().items()}

    started = time.perf_counter()
    result = samples_lib.generate_samples(sample_shard, directory, num_samples=settings.num_samples,
                                          shard_size=settings.shard_size, progress_bar=self.settings.progress_bar)
    out = {**result.to_dict(), "sampler": _sampler_description(self.experiment),
           "seconds": time.perf_counter() - started, "compilations": sample_fn._cache_size()}
    if settings.grid_size:
      from scoreflow.train import visualize  # pylint: disable=g-import-not-at-top

      grid = samples_lib.load_samples(directory, min(settings.grid_size, settings.num_samples), settings.shard_size)
      out["grid"] = os.path.join(directory, "grid.png")
      io.write_png(out["grid"], visualize.sample_picture(grid, self.scaler))
    io.write_json(os.path.join(directory, "results.json"), out)
    return out

  def _load_finite_samples(self, record) -> tuple[np.ndarray, int]:
    """The finite samples of the set, and how many were left out."""
    samples = samples_lib.load_samples(record["samples"]["directory"], self.settings.samples.num_samples,
                                       self.settings.samples.shard_size)
    finite = samples_lib.finite_rows(samples)
    if not finite.any():
      raise samples_lib.no_finite_samples(samples.shape[0], record["samples"]["directory"])
    return samples[finite], int(samples.shape[0] - finite.sum())

  # --- FID / IS / KID ---
  def fid_reference(self, variables=None):
    """`(variables, weights digest, reference statistics, moments path, KID path)`, computing and caching the
    statistics (resumably) where the cache lacks them."""
    fid, data = self.settings.fid, self.experiment.data
    digest = reference_lib.weights_digest(fid.inception_path)
    batch_size = self.settings.batch_size
    stream = reference_lib.eval_stream(data, fid.reference_split, batch_size)
    stream.close()
    total = min(fid.reference_num_examples or stream.num_examples, stream.num_examples)
    moments_path, kid_path = reference_lib.inception_reference_paths(self.cache_dir, data, fid, num_examples=total,
                                                                     version=stream.version, weights_digest=digest)
    if not (os.path.isfile(moments_path) and (kid_path is None or os.path.isfile(kid_path))):
      variables = variables or inception.load_fid_inception(fid.inception_path)
    images = reference_lib.reference_images(data, fid.reference_split, batch_size)
    reference = reference_lib.inception_reference(variables, images, moments_path, num_examples=total,
                                                  kid_path=kid_path, kid_reference_size=fid.kid_reference_size,
                                                  batch_size=batch_size, progress_bar=self.settings.progress_bar)
    return variables, digest, reference, moments_path, kid_path

  def fid(self, params, checkpoint_dir, record):
    started = time.perf_counter()
    variables, digest, reference, path, kid_path = self.fid_reference()
    samples = self.settings.samples
    directory = record["samples"]["directory"]
    # The metrics of these samples against this reference: computed once (the 2048-d Fréchet distance alone
    # takes seconds to minutes on a CPU), then read back.
    result_path = os.path.join(directory, "fid-" + units.fingerprint(
        {"reference": os.path.basename(path), "kid_reference": os.path.basename(kid_path or ""),
         "num_samples": samples.num_samples, **dataclasses.asdict(self.settings.fid),
         "inception_path": digest}) + ".json")
    if os.path.isfile(result_path):
      with open(result_path) as file:
        return {**json.load(file), "reused": True}
    variables = variables or inception.load_fid_inception(self.settings.fid.inception_path)
    pool, logits, nonfinite = reference_lib.inception_sample_outputs(
        variables, directory, digest, samples.num_samples, samples.shard_size, self.scaler.to_uint8,
        batch_size=self.settings.batch_size, progress_bar=self.settings.progress_bar)
    out = {**reference_lib.inception_metrics(pool, logits, reference, self.settings.fid),
           "num_nonfinite_samples": nonfinite, "reference": path, "kid_reference": kid_path,
           "reference_num_examples": reference.num_examples, "seconds": time.perf_counter() - started}
    io.write_json(result_path, out)
    return out

  # --- digits metric ---
  def digits_reference(self):
    digits, data = self.settings.digits, self.experiment.data
    classifier, classifier_path = reference_lib.digits_classifier(
        self.cache_dir, data_dir=data.data_dir, seed=digits.classifier_seed, num_steps=digits.classifier_steps)
    reference, path = reference_lib.digits_reference(classifier, classifier_path, data_dir=data.data_dir,
                                                     split=digits.reference_split)
    return classifier, classifier_path, reference, path

  def digits(self, params, checkpoint_dir, record):
    started = time.perf_counter()
    classifier, classifier_path, reference, path = self.digits_reference()
    samples, nonfinite = self._load_finite_samples(record)
    # Samples are rounded to levels by the training scaler (`to_levels`), as real digits are levels.
    quality = digits_metric.evaluate_digits_samples(classifier, samples, reference, scaler=self.scaler)
    out = {**quality._asdict(), "num_nonfinite_samples": nonfinite, "classifier": classifier_path,
           "classifier_test_accuracy": classifier.test_accuracy, "reference": path}
    # The same metric on real held-out digits, to read the numbers against. The Fréchet distance of a finite set
    # is biased upwards by about tr(Sigma)/N, so the samples are also scored at the real set's size.
    real_split = "test" if self.settings.digits.reference_split != "test" else "train"
    images, _ = digits_metric.load_digits_split(real_split, data_dir=self.experiment.data.data_dir)
    real = digits_metric.evaluate_digits_samples(classifier, images, reference)
    out["real_data"] = {"split": real_split, **real._asdict()}
    matched = min(samples.shape[0], images.shape[0])
    out["fd_matched"] = (quality.fd if matched == samples.shape[0] else digits_metric.evaluate_digits_samples(
        classifier, samples[:matched], reference, scaler=self.scaler).fd)
    out["fd_matched_num_examples"] = matched
    out["seconds"] = time.perf_counter() - started
    io.write_json(os.path.join(record["samples"]["directory"], "digits.json"), out)
    return out


def compute_reference_statistics(config, workdir: str | os.PathLike, *, experiment: Experiment | None = None,
                                 settings: EvalSettings | None = None) -> dict[str, str]:
  """Computes (or finds cached) the reference statistics that the quality tasks of `config.eval` need.

  The digits metric's classifier and its reference statistics, and/or the Inception reference statistics of
  `eval.fid.reference_split` (the moments and, with KID, the features), are written to `eval.cache_dir` (default
  `workdir/eval/cache`).

  Returns:
    `{name: path}` of the cached files.
  """
  experiment = experiment or build_experiment(config)
  settings = settings or build_eval_settings(config)
  output_dir = settings.output_dir or os.path.join(os.fspath(workdir), "eval")
  cache_dir = settings.cache_dir or os.path.join(output_dir, "cache")
  element_shape, scaler = reference_lib.model_space(experiment.data)
  runners = _TaskRunners(experiment, settings, element_shape, scaler, cache_dir)
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
