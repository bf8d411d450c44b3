"""The config's `eval` section: its defaults (:func:`eval_config`), checked into :class:`EvalSettings` once at the
boundary (:func:`build_eval_settings`), and which fields define what a checkpoint's parameters mean
(:data:`MODEL_SECTIONS`, :func:`model_fields`).

The evaluation engine (:mod:`scoreflow.evaluate`) takes the settings, never the config.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from scoreflow.config.fields import (ConfigError, config_choice, config_field, config_float, config_int,
                                     config_to_dict, field_matches, flatten_config)
from scoreflow.data.digits import DIGITS_NAMES
from scoreflow.data.toy import TOY_DATASETS

TASKS = ("bpd", "bound", "samples", "conditional", "inpaint", "colorize", "fid", "digits")
QUALITY = "quality"
# Config fields (a trailing "." takes a whole section) whose change alters what a checkpoint's parameters mean.
MODEL_SECTIONS = ("model.", "sde.", "parameterization.", "data.name", "data.scaler", "data.dequantize",
                  "data.image_size")

def eval_config() -> ml_collections.ConfigDict:
  """The default `config.eval` section: `configs/default.py` sets `config.eval = eval_config()` and lists the
  meaning of every field; the settings classes below document them too."""
  return ml_collections.ConfigDict(dict(
      checkpoints="latest", use_ema=True, tasks="bpd,samples,quality", seed=0, batch_size=128, output_dir="",
      cache_dir="", progress_bar=True, allow_config_mismatch=False, init_from="",
      bpd=dict(split="test", num_examples=0, num_repeats=1, divergence="hutchinson", probe="rademacher",
               num_probes=1, rtol=1e-5, atol=1e-5, eps=1e-5, solver="dopri5", max_steps=4096, per_example=False),
      bound=dict(split="test", num_examples=0, num_samples=8, eps=1e-5, importance_sampling=True, decoder=True,
                 ddpm_estimator="exact", ddpm_variance="beta", ddpm_clip_x0=False),
      samples=dict(num_samples=50000, shard_size=500, grid_size=64),
      conditional=dict(guidance_scales="0,1,3", samples_per_class=100, shard_size=500, grid_columns=10,
                       classifier_workdir=""),
      inverse=dict(split="test", num_examples=0, mask="lower_half", predictor="reverse_diffusion",
                   corrector="langevin", num_steps=500, snr=0.16, n_corrector_steps=1, eps=1e-3, guidance="none",
                   guidance_scale=1.0, data_std=0.5, noise_std=0.0, guidance_t_max=1.0, grid_size=16),
      fid=dict(inception_path="", reference_split="train", reference_num_examples=0, kid_reference_size=10000,
               kid_num_subsets=100, kid_subset_size=1000, is_num_splits=10),
      digits=dict(reference_split="train", classifier_steps=1000, classifier_seed=0),
  ))


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
class BoundSettings:
  """`config.eval.bound`: the variational bound of the data's NLL in bits/dim. Continuous SDEs: the score-flow
  bound with uniform dequantization and a Gaussian decoder for `[0, eps]` (`num_samples` draws per example,
  `importance_sampling` of t, `decoder`); the DDPM chain: Ho et al.'s VLB with the discretized decoder
  (`ddpm_estimator` "exact" sums every step, "sampled" one random step; `ddpm_variance` "beta" or "beta_tilde";
  `ddpm_clip_x0` clips the implied x0 as Ho et al.'s 3.70 bits/dim did)."""

  split: str
  num_examples: int
  num_samples: int
  eps: float
  importance_sampling: bool
  decoder: bool
  ddpm_estimator: str
  ddpm_variance: str
  ddpm_clip_x0: bool


@dataclasses.dataclass(frozen=True)
class ConditionalSettings:
  """`config.eval.conditional`: `samples_per_class` samples of every class with the sampler of `config.sampling`,
  guided at each of `guidance_scales` w, drawn `shard_size` at a time; a grid of `grid_columns` samples per class;
  on digits, the digits classifier's accuracy on the requested classes. A class-conditional model uses
  classifier-free guidance, `(1 + w) s(x|y) - w s(x)`; an unconditional one the noise-conditional classifier
  trained in `classifier_workdir` (a run of `config.loss.name="classifier"`), `s(x) + (1 + w) grad log p_t(y|x)`:
  the same score for an exact classifier, so w = 0 is the plain conditional in both."""

  guidance_scales: tuple[float, ...]
  samples_per_class: int
  shard_size: int
  grid_columns: int
  classifier_workdir: str = ""


@dataclasses.dataclass(frozen=True)
class InverseSettings:
  """`config.eval.inverse` (the `inpaint` and `colorize` tasks): the split and how many examples (0: all), the
  inpainting `mask` (the region generated: `lower_half`, `right_half`, `centre` or `checkerboard`; the rest is
  observed), the predictor-corrector sampler that completes them (by replacement: observed values are kept
  exactly), inpainting's reconstruction `guidance` (`none`, `pigdm` or `dps`: :func:`scoreflow.masked_inverse_score`
  with `guidance_scale`, `data_std`, `noise_std` and `t_max = guidance_t_max`; colorization is replacement only),
  and the grid's size."""

  split: str
  num_examples: int
  mask: str
  predictor: str
  corrector: str
  num_steps: int
  snr: float
  n_corrector_steps: int
  eps: float
  guidance: str
  guidance_scale: float
  data_std: float
  noise_std: float
  guidance_t_max: float
  grid_size: int

  def sampler_kwargs(self, task: str) -> dict[str, Any]:
    """Keyword arguments of :func:`scoreflow.inpaint_sample` (`task="inpaint"`) or
    :func:`scoreflow.colorize_sample` (`"colorize"`)."""
    kwargs = dict(predictor=self.predictor, corrector=self.corrector, num_steps=self.num_steps, snr=self.snr,
                  n_corrector_steps=self.n_corrector_steps, eps=self.eps)
    if task == "inpaint" and self.guidance != "none":
      kwargs.update(guidance=self.guidance, guidance_scale=self.guidance_scale, data_std=self.data_std,
                    noise_std=self.noise_std, guidance_t_max=self.guidance_t_max)
    return kwargs


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
  `init_from`: evaluate published weights instead of the workdir's checkpoints: a score_sde_pytorch
  `checkpoint_N.pth` or a score_sde (Flax) `checkpoint_N` file or directory, imported for `config.model`
  (:mod:`scoreflow.models.importers`); `use_ema` picks the EMA or the raw weights.
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
  bound: BoundSettings | None = None
  conditional: ConditionalSettings | None = None
  inverse: InverseSettings | None = None
  allow_config_mismatch: bool = False
  init_from: str = ""


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
      raise ConfigError(f"config.eval.tasks: unknown task {name!r} in {tasks!r}; choose from "
                        f"{', '.join(TASKS + (QUALITY,))} (comma-separated).")
  if not names:
    raise ConfigError(f"config.eval.tasks must name at least one of {', '.join(TASKS + (QUALITY,))}, "
                      f"got {tasks!r}.")
  if "fid" in chosen and data_name in TOY_DATASETS:
    raise ConfigError(f"config.eval.tasks: 'fid' needs images, but config.data.name={data_name!r} is a 2-D "
                      "toy density; drop it.")
  if "digits" in chosen and data_name not in DIGITS_NAMES:
    raise ConfigError(f"config.eval.tasks: 'digits' (the digits classifier metric) needs "
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
  _get, _int, _float, _choice = config_field, config_int, config_float, config_choice
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
    raise ConfigError(f"config.eval.bpd.num_examples must be > 0 for the toy density {data_name!r} (an "
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
      raise ConfigError("config.eval.fid.inception_path is empty, but FID/IS/KID (eval.tasks has 'fid' or "
                        f"'quality' on images) need pytorch-fid's Inception-v3 weights. {_INCEPTION_HOWTO}")
    if not os.path.isfile(fid.inception_path):
      raise ConfigError(f"config.eval.fid.inception_path={fid.inception_path!r}: no such file. "
                        f"{_INCEPTION_HOWTO}")
    from scoreflow.evaluate import inception  # pylint: disable=g-import-not-at-top (a header check, but a JAX module)

    try:
      inception.check_fid_inception_file(fid.inception_path)
    except ValueError as error:
      raise ConfigError(f"config.eval.fid.inception_path={fid.inception_path!r}: {error} "
                        f"{_INCEPTION_HOWTO}") from None
  bound = BoundSettings(
      split=str(_get(config, "eval.bound.split")),
      num_examples=_int(config, "eval.bound.num_examples", 0, "(0: all)"),
      num_samples=_int(config, "eval.bound.num_samples", 1), eps=_float(config, "eval.bound.eps", 0.0, low_open=True),
      importance_sampling=bool(_get(config, "eval.bound.importance_sampling")),
      decoder=bool(_get(config, "eval.bound.decoder")),
      ddpm_estimator=_choice(config, "eval.bound.ddpm_estimator", ("exact", "sampled")),
      ddpm_variance=_choice(config, "eval.bound.ddpm_variance", ("beta", "beta_tilde")),
      ddpm_clip_x0=bool(_get(config, "eval.bound.ddpm_clip_x0")))
  if "bound" in tasks and data_name in TOY_DATASETS and bound.num_examples == 0:
    raise ConfigError(f"config.eval.bound.num_examples must be > 0 for the toy density {data_name!r} (an infinite "
                      "stream), e.g. --config.eval.bound.num_examples=4096.")
  conditional = _conditional_settings(config, tasks)
  inverse = _inverse_settings(config, tasks, data_name)
  init_from = str(_get(config, "eval.init_from") or "")
  if init_from and not os.path.exists(init_from):
    raise ConfigError(f"config.eval.init_from={init_from!r}: no such file or directory. Pass a score_sde_pytorch "
                      "checkpoint_N.pth or a score_sde (Flax) checkpoint_N file or directory (README: 'Published "
                      "weights').")
  digits = DigitsSettings(reference_split=str(_get(config, "eval.digits.reference_split")),
                          classifier_steps=_int(config, "eval.digits.classifier_steps", 1),
                          classifier_seed=_int(config, "eval.digits.classifier_seed", 0))
  return EvalSettings(checkpoints=checkpoints, use_ema=bool(_get(config, "eval.use_ema")), tasks=tasks,
                      seed=_int(config, "eval.seed", 0), batch_size=_int(config, "eval.batch_size", 1),
                      output_dir=str(_get(config, "eval.output_dir") or ""),
                      cache_dir=str(_get(config, "eval.cache_dir") or ""),
                      progress_bar=bool(_get(config, "eval.progress_bar")), bpd=bpd, samples=samples, fid=fid,
                      digits=digits, bound=bound, conditional=conditional, inverse=inverse, init_from=init_from,
                      allow_config_mismatch=bool(_get(config, "eval.allow_config_mismatch")))


def _conditional_settings(config, tasks) -> ConditionalSettings:
  text = str(config_field(config, "eval.conditional.guidance_scales"))
  try:
    scales = tuple(float(part) for part in text.split(",") if part.strip())
  except ValueError:
    scales = ()
  if not scales or any(not scale >= 0 for scale in scales):
    raise ConfigError(f"config.eval.conditional.guidance_scales must be comma-separated numbers >= 0 (w of "
                      f"classifier-free guidance, 0: the conditional model alone), got {text!r}.")
  settings = ConditionalSettings(
      guidance_scales=scales, samples_per_class=config_int(config, "eval.conditional.samples_per_class", 1),
      shard_size=config_int(config, "eval.conditional.shard_size", 1),
      grid_columns=config_int(config, "eval.conditional.grid_columns", 1),
      classifier_workdir=str(config_field(config, "eval.conditional.classifier_workdir") or ""))
  num_classes = int(config.model.get("num_classes", 0) or 0) if hasattr(config.model, "get") else 0
  if "conditional" in tasks:
    classifier = settings.classifier_workdir
    if num_classes < 1 and not classifier:
      raise ConfigError("config.eval.tasks has 'conditional', but config.model.num_classes is 0: the model is "
                        "unconditional. Train a class-conditional model (e.g. configs/digits_vp_conditional.py), or "
                        "guide this one with a noise-conditional classifier: --config.eval.conditional."
                        "classifier_workdir=RUN of a run trained with configs/digits_classifier.py.")
    if classifier and not os.path.isfile(os.path.join(classifier, "config.json")):
      raise ConfigError(f"config.eval.conditional.classifier_workdir={classifier!r} holds no config.json: pass the "
                        "--workdir of a run trained with config.loss.name='classifier' (e.g. configs/"
                        "digits_classifier.py).")
    if settings.grid_columns > settings.samples_per_class:
      raise ConfigError(f"config.eval.conditional.grid_columns={settings.grid_columns} exceeds samples_per_class="
                        f"{settings.samples_per_class}; the grid shows that many samples of every class.")
  return settings


def _inverse_settings(config, tasks, data_name) -> InverseSettings:
  from scoreflow.sampling import CORRECTORS, PREDICTORS  # pylint: disable=g-import-not-at-top

  settings = InverseSettings(
      split=str(config_field(config, "eval.inverse.split")),
      num_examples=config_int(config, "eval.inverse.num_examples", 0, "(0: all)"),
      mask=config_choice(config, "eval.inverse.mask", ("lower_half", "right_half", "centre", "checkerboard")),
      predictor=config_choice(config, "eval.inverse.predictor", PREDICTORS),
      corrector=config_choice(config, "eval.inverse.corrector", CORRECTORS),
      num_steps=config_int(config, "eval.inverse.num_steps", 1),
      snr=config_float(config, "eval.inverse.snr", 0.0, low_open=True),
      n_corrector_steps=config_int(config, "eval.inverse.n_corrector_steps", 0),
      eps=config_float(config, "eval.inverse.eps", 0.0, low_open=True),
      guidance=config_choice(config, "eval.inverse.guidance", ("none", "pigdm", "dps")),
      guidance_scale=config_float(config, "eval.inverse.guidance_scale", 0.0),
      data_std=config_float(config, "eval.inverse.data_std", 0.0, low_open=True),
      noise_std=config_float(config, "eval.inverse.noise_std", 0.0),
      guidance_t_max=config_float(config, "eval.inverse.guidance_t_max", 0.0, low_open=True),
      grid_size=config_int(config, "eval.inverse.grid_size", 0, "(0: no grid)"))
  if settings.guidance == "dps" and settings.noise_std == 0:
    raise ConfigError("config.eval.inverse.guidance='dps' needs config.eval.inverse.noise_std > 0 (its likelihood "
                      "is degenerate for an exact observation); set it (e.g. 0.05) or use guidance='pigdm'.")
  for task in ("inpaint", "colorize"):
    if task in tasks and data_name in TOY_DATASETS:
      raise ConfigError(f"config.eval.tasks: {task!r} needs images, but config.data.name={data_name!r} is a 2-D toy "
                        "density; drop it.")
  if "colorize" in tasks and data_name in DIGITS_NAMES:
    raise ConfigError("config.eval.tasks: 'colorize' needs RGB images, but the digits are grey; use 'inpaint'.")
  return settings


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
  raise ConfigError(f"config.eval.checkpoints must be 'latest', 'all', a step ('2000'), a list of steps "
                    f"('1000,3000') or an inclusive range ('1000:5000', '1000:', ':5000'), got {spec!r}.")


def model_fields(config) -> dict[str, Any]:
  """`{"section.field": value}` of the model-defining fields (:data:`MODEL_SECTIONS`) of `config`."""
  return {name: value for name, value in sorted(flatten_config(config_to_dict(config)).items())
          if field_matches(name, MODEL_SECTIONS)}
