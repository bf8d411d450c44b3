"""The boundary from an `ml_collections` config to the typed objects of a run, through explicit tables.

:func:`build_experiment` reads a config (see `configs/default.py` for every field) and returns an
:class:`Experiment`: the forward process, the network, the parameterization, the loss, the optimizer, the
sampler for in-training snapshots and the run's settings, all plain Python objects. Nothing else in the library
reads a config. Building touches no device and allocates no array, so a bad config fails at once, before any
data is read or any program is compiled, with a message that names the config field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from scoreflow import sampling
from scoreflow.data.toy import TOY_DATASETS, TOY_NUM_CLASSES
from scoreflow.guidance import classifier_free_score
from scoreflow.models import PRESETS, build_model, init_kwargs, is_classifier
from scoreflow.parameterization import (AbstractParameterization, DataParameterization, EDMPreconditioning,
                                        EpsilonParameterization, NoiseConditioning, ScoreParameterization,
                                        VParameterization, make_conditional_score_fn, make_score_fn)
from scoreflow.sde import VESDE, VPSDE, CosineVPSDE, DDPMChain, SMLDChain, SubVPSDE
from scoreflow.config.fields import ConfigError, config_choice, config_field, config_float, config_int
from scoreflow.train import sharding
from scoreflow.train.state import TrainState, learning_rate_schedule, make_optimizer
from scoreflow.train.step import NONFINITE_POLICIES, make_network

# --- Tables: config strings -> objects. ----------------------------------------------------------------------

# name -> (class, the config.sde fields it takes, with the constructor's argument names).
SDES: dict[str, tuple[type, dict[str, str]]] = {
    "vp": (VPSDE, {"beta_min": "beta_min", "beta_max": "beta_max"}),
    "subvp": (SubVPSDE, {"beta_min": "beta_min", "beta_max": "beta_max"}),
    "ve": (VESDE, {"sigma_min": "sigma_min", "sigma_max": "sigma_max", "ve_kernel": "kernel"}),
    "cosine_vp": (CosineVPSDE, {"cosine_s": "s", "cosine_T": "T"}),
    "ddpm": (DDPMChain, {"beta_min": "beta_min", "beta_max": "beta_max", "num_scales": "num_steps"}),
    "smld": (SMLDChain, {"sigma_min": "sigma_min", "sigma_max": "sigma_max", "num_scales": "num_scales"}),
}
CHAINS = ("ddpm", "smld")

PARAMETERIZATIONS: dict[str, type[AbstractParameterization]] = {
    "score": ScoreParameterization, "eps": EpsilonParameterization, "x0": DataParameterization,
    "v": VParameterization, "edm": EDMPreconditioning,
}

# loss name -> the config.loss fields it takes.
LOSS_FIELDS: dict[str, tuple[str, ...]] = {
    "dsm": ("weighting", "importance_sampling", "reduce_mean", "eps", "t_sampling"),
    "edm": ("p_mean", "p_std", "eps", "reduce_mean"),  # + sigma_data, from config.parameterization.
    "ddpm": ("reduce_mean", "t_sampling"),
    "smld": ("reduce_mean", "t_sampling"),
    "classifier": ("eps",),  # The noise-conditional classifier of classifier guidance (noisy_classifier_loss).
}

# sampling method -> (sampler, the config.sampling fields it takes, with the sampler's argument names).
SAMPLERS: dict[str, tuple[Callable, dict[str, str]]] = {
    "pc": (sampling.pc_sample, {"predictor": "predictor", "corrector": "corrector", "num_steps": "num_steps",
                                "snr": "snr", "n_corrector_steps": "n_corrector_steps", "eps": "eps",
                                "denoise": "denoise"}),
    "ode": (sampling.ode_sample, {"ode_method": "method", "rtol": "rtol", "atol": "atol",
                                  "ode_error_control": "error_control", "eps": "eps", "denoise": "denoise"}),
    "ddim": (sampling.ddim_sample, {"num_steps": "num_steps", "eta": "eta", "eps": "eps"}),
    "edm": (sampling.edm_sample, {"num_steps": "num_steps", "rho": "rho", "s_churn": "s_churn", "s_min": "s_min",
                                  "s_max": "s_max", "s_noise": "s_noise", "eps": "eps"}),
    "dpm_solver": (sampling.dpm_solver_pp_sample, {"num_steps": "num_steps", "dpm_order": "order",
                                                   "dpm_spacing": "spacing", "eps": "eps", "denoise": "denoise"}),
}

# float16 is left out on purpose: without loss scaling its gradients underflow (bfloat16 has float32's range).
COMPUTE_DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}

# Config fields that may change when a run is resumed (everything else must match the workdir's config).
RESUMABLE_CHANGES = ("training.num_train_steps", "training.log_every", "training.checkpoint_every",
                     "training.snapshot_every", "training.sample_every", "training.keep_checkpoints",
                     "training.async_checkpointing", "training.progress_bar", "sampling.", "data.data_dir",
                     "data.read_threads", "data.prefetch_batches", "eval.")


def _decaying_schedule(config) -> str | None:
  schedule = config_field(config, "optim.schedule")
  return None if schedule == "constant" else schedule


def resumable_changes(config) -> tuple[str, ...]:
  """The fields of :data:`RESUMABLE_CHANGES` that `config` lets a resumed run change: all of them, except
  `training.num_train_steps` when the learning rate decays over it (changing it would move the rate of every
  remaining step onto another curve)."""
  if _decaying_schedule(config):
    return tuple(name for name in RESUMABLE_CHANGES if name != "training.num_train_steps")
  return RESUMABLE_CHANGES


def resume_notes(config) -> dict[str, str]:
  """Why a field that cannot change on resume cannot, for the error message (fields not obvious from the name)."""
  schedule = _decaying_schedule(config)
  if not schedule:
    return {}
  return {"training.num_train_steps": f"config.optim.schedule={schedule!r} decays the learning rate over "
                                      "config.training.num_train_steps, so a new value would change the rate of the "
                                      "remaining steps"}


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
  """`config.training`, checked. Intervals are in train steps; 0 disables a periodic action."""

  batch_size: int
  num_train_steps: int
  steps_per_call: int = 1
  ema_rate: float = 0.9999
  ema_warmup: bool = False
  nonfinite: str = "skip"
  compute_dtype: Any = None
  log_every: int = 50
  checkpoint_every: int = 50000
  snapshot_every: int = 10000
  keep_checkpoints: int = 3
  async_checkpointing: bool = True
  sample_every: int = 0
  progress_bar: bool = True
  label_dropout: float = 0.0


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """`config.data`, checked: keyword arguments of :func:`scoreflow.data.make_dataset`."""

  name: str
  split: str = "train"
  data_dir: str | None = None
  image_size: int | None = None
  random_flip: bool = False
  dequantize: bool = False
  scaler: str = "centred"
  read_threads: int = 1
  prefetch_batches: int = 2

  def dataset_kwargs(self) -> dict[str, Any]:
    kwargs = dict(data_dir=self.data_dir, read_threads=self.read_threads, prefetch_batches=self.prefetch_batches)
    if self.name not in TOY_DATASETS:  # Toy streams are already in model space: no image options.
      kwargs.update(image_size=self.image_size, random_flip=self.random_flip, dequantize=self.dequantize,
                    scaler=self.scaler)
    return kwargs


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """`config.sampling`, checked: the sampler, its keyword arguments and the process/parameterization it uses."""

  method: str
  kwargs: Mapping[str, Any]
  num_samples: int
  use_ema: bool = True


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a training run needs, built from a config by :func:`build_experiment`.

  Attributes:
    seed: the run's seed.
    process: the forward process of the loss (an SDE, or a `DDPMChain` / `SMLDChain`).
    model: the Flax module.
    parameterization: what the network predicts, with its noise conditioning (for a chain: the equivalent
      continuous parameterization used to sample it).
    sampling_sde: the continuous SDE that in-training samples are drawn from.
    loss, loss_kwargs: the loss name (`"dsm"`, `"edm"`, `"ddpm"`, `"smld"`) and its keyword arguments.
    compute_dtype: forward-pass dtype cast by the train step for models without a `dtype` field, else None.
    optimizer, learning_rate_fn: the optax transformation and its learning-rate schedule.
    training, data, sampler: the run's settings.
    num_classes: `config.model.num_classes`: the classes of a class-conditional score network (0: unconditional;
      the null class is `num_classes`), or the logits of a noise-conditional classifier (`loss="classifier"`).
    label_dropout: `config.training.label_dropout`, the probability in [0, 1) of training a label as the null
      class (classifier-free guidance).
  """

  seed: int
  process: Any
  model: Any
  parameterization: AbstractParameterization
  sampling_sde: Any
  loss: str
  loss_kwargs: Mapping[str, Any]
  compute_dtype: Any
  optimizer: optax.GradientTransformation
  learning_rate_fn: Callable
  training: TrainingSettings
  data: DataSettings
  sampler: SamplerSettings
  num_classes: int = 0
  label_dropout: float = 0.0

  @property
  def is_classifier(self) -> bool:
    """Whether the run trains a noise-conditional classifier (no samples) rather than a score network."""
    return self.loss == "classifier"

  @property
  def is_conditional(self) -> bool:
    """Whether the run trains a class-conditional score network (`num_classes > 0`)."""
    return self.num_classes > 0 and not self.is_classifier

  def _check_score_model(self, method: str) -> None:
    if self.is_classifier:
      raise ValueError(f"Experiment.{method}: this run trains a noise-conditional classifier "
                       "(config.loss.name='classifier'), which draws no samples; guide a score model with it through "
                       "scoreflow.parameterization.make_classifier_log_prob_fn and guidance.classifier_guided_score.")

  def _run_sampler(self, key, shape, score_fn):
    method, fields = self.sampler.method, self.sampler.kwargs
    return SAMPLERS[method][0](key, self.sampling_sde, score_fn, shape, **fields)

  def make_sample_fn(self) -> Callable:
    """`sample(key, params, shape) -> (x [N, *D], info)`: samples with the config's sampler (pure; jit it).

    A class-conditional model (`num_classes > 0`) samples its unconditional score, the null class `num_classes`,
    which label dropout trained; use :meth:`make_conditional_sample_fn` for classes.

    Raises:
      ValueError: for a classifier run, or a class-conditional model trained without label dropout (its null class
        was never trained).
    """
    self._check_score_model("make_sample_fn")
    if self.is_conditional and self.label_dropout == 0:
      raise ValueError(f"Experiment.make_sample_fn: this class-conditional model (num_classes={self.num_classes}) was "
                       "trained with config.training.label_dropout=0, so its null class (unconditional) is untrained; "
                       "sample classes with make_conditional_sample_fn(guidance_scale=0.0).")

    def sample(key, params, shape):
      network = make_network(self.model.apply, train=False)
      label = jnp.full(shape[:1], self.num_classes, jnp.int32) if self.is_conditional else None
      score_fn = make_score_fn(network, params, self.sampling_sde, self.parameterization, label=label)
      return self._run_sampler(key, shape, score_fn)

    return sample

  def make_conditional_sample_fn(self, guidance_scale) -> Callable:
    r"""`sample(key, params, shape, labels [N]) -> (x [N, *D], info)`: class-conditional samples with the config's
    sampler from the classifier-free guided score (Ho & Salimans 2022)

    .. math:: \tilde s = (1 + w)\,s_\theta(x, t \mid y) - w\,s_\theta(x, t \mid \varnothing),

    :func:`scoreflow.guidance.classifier_free_score` of :func:`scoreflow.make_conditional_score_fn` with
    `null_label=num_classes`. Pure; jit it (the labels are an argument, so one program serves every class).

    Args:
      guidance_scale: :math:`w \ge 0`, a scalar or `[N]`; 0 samples the plain conditional score.

    Raises:
      ValueError: for an unconditional model (`num_classes == 0`) or a classifier run; when called, labels that are
        not int `[N]`.
    """
    self._check_score_model("make_conditional_sample_fn")
    if not self.is_conditional:
      raise ValueError("Experiment.make_conditional_sample_fn: the model is unconditional (config.model.num_classes=0);"
                       " train a class-conditional one (config.model.num_classes > 0), or use make_sample_fn.")

    def sample(key, params, shape, labels):
      labels = jnp.asarray(labels)
      if not jnp.issubdtype(labels.dtype, jnp.integer) or labels.shape != tuple(shape[:1]):
        raise ValueError(f"conditional sample: labels must be integers of shape [N] = {tuple(shape[:1])}, got dtype "
                         f"{labels.dtype} and shape {labels.shape}.")
      network = make_network(self.model.apply, train=False)
      cond_score_fn = make_conditional_score_fn(network, params, self.sampling_sde, self.parameterization)
      score_fn = classifier_free_score(cond_score_fn, labels, guidance_scale, null_label=self.num_classes)
      return self._run_sampler(key, shape, score_fn)

    return sample

  def init_train_state(self, element_shape: tuple[int, ...], key) -> TrainState:
    """A fresh TrainState: parameters from `model.init` on a zero batch of one `element_shape` example (with the
    null label for a class-conditional network), the optimizer's state and the state's RNG, from the two halves of
    `key`."""
    init_key, state_key = jax.random.split(key)
    x = jnp.zeros((1, *element_shape), jnp.float32)
    params = self.model.init({"params": init_key}, x, jnp.zeros((1,), jnp.float32), train=False,
                             **init_kwargs(self.model, 1))["params"]
    return TrainState.create(params, self.optimizer, state_key)

  def abstract_train_state(self, element_shape: tuple[int, ...], mesh) -> TrainState:
    """The shapes and dtypes of :meth:`init_train_state`, replicated over `mesh` (nothing is computed): the
    target that checkpoints restore into."""
    replicated = sharding.replicated(mesh)
    shapes = jax.eval_shape(lambda: self.init_train_state(element_shape, jax.random.key(0)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), shapes)


