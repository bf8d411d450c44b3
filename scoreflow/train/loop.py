"""The training loop: `train_and_evaluate(config, workdir)`.

It builds every object from the config at one boundary (:func:`scoreflow.config.build_experiment`),
then runs the compiled, sharded train step over the data stream with

* automatic resume from the newest complete checkpoint (state, data position) in `workdir`;
* periodic checkpoints, a frequent preemption snapshot, and a snapshot on SIGTERM;
* a progress bar (loss, steps/s, examples/s), `workdir/metrics.jsonl` and TensorBoard event files
  (`workdir/tensorboard/`, written with tensorboardX, no TensorFlow);
* sample grids from the EMA parameters as PNG and `.npz` in `workdir/samples/` (a class-conditional model: one
  row per class, labels `i % num_classes`, guidance scale 0; a noise-conditional classifier draws none and logs
  its accuracy on the noisy batches instead);
* a summary at the end (`workdir/summary.json`, a loss curve `workdir/loss.png`).

Where dispatch is asynchronous (accelerators; CPU only with `--cpu_async_dispatch`, see
`sharding.configure_cpu_dispatch`), train calls run at most :data:`MAX_CALLS_IN_FLIGHT` ahead of the device.

Only process 0 writes logs, pictures and summaries; every process takes part in checkpointing.
Workdir layout: `config.json`, `checkpoints/<step>/`, `snapshot/<step>/`, `metrics.jsonl`, `tensorboard/`,
`samples/step_<N>.png|.npz`, `loss.png`, `summary.json`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np

from scoreflow.data import make_dataset
from scoreflow import io
from scoreflow.config.experiment import Experiment, build_experiment, resumable_changes, resume_notes
from scoreflow.config.fields import config_to_dict
from scoreflow.train import sharding, visualize
from scoreflow.train.checkpoint import Checkpointer, WorkdirLock, check_workdir_config, local_workdir
from scoreflow.train.step import make_objective, make_train_step

# Train calls dispatched ahead of the newest finished one. Two keep the device fed (the next call is queued while
# one runs) and hold at most two batches beyond it in memory. An unbounded run-ahead deadlocks a CPU split into
# devices (jax 0.10.2): past 32 queued computations per device, XLA:CPU blocks the launch on a thread of a pool
# with max(cores, devices) threads, and with 2 of them the other thread then waits in an all-reduce for a device
# part that no free thread can start (the abort is its collective rendezvous timing out; bench/RESULTS.md).
MAX_CALLS_IN_FLIGHT = 2

logger = logging.getLogger(__name__)


class MetricsWriter:
  """JSON lines and TensorBoard scalars/images on process 0; a no-op elsewhere.

  A run resumed at `start_step` first drops what an interrupted attempt logged after it (records in
  `metrics.jsonl` with a later step; TensorBoard events through its purge step), so every step is logged once.
  """

  def __init__(self, workdir: str, enabled: bool, start_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tensorboard = None
    if not enabled:
      return
    _truncate_metrics(self.path, start_step)
    try:
      from tensorboardX import SummaryWriter
    except ImportError:  # Optional: logs still go to metrics.jsonl.
      logger.warning("tensorboardX is not installed; writing metrics.jsonl only (pip install tensorboardX).")
    else:
      self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    # Strict JSON: a window whose steps were all skipped has no loss (null, not NaN).
    record = {name: None if isinstance(v, float) and not np.isfinite(v) else v for name, v in values.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, **record}, allow_nan=False) + "\n")
    if self._tensorboard is not None:
      for name, value in values.items():
        self._tensorboard.add_scalar(f"train/{name}", value, step)
      self._tensorboard.flush()

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    if self.enabled and self._tensorboard is not None:
      self._tensorboard.add_image(name, image, step, dataformats="HWC")
      self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


class _Preemption:
  """Turns SIGTERM into a flag the loop checks (single process), or asks JAX's preemption sync point."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def wait_ready(self, tree) -> bool:
    """Waits for the arrays of `tree` (dispatched asynchronously) while watching for SIGTERM: a blocking read
    would hold off the signal handler until the computation ends, however long (or hung) it is.

    Returns:
      Whether they are ready (False: a preemption was requested first; the computation is abandoned).
    """
    leaves = [leaf for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array)]
    while not all(leaf.is_ready() for leaf in leaves):
      if self.requested:
        return False
      time.sleep(0.02)
    return True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except Exception:  # No preemption service in this runtime.
        return False
    return self.requested

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _local(tree):
  """Host copies of (replicated) arrays, read from this process's first shard: works in multi-process runs."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else np.asarray(a),
                      tree)


def _stack_batches(dataset, count: int, *, labels: bool = False, num_classes: int = 0):
  """The next `count` batches, stacked on a leading steps axis when `count > 1`: `{"x"}`, plus `{"label"}` with
  `labels` (checked on the host against `num_classes` when it is > 0: a label the network has no row for would
  turn its loss into NaN, and every step would be skipped)."""
  batches = [next(dataset) for _ in range(count)]
  keys = ("x", "label") if labels else ("x",)
  if labels and num_classes > 0:
    for batch in batches:
      values = np.asarray(batch["label"])
      if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(f"the dataset's labels run from {values.min()} to {values.max()}, outside 0..{num_classes - 1}"
                         f" for config.model.num_classes={num_classes}; set config.model.num_classes to the dataset's "
                         "number of classes.")
  if count == 1:
    return {key: batches[0][key] for key in keys}
  return {key: np.stack([b[key] for b in batches]) for key in keys}


def _class_rows(images: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """uint8 images `[N, H, W, C]` rearranged row-major into one row per class (`ceil(N / num_classes)` columns,
  padded with mid-grey tiles where a class has fewer samples)."""
  columns = -(-len(images) // num_classes)
  tiles = np.full((num_classes * columns, *images.shape[1:]), 128, np.uint8)
  for c in range(num_classes):
    members = images[labels == c][:columns]
    tiles[c * columns:c * columns + len(members)] = members
  return visualize.image_grid(tiles, columns=columns)


def train_and_evaluate(config, workdir: str | os.PathLike, *, allow_config_change: bool = False,
                       experiment: Experiment | None = None) -> dict[str, Any]:
  """Trains the model that `config` describes in `workdir`, resuming from its newest checkpoint if any.

  Args:
    config: an `ml_collections.ConfigDict` with the fields of `configs/default.py`.
    workdir: the run's directory (created if needed), a local or mounted path.
    allow_config_change: resume a workdir whose `config.json` differs in fields other than the ones a resumed
      run may change (:func:`scoreflow.config.experiment.resumable_changes`).
    experiment: `build_experiment(config)`, when the caller has built it already (run_train.py does, to check
      the config before JAX starts).

  Returns:
    The run's summary (also written to `workdir/summary.json` by process 0).

  Raises:
    ValueError: a bad config field (before any data is read or program compiled), a batch size that does not
      split over the devices, a URL as workdir, a workdir whose checkpoints were written with another
      configuration, or an unusable checkpoint.
    FileNotFoundError: a tfds dataset that is not prepared.
    FloatingPointError: with `training.nonfinite="halt"`, when a step has a non-finite loss or gradient (the last
      finite state is in the last checkpoint; nothing non-finite is written).
  """
  experiment = experiment or build_experiment(config)
  settings = experiment.training
  workdir = local_workdir(workdir)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh()
  sharding.check_batch_size(settings.batch_size, mesh, name="config.training.batch_size")

  def say(message: str) -> None:
    if is_main:
      from tqdm import tqdm
      tqdm.write(message)

  with contextlib.ExitStack() as cleanup:
    if is_main:  # One run per workdir: taken before anything is written, released when the process ends.
      cleanup.enter_context(WorkdirLock(workdir))
    data = experiment.data
    dataset = make_dataset(data.name, data.split, global_batch_size=settings.batch_size, seed=experiment.seed,
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           **data.dataset_kwargs())
    cleanup.callback(dataset.close)
    element_shape = tuple(dataset.element_shape)
    os.makedirs(workdir, exist_ok=True)
    checkpointer = Checkpointer(workdir, keep=settings.keep_checkpoints, async_save=settings.async_checkpointing)
    cleanup.callback(checkpointer.close)  # Waits for asynchronous saves, on errors and preemption too.
    # config.json only guards a run that has saved state: without a checkpoint there is nothing to protect.
    accepted = check_workdir_config(workdir, config_to_dict(config),
                                    allowed_changes=resumable_changes(config),
                                    notes=resume_notes(config), resuming=checkpointer.latest() is not None,
                                    allow_config_change=allow_config_change, write=is_main)
    for name, (old, new) in accepted.items():
      say(f"config.{name} changed from {old!r} to {new!r} since this workdir's last run.")

    model, optimizer = experiment.model, experiment.optimizer
    replicated = sharding.replicated(mesh)
    abstract_state = experiment.abstract_train_state(element_shape, mesh)
    # The newest checkpoint that passes its integrity checks; corrupt ones are reported and moved aside.
    restored = checkpointer.restore_intact(abstract_state, report=say)
    if restored is None:
      state = jax.jit(lambda: experiment.init_train_state(element_shape, jax.random.key(experiment.seed)),
                      out_shardings=replicated)()
      start_step = 0
    else:
      state, meta, start_step, kind = restored
      if "data" in meta:
        dataset.set_state(meta["data"])
      say(f"Resumed from step {start_step} ({checkpointer.directory(kind, start_step)}).")
    num_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract_state.params))
    # "halt" stops at a new non-finite step, not at ones an earlier "skip" policy already skipped.
    skipped_before = int(_local(state.nonfinite_steps))

    steps_per_call = settings.steps_per_call
    use_labels = experiment.is_conditional or experiment.is_classifier
    objective = make_objective(model.apply, experiment.process, parameterization=experiment.parameterization,
                               loss=experiment.loss, compute_dtype=experiment.compute_dtype,
                               num_classes=experiment.num_classes if experiment.is_conditional else 0,
                               label_dropout=experiment.label_dropout, **experiment.loss_kwargs)
    train_step = sharding.jit_train_step(
        make_train_step(objective, optimizer, ema_rate=settings.ema_rate, ema_warmup=settings.ema_warmup,
                        nonfinite=settings.nonfinite, steps_per_call=steps_per_call,
                        learning_rate_fn=experiment.learning_rate_fn,
                        skipped_before=skipped_before if settings.nonfinite == "halt" else 0, use_labels=use_labels),
        mesh, steps_per_call=steps_per_call)

    sample_shape = (experiment.sampler.num_samples, *element_shape)
    sample_labels = None
    if experiment.is_classifier:  # A classifier draws no samples.
      sample_jit = None
    elif experiment.is_conditional:  # One row per class, at guidance scale 0 (the plain conditional score).
      sample_labels = np.arange(sample_shape[0], dtype=np.int32) % experiment.num_classes
      conditional_sample = experiment.make_conditional_sample_fn(0.0)
      sample_jit = jax.jit(lambda key, params: conditional_sample(key, params, sample_shape, sample_labels),
                           out_shardings=replicated)
    else:
      sample = experiment.make_sample_fn()
      sample_jit = jax.jit(lambda key, params: sample(key, params, sample_shape), out_shardings=replicated)
    samples_dir = os.path.join(workdir, "samples")
    writer = MetricsWriter(workdir, is_main, start_step)
    cleanup.callback(writer.close)
    preemption = _Preemption()
    cleanup.callback(preemption.close)
    sample_paths: list[str] = []

    def check_finite_policy():
      if settings.nonfinite == "halt" and int(_local(state.nonfinite_steps)) > skipped_before:
        raise FloatingPointError(
            f"training halted: step {int(_local(state.step))} had a non-finite loss or gradient "
            f"(config.training.nonfinite='halt'). Parameters were not updated by it and no checkpoint holds a "
            f"non-finite value; the last checkpoint is {checkpointer.latest()}. Lower config.optim.learning_rate, "
            f"keep config.optim.grad_clip on, or set config.training.nonfinite='skip' to skip such steps.")

    saved_kind: dict[int, str] = {}

    def save(step: int, *, snapshot: bool = False) -> bool:
      check_finite_policy()
      meta = {"data": dataset.get_state(), "step": step}
      written = checkpointer.save(step, state, meta, snapshot=snapshot)
      if written:
        saved_kind[step] = "snapshot" if snapshot else "checkpoints"
      return written

    def draw_samples(step: int) -> bool:
      """Draws and writes a sample grid; False if a preemption request interrupted the sampling."""
      params = state.ema_params if experiment.sampler.use_ema else state.params
      key = jax.random.fold_in(jax.random.key(experiment.seed + 1), step)
      started = time.perf_counter()
      x, info = sample_jit(key, params)
      if not preemption.wait_ready((x, info)):
        return False
      x, info = _local((x, info._asdict()))
      seconds = time.perf_counter() - started
      if not is_main:
        return True
      os.makedirs(samples_dir, exist_ok=True)
      base = os.path.join(samples_dir, f"step_{step}")
      if sample_labels is None:
        np.savez(base + ".npz", samples=x, **info)
        picture = visualize.sample_picture(x, dataset.scaler)
      else:
        np.savez(base + ".npz", samples=x, labels=sample_labels, **info)
        if x.ndim == 4:
          images = np.asarray(dataset.scaler.to_uint8(x)) if dataset.scaler is not None else \
              np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)
          picture = _class_rows(images, sample_labels, experiment.num_classes)
        else:
          picture = visualize.sample_picture(x, dataset.scaler)
      visualize.save_png(picture, base + ".png")
      writer.image(step, "samples", picture)
      writer.scalars(step, {"sample_seconds": seconds, "sample_nfe": float(np.mean(info.get("nfe", np.nan)))})
      sample_paths.append(base + ".png")
      return True

    from tqdm import tqdm
    bar = tqdm(total=settings.num_train_steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not (is_main and settings.progress_bar))
    cleanup.callback(bar.close)
    step = start_step
    compile_seconds = None
    window, window_start, window_step = [], time.perf_counter(), step
    in_flight: collections.deque = collections.deque()  # The metrics of the calls not known to have finished.
    run_start = time.perf_counter()
    last_record: dict[str, float] = {}
    preempted = abandoned = False
    stop_note = None  # Said once every checkpoint is written (the checkpointer's close waits for them).
    while step < settings.num_train_steps:
      local_batch = _stack_batches(dataset, steps_per_call, labels=use_labels, num_classes=experiment.num_classes)
      batch = sharding.global_batch(local_batch, mesh, steps_axis=steps_per_call > 1)
      if compile_seconds is None:
        started = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        compile_seconds = time.perf_counter() - started
        # Its steps count in the logged loss, not in the throughput (which leaves the compilation out).
        window_start, window_step = time.perf_counter(), step + steps_per_call
      else:
        if len(in_flight) >= MAX_CALLS_IN_FLIGHT:
          jax.block_until_ready(in_flight.popleft())
        state, metrics = train_step(state, batch)
        in_flight.append(metrics)
      window.append(metrics)
      step += steps_per_call
      bar.update(steps_per_call)

      if step % settings.log_every == 0 or step == settings.num_train_steps:
        check_finite_policy()
        host = _local(window)
        elapsed = time.perf_counter() - window_start
        steps_done = step - window_step
        record = {name: _finite_mean([m[name] for m in host]) for name in ("loss", "grad_norm")}
        if "accuracy" in host[-1]:  # A classifier's accuracy on the noisy training batches.
          record["accuracy"] = _finite_mean([m["accuracy"] for m in host])
        record["learning_rate"] = float(host[-1]["learning_rate"])
        record["nonfinite_steps"] = int(_local(state.nonfinite_steps))
        if steps_done > 0 and elapsed > 0:
          record["steps_per_sec"] = steps_done / elapsed
          record["examples_per_sec"] = steps_done * settings.batch_size / elapsed
        writer.scalars(step, record)
        last_record = record
        bar.set_postfix(loss=f"{record['loss']:.4g}", steps_s=f"{record.get('steps_per_sec', 0):.3g}",
                        ex_s=f"{record.get('examples_per_sec', 0):.4g}", refresh=False)
        window, window_start, window_step = [], time.perf_counter(), step

      final = step == settings.num_train_steps
      if final or (settings.checkpoint_every and step % settings.checkpoint_every == 0):
        save(step)
      elif settings.snapshot_every and step % settings.snapshot_every == 0:
        save(step, snapshot=True)
      if sample_jit is not None and settings.sample_every and step % settings.sample_every == 0 and not final:
        draw_samples(step)  # Interrupted by a preemption request, it draws nothing; the check below stops.
      if preemption.reached(step) and not final:
        preempted = True
        if save(step, snapshot=True):
          stop_note = f"Preemption requested: saved a snapshot at step {step}; rerun the same command to resume."
        else:
          held = saved_kind.get(step) or ("checkpoints" if step in checkpointer.steps()["checkpoints"] else "snapshot")
          stop_note = (f"Preemption requested at step {step}, which {checkpointer.directory(held, step)} already "
                       "holds (no extra snapshot written); rerun the same command to resume.")
        break
    if not preempted:
      check_finite_policy()
      if sample_jit is not None and (step > start_step or not sample_paths) and not draw_samples(step):
        preempted = abandoned = True
        stop_note = (f"Preemption requested during the final sampling: training is complete and checkpoint {step} "
                     f"is saved; the final samples were not drawn (rerun the same command to draw them).")

  if stop_note:
    say(stop_note)
  total_seconds = time.perf_counter() - run_start
  summary = {
      "workdir": workdir, "step": step, "start_step": start_step, "preempted": preempted,
      # A device computation (the final sampling) still runs: exiting the process would wait for it.
      "abandoned_computation": abandoned,
      "num_params": num_params, "num_devices": int(mesh.devices.size), "num_processes": jax.process_count(),
      "batch_size": settings.batch_size, "compile_seconds": compile_seconds, "total_seconds": total_seconds,
      "final_loss": last_record["loss"] if np.isfinite(last_record.get("loss", np.nan)) else None,
      "final_accuracy": (last_record["accuracy"] if np.isfinite(last_record.get("accuracy", np.nan)) else None)
                        if experiment.is_classifier else None,
      "steps_per_sec": last_record.get("steps_per_sec"),
      "examples_per_sec": last_record.get("examples_per_sec"),
      "nonfinite_steps": int(_local(state.nonfinite_steps)),
      "checkpoints": checkpointer.steps(), "samples": sample_paths[-1] if sample_paths else None,
      # Programs compiled for the train step: 1 unless something (a dtype, a sharding) changed between calls.
      "compilations": train_step._cache_size() if hasattr(train_step, "_cache_size") else None,
  }
  if is_main:
    records = [r for r in _read_metrics(writer.path) if r.get("loss") is not None]
    if records:
      visualize.save_loss_curve(os.path.join(workdir, "loss.png"), [r["step"] for r in records],
                                [r["loss"] for r in records])
      summary["loss_curve"] = os.path.join(workdir, "loss.png")
    io.write_json(os.path.join(workdir, "summary.json"), summary)
    say(_format_summary(summary))
  return summary


def _finite_mean(values) -> float:
  """The mean of the finite values (NaN marks calls whose steps were all skipped), NaN if there is none."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  return float(values.mean()) if values.size else float("nan")


