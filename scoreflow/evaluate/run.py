r"""Evaluation of a trained run: `evaluate(config, workdir)`, the engine of `run_eval.py`.

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
  :data:`scoreflow.train.builders.SAMPLERS`), written in shards (`shard_00000.npz`, ...: `samples` in model
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
import functools
import hashlib
import io
import json
import math
import os
import re
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scoreflow.data import AffineScaler, make_dataset
from scoreflow.data.pipeline import DIGITS_NAMES
from scoreflow.data.toy import TOY_DATASETS
from scoreflow.evaluate import digits_metric, inception, metrics
from scoreflow.evaluate.metrics import atomic_savez
from scoreflow.likelihood import bits_per_dim, dequantize, log_likelihood
from scoreflow.parameterization import make_score_fn
from scoreflow.train import builders, sharding
from scoreflow.train.checkpoint import (CONFIG_FILE, CheckpointError, CheckpointMismatchError, Checkpointer,
                                       CorruptCheckpointError, WorkdirBusyError, WorkdirLock, config_differences,
                                       field_matches, flatten_config)
from scoreflow.train.step import make_network

TASKS = ("bpd", "samples", "fid", "digits")
QUALITY = "quality"
# Config fields (a trailing "." takes a whole section) whose change alters what a checkpoint's parameters mean.
MODEL_SECTIONS = ("model.", "sde.", "parameterization.", "data.name", "data.scaler", "data.dequantize",
                  "data.image_size")

_BPD_KEY, _SAMPLES_KEY = 0, 1  # fold_in tags: independent streams for the two random tasks.


def eval_config() -> ml_collections.ConfigDict:
  """The default `config.eval` section: `configs/default.py` sets `config.eval = eval_config()` and lists the
  meaning of every field; the settings classes below document them too."""
  return ml_collections.ConfigDict(dict(
      checkpoints="latest", use_ema=True, tasks="bpd,samples,quality", seed=0, batch_size=128, output_dir="",
      cache_dir="", progress_bar=True, allow_config_mismatch=False,
      bpd=dict(split="test", num_examples=0, num_repeats=1, divergence="hutchinson", probe="rademacher",
               num_probes=1, rtol=1e-5, atol=1e-5, eps=1e-5, solver="dopri5", max_steps=4096, per_example=False),
      samples=dict(num_samples=50000, shard_size=500, grid_size=64),
      fid=dict(inception_path="", reference_split="train", reference_num_examples=0, kid_reference_size=10000,
               kid_num_subsets=100, kid_subset_size=1000, is_num_splits=10),
      digits=dict(reference_split="train", classifier_steps=1000, classifier_seed=0),
  ))


# ----------------------------------------------------------------------------------------------------------
# Settings: the config's `eval` section, checked at the boundary.


@dataclasses.dataclass(frozen=True)
class BpdSettings:
  """`config.eval.bpd`: the split, how many examples (0: all), dequantization repeats and the ODE options."""

  split: str
  num_examples: int
  num_repeats: int
  divergence: str
  probe: str
  num_probes: int
  rtol: float
  atol: float
  eps: float
  solver: str
  max_steps: int
  per_example: bool

  def likelihood_kwargs(self) -> dict[str, Any]:
    """Keyword arguments of :func:`scoreflow.likelihood.log_likelihood`."""
    return dict(eps=self.eps, rtol=self.rtol, atol=self.atol, divergence=self.divergence, probe=self.probe,
                num_probes=self.num_probes, solver=self.solver, max_steps=self.max_steps,
                per_example=self.per_example)


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """`config.eval.samples`: how many samples, drawn `shard_size` per sampler call, and the grid's size."""

  num_samples: int
  shard_size: int
  grid_size: int


@dataclasses.dataclass(frozen=True)
class FidSettings:
  """`config.eval.fid`: the Inception weights file and the reference split; KID and IS options."""

  inception_path: str
  reference_split: str
  reference_num_examples: int
  kid_reference_size: int
  kid_num_subsets: int
  kid_subset_size: int
  is_num_splits: int


@dataclasses.dataclass(frozen=True)
class DigitsSettings:
  """`config.eval.digits`: the reference split and the classifier's training steps and seed."""

  reference_split: str
  classifier_steps: int
  classifier_seed: int


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """`config.eval`, checked: which checkpoints, which parameters, which tasks, and each task's settings.

  `allow_config_mismatch`: evaluate even though model-defining fields (:data:`MODEL_SECTIONS`) differ from the
  workdir's `config.json` (a warning instead of an error).
  """

  checkpoints: str
  use_ema: bool
  tasks: tuple[str, ...]
  seed: int
  batch_size: int
  output_dir: str
  cache_dir: str
  progress_bar: bool
  bpd: BpdSettings
  samples: SampleSettings
  fid: FidSettings
  digits: DigitsSettings
  allow_config_mismatch: bool = False


_INCEPTION_HOWTO = (
    "Nothing is downloaded at run time. On a machine with internet access and PyTorch: download "
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth "
    "and convert it with `python -c \"from scoreflow.evaluate import convert_pytorch_fid_weights as c; "
    "c('pt_inception-2015-12-05-6726825d.pth', 'fid_inception.npz')\"`, then pass "
    "--config.eval.fid.inception_path=/path/to/fid_inception.npz.")


def resolve_tasks(tasks: str, data_name: str) -> tuple[str, ...]:
  """The tasks of a comma-separated `eval.tasks` string, `quality` resolved for `data_name`, in run order.

  `fid` and `digits` need samples, so they add `samples`.

  Raises:
    ConfigError: for an unknown task, or a quality metric the data cannot have (Inception on 2-D points,
      the digits metric on other data).
  """
  names = [name.strip() for name in str(tasks).split(",") if name.strip()]
  chosen = set()
  for name in names:
    if name == QUALITY:
      if data_name in DIGITS_NAMES:
        chosen.add("digits")
      elif data_name not in TOY_DATASETS:  # 2-D points have no image-quality metric.
        chosen.add("fid")
    elif name in TASKS:
      chosen.add(name)
    else:
      raise builders.ConfigError(f"config.eval.tasks: unknown task {name!r} in {tasks!r}; choose from "
                                 f"{', '.join(TASKS + (QUALITY,))} (comma-separated).")
  if not names:
    raise builders.ConfigError(f"config.eval.tasks must name at least one of {', '.join(TASKS + (QUALITY,))}, "
                               f"got {tasks!r}.")
  if "fid" in chosen and data_name in TOY_DATASETS:
    raise builders.ConfigError(f"config.eval.tasks: 'fid' needs images, but config.data.name={data_name!r} is a 2-D "
                               "toy density; drop it.")
  if "digits" in chosen and data_name not in DIGITS_NAMES:
    raise builders.ConfigError(f"config.eval.tasks: 'digits' (the digits classifier metric) needs "
                               f"config.data.name='digits', got {data_name!r}; use 'fid' for other images.")
  if chosen & {"fid", "digits"}:
    chosen.add("samples")
  return tuple(task for task in TASKS if task in chosen)