def _built(what: str, build: Callable):
  """Calls `build()`, prefixing a constructor's ValueError with the config section it came from."""
  try:
    return build()
  except ConfigError:
    raise
  except (ValueError, TypeError) as error:
    raise ConfigError(f"{what}: {error}") from None


def build_process(config):
  """The forward process of `config.sde` through :data:`SDES`."""
  name = config_choice(config, "sde.name", SDES)
  cls, fields = SDES[name]
  kwargs = {argument: config_field(config, f"sde.{field}") for field, argument in fields.items()}
  return _built(f"config.sde ({cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}))",
                lambda: cls(**kwargs))


def build_sampling_sde(config, process):
  """The continuous SDE to sample from: the process itself, or the SDE a chain discretizes."""
  del config
  return process.continuous_sde


def build_training(config) -> TrainingSettings:
  steps_per_call = config_int(config, "training.steps_per_call", 1)
  settings = {"steps_per_call": steps_per_call}
  settings["batch_size"] = config_int(config, "training.batch_size", 1)
  settings["num_train_steps"] = config_int(config, "training.num_train_steps", 1)
  for name in ("log_every", "checkpoint_every", "snapshot_every", "sample_every"):
    settings[name] = config_int(config, f"training.{name}", 0)
  for name in ("num_train_steps", "log_every", "checkpoint_every", "snapshot_every", "sample_every"):
    if settings[name] % steps_per_call:
      raise ConfigError(f"config.training.{name}={settings[name]} must be a multiple of "
                        f"config.training.steps_per_call={steps_per_call} (steps run {steps_per_call} per call).")
  if settings["log_every"] == 0:
    raise ConfigError("config.training.log_every must be >= 1, got 0.")
  settings["keep_checkpoints"] = config_int(config, "training.keep_checkpoints", 1)
  settings["ema_rate"] = config_float(config, "training.ema_rate", 0.0, 1.0, high_open=True)
  settings["ema_warmup"] = bool(config_field(config, "training.ema_warmup"))
  settings["nonfinite"] = config_choice(config, "training.nonfinite", NONFINITE_POLICIES)
  settings["compute_dtype"] = COMPUTE_DTYPES[config_choice(config, "training.compute_dtype", COMPUTE_DTYPES)]
  settings["async_checkpointing"] = bool(config_field(config, "training.async_checkpointing"))
  settings["progress_bar"] = bool(config_field(config, "training.progress_bar"))
  settings["label_dropout"] = config_float(config, "training.label_dropout", 0.0, 1.0, high_open=True)
  return TrainingSettings(**settings)