def _read_metrics(path: str) -> list[dict]:
  """The training records (those with a `loss` field) of `metrics.jsonl`."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [r for r in (json.loads(line) for line in f if line.strip()) if "loss" in r]


def _truncate_metrics(path: str, start_step: int) -> None:
  """Drops the records of `metrics.jsonl` logged after `start_step` (by an attempt that did not save them)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  kept = [line for line in lines if json.loads(line)["step"] <= start_step]
  if len(kept) < len(lines):
    io.write_text(path, "".join(kept))


def _format_summary(summary: dict) -> str:
  def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)

  lines = [
      f"Trained {summary['step'] - summary['start_step']} steps (to step {summary['step']}) of a "
      f"{summary['num_params']:,}-parameter model on {summary['num_devices']} device(s) in "
      f"{summary['total_seconds']:.1f} s (first call with compilation: {fmt(summary['compile_seconds'], '.1f')} s).",
      f"  final loss {fmt(summary['final_loss'], '.4g')}"
      + (f" (accuracy on noisy data {fmt(summary['final_accuracy'], '.3f')})"
         if summary.get("final_accuracy") is not None else "")
      + f", {fmt(summary['steps_per_sec'], '.3g')} steps/s, "
      f"{fmt(summary['examples_per_sec'], '.4g')} examples/s, {summary['nonfinite_steps']} non-finite steps skipped.",
      f"  checkpoints: {summary['checkpoints']} in {summary['workdir']}",
      f"  samples: {summary['samples']}",
  ]
  if summary.get("loss_curve"):
    lines.append(f"  loss curve: {summary['loss_curve']}")
  if summary["preempted"]:
    lines.append("  stopped early on a preemption request; rerun to resume.")
  return "\n".join(lines)
