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
from scoreflow.data.toy import TOY_DATASETS
from scoreflow.models import PRESETS, build_model
from scoreflow.parameterization import (AbstractParameterization, DataParameterization, EDMPreconditioning,
                                        EpsilonParameterization, NoiseConditioning, ScoreParameterization,
                                        VParameterization, make_score_fn)
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

  def make_sample_fn(self) -> Callable:
    """`sample(key, params) -> (x [N, *D], info)` for a given data shape (pure; jit it)."""
    method, fields = self.sampler.method, self.sampler.kwargs
    sampler = SAMPLERS[method][0]

    def sample(key, params, shape):
      network = make_network(self.model.apply, train=False)
      score_fn = make_score_fn(network, params, self.sampling_sde, self.parameterization)
      return sampler(key, self.sampling_sde, score_fn, shape, **fields)

    return sample

  def init_train_state(self, element_shape: tuple[int, ...], key) -> TrainState:
    """A fresh TrainState: parameters from `model.init` on a zero batch of one `element_shape` example, the
    optimizer's state and the state's RNG, from the two halves of `key`."""
    init_key, state_key = jax.random.split(key)
    x = jnp.zeros((1, *element_shape), jnp.float32)
    params = self.model.init({"params": init_key}, x, jnp.zeros((1,), jnp.float32), train=False)["params"]
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
  optimizer, rate = build_optimizer(config, training.num_train_steps)
  sampler = build_sampler(config, sampling_sde)
  return Experiment(seed=seed, process=process, model=model, parameterization=parameterization,
                    sampling_sde=sampling_sde, loss=loss, loss_kwargs=loss_kwargs, compute_dtype=compute_dtype,
                    optimizer=optimizer, learning_rate_fn=rate, training=training, data=data, sampler=sampler)