def build_data(config) -> DataSettings:
  name = config_field(config, "data.name")
  if not isinstance(name, str) or not name:
    raise ConfigError(f"config.data.name must name a dataset (a toy density, 'digits', or a tfds name), "
                      f"got {name!r}.")
  split = config_field(config, "data.split")
  image_size = config_int(config, "data.image_size", 0, "(0 keeps the dataset's size)")
  scaler = config_choice(config, "data.scaler", ("centred", "centered", "unit_interval"))
  return DataSettings(name=name, split=split, data_dir=config_field(config, "data.data_dir") or None,
                      image_size=image_size or None, random_flip=bool(config_field(config, "data.random_flip")),
                      dequantize=bool(config_field(config, "data.dequantize")), scaler=scaler,
                      read_threads=config_int(config, "data.read_threads", 0),
                      prefetch_batches=config_int(config, "data.prefetch_batches", 0))


def build_model_from_config(config, compute_dtype):
  """The network of `config.model` (a preset name plus overrides), in `compute_dtype` when it takes a dtype."""
  spec = dict(config_field(config, "model"))
  preset = spec.get("preset")
  if preset is not None and preset not in PRESETS:
    raise ConfigError(f"config.model.preset must be one of {sorted(PRESETS)} (or None with config.model."
                      f"architecture set), got {preset!r}.")
  if preset is None:
    spec.pop("preset", None)
  model = _built("config.model", lambda: build_model(spec))
  if compute_dtype is not None and any(f.name == "dtype" for f in dataclasses.fields(model)):
    return model.clone(dtype=compute_dtype), None
  return model, compute_dtype