def build_eval_settings(config) -> EvalSettings:
  """Checks `config.eval` (and the fields of other sections it depends on) and returns :class:`EvalSettings`.

  Raises:
    ConfigError (a ValueError): naming the first bad field, what it holds and what would fix it; in particular
      FID without an Inception weights file, or with a file that does not hold the network's arrays (checked from
      the archive's headers, in about a second), with how to obtain one.
  """
  # The checked getters of the training config's boundary, so that messages read the same.
  _get, _int, _float, _choice = (builders.config_field, builders.config_int, builders.config_float,
                                 builders.config_choice)
  data_name = _get(config, "data.name")
  tasks = resolve_tasks(_get(config, "eval.tasks"), data_name)
  checkpoints = str(_get(config, "eval.checkpoints"))
  parse_checkpoint_spec(checkpoints)

  bpd = BpdSettings(
      split=str(_get(config, "eval.bpd.split")), num_examples=_int(config, "eval.bpd.num_examples", 0, "(0: all)"),
      num_repeats=_int(config, "eval.bpd.num_repeats", 1),
      divergence=_choice(config, "eval.bpd.divergence", ("hutchinson", "exact")),
      probe=_choice(config, "eval.bpd.probe", ("rademacher", "gaussian")),
      num_probes=_int(config, "eval.bpd.num_probes", 1),
      rtol=_float(config, "eval.bpd.rtol", 0.0, low_open=True),
      atol=_float(config, "eval.bpd.atol", 0.0, low_open=True),
      eps=_float(config, "eval.bpd.eps", 0.0, low_open=True),
      solver=_choice(config, "eval.bpd.solver", ("dopri5", "tsit5", "dopri8", "bosh3")),
      max_steps=_int(config, "eval.bpd.max_steps", 1), per_example=bool(_get(config, "eval.bpd.per_example")))
  if "bpd" in tasks and data_name in TOY_DATASETS and bpd.num_examples == 0:
    raise builders.ConfigError(f"config.eval.bpd.num_examples must be > 0 for the toy density {data_name!r} (an "
                               "infinite stream), e.g. --config.eval.bpd.num_examples=4096.")
  samples = SampleSettings(num_samples=_int(config, "eval.samples.num_samples", 1),
                           shard_size=_int(config, "eval.samples.shard_size", 1),
                           grid_size=_int(config, "eval.samples.grid_size", 0, "(0: no grid)"))
  fid = FidSettings(
      inception_path=str(_get(config, "eval.fid.inception_path") or ""),
      reference_split=str(_get(config, "eval.fid.reference_split")),
      reference_num_examples=_int(config, "eval.fid.reference_num_examples", 0, "(0: the whole split)"),
      kid_reference_size=_int(config, "eval.fid.kid_reference_size", 0, "(0: no KID)"),
      kid_num_subsets=_int(config, "eval.fid.kid_num_subsets", 1),
      kid_subset_size=_int(config, "eval.fid.kid_subset_size", 2),
      is_num_splits=_int(config, "eval.fid.is_num_splits", 1))
  if "fid" in tasks:
    if not fid.inception_path:
      raise builders.ConfigError("config.eval.fid.inception_path is empty, but FID/IS/KID (eval.tasks has 'fid' or "
                                 f"'quality' on images) need pytorch-fid's Inception-v3 weights. {_INCEPTION_HOWTO}")
    if not os.path.isfile(fid.inception_path):
      raise builders.ConfigError(f"config.eval.fid.inception_path={fid.inception_path!r}: no such file. "
                                 f"{_INCEPTION_HOWTO}")
    try:
      inception.check_fid_inception_file(fid.inception_path)
    except ValueError as error:
      raise builders.ConfigError(f"config.eval.fid.inception_path={fid.inception_path!r}: {error} "
                                 f"{_INCEPTION_HOWTO}") from None
  digits = DigitsSettings(reference_split=str(_get(config, "eval.digits.reference_split")),
                          classifier_steps=_int(config, "eval.digits.classifier_steps", 1),
                          classifier_seed=_int(config, "eval.digits.classifier_seed", 0))
  return EvalSettings(checkpoints=checkpoints, use_ema=bool(_get(config, "eval.use_ema")), tasks=tasks,
                      seed=_int(config, "eval.seed", 0), batch_size=_int(config, "eval.batch_size", 1),
                      output_dir=str(_get(config, "eval.output_dir") or ""),
                      cache_dir=str(_get(config, "eval.cache_dir") or ""),
                      progress_bar=bool(_get(config, "eval.progress_bar")), bpd=bpd, samples=samples, fid=fid,
                      digits=digits, allow_config_mismatch=bool(_get(config, "eval.allow_config_mismatch")))


# ----------------------------------------------------------------------------------------------------------
# Choosing checkpoints.


def parse_checkpoint_spec(spec: str):
  """`"latest"`, `"all"`, a step `"2000"`, a list `"1000,3000"` or an inclusive range `"1000:5000"` (`"1000:"`,
  `":5000"`) -> `("latest",)`, `("all",)`, `("steps", [..])` or `("range", lo, hi)` (None for an open end).

  Raises:
    ConfigError: for anything else.
  """
  text = str(spec).strip().lower()
  if text in ("latest", "all"):
    return (text,)
  try:
    if ":" in text:
      low, high = (part.strip() for part in text.split(":", 1))
      return ("range", int(low) if low else None, int(high) if high else None)
    steps = [int(part) for part in text.split(",") if part.strip()]
    if steps:
      return ("steps", steps)
  except ValueError:
    pass
  raise builders.ConfigError(f"config.eval.checkpoints must be 'latest', 'all', a step ('2000'), a list of steps "
                             f"('1000,3000') or an inclusive range ('1000:5000', '1000:', ':5000'), got {spec!r}.")


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


# ----------------------------------------------------------------------------------------------------------
# Files: atomic writes, settings fingerprints.


def write_json(path: str | os.PathLike, obj) -> None:
  """Writes `obj` as indented JSON to `path` atomically (temporary file beside it, then rename)."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
  try:
    with os.fdopen(handle, "w") as file:
      json.dump(_finite_or_none(obj), file, indent=2, default=_json_default)
      file.write("\n")
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def _finite_or_none(obj):
  """`obj` with NaN and infinite floats replaced by None (strict JSON has no NaN)."""
  if isinstance(obj, dict):
    return {key: _finite_or_none(value) for key, value in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite_or_none(value) for value in obj]
  if isinstance(obj, (float, np.floating)) and not math.isfinite(obj):
    return None
  return obj


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes a uint8 `[H, W, 3]` image as PNG, atomically."""
  import PIL.Image  # pylint: disable=g-import-not-at-top

  buffer = io.BytesIO()
  PIL.Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
  path = os.fspath(path)
  handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".tmp-", suffix=".png")
  try:
    with os.fdopen(handle, "wb") as file:
      file.write(buffer.getvalue())
    os.replace(temporary, path)
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


def fingerprint(settings: dict) -> str:
  """An 8-hex-digit hash of JSON-serialisable `settings` (names task directories)."""
  text = json.dumps(settings, sort_keys=True, default=_json_default)
  return hashlib.sha256(text.encode()).hexdigest()[:8]


def _task_directory(parent: str, name: str, settings: dict, key_fields: Iterable[str] | None = None) -> str:
  """`parent/name-<hash of settings>` (of its `key_fields` only, if given), created with its `settings.json` on
  first use."""
  key = settings if key_fields is None else {field: settings[field] for field in key_fields}
  directory = os.path.join(parent, f"{name}-{fingerprint(key)}")
  os.makedirs(directory, exist_ok=True)
  if not os.path.exists(os.path.join(directory, "settings.json")):
    write_json(os.path.join(directory, "settings.json"), settings)
  return directory


