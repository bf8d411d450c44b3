"""The evaluation tasks: one method of :class:`TaskRunners` per task of `config.eval.tasks`, each calling the
module of its idea (:mod:`~scoreflow.evaluate.bpd`, :mod:`~scoreflow.evaluate.samples`,
:mod:`~scoreflow.evaluate.reference`) and returning a JSON-ready dict; :mod:`~scoreflow.evaluate.run` calls them
for every checkpoint. A new task is a new method here (and its settings in :mod:`scoreflow.config.evaluation`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from scoreflow import guidance, io
from scoreflow.data.digits import DIGITS_NAMES
from scoreflow.parameterization import make_classifier_log_prob_fn, make_score_fn
from scoreflow.train.checkpoint import CONFIG_FILE, Checkpointer
from scoreflow.config.evaluation import EvalSettings
from scoreflow.config.experiment import SAMPLERS, Experiment, build_experiment
from scoreflow.evaluate import bpd as bpd_lib
from scoreflow.evaluate import checkpoints, controllable, digits_metric, inception, units
from scoreflow.evaluate import reference as reference_lib
from scoreflow.evaluate import samples as samples_lib
from scoreflow.train import sharding, visualize
from scoreflow.train.step import make_network

BPD_KEY, SAMPLES_KEY, CONDITIONAL_KEY, INVERSE_KEY = 0, 1, 2, 3  # fold_in tags: independent random streams.


def sampler_description(experiment: Experiment) -> dict[str, Any]:
  """The sampler as results record it: its method and options."""
  return {"method": experiment.sampler.method, "options": dict(experiment.sampler.kwargs)}


class TaskRunners:
  """One method per task: `task(params, checkpoint_dir, record) -> results dict`; compiled functions are built
  once and reused for every checkpoint. `scaler` is the training stream's (:func:`model_space`): it decodes
  samples; `mesh` holds this process's devices, over which a batch is split.

  In a multi-process evaluation (:mod:`~scoreflow.evaluate.units`) every process calls the tasks of
  :attr:`SPLIT_TASKS`, which split their units over the processes and leave the shared files and whole-set
  metrics to process 0 (whose results dict counts: the others may return None); process 0 runs every other task
  alone, within :func:`units.single_process`.
  """

  # The tasks whose units (bits/dim batches, sample shards, Inception features of shards, batches of an inverse
  # problem) every process shares.
  # The digits metric is left to process 0: its 34k-parameter perceptron scores 10k samples in under a GFLOP, not
  # worth a round of waiting for one another.
  SPLIT_TASKS = frozenset({"bpd", "bound", "samples", "conditional", "fid", "inpaint", "colorize"})

  def __init__(self, experiment, settings: EvalSettings, element_shape, scaler, cache_dir, mesh=None):
    self.experiment, self.settings = experiment, settings
    self.element_shape, self.scaler, self.cache_dir = element_shape, scaler, cache_dir
    self.mesh = mesh
    self._sample_fn = self._conditional_fn = None
    self._inverse_fns = {}

  def _batch_sharding(self, batch_size: int):
    """Examples split over the devices when they divide the batch (else None: replicated computation)."""
    if self.mesh is None or self.mesh.devices.size == 1 or batch_size % self.mesh.devices.size:
      return None
    return sharding.batch_sharding(self.mesh)

  # --- bits/dim: the probability-flow ODE likelihood, and the variational bound ---
  def _split_bits(self, params, checkpoint_dir, task: str, split: str, num_examples: int, num_repeats: int,
                  options: dict, make_fn: Callable) -> tuple[dict, str]:
    """Bits/dim of a split's examples with `make_fn(levels) -> fn(params, key, values)`, resumably in
    `<checkpoint_dir>/<task>-<split>-<hash>`; returns `(results, that directory)`."""
    data, batch_size = self.experiment.data, self.settings.batch_size
    stream = reference_lib.eval_stream(data, split, batch_size, seed=self.settings.seed)
    discrete = stream.scaler is not None
    if discrete:
      num_examples = min(num_examples or stream.num_examples, stream.num_examples)
      # The real data's integer levels (the stream's levels scaler), dequantized by the bits/dim convention.
      unit = stream.scaler.as_dequantized()
      levels = (("num_levels", unit.num_levels), ("scale", float(stream.scaler.scale)), ("shift", float(unit.shift)),
                ("unit_cube_scale", float(unit.unit_cube_scale)), ("dequantized_scale", float(unit.scale)))
    else:
      levels = (("num_levels", None),)
    described = {"dataset": data.name, "split": split, "num_examples": num_examples, "batch_size": batch_size,
                 "seed": self.settings.seed, "num_repeats": num_repeats, "image_size": data.image_size,
                 "scaler": data.scaler, **options}
    directory = units.task_directory(checkpoint_dir, f"{task}-{units.safe_name(split)}", described)
    fn = make_fn(levels)
    to_values = (lambda batch: stream.scaler.to_levels(batch["x"])) if discrete else (lambda batch: batch["x"])
    batches = bpd_lib.bpd_batches((to_values(batch) for batch in stream), num_examples)
    split_examples = self._batch_sharding(batch_size)  # Placed only for the batches this process computes.
    place = (lambda values: values) if split_examples is None else (
        lambda values: jax.device_put(values, split_examples))
    started = time.perf_counter()
    try:
      result = bpd_lib.evaluate_bpd(lambda key, values: fn(params, key, place(values)), batches, directory,
                                    key=jax.random.fold_in(jax.random.key(self.settings.seed), BPD_KEY),
                                    num_examples=num_examples, num_repeats=num_repeats,
                                    progress_bar=self.settings.progress_bar)
    finally:
      stream.close()
    out = {**result.to_dict(), "split": split, "dequantized": discrete, "seconds": time.perf_counter() - started,
           "compilations": fn._cache_size()}
    return out, directory

  def bpd(self, params, checkpoint_dir, record):
    experiment, bpd = self.experiment, self.settings.bpd

    def make_fn(levels):
      levels = dict(levels)
      unit = ((("num_levels", None),) if levels["num_levels"] is None else
              (("num_levels", levels["num_levels"]), ("scale", levels["unit_cube_scale"]), ("shift", levels["shift"])))
      return bpd_lib.model_bpd_fn(experiment.model, experiment.sampling_sde, experiment.parameterization, unit,
                                  tuple(sorted(bpd.likelihood_kwargs().items())))

    out, directory = self._split_bits(params, checkpoint_dir, "bpd", bpd.split, bpd.num_examples, bpd.num_repeats,
                                      bpd.likelihood_kwargs(), make_fn)
    out.update(divergence=bpd.divergence, num_probes=bpd.num_probes, rtol=bpd.rtol, atol=bpd.atol, eps=bpd.eps)
    if units.is_main_process():
      io.write_json(os.path.join(directory, "results.json"), out)
    return out

  def bound(self, params, checkpoint_dir, record):
    experiment, bound = self.experiment, self.settings.bound
    options = dataclasses.asdict(bound)
    del options["split"], options["num_examples"]

    def make_fn(levels):
      return bpd_lib.model_bound_fn(experiment.model, experiment.process, experiment.sampling_sde,
                                    experiment.parameterization, levels, tuple(sorted(options.items())))

    out, directory = self._split_bits(params, checkpoint_dir, "bound", bound.split, bound.num_examples, 1, options,
                                      make_fn)
    kind = ("ddpm_vlb" if experiment.process.chain_loss == "ddpm" else "continuous")
    out.update(kind=kind, **options)
    if units.is_main_process():
      io.write_json(os.path.join(directory, "results.json"), out)
    return out

  # --- samples ---
  def _sample_directory(self, checkpoint_dir):
    sampler = sampler_description(self.experiment)
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
    key = jax.random.fold_in(jax.random.key(self.settings.seed), SAMPLES_KEY)

    def sample_shard(index):
      x, info = sample_fn(jax.random.fold_in(key, index), params)
      return np.asarray(x), {name: np.asarray(value) for name, value in info._asdict().items()}

    started = time.perf_counter()
    result = samples_lib.generate_samples(sample_shard, directory, num_samples=settings.num_samples,
                                          shard_size=settings.shard_size, progress_bar=self.settings.progress_bar)
    if not units.is_main_process():
      return None
    out = {**result.to_dict(), "sampler": sampler_description(self.experiment),
           "seconds": time.perf_counter() - started, "compilations": sample_fn._cache_size()}
    if settings.grid_size:
      grid = samples_lib.load_samples(directory, min(settings.grid_size, settings.num_samples), settings.shard_size)
      out["grid"] = os.path.join(directory, "grid.png")
      io.write_png(out["grid"], visualize.sample_picture(grid, self.scaler))
    io.write_json(os.path.join(directory, "results.json"), out)
    return out

  # --- controllable generation: class-conditional samples, inpainting, colorization ---
  def _digits_judge(self):
    """The digits classifier (trained once, cached) when the data are the digits, else None."""
    if self.experiment.data.name not in DIGITS_NAMES:
      return None
    digits = self.settings.digits
    classifier, _ = reference_lib.digits_classifier(self.cache_dir, data_dir=self.experiment.data.data_dir,
                                                    seed=digits.classifier_seed, num_steps=digits.classifier_steps)
    return classifier

  def _judged(self, classifier, x, labels) -> dict[str, Any]:
    """The digits classifier's accuracy on model-space images `x` for the requested `labels` (non-finite images
    count as wrong), overall and per class."""
    finite = samples_lib.finite_rows(x)
    predicted = np.full(labels.shape, -1)
    if finite.any():
      _, logits = jax.jit(digits_metric.digits_features)(
          classifier, jnp.asarray(digits_metric.to_unit_intensity(x[finite], self.scaler)))
      predicted[finite] = np.argmax(np.asarray(logits), axis=-1)
    correct = predicted == labels
    return {"accuracy": float(correct.mean()),
            "accuracy_per_class": [float(correct[labels == c].mean()) for c in range(int(labels.max()) + 1)],
            "num_nonfinite": int((~finite).sum())}

  def _classifier(self):
    """`(experiment, EMA parameters, description)` of the noise-conditional classifier of
    `eval.conditional.classifier_workdir` (its own config.json and newest intact checkpoint)."""
    import ml_collections  # pylint: disable=g-import-not-at-top

    workdir = self.settings.conditional.classifier_workdir
    with open(os.path.join(workdir, CONFIG_FILE)) as file:
      experiment = build_experiment(ml_collections.ConfigDict(json.load(file)))
    if not experiment.is_classifier:
      raise ValueError(f"config.eval.conditional.classifier_workdir={workdir!r} was trained with config.loss.name="
                       f"{experiment.loss!r}, not 'classifier'; pass a noise-conditional classifier's run.")
    checkpointer = Checkpointer(workdir, async_save=False)
    try:
      restored = checkpointer.restore_intact(experiment.abstract_train_state(self.element_shape, self.mesh),
                                             report=units.say, move_aside=False)
      if restored is None:
        raise ValueError(f"config.eval.conditional.classifier_workdir={workdir!r} holds no checkpoint; train it "
                         "first.")
      state, _, step, kind = restored
      source = checkpointer.directory(kind, step)
    finally:
      checkpointer.close()
    return experiment, state.ema_params, {"checkpoint": source, "identity": checkpoints.checkpoint_identity(source)}

  def conditional(self, params, checkpoint_dir, record):
    settings, experiment = self.settings.conditional, self.experiment
    guided_by = "classifier-free" if experiment.num_classes else "classifier"
    classifier_params, described_classifier = None, None
    if guided_by == "classifier":
      classifier, classifier_params, described_classifier = self._classifier()
      num_classes = classifier.num_classes
    else:
      num_classes = experiment.num_classes
    num_samples = settings.samples_per_class * num_classes
    if self._conditional_fn is None:
      shape = (settings.shard_size, *self.element_shape)
      split_examples = self._batch_sharding(settings.shard_size)
      if guided_by == "classifier-free":

        def draw(key, params, classifier_params, labels, guidance_scale):
          del classifier_params
          return experiment.make_conditional_sample_fn(guidance_scale)(key, params, shape, labels)
      else:
        network = make_network(experiment.model.apply, train=False)
        sampler, options = SAMPLERS[experiment.sampler.method][0], dict(experiment.sampler.kwargs)

        def draw(key, params, classifier_params, labels, guidance_scale):
          # s(x) + (1 + w) grad log p_t(y | x): classifier-free guidance's score for an exact classifier.
          score_fn = make_score_fn(network, params, experiment.sampling_sde, experiment.parameterization)
          log_prob = make_classifier_log_prob_fn(lambda p, x, c: classifier.model.apply({"params": p}, x, c),
                                                 classifier_params, classifier.sampling_sde,
                                                 classifier.parameterization)
          guided = guidance.classifier_guided_score(score_fn, functools.partial(log_prob, labels=labels),
                                                    1 + guidance_scale)
          return sampler(key, experiment.sampling_sde, guided, shape, **options)

      self._conditional_fn = jax.jit(draw, out_shardings=None if split_examples is None else (split_examples, None))
    sample_fn = self._conditional_fn
    judge = self._digits_judge() if units.is_main_process() else None
    key = jax.random.fold_in(jax.random.key(self.settings.seed), CONDITIONAL_KEY)
    started, per_scale = time.perf_counter(), []
    for guidance_scale in settings.guidance_scales:
      described = {"sampler": sampler_description(experiment), "guidance_scale": guidance_scale,
                   "guided_by": guided_by, "classifier": described_classifier, "num_classes": num_classes,
                   "shard_size": settings.shard_size, "seed": self.settings.seed,
                   "element_shape": list(self.element_shape)}
      directory = units.task_directory(checkpoint_dir, f"conditional-w{guidance_scale:g}", described)

      def sample_shard(index, guidance_scale=guidance_scale):
        labels = controllable.class_labels(index * settings.shard_size, settings.shard_size, num_classes)
        x, info = sample_fn(jax.random.fold_in(key, index), params, classifier_params, jnp.asarray(labels),
                            jnp.asarray(guidance_scale, jnp.float32))
        return np.asarray(x), {"label": labels, **{name: np.asarray(value) for name, value in info._asdict().items()}}

      result = samples_lib.generate_samples(sample_shard, directory, num_samples=num_samples,
                                            shard_size=settings.shard_size, progress_bar=self.settings.progress_bar)
      if not units.is_main_process():
        continue  # Process 0 draws the grid, judges the samples and writes the results.
      samples = samples_lib.load_samples(directory, num_samples, settings.shard_size)
      entry = {"guidance_scale": guidance_scale, **result.to_dict()}
      grid = controllable.class_grid(samples, num_classes, settings.grid_columns)
      entry["grid"] = os.path.join(directory, "grid.png")
      picture = (visualize.image_grid(np.asarray(self.scaler.to_uint8(grid)), columns=settings.grid_columns)
                 if grid.ndim == 4 else visualize.sample_picture(grid))
      io.write_png(entry["grid"], picture)
      if judge is not None:
        entry.update(self._judged(judge, samples, controllable.class_labels(0, num_samples, num_classes)))
      io.write_json(os.path.join(directory, "results.json"), entry)
      per_scale.append(entry)
    if not units.is_main_process():
      return None
    return {"num_classes": num_classes, "samples_per_class": settings.samples_per_class, "guided_by": guided_by,
            "sampler": sampler_description(experiment), "scales": per_scale, "seconds": time.perf_counter() - started,
            "compilations": sample_fn._cache_size()}

  def inpaint(self, params, checkpoint_dir, record):
    return self._inverse("inpaint", params, checkpoint_dir)

  def colorize(self, params, checkpoint_dir, record):
    return self._inverse("colorize", params, checkpoint_dir)

  def _inverse(self, task: str, params, checkpoint_dir) -> dict[str, Any]:
    settings, experiment = self.settings.inverse, self.experiment
    if task == "colorize" and self.element_shape[-1] != 3:
      raise ValueError(f"config.eval.tasks: 'colorize' needs RGB images, but the data have {self.element_shape[-1]} "
                       "channel(s); use 'inpaint'.")
    batch_size, sde = self.settings.batch_size, experiment.sampling_sde
    stream = reference_lib.eval_stream(experiment.data, settings.split, batch_size, seed=self.settings.seed)
    num_examples = min(settings.num_examples or stream.num_examples, stream.num_examples)
    mask = controllable.masks(settings.mask, self.element_shape) if task == "inpaint" else None
    described = {"dataset": experiment.data.name, "split": settings.split, "num_examples": num_examples,
                 "batch_size": batch_size, "seed": self.settings.seed,
                 "mask": settings.mask if mask is not None else None, **settings.sampler_kwargs(task)}
    directory = units.task_directory(checkpoint_dir, f"{task}-{units.safe_name(settings.split)}", described)
    if task not in self._inverse_fns:
      network = make_network(experiment.model.apply, train=False)
      kwargs = settings.sampler_kwargs(task)

      def complete(params, key, truth):
        # The unconditional score; a class-conditional model gives it at its null class.
        label = (None if not experiment.num_classes else
                 jnp.full(truth.shape[:1], experiment.num_classes, jnp.int32))
        score_fn = make_score_fn(network, params, sde, experiment.parameterization, label=label)
        if mask is not None:
          x, info = guidance.inpaint_sample(key, sde, score_fn, truth, jnp.asarray(mask, truth.dtype), **kwargs)
          return truth, x, info.nfe
        grey = controllable.grey_of(truth)
        x, info = guidance.colorize_sample(key, sde, score_fn, grey, **kwargs)
        return jnp.broadcast_to(grey, truth.shape), x, info.nfe

      self._inverse_fns[task] = jax.jit(complete)
    complete = self._inverse_fns[task]
    # The test images in the model's space: the training scaler of their levels (cell centres if it dequantizes).
    offset = 0.5 if self.scaler.dequantized else 0.0

    def batches():
      covered = 0
      for index, batch in enumerate(stream):
        if covered >= num_examples:
          return
        levels = np.asarray(stream.scaler.to_levels(batch["x"]), np.float32)
        num_valid = min(levels.shape[0], num_examples - covered)
        covered += num_valid
        yield index, np.asarray(self.scaler.forward(levels + offset), np.float32), np.asarray(batch["label"]), num_valid

    started = time.perf_counter()
    try:
      result = controllable.inverse_problem(lambda key, truth: complete(params, key, truth), batches(), directory,
                                            key=jax.random.fold_in(jax.random.key(self.settings.seed), INVERSE_KEY),
                                            num_examples=num_examples, progress_bar=self.settings.progress_bar)
    finally:
      stream.close()
    if not units.is_main_process():
      return None  # Process 0 judges the completions, draws the grid and writes the results.
    truth, completed = result["truth"], result["completed"]
    region = np.broadcast_to(mask < 1, truth.shape) if mask is not None else np.ones(truth.shape, bool)
    error = (completed - truth)[region]
    out = {"task": task, "split": settings.split, "num_examples": int(truth.shape[0]), "mask": described["mask"],
           "sampler": settings.sampler_kwargs(task), "nfe": int(result["nfe"].max()),
           "mse": float(np.mean(error**2)),  # Over the generated values, in model space.
           "observed_preserved": bool(np.all((completed == truth)[~region])) if mask is not None else None,
           "directory": directory}
    judge = self._digits_judge()
    if judge is not None:
      out["completed"] = self._judged(judge, completed, result["label"])
      out["truth"] = self._judged(judge, truth, result["label"])
    if settings.grid_size:
      images, columns = controllable.inverse_grid(result, settings.grid_size, mask)
      out["grid"] = os.path.join(directory, "grid.png")
      io.write_png(out["grid"], visualize.image_grid(np.asarray(self.scaler.to_uint8(images)), columns=2 * columns))
    out["seconds"] = time.perf_counter() - started
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
    main = units.is_main_process()
    if main:  # Process 0 computes (or reads) the reference statistics; the others need only their file names.
      variables, digest, reference, path, kid_path = self.fid_reference()
    else:
      variables, digest, reference = None, reference_lib.weights_digest(self.settings.fid.inception_path), None
    path, kid_path = units.share("fid reference", [path, kid_path] if main else None)
    samples = self.settings.samples
    directory = record["samples"]["directory"]
    # The metrics of these samples against this reference: computed once (the 2048-d Fréchet distance alone
    # takes seconds to minutes on a CPU), then read back.
    result_path = os.path.join(directory, "fid-" + units.fingerprint(
        {"reference": os.path.basename(path), "kid_reference": os.path.basename(kid_path or ""),
         "num_samples": samples.num_samples, **dataclasses.asdict(self.settings.fid),
         "inception_path": digest}) + ".json")
    if os.path.isfile(result_path):  # Written after the last wait below: every process sees the same.
      with open(result_path) as file:
        return {**json.load(file), "reused": True}
    variables = variables or inception.load_fid_inception(self.settings.fid.inception_path)
    pool, logits, nonfinite = reference_lib.inception_sample_outputs(
        variables, directory, digest, samples.num_samples, samples.shard_size, self.scaler.to_uint8,
        batch_size=self.settings.batch_size, progress_bar=self.settings.progress_bar)
    if not main:
      return None
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