def build_parameterization(config, model, process) -> AbstractParameterization:
  """`config.parameterization.name` through :data:`PARAMETERIZATIONS`, with the noise conditioning the model
  was built for (`model.noise_conditioning`)."""
  name = config_choice(config, "parameterization.name", PARAMETERIZATIONS)
  if name == "edm":
    return _built("config.parameterization",
                  lambda: EDMPreconditioning(sigma_data=config_float(config, "parameterization.sigma_data", 0.0,
                                                                     low_open=True)))
  target = process.network_target
  if target is not None and name != target:
    what = {"eps": "a noise predictor", "score": "a score network"}[target]
    raise ConfigError(f"config.parameterization.name must be {target!r} for the {process.chain_loss.upper()} chain "
                      f"(its loss trains {what}), got {name!r}.")
  kind = getattr(model, "noise_conditioning", "time")
  num_steps = config_field(config, "sde.num_scales")
  scale = config_float(config, "parameterization.time_scale", 0.0, low_open=True)
  conditioning = _built("config.parameterization",
                        lambda: NoiseConditioning(kind, scale=scale, num_steps=num_steps))
  return PARAMETERIZATIONS[name](conditioning=conditioning)


def build_loss(config, sde_name: str, process):
  name = config_choice(config, "loss.name", LOSS_FIELDS)
  if name in ("dsm", "edm") and sde_name in CHAINS:
    raise ConfigError(f"config.loss.name={name!r} is a continuous-time loss but config.sde.name={sde_name!r} is a "
                      f"discrete chain; use config.loss.name={sde_name!r}, or a continuous SDE (vp, subvp, ve, "
                      "cosine_vp).")
  if name == "classifier" and sde_name in CHAINS:
    raise ConfigError(f"config.loss.name='classifier' trains a noise-conditional classifier on a continuous SDE's "
                      f"marginals, but config.sde.name={sde_name!r} is a discrete chain; use vp, subvp, ve or "
                      "cosine_vp.")
  if name in CHAINS and sde_name != name:
    raise ConfigError(f"config.loss.name={name!r} trains the {name.upper()} chain and needs config.sde.name="
                      f"{name!r}, got {sde_name!r}.")
  kwargs = {field: config_field(config, f"loss.{field}") for field in LOSS_FIELDS[name]}
  if name == "edm":  # One sigma_data: the data scale the preconditioning assumes is the one the loss weights by.
    kwargs["sigma_data"] = config_float(config, "parameterization.sigma_data", 0.0, low_open=True)
  if name == "dsm":
    if kwargs["weighting"] not in ("sigma2", "likelihood"):
      raise ConfigError(f"config.loss.weighting must be 'sigma2' or 'likelihood', got {kwargs['weighting']!r}.")
    if kwargs["importance_sampling"] and kwargs["weighting"] != "likelihood":
      raise ConfigError("config.loss.importance_sampling=True needs config.loss.weighting='likelihood', got "
                        f"{kwargs['weighting']!r}.")
  if "eps" in kwargs and not 0 < kwargs["eps"] < process.T:
    raise ConfigError(f"config.loss.eps must lie in (0, T={process.T}), got {kwargs['eps']!r}.")
  if "t_sampling" in kwargs and kwargs["t_sampling"] not in ("iid", "stratified", "antithetic"):
    raise ConfigError("config.loss.t_sampling must be 'iid', 'stratified' or 'antithetic', got "
                      f"{kwargs['t_sampling']!r}.")
  return name, kwargs