def _load_npz(path: str) -> dict[str, np.ndarray] | None:
  """The arrays of a finished unit's file, or None if it does not exist (or is unreadable: recomputed)."""
  if not os.path.isfile(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {name: archive[name] for name in archive.files}
  except (OSError, ValueError, EOFError):
    return None


def _progress(total: int, initial: int, description: str, unit: str, enabled: bool):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  return tqdm(total=total, initial=initial, desc=description, unit=unit, dynamic_ncols=True, disable=not enabled,
              leave=False)


def _say(message: str) -> None:
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  tqdm.write(message)


# ----------------------------------------------------------------------------------------------------------
# Bits per dimension over a dataset, resumable.


@dataclasses.dataclass(frozen=True)
class BpdResult:
  """Bits/dim of a dataset split (see :func:`evaluate_bpd`)."""

  mean: float  # mean over examples and repeats; examples with a failed solve are left out (and counted)
  stderr: float  # standard error of `mean` over examples: std of the per-example means / sqrt(N)
  dequantization_stderr: float  # std of the R repeat means / sqrt(R) (NaN for R = 1)
  num_examples: int
  num_repeats: int
  nfe_mean: float
  nfe_min: int
  nfe_max: int
  num_failed: int  # solves whose status was not success
  computed_batches: int  # batches computed by this call
  reused_batches: int  # batches found finished on disk
  directory: str
  per_example_file: str

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def bpd_batches(batches: Iterable[np.ndarray], num_examples: int) -> Iterator[tuple[int, np.ndarray, int]]:
  """`(batch_index, values [B, *D], num_valid)` for a stream of equal-size batches covering `num_examples`.

  The stream must hold at least `ceil(num_examples / B)` batches; the last one's examples past `num_examples`
  are padding (computed with the rest, so that every batch has one shape and compiles once, then dropped).
  """
  covered = 0
  for index, values in enumerate(batches):
    if covered >= num_examples:
      return
    values = np.asarray(values)
    num_valid = min(values.shape[0], num_examples - covered)
    covered += num_valid
    yield index, values, num_valid
  if covered < num_examples:
    raise ValueError(f"bpd_batches: the stream ended after {covered} of {num_examples} examples.")


def evaluate_bpd(bpd_fn: Callable, batches: Iterable[tuple[int, np.ndarray, int]], directory: str, *, key,
                 num_examples: int, num_repeats: int = 1, progress_bar: bool = False) -> BpdResult:
  r"""Bits/dim of a dataset, batch by batch, resuming from the batches already written in `directory`.

  For batch `i` and repeat `r` it calls `bpd_fn(fold_in(fold_in(key, i), r), values)` (the key scheme of
  :func:`scoreflow.likelihood.evaluate_bits_per_dim`, so both give the same numbers on the same batches) and
  writes `batch_<i>.npz` atomically; batches whose file exists are not recomputed. At the end it writes
  `per_example.npz`: `index [N]`, `bpd [N]` (each example's mean over repeats), `bpd_draws [R, N]`,
  `logp [R, N]` (nats, model space), `nfe [R, N]` and `status [R, N]`.

  Args:
    bpd_fn: `bpd_fn(key, values [B, *D]) -> (bpd [B], logp [B], nfe [B], status [B])`, e.g. from
      :func:`make_bpd_fn` (jit it: every batch has the same shape).
    batches: `(batch_index, values, num_valid)` triples, e.g. from :func:`bpd_batches`.
    directory: where the batch files and results go (created if needed).
    key: PRNG key.
    num_examples: `N`, for the progress bar and the check that the batches cover it.
    num_repeats: `R`, dequantization (and probe) draws per example.
    progress_bar: show a tqdm bar.

  Returns:
    A :class:`BpdResult`.
  """
  os.makedirs(directory, exist_ok=True)
  parts, computed, reused = [], 0, 0
  bar = _progress(num_examples, 0, "bits/dim", "example", progress_bar)
  try:
    for index, values, num_valid in batches:
      path = os.path.join(directory, f"batch_{index:05d}.npz")
      part = _load_npz(path)
      if part is None or part["bpd"].shape != (num_repeats, num_valid):
        draws = []
        for repeat in range(num_repeats):
          draw_key = jax.random.fold_in(jax.random.fold_in(key, index), repeat)
          draws.append([np.asarray(a) for a in bpd_fn(draw_key, values)])
        part = {name: np.stack([d[k][:num_valid] for d in draws])
                for k, name in enumerate(("bpd", "logp", "nfe", "status"))}
        part["index"] = np.arange(num_valid, dtype=np.int64) + index * values.shape[0]
        atomic_savez(path, part)
        computed += 1
      else:
        reused += 1
      parts.append(part)
      bar.update(num_valid)
  finally:
    bar.close()
  if not parts:
    raise ValueError("evaluate_bpd: batches yielded no data.")
  table = {name: np.concatenate([p[name] for p in parts], axis=-1) for name in ("bpd", "logp", "nfe", "status")}
  index = np.concatenate([p["index"] for p in parts])
  if index.size != num_examples:
    raise ValueError(f"evaluate_bpd: the batches held {index.size} examples, expected num_examples={num_examples}.")
  example_means = table["bpd"].mean(axis=0)
  finite = np.isfinite(example_means)
  per_example_file = os.path.join(directory, "per_example.npz")
  atomic_savez(per_example_file, {"index": index, "bpd": example_means, "bpd_draws": table["bpd"],
                                  "logp": table["logp"], "nfe": table["nfe"], "status": table["status"]})
  good = table["bpd"][:, finite]
  mean = float(good.mean()) if good.size else float("nan")
  stderr = float(np.std(example_means[finite], ddof=1) / math.sqrt(finite.sum())) if finite.sum() > 1 else float("nan")
  dequantization_stderr = (float(np.std(good.mean(axis=1), ddof=1) / math.sqrt(num_repeats))
                           if num_repeats > 1 and good.size else float("nan"))
  nfe = table["nfe"]
  return BpdResult(mean=mean, stderr=stderr, dequantization_stderr=dequantization_stderr,
                   num_examples=int(index.size), num_repeats=num_repeats, nfe_mean=float(nfe.mean()),
                   nfe_min=int(nfe.min()), nfe_max=int(nfe.max()), num_failed=int(np.sum(table["status"] != 0)),
                   computed_batches=computed, reused_batches=reused, directory=directory,
                   per_example_file=per_example_file)


def make_bpd_fn(sde, score_fn_of_params: Callable, *, num_levels: int | None, scale=2.0, shift=-1.0,
                dtype=jnp.float32, likelihood_kwargs: dict[str, Any]):
  r"""`bpd_fn(params, key, values) -> (bpd [B], logp [B], nfe [B], status [B])`, jitted.

  With `num_levels` (discrete data: integer levels `values [B, *D]` in `0 .. L-1`), the levels are dequantized
  to :math:`x = a(v + u)/L + b` (`a = scale`, `b = shift`) and :math:`\mathrm{bpd} = -(\log p(x) + D\log a
  - D\log L)/(D\ln 2)` (:func:`~scoreflow.likelihood.bits_per_dim`). With `num_levels=None` (continuous data
  already in model space) :math:`\mathrm{bpd} = -\log p(x)/(D \ln 2)`.

  Args:
    sde: the process whose probability-flow ODE defines the likelihood.
    score_fn_of_params: `params -> score_fn(x [B, *D], t [B])`.
    num_levels, scale, shift: the dequantization (see above).
    dtype: floating dtype of the model's inputs.
    likelihood_kwargs: :func:`scoreflow.likelihood.log_likelihood` options.
  """
  kwargs = dict(likelihood_kwargs)

  @jax.jit
  def bpd_fn(params, key, values):
    key_dequantize, key_likelihood = jax.random.split(key)
    if num_levels is None:
      x = jnp.asarray(values, dtype)
    else:
      x = dequantize(key_dequantize, values, num_levels=num_levels, scale=scale, shift=shift, dtype=dtype)
    logp, _, info = log_likelihood(key_likelihood, sde, score_fn_of_params(params), x, **kwargs)
    if num_levels is None:
      bpd = -logp / (math.prod(x.shape[1:]) * math.log(2.0))
    else:
      bpd = bits_per_dim(logp, x.shape[1:], num_levels=num_levels, scale=scale)
    return bpd, logp, info.nfe, info.status

  return bpd_fn


@functools.lru_cache(maxsize=8)
def _model_bpd_fn(model, sde, parameterization, levels: tuple, likelihood_items: tuple):
  """:func:`make_bpd_fn` for a Flax model, memoised: later evaluations in the process skip tracing the solver."""
  network = make_network(model.apply, train=False)

  def score_fn_of(params):
    return make_score_fn(network, params, sde, parameterization)

  return make_bpd_fn(sde, score_fn_of, **dict(levels), likelihood_kwargs=dict(likelihood_items))


# ----------------------------------------------------------------------------------------------------------
# Samples, resumable.


@dataclasses.dataclass(frozen=True)
class SampleResult:
  """A sample set on disk (see :func:`generate_samples`)."""

  num_samples: int
  num_shards: int
  shape: tuple[int, ...]  # one sample's shape
  nfe_mean: float  # score evaluations per sample, averaged over shards
  num_failed_shards: int  # shards whose sampler status was not success (e.g. an ODE solve hit max_steps)
  num_nonfinite: int  # samples holding a NaN or infinite value (left out of the quality metrics)
  computed_shards: int
  reused_shards: int
  directory: str

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _shard_path(directory: str, index: int) -> str:
  return os.path.join(directory, f"shard_{index:05d}.npz")


def finite_rows(samples: np.ndarray) -> np.ndarray:
  """`[N]` bool: which of `samples: [N, *D]` hold only finite values."""
  samples = np.asarray(samples)
  return np.all(np.isfinite(samples.reshape(samples.shape[0], -1)), axis=1)


def _no_finite_samples(num_samples: int, directory: str) -> ValueError:
  return ValueError(f"all {num_samples} samples in {directory} hold NaN or infinite values; there is nothing to "
                    "score. Check the sampler's settings (see each shard's `status`) and the checkpoint.")


def generate_samples(sample_shard: Callable[[int], tuple[np.ndarray, dict]], directory: str, *, num_samples: int,
                     shard_size: int, progress_bar: bool = False) -> SampleResult:
  """Draws `num_samples` samples in shards of `shard_size`, skipping shards already written in `directory`.

  Shard `i` holds samples `i * shard_size ...` (the last one truncated to `num_samples`) as
  `shard_<i>.npz` with `samples [n, *D]` and the sampler's `nfe`, `num_steps`, `num_rejected_steps`, `status`.
  A shard file that holds fewer samples than now needed (an evaluation asking for more samples than an earlier
  one) is drawn again; the draw is keyed by the shard index, so its first samples are the same. Samples with a
  NaN or infinite value are kept in the shards and counted (`num_nonfinite`).

  Args:
    sample_shard: `sample_shard(i) -> (x [shard_size, *D], info)` with `info` a dict of scalars; it must be
      deterministic in `i` (e.g. keyed by `fold_in(key, i)`).
    directory: the shards' directory (created if needed).
    num_samples, shard_size: how many samples, and how many per call.
    progress_bar: show a tqdm bar.
  """
  os.makedirs(directory, exist_ok=True)
  num_shards = -(-num_samples // shard_size)
  computed = reused = 0
  nfe, failed, nonfinite, shape = [], 0, 0, None
  bar = _progress(num_samples, 0, "samples", "sample", progress_bar)
  try:
    for index in range(num_shards):
      needed = min(shard_size, num_samples - index * shard_size)
      path = _shard_path(directory, index)
      shard = _load_npz(path)
      if shard is None or shard["samples"].shape[0] < needed:
        x, info = sample_shard(index)
        x = np.asarray(x)
        if x.shape[0] != shard_size:
          raise ValueError(f"generate_samples: sample_shard({index}) returned {x.shape[0]} samples, expected "
                           f"shard_size={shard_size}.")
        shard = {"samples": x[:needed], **{name: np.asarray(value) for name, value in info.items()}}
        atomic_savez(path, shard)
        computed += 1
      else:
        reused += 1
      shape = tuple(shard["samples"].shape[1:])
      nfe.append(float(np.mean(shard["nfe"])) if "nfe" in shard else float("nan"))
      failed += int(np.any(shard.get("status", 0) != 0))
      nonfinite += int(needed - np.sum(finite_rows(shard["samples"][:needed])))
      bar.update(needed)
  finally:
    bar.close()
  return SampleResult(num_samples=num_samples, num_shards=num_shards, shape=shape, nfe_mean=float(np.mean(nfe)),
                      num_failed_shards=failed, num_nonfinite=nonfinite, computed_shards=computed,
                      reused_shards=reused, directory=directory)


def _load_shard(directory: str, index: int) -> np.ndarray:
  """The `samples` of shard `index` in `directory`."""
  shard = _load_npz(_shard_path(directory, index))
  if shard is None:
    raise FileNotFoundError(f"{_shard_path(directory, index)} is missing or unreadable; run the sampling again.")
  return shard["samples"]


def load_samples(directory: str, num_samples: int, shard_size: int) -> np.ndarray:
  """The first `num_samples` samples of the shards in `directory`, `[num_samples, *D]`."""
  parts = [_load_shard(directory, index)[:num_samples - index * shard_size]
           for index in range(-(-num_samples // shard_size))]
  return np.concatenate(parts)


# ----------------------------------------------------------------------------------------------------------
# Sample quality: Inception metrics and the digits metric, with cached references.


def _weights_digest(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as file:
    for block in iter(lambda: file.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()[:8]


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _inception_outputs(variables, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Inception pool features and logits of uint8 `images`, padded to whole batches so that every call of the
  network has the shape `[batch_size, ...]` (one compilation)."""
  num_images = images.shape[0]
  padding = -num_images % batch_size
  if padding:
    images = np.concatenate([images, np.repeat(images[-1:], padding, axis=0)])
  pool, logits = inception.fid_inception_outputs(variables, images, batch_size=batch_size)
  return pool[:num_images], logits[:num_images]


def _partial_path(path: str) -> str:
  return (path[:-len(".npz")] if path.endswith(".npz") else path) + ".partial.npz"


def _load_partial(path: str, num_features: int, with_moments: bool, keep: int):
  """`(count, moments or None, kept features [k, d])` of a partial reference pass, or the start of a new one
  when `path` holds none (or one that does not fit: it is then recomputed)."""
  fresh = (0, metrics.FeatureMoments.empty(num_features) if with_moments else None,
           np.zeros((0, num_features), np.float32))
  saved = _load_npz(path)
  if saved is None or "count" not in saved or "features" not in saved:
    return fresh
  count = int(saved["count"])
  kept = saved["features"][:keep]
  if kept.shape[0] != min(count, keep) or kept.shape[1:] != (num_features,):
    return fresh
  if not with_moments:
    return count, None, kept
  if "mean" not in saved or "scatter" not in saved or saved["mean"].shape != (num_features,):
    return fresh
  return count, metrics.FeatureMoments(count, saved["mean"], saved["scatter"]), kept


def reference_statistics(features_fn: Callable[[np.ndarray], np.ndarray], images: Callable[[int], Iterable],
                         moments_path: str, *, num_examples: int, num_features: int, kid_path: str | None = None,
                         kid_reference_size: int = 0, save_every: int = 50, progress_bar: bool = False
                         ) -> metrics.FeatureStatistics:
  """Reference statistics of a stream of images, computed once, cached, and resumable while computed.

  Two files: `moments_path` holds the mean and covariance of the features of the first `num_examples` images
  (what FID needs), `kid_path` the features of the first `K = min(kid_reference_size, num_examples)` (what KID
  needs). One pass over the images computes whichever is missing, so changing only `kid_reference_size`
  reads `K` images and leaves the moments alone.

  The pass accumulates exact float64 moments (:class:`~scoreflow.evaluate.metrics.FeatureMoments`) and, every
  `save_every` batches, writes its state (the count, mean and scatter, and the features kept for KID so far)
  atomically to `<file>.partial.npz`. A pass that finds such a file resumes after the images it counts, asking
  `images(count)` for the rest; the resumed statistics equal those of an uninterrupted pass bit for bit when
  the images come in the same batches (the same moments are merged in the same order). The partial file is
  removed when the statistics are written.

  Args:
    features_fn: `features_fn(images [b, ...]) -> features [b, d]`, e.g. Inception `pool_3` features.
    images: `images(start)`: an iterable of image batches from image `start` on (at least up to the last image
      needed), e.g. uint8 `[b, H, W, C]` batches of a dataset split.
    moments_path, kid_path: the cache files (`kid_path` None: no KID features).
    num_examples: images whose features make the moments.
    num_features: `d`.
    kid_reference_size: images whose features are kept for KID (0: none).
    save_every: batches between two saves of the partial state.
    progress_bar: show a tqdm bar.

  Returns:
    :class:`~scoreflow.evaluate.metrics.FeatureStatistics` with the KID features (None without them).

  Raises:
    ValueError: if `images(start)` ends before the last image needed.
  """
  keep = min(kid_reference_size, num_examples) if kid_path else 0
  with_moments = not os.path.isfile(moments_path)
  keep_missing = keep if keep and not os.path.isfile(kid_path) else 0
  if with_moments or keep_missing:
    end = num_examples if with_moments else keep_missing
    partial = _partial_path(moments_path if with_moments else kid_path)
    count, moments, kept = _load_partial(partial, num_features, with_moments, keep_missing)
    kept = [kept]
    bar = _progress(end, count, "reference features", "image", progress_bar)
    batches = iter(images(count))
    try:
      since_save = 0
      while count < end:
        batch = next(batches, None)
        if batch is None:
          raise ValueError(f"reference_statistics: the images ended after {count} of {end}.")
        batch = np.asarray(batch)[:end - count]
        features = np.asarray(features_fn(batch))
        if with_moments:
          moments = moments.update(features)
        held = sum(part.shape[0] for part in kept)
        if held < keep_missing:
          kept.append(features[:keep_missing - held].astype(np.float32))
        count += batch.shape[0]
        bar.update(batch.shape[0])
        since_save += 1
        if since_save == save_every and count < end:
          state = {"count": np.asarray(count, np.int64), "features": np.concatenate(kept)}
          if with_moments:
            state.update(mean=moments.mean, scatter=moments.scatter)
          atomic_savez(partial, state)
          since_save = 0
    finally:
      bar.close()
      close = getattr(batches, "close", None)
      if close is not None:
        close()
    if with_moments:
      metrics.save_statistics(moments_path, moments.statistics())
    if keep_missing:
      atomic_savez(kid_path, {"features": np.concatenate(kept)})
    if os.path.exists(partial):
      os.remove(partial)
  statistics = metrics.load_statistics(moments_path)
  if keep:
    with np.load(kid_path, allow_pickle=False) as archive:
      statistics = statistics._replace(features=archive["features"])
  return statistics


def inception_reference(variables, images: Callable[[int], Iterable[np.ndarray]], moments_path: str, *,
                        num_examples: int, kid_path: str | None, kid_reference_size: int, batch_size: int,
                        save_every: int = 50, progress_bar: bool = False) -> metrics.FeatureStatistics:
  """:func:`reference_statistics` of uint8 image batches under the FID Inception network (`pool_3` features)."""
  return reference_statistics(lambda batch: _inception_outputs(variables, batch, batch_size)[0], images,
                              moments_path, num_examples=num_examples,
                              num_features=inception.FID_INCEPTION_NUM_FEATURES, kid_path=kid_path,
                              kid_reference_size=kid_reference_size, save_every=save_every,
                              progress_bar=progress_bar)


def shard_outputs(outputs_fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], sample_dir: str,
                  cache_name: str, num_samples: int, shard_size: int, to_images: Callable, *,
                  progress_bar: bool = False, description: str = "features"
                  ) -> tuple[np.ndarray, np.ndarray, int]:
  """Network outputs of the finite samples of the shards in `sample_dir`, cached per shard.

  Each shard file is read once; its finite samples (:func:`finite_rows`) are mapped to images by `to_images`
  (the training scaler's `to_uint8`) and through `outputs_fn`, and the result is written to
  `<cache_name>-<i>.npz` (`pool`, `logits` of the finite samples and the `finite` mask of the shard).

  Returns:
    `(pool [M, d], logits [M, K], num_nonfinite)`: the outputs of the `M` finite samples among the first
    `num_samples`, and how many were left out.

  Raises:
    ValueError: if no sample is finite.
  """
  pools, logits, nonfinite = [], [], 0
  bar = _progress(num_samples, 0, description, "sample", progress_bar)
  try:
    for index in range(-(-num_samples // shard_size)):
      needed = min(shard_size, num_samples - index * shard_size)
      path = os.path.join(sample_dir, f"{cache_name}-{index:05d}.npz")
      cached = _load_npz(path)
      if cached is None or "finite" not in cached or cached["finite"].shape[0] < needed:
        samples = _load_shard(sample_dir, index)[:needed]
        finite = finite_rows(samples)
        pool, logit = np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
        if finite.any():
          pool, logit = outputs_fn(np.asarray(to_images(samples[finite])))
        cached = {"pool": np.asarray(pool, np.float32), "logits": np.asarray(logit, np.float32), "finite": finite}
        atomic_savez(path, cached)
      rows = int(np.sum(cached["finite"][:needed]))
      if rows:
        pools.append(cached["pool"][:rows])
        logits.append(cached["logits"][:rows])
      nonfinite += needed - rows
      bar.update(needed)
  finally:
    bar.close()
  if not pools:
    raise _no_finite_samples(num_samples, sample_dir)
  return np.concatenate(pools), np.concatenate(logits), nonfinite


def inception_reference_paths(cache_dir: str, data: builders.DataSettings, fid: FidSettings, *, num_examples: int,
                              version: str | None, weights_digest: str) -> tuple[str, str | None]:
  """`(moments file, KID features file or None)` of the Inception reference statistics in `cache_dir`.

  Named by what determines their content: the dataset, its prepared tfds `version` and `data_dir`, the split, the
  image size and the weights, and the number of images (`num_examples` for the moments, the KID reference size
  for the features, so that changing one does not recompute the other).
  """
  data_dir = str(data.data_dir or "")
  if data_dir and "://" not in data_dir:
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
  source = fingerprint({"dataset": data.name, "version": version, "data_dir": data_dir, "split": fid.reference_split,
                        "image_size": data.image_size or 0, "inception": weights_digest})
  stem = f"{_safe(data.name)}-{_safe(fid.reference_split)}"
  moments = os.path.join(cache_dir, f"inception_moments-{stem}-{num_examples}-{source}.npz")
  kid_size = min(fid.kid_reference_size, num_examples)
  return moments, os.path.join(cache_dir, f"inception_kid-{stem}-{kid_size}-{source}.npz") if kid_size else None


def inception_sample_outputs(variables, sample_dir: str, weights_digest: str, num_samples: int, shard_size: int,
                             to_uint8: Callable, *, batch_size: int, progress_bar: bool = False):
  """:func:`shard_outputs` with the FID Inception network: `(pool [M, 2048], logits [M, 1008], num_nonfinite)`,
  cached as `inception-<weights digest>-<i>.npz` in `sample_dir`."""
  return shard_outputs(lambda images: _inception_outputs(variables, images, batch_size), sample_dir,
                       f"inception-{weights_digest}", num_samples, shard_size, to_uint8,
                       progress_bar=progress_bar, description="Inception features")


def inception_metrics(pool: np.ndarray, logits: np.ndarray, reference: metrics.FeatureStatistics,
                      settings: FidSettings) -> dict[str, Any]:
  """FID, IS (mean, std over splits) and KID (mean, std over subsets) of sample features against `reference`."""
  statistics = metrics.FeatureMoments.from_features(pool).statistics()
  result = {"fid": metrics.frechet_distance(statistics.mu, statistics.sigma, reference.mu, reference.sigma)}
  result["inception_score"], result["inception_score_std"] = metrics.inception_score(
      logits, num_splits=min(settings.is_num_splits, logits.shape[0]))
  if reference.features is not None and reference.features.shape[0] >= 2:
    kid = metrics.kernel_inception_distance(pool, reference.features, num_subsets=settings.kid_num_subsets,
                                            subset_size=settings.kid_subset_size)
    result["kid"], result["kid_std"] = kid.mean, kid.std
  result["num_samples"] = int(pool.shape[0])
  return result


def digits_classifier(cache_dir: str, *, data_dir, seed: int, num_steps: int) -> tuple[Any, str]:
  """The digits judge, trained once and cached as `cache_dir/digits_classifier-seed<s>-steps<n>.npz`."""
  path = os.path.join(cache_dir, f"digits_classifier-seed{seed}-steps{num_steps}.npz")
  if os.path.isfile(path):
    return digits_metric.load_digits_classifier(path), path
  classifier = digits_metric.train_digits_classifier(data_dir=data_dir, seed=seed, num_steps=num_steps)
  digits_metric.save_digits_classifier(path, classifier)
  return classifier, path


def digits_reference(classifier, classifier_path: str, *, data_dir, split: str) -> tuple[Any, str]:
  """Digits-classifier feature statistics of a digits split, cached beside the classifier."""
  path = classifier_path.replace("digits_classifier-", f"digits_reference-{_safe(split)}-")
  if os.path.isfile(path):
    return metrics.load_statistics(path), path
  images, _ = digits_metric.load_digits_split(split, data_dir=data_dir)
  statistics = digits_metric.digits_statistics(classifier, images)
  metrics.save_statistics(path, statistics)
  return statistics, path


# ----------------------------------------------------------------------------------------------------------
# The run: restore, then the tasks.


def _stream(data: builders.DataSettings, split: str, batch_size: int, *, seed: int = 0, dequantize: bool = False):
  """An unshuffled, infinite stream of `split` (position n holds example n mod N) in model space, flips off.

  Without `dequantize` (the default) the images are their integer levels and `stream.scaler` is the levels
  scaler, which gives the real data's levels back exactly; with `dequantize=data.dequantize` the stream's scaler
  is the training one.
  """
  kwargs = data.dataset_kwargs()
  if data.name not in TOY_DATASETS:
    kwargs.update(random_flip=False, dequantize=dequantize)
  return make_dataset(data.name, split, global_batch_size=batch_size, seed=seed, shuffle=False, num_epochs=None,
                      **kwargs)


def reference_images(data: builders.DataSettings, split: str, batch_size: int) -> Callable[[int], Iterator]:
  """`images(start)`: uint8 `[b, H, W, C]` batches of `split`'s exact levels from image `start` on (the stream's
  position `n` holds example `n mod N`), read `batch_size` at a time; whole batches before `start` are skipped
  unread. The image source of :func:`reference_statistics`."""

  def images(start: int) -> Iterator[np.ndarray]:
    reader = _stream(data, split, batch_size)
    try:
      first, skip = divmod(start, batch_size)
      reader.set_state({**reader.get_state(), "next_batch": first})
      for batch in reader:
        yield np.asarray(reader.scaler.to_uint8(batch["x"][skip:]))
        skip = 0
    finally:
      reader.close()

  return images


def model_space(data: builders.DataSettings) -> tuple[tuple[int, ...], Any]:
  """`(element_shape, scaler)` of the training stream: one example's shape and the
  :class:`~scoreflow.data.AffineScaler` of `data.scaler` and `data.dequantize` (None for toy data), which maps
  levels to the space the model was trained in and decodes samples back to levels (`to_levels`, `to_uint8`)."""
  stream = _stream(data, data.split, 1, dequantize=data.dequantize)
  try:
    return tuple(stream.element_shape), stream.scaler
  finally:
    stream.close()


def _json_config(config) -> dict:
  return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config), default=str))


def model_fields(config) -> dict[str, Any]:
  """`{"section.field": value}` of the model-defining fields (:data:`MODEL_SECTIONS`) of `config`."""
  return {name: value for name, value in sorted(flatten_config(_json_config(config)).items())
          if field_matches(name, MODEL_SECTIONS)}


def _workdir_config_differences(workdir: str, config) -> dict[str, tuple]:
  """Fields of the model-defining sections that differ between `workdir/config.json` and `config`."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return {}
  with open(path) as file:
    saved = json.load(file)
  return {name: d for name, d in config_differences(saved, _json_config(config)).items()
          if field_matches(name, MODEL_SECTIONS)}


def _describe_differences(differences: dict[str, tuple]) -> str:
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


def _restore_params(checkpointer: Checkpointer, abstract_state, kind: str, step: int, use_ema: bool,
                    differences: dict[str, tuple], *, newest_intact: bool = False):
  """The EMA or raw parameters of checkpoint `(kind, step)`, with the `(kind, step)` they come from.

  With `newest_intact` (`eval.checkpoints=latest`), a corrupt checkpoint is reported in one line and the newest
  intact one is evaluated instead; the corrupt one is moved aside into `workdir/corrupt/` when no training run holds
  the workdir (a running one moves it itself when it next resumes). A corrupt checkpoint asked for by step is an
  error, told apart from a configuration mismatch."""
  try:
    if newest_intact:
      lock = WorkdirLock(checkpointer.workdir)
      try:
        lock.acquire()
      except WorkdirBusyError:
        pass
      try:
        state, _, step, kind = checkpointer.restore_intact(abstract_state, report=_say, move_aside=lock.held)
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
    named = _describe_differences(differences)
    hint = f"\nThe configuration differs from the one that trained this run in:{named}" if named else ""
    raise CheckpointError(f"cannot evaluate {checkpointer.directory(kind, step)}: its parameters do not match "
                          f"the model that --config describes.{hint}\nMismatched arrays (checkpoint vs model):\n"
                          + "\n".join("  " + line for line in error.differences) + "\nEvaluate with the "
                          "configuration the run was trained with (its config.json).") from None
  return (state.ema_params if use_ema else state.params), kind, step


def _sampler_description(experiment: builders.Experiment) -> dict[str, Any]:
  return {"method": experiment.sampler.method, "options": dict(experiment.sampler.kwargs)}


def _check_reference_splits(data: builders.DataSettings, settings: EvalSettings) -> None:
  """Opens the reference splits of the quality tasks, so that a missing or unprepared one fails before the
  checkpoints are evaluated rather than after hours of sampling."""
  splits = []
  if "fid" in settings.tasks:
    splits.append(("fid", settings.fid.reference_split))
  if "digits" in settings.tasks:
    splits.append(("digits", settings.digits.reference_split))
  for section, split in splits:
    try:
      _stream(data, split, 1).close()
    except (FileNotFoundError, ValueError) as error:
      raise type(error)(f"config.eval.{section}.reference_split={split!r}: {error}") from None


def evaluate(config, workdir: str | os.PathLike) -> dict[str, Any]:
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
  experiment = builders.build_experiment(config)
  settings = build_eval_settings(config)
  workdir = os.fspath(workdir)
  if not os.path.isdir(workdir):
    raise CheckpointError(f"workdir {workdir!r} does not exist; pass the --workdir of a training run.")
  differences = _workdir_config_differences(workdir, config)
  if differences and not settings.allow_config_mismatch:
    raise CheckpointError(
        f"--config differs from the configuration that trained {workdir} ({CONFIG_FILE}) in fields that define "
        f"what its checkpoints mean:{_describe_differences(differences)}\nEvaluate with the run's configuration, "
        "or pass --config.eval.allow_config_mismatch=True to evaluate its checkpoints as --config describes "
        "(the results are kept apart from those of the run's own configuration).")
  output_dir = settings.output_dir or os.path.join(workdir, "eval")
  cache_dir = settings.cache_dir or os.path.join(output_dir, "cache")
  checkpointer = Checkpointer(workdir, async_save=False)
  try:
    chosen = select_checkpoints(checkpointer.steps(), settings.checkpoints)
    _check_reference_splits(experiment.data, settings)
    element_shape, scaler = model_space(experiment.data)
    setup = model_fields(config)
    mesh = sharding.make_mesh()
    abstract_state = experiment.abstract_train_state(element_shape, mesh)
    runners = _TaskRunners(experiment, settings, element_shape, scaler, cache_dir, mesh)
    results = []
    for name, (old, new) in differences.items():  # Allowed: the model may mean something else.
      _say(f"warning: config.{name} is {new!r} here but {old!r} in {workdir}/{CONFIG_FILE} "
           "(eval.allow_config_mismatch=True).")
    for kind, step in chosen:
      started = time.perf_counter()
      params, kind, step = _restore_params(checkpointer, abstract_state, kind, step, settings.use_ema, differences,
                                           newest_intact=settings.checkpoints == "latest")
      source = checkpointer.directory(kind, step)
      params_kind = "ema" if settings.use_ema else "raw"
      checkpoint_dir = _task_directory(output_dir, f"step_{step}-{params_kind}",
                                       {"model": setup, "checkpoint": source, "step": step, "params": params_kind,
                                        "checkpoint_identity": checkpoint_identity(source)},
                                       key_fields=("model", "step", "params", "checkpoint_identity"))
      record: dict[str, Any] = {"step": step, "checkpoint": source, "params": params_kind,
                                "directory": checkpoint_dir}
      for task in settings.tasks:
        record[task] = getattr(runners, task)(params, checkpoint_dir, record)
      record["seconds"] = time.perf_counter() - started
      write_json(os.path.join(checkpoint_dir, "results.json"), record)
      _say(format_results(record))
      results.append(record)
  finally:
    checkpointer.close()
  summary = {"workdir": workdir, "tasks": list(settings.tasks), "checkpoints": results,
             "summary_file": os.path.join(output_dir, "summary.json")}
  write_json(summary["summary_file"], summary)
  _say(f"Results: {summary['summary_file']}")
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
    stream = _stream(data, bpd.split, batch_size, seed=self.settings.seed)
    discrete = stream.scaler is not None
    num_examples = bpd.num_examples
    if discrete:
      num_examples = min(num_examples or stream.num_examples, stream.num_examples)
    described = {"dataset": data.name, "split": bpd.split, "num_examples": num_examples,
                 "batch_size": batch_size, "seed": self.settings.seed, "num_repeats": bpd.num_repeats,
                 "image_size": data.image_size, "scaler": data.scaler, **bpd.likelihood_kwargs()}
    directory = _task_directory(checkpoint_dir, f"bpd-{_safe(bpd.split)}", described)
    if discrete:
      # The real data's integer levels (the stream's levels scaler), dequantized here by the bpd convention.
      unit = (AffineScaler.unit_interval if data.scaler == "unit_interval" else AffineScaler.centred)(
          stream.scaler.num_levels, dequantized=True)
      levels = (("num_levels", unit.num_levels), ("scale", float(unit.unit_cube_scale)), ("shift", float(unit.shift)))
    else:
      levels = (("num_levels", None),)
    bpd_fn = _model_bpd_fn(experiment.model, experiment.sampling_sde, experiment.parameterization, levels,
                           tuple(sorted(bpd.likelihood_kwargs().items())))
    to_values = (lambda batch: stream.scaler.to_levels(batch["x"])) if discrete else (lambda batch: batch["x"])
    batches = bpd_batches((to_values(batch) for batch in stream), num_examples)
    split_examples = self._batch_sharding(batch_size)
    if split_examples is not None:
      batches = ((index, jax.device_put(values, split_examples), num_valid) for index, values, num_valid in batches)
    started = time.perf_counter()
    try:
      result = evaluate_bpd(lambda key, values: bpd_fn(params, key, values), batches, directory,
                            key=jax.random.fold_in(jax.random.key(self.settings.seed), _BPD_KEY),
                            num_examples=num_examples, num_repeats=bpd.num_repeats,
                            progress_bar=self.settings.progress_bar)
    finally:
      stream.close()
    out = {**result.to_dict(), "split": bpd.split, "divergence": bpd.divergence, "num_probes": bpd.num_probes,
           "rtol": bpd.rtol, "atol": bpd.atol, "eps": bpd.eps, "dequantized": discrete,
           "seconds": time.perf_counter() - started, "compilations": bpd_fn._cache_size()}
    write_json(os.path.join(directory, "results.json"), out)
    return out

  # --- samples ---
  def _sample_directory(self, checkpoint_dir):
    sampler = _sampler_description(self.experiment)
    described = {"sampler": sampler, "shard_size": self.settings.samples.shard_size, "seed": self.settings.seed,
                 "element_shape": list(self.element_shape)}
    return _task_directory(checkpoint_dir, f"samples-{sampler['method']}", described)

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
    result = generate_samples(sample_shard, directory, num_samples=settings.num_samples,
                              shard_size=settings.shard_size, progress_bar=self.settings.progress_bar)
    out = {**result.to_dict(), "sampler": _sampler_description(self.experiment),
           "seconds": time.perf_counter() - started, "compilations": sample_fn._cache_size()}
    if settings.grid_size:
      from scoreflow.train import visualize  # pylint: disable=g-import-not-at-top

      grid = load_samples(directory, min(settings.grid_size, settings.num_samples), settings.shard_size)
      out["grid"] = os.path.join(directory, "grid.png")
      write_png(out["grid"], visualize.sample_picture(grid, self.scaler))
    write_json(os.path.join(directory, "results.json"), out)
    return out

  def _load_finite_samples(self, record) -> tuple[np.ndarray, int]:
    """The finite samples of the set, and how many were left out."""
    samples = load_samples(record["samples"]["directory"], self.settings.samples.num_samples,
                           self.settings.samples.shard_size)
    finite = finite_rows(samples)
    if not finite.any():
      raise _no_finite_samples(samples.shape[0], record["samples"]["directory"])
    return samples[finite], int(samples.shape[0] - finite.sum())

  # --- FID / IS / KID ---
  def fid_reference(self, variables=None):
    """`(variables, weights digest, reference statistics, moments path, KID path)`, computing and caching the
    statistics (resumably) where the cache lacks them."""
    fid, data = self.settings.fid, self.experiment.data
    digest = _weights_digest(fid.inception_path)
    batch_size = self.settings.batch_size
    stream = _stream(data, fid.reference_split, batch_size)
    stream.close()
    total = min(fid.reference_num_examples or stream.num_examples, stream.num_examples)
    moments_path, kid_path = inception_reference_paths(self.cache_dir, data, fid, num_examples=total,
                                                       version=stream.version, weights_digest=digest)
    if not (os.path.isfile(moments_path) and (kid_path is None or os.path.isfile(kid_path))):
      variables = variables or inception.load_fid_inception(fid.inception_path)
    images = reference_images(data, fid.reference_split, batch_size)
    reference = inception_reference(variables, images, moments_path, num_examples=total, kid_path=kid_path,
                                    kid_reference_size=fid.kid_reference_size, batch_size=batch_size,
                                    progress_bar=self.settings.progress_bar)
    return variables, digest, reference, moments_path, kid_path

  def fid(self, params, checkpoint_dir, record):
    started = time.perf_counter()
    variables, digest, reference, path, kid_path = self.fid_reference()
    samples = self.settings.samples
    directory = record["samples"]["directory"]
    # The metrics of these samples against this reference: computed once (the 2048-d Fréchet distance alone
    # takes seconds to minutes on a CPU), then read back.
    result_path = os.path.join(directory, "fid-" + fingerprint(
        {"reference": os.path.basename(path), "kid_reference": os.path.basename(kid_path or ""),
         "num_samples": samples.num_samples, **dataclasses.asdict(self.settings.fid),
         "inception_path": digest}) + ".json")
    if os.path.isfile(result_path):
      with open(result_path) as file:
        return {**json.load(file), "reused": True}
    variables = variables or inception.load_fid_inception(self.settings.fid.inception_path)
    pool, logits, nonfinite = inception_sample_outputs(
        variables, directory, digest, samples.num_samples, samples.shard_size, self.scaler.to_uint8,
        batch_size=self.settings.batch_size, progress_bar=self.settings.progress_bar)
    out = {**inception_metrics(pool, logits, reference, self.settings.fid), "num_nonfinite_samples": nonfinite,
           "reference": path, "kid_reference": kid_path, "reference_num_examples": reference.num_examples,
           "seconds": time.perf_counter() - started}
    write_json(result_path, out)
    return out

  # --- digits metric ---
  def digits_reference(self):
    digits, data = self.settings.digits, self.experiment.data
    classifier, classifier_path = digits_classifier(self.cache_dir, data_dir=data.data_dir,
                                                    seed=digits.classifier_seed, num_steps=digits.classifier_steps)
    reference, path = digits_reference(classifier, classifier_path, data_dir=data.data_dir,
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
    write_json(os.path.join(record["samples"]["directory"], "digits.json"), out)
    return out


def compute_reference_statistics(config, workdir: str | os.PathLike) -> dict[str, str]:
  """Computes (or finds cached) the reference statistics that the quality tasks of `config.eval` need.

  The digits metric's classifier and its reference statistics, and/or the Inception reference statistics of
  `eval.fid.reference_split` (the moments and, with KID, the features), are written to `eval.cache_dir` (default
  `workdir/eval/cache`).

  Returns:
    `{name: path}` of the cached files.
  """
  experiment = builders.build_experiment(config)
  settings = build_eval_settings(config)
  output_dir = settings.output_dir or os.path.join(os.fspath(workdir), "eval")
  cache_dir = settings.cache_dir or os.path.join(output_dir, "cache")
  element_shape, scaler = model_space(experiment.data)
  runners = _TaskRunners(experiment, settings, element_shape, scaler, cache_dir)
  paths = {}
  if "digits" in settings.tasks:
    _, paths["digits_classifier"], _, paths["digits_reference"] = runners.digits_reference()
  if "fid" in settings.tasks:
    _, _, _, paths["inception_reference"], kid_path = runners.fid_reference()
    if kid_path:
      paths["inception_kid_reference"] = kid_path
  if not paths:
    raise builders.ConfigError(f"config.eval.tasks={','.join(settings.tasks)!r} needs no reference statistics; "
                               "add 'fid', 'digits' or 'quality'.")
  for name, path in paths.items():
    _say(f"{name}: {path}")
  return paths


# ----------------------------------------------------------------------------------------------------------
# The printed summary.


def _fmt(value, spec=".4g") -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  return format(value, spec)


def format_results(record: dict[str, Any]) -> str:
  """The human-readable lines of one checkpoint's results."""
  lines = [f"Step {record['step']} ({record['params']} parameters, {record['checkpoint']}):"]
  if "bpd" in record:
    r = record["bpd"]
    what = "bits/dim" if r["dequantized"] else "bits/dim (continuous data: -log2 p(x) / D)"
    reused = f", {r['reused_batches']} batches reused" if r["reused_batches"] else ""
    lines.append(f"  {what} on {r['split']} ({r['num_examples']} examples x {r['num_repeats']} repeats): "
                 f"{_fmt(r['mean'])} ± {_fmt(r['stderr'], '.2g')} (std. error); NFE mean {_fmt(r['nfe_mean'], '.1f')} "
                 f"[{r['nfe_min']}, {r['nfe_max']}]; {r['num_failed']} failed solves{reused}")
    if r["num_failed"]:
      lines.append(f"  warning: {r['num_failed']} likelihood solve(s) failed (see `status` in "
                   f"{r['per_example_file']}); their examples are left out of the mean. Raise "
                   "config.eval.bpd.max_steps or loosen rtol/atol.")
  if "samples" in record:
    r = record["samples"]
    options = ", ".join(f"{k}={v}" for k, v in r["sampler"]["options"].items())
    reused = f", {r['reused_shards']} of {r['num_shards']} shards reused" if r["reused_shards"] else ""
    lines.append(f"  samples: {r['num_samples']} x {tuple(r['shape'])} with {r['sampler']['method']} ({options}), "
                 f"NFE {_fmt(r['nfe_mean'], '.1f')} per sample{reused}, in {r['directory']}")
    if r.get("num_failed_shards"):
      lines.append(f"  warning: {r['num_failed_shards']} shard(s) report a sampler failure (status != 0).")
    if r.get("num_nonfinite"):
      lines.append(f"  warning: {r['num_nonfinite']} of {r['num_samples']} samples hold NaN or infinite values; they "
                   "are left out of the quality metrics. Check the sampler's settings and the checkpoint.")
  if "digits" in record:
    r, real = record["digits"], record["digits"]["real_data"]
    matched = (f" (first {r['fd_matched_num_examples']} samples: {_fmt(r['fd_matched'])})"
               if r["fd_matched_num_examples"] < r["num_examples"] else "")

    def scores(q):
      return (f"confidence {_fmt(q['mean_confidence'], '.3f')}, class entropy {_fmt(q['class_entropy'], '.3f')} "
              f"nats, classifier score {_fmt(q['classifier_score'], '.3f')}")

    left_out = f" ({r['num_nonfinite_samples']} non-finite samples left out)" if r.get("num_nonfinite_samples") else ""
    lines.append(f"  digits metric: FD {_fmt(r['fd'])}{matched}, {scores(r)}{left_out}")
    lines.append(f"    real {real['split']} digits ({real['num_examples']}): FD {_fmt(real['fd'])}, {scores(real)}")
  if "fid" in record:
    r = record["fid"]
    kid = f", KID {_fmt(r['kid'])} ± {_fmt(r['kid_std'], '.2g')}" if "kid" in r else ""
    left_out = f", {r['num_nonfinite_samples']} non-finite left out" if r.get("num_nonfinite_samples") else ""
    lines.append(f"  FID {_fmt(r['fid'])}, IS {_fmt(r['inception_score'])} ± {_fmt(r['inception_score_std'], '.2g')}"
                 f"{kid} ({r['num_samples']} samples{left_out} vs {r['reference_num_examples']} reference images)")
  return "\n".join(lines)
