"""Every sampler of scoreflow.sampling is reachable from config.sampling.method with its options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy_2d
from scoreflow.config import experiment as config_lib


# dpm_solver: 8 steps + the final denoising step the toy config asks for (sampling.denoise).
@pytest.mark.parametrize("method,expected_nfe", [("pc", 9), ("ode", None), ("ddim", 8), ("edm", 15),
                                                 ("dpm_solver", 9)])
def test_config_sampling_methods_build_and_run(method, expected_nfe):
  config = toy_2d.get_config()
  config.sampling.method = method
  config.sampling.num_steps = 8
  config.sampling.predictor, config.sampling.corrector = "euler_maruyama", "none"
  experiment = config_lib.build_experiment(config)
  settings = experiment.sampler
  assert settings.method == method
  sde = experiment.sampling_sde
  # The exact score of N(0, I) data under any process: -x / (alpha^2 + sigma^2).
  score_fn = lambda x, t: -x / (sde.alpha(t) ** 2 + sde.sigma(t) ** 2)[:, None]
  x, info = config_lib.SAMPLERS[method][0](jax.random.key(0), sde, score_fn, (4, 2), **settings.kwargs)
  assert x.shape == (4, 2) and bool(jnp.all(jnp.isfinite(x)))
  if expected_nfe is not None:
    assert int(info.nfe) == expected_nfe


def test_unknown_sampling_method_names_the_field():
  config = toy_2d.get_config()
  config.sampling.method = "heun"
  with pytest.raises(config_lib.ConfigError, match=r"config.sampling.method must be one of .*'dpm_solver'.*got 'heun'"):
    config_lib.build_experiment(config)


# --- config.loss -> the loss: every field reaches it (issue 15, item 5). ---------------------------------------

DSM_FIELDS = dict(weighting="likelihood", importance_sampling=True, reduce_mean=False, eps=1e-3,
                  t_sampling="stratified")  # Every field off its default (sigma2, False, True, 1e-5, iid).
EDM_FIELDS = dict(p_mean=0.3, p_std=0.5, sigma_data=0.7, eps=1e-3, reduce_mean=False)  # (-1.2, 1.2, 0.5, 1e-5, True)


def _toy_config(name, fields):
  from configs import default
  config = toy_2d.get_config()
  config.model = default.model_config("mlp_toy", width=16, depth=1, embedding_dim=16)
  config.loss.name = name
  for field, value in fields.items():
    # sigma_data has one home: the preconditioning's data scale is the one the EDM loss weights by.
    section = config.parameterization if field == "sigma_data" else config.loss
    section[field] = value
  return config


@pytest.mark.parametrize("name, fields", [("dsm", DSM_FIELDS), ("edm", EDM_FIELDS)])
def test_each_config_loss_field_reaches_loss_kwargs(name, fields):
  """Changing one config.loss field changes exactly that keyword of the loss (and only the loss's fields go)."""
  defaults = config_lib.build_experiment(_toy_config(name, {})).loss_kwargs
  assert set(defaults) == set(fields)
  for field, value in fields.items():
    experiment = config_lib.build_experiment(_toy_config(name, {field: value} | (
        {"weighting": "likelihood"} if field == "importance_sampling" else {})))
    assert experiment.loss == name and experiment.loss_kwargs[field] == value and value != defaults[field]


@pytest.mark.parametrize("name, fields", [("dsm", DSM_FIELDS), ("edm", EDM_FIELDS)])
def test_objective_of_the_config_is_the_loss_called_by_hand(name, fields):
  """make_objective(**build_experiment(config).loss_kwargs) equals sf.dsm_loss / sf.edm_loss called by hand with
  the config's fields and an SDE built from its numbers, and differs from the default config's objective."""
  import scoreflow as sf
  from scoreflow.train.step import make_objective

  experiment = config_lib.build_experiment(_toy_config(name, fields))
  model = experiment.model
  x0 = jax.random.normal(jax.random.key(1), (64, 2), jnp.float32)
  params = model.init(jax.random.key(0), x0, jnp.zeros((64,), jnp.float32), train=False)["params"]
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape, p.dtype), params)
  key = jax.random.key(3)

  def objective_value(experiment):
    objective = make_objective(model.apply, experiment.process, parameterization=experiment.parameterization,
                               loss=experiment.loss, compute_dtype=experiment.compute_dtype,
                               **experiment.loss_kwargs)
    return float(objective(params, key, x0)[0])

  config = toy_2d.get_config()
  sde = sf.VPSDE(beta_min=config.sde.beta_min, beta_max=config.sde.beta_max)
  key_loss, key_dropout = jax.random.split(key)  # make_objective's split.
  network = lambda p, x, cond: model.apply({"params": p}, x, cond, train=True, rngs={"dropout": key_dropout})
  score_fn = sf.make_score_fn(network, params, sde, experiment.parameterization)
  loss_fn = {"dsm": sf.dsm_loss, "edm": sf.edm_loss}[name]
  expected = float(loss_fn(key_loss, x0, score_fn, sde, **fields)[0])
  value = objective_value(experiment)
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  default_value = objective_value(config_lib.build_experiment(_toy_config(name, {})))
  assert abs(value - default_value) > 1e-2 * abs(default_value), (value, default_value)


def test_one_sigma_data_for_the_edm_preconditioning_and_loss():
  """config.parameterization.sigma_data is the only sigma_data: the EDM preconditioning and the EDM loss's weighting
  read the same number (a separate loss.sigma_data could silently disagree with it)."""
  config = _toy_config("edm", {"sigma_data": 0.7})
  config.parameterization.name = "edm"
  experiment = config_lib.build_experiment(config)
  assert float(experiment.parameterization.sigma_data) == experiment.loss_kwargs["sigma_data"] == 0.7
  assert "sigma_data" not in config.loss


def test_runs_saved_before_a_field_was_added_or_retired_still_match():
  """A config.json written before sde.ve_kernel existed (and with the retired loss.sigma_data) matches today's
  config at the added field's old meaning, and differs when the new field takes another value."""
  from scoreflow.config.fields import config_differences, config_to_dict

  new = config_to_dict(toy_2d.get_config())
  old = config_to_dict(toy_2d.get_config())
  del old["sde"]["ve_kernel"]
  old["loss"]["sigma_data"] = 0.5
  assert config_differences(old, new) == {}
  new["sde"]["ve_kernel"] = "reference"
  assert config_differences(old, new) == {"sde.ve_kernel": ("exact", "reference")}
  new["sde"]["beta_max"] = 10.0  # Ordinary fields still differ.
  assert set(config_differences(old, new)) == {"sde.ve_kernel", "sde.beta_max"}