def build_optimizer(config, num_train_steps: int):
  optimizer = config_choice(config, "optim.optimizer", ("adam", "adamw"))
  kwargs = dict(learning_rate=config_float(config, "optim.learning_rate", 0.0, low_open=True),
                b1=config_float(config, "optim.b1", 0.0, 1.0, high_open=True),
                b2=config_float(config, "optim.b2", 0.0, 1.0, high_open=True),
                eps=config_float(config, "optim.eps", 0.0),
                weight_decay=config_float(config, "optim.weight_decay", 0.0),
                grad_clip=config_float(config, "optim.grad_clip", 0.0) or None,
                warmup_steps=config_int(config, "optim.warmup_steps", 0),
                schedule=config_choice(config, "optim.schedule", ("constant", "cosine", "linear")),
                final_lr_ratio=config_float(config, "optim.final_lr_ratio", 0.0, 1.0))
  if optimizer == "adam" and kwargs["weight_decay"]:
    raise ConfigError(f"config.optim.weight_decay={kwargs['weight_decay']} needs config.optim.optimizer='adamw' "
                      "(Adam has no decoupled weight decay).")
  if kwargs["schedule"] != "constant" and num_train_steps <= kwargs["warmup_steps"]:
    raise ConfigError(f"config.optim.schedule={kwargs['schedule']!r} decays after the warm-up and needs "
                      f"config.training.num_train_steps > config.optim.warmup_steps={kwargs['warmup_steps']}.")
  schedule_kwargs = {k: kwargs[k] for k in ("warmup_steps", "schedule", "final_lr_ratio")}
  tx = _built("config.optim", lambda: make_optimizer(optimizer=optimizer, total_steps=num_train_steps, **kwargs))
  rate = learning_rate_schedule(kwargs["learning_rate"], total_steps=num_train_steps, **schedule_kwargs)
  return tx, rate


def build_sampler(config, sampling_sde) -> SamplerSettings:
  method = config_choice(config, "sampling.method", SAMPLERS)
  fields = SAMPLERS[method][1]
  kwargs = {argument: config_field(config, f"sampling.{field}") for field, argument in fields.items()}
  if method == "pc":
    if kwargs["predictor"] not in sampling.PREDICTORS:
      raise ConfigError(f"config.sampling.predictor must be one of {sorted(sampling.PREDICTORS)}, got "
                        f"{kwargs['predictor']!r}.")
    if kwargs["corrector"] not in sampling.CORRECTORS:
      raise ConfigError(f"config.sampling.corrector must be one of {sorted(sampling.CORRECTORS)}, got "
                        f"{kwargs['corrector']!r}.")
  if "num_steps" in kwargs and (not isinstance(kwargs["num_steps"], int) or kwargs["num_steps"] < 1):
    raise ConfigError(f"config.sampling.num_steps must be an integer >= 1, got {kwargs['num_steps']!r}.")
  if "eps" in kwargs and not 0 < kwargs["eps"] < sampling_sde.T:
    raise ConfigError(f"config.sampling.eps must lie in (0, T={sampling_sde.T}), got {kwargs['eps']!r}.")
  return SamplerSettings(method=method, kwargs=kwargs, num_samples=config_int(config, "sampling.num_samples", 1),
                         use_ema=bool(config_field(config, "sampling.use_ema")))


def build_classes(model, loss: str, data: DataSettings, training: TrainingSettings) -> int:
  """`config.model.num_classes`, checked against the loss, the label dropout and the dataset's labels."""
  num_classes = int(getattr(model, "num_classes", 0))
  classifier = is_classifier(model)
  if loss == "classifier" and not classifier:
    raise ConfigError("config.loss.name='classifier' trains a noise-conditional classifier and needs "
                      "config.model.architecture='classifier' (e.g. config.model = model_config('classifier_digits')), "
                      f"got a {type(model).__name__}.")
  if classifier and loss != "classifier":
    raise ConfigError(f"config.model is a noise-conditional classifier, which config.loss.name={loss!r} cannot train "
                      "(it outputs logits, not a score); set config.loss.name='classifier'.")
  if training.label_dropout > 0 and (num_classes == 0 or classifier):
    raise ConfigError(f"config.training.label_dropout={training.label_dropout} drops labels to the null class of a "
                      "class-conditional score network and needs config.model.num_classes > 0 (and a score loss); "
                      "set it to 0.0.")
  known = TOY_NUM_CLASSES.get(data.name)
  if known is not None and num_classes > 0 and num_classes < known:
    raise ConfigError(f"config.model.num_classes={num_classes} is smaller than the {known} classes (labels "
                      f"0..{known - 1}) of the toy dataset {data.name!r}; set config.model.num_classes={known}.")
  if known == 1 and num_classes > 0:
    raise ConfigError(f"the toy dataset {data.name!r} has no classes (every label is 0), so config.model.num_classes="
                      f"{num_classes} would train nothing conditional; use eight_gaussians or gaussian_mixture, or 0.")
  return num_classes


def build_experiment(config) -> Experiment:
  """Checks `config` and builds every object of a training run (no device work, no data access).

  Raises:
    ConfigError (a ValueError): naming the first bad field, what it holds and what would fix it.
  """
  seed = config_int(config, "seed", 0)
  training = build_training(config)
  data = build_data(config)
  process = build_process(config)
  sde_name = config_field(config, "sde.name")
  sampling_sde = build_sampling_sde(config, process)
  model, compute_dtype = build_model_from_config(config, training.compute_dtype)
  parameterization = build_parameterization(config, model, process)
  loss, loss_kwargs = build_loss(config, sde_name, process)
  num_classes = build_classes(model, loss, data, training)
  optimizer, rate = build_optimizer(config, training.num_train_steps)
  sampler = build_sampler(config, sampling_sde)
  return Experiment(seed=seed, process=process, model=model, parameterization=parameterization,
                    sampling_sde=sampling_sde, loss=loss, loss_kwargs=loss_kwargs, compute_dtype=compute_dtype,
                    optimizer=optimizer, learning_rate_fn=rate, training=training, data=data, sampler=sampler,
                    num_classes=num_classes, label_dropout=training.label_dropout)
