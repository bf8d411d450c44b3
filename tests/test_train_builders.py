"""Every sampler of scoreflow.sampling is reachable from config.sampling.method with its options."""

import jax
import jax.numpy as jnp
import pytest

from configs import toy_2d
from scoreflow.train import builders


# dpm_solver: 8 steps + the final denoising step the toy config asks for (sampling.denoise).
@pytest.mark.parametrize("method,expected_nfe", [("pc", 9), ("ode", None), ("ddim", 8), ("edm", 15),
                                                 ("dpm_solver", 9)])
def test_config_sampling_methods_build_and_run(method, expected_nfe):
  config = toy_2d.get_config()
  config.sampling.method = method
  config.sampling.num_steps = 8
  config.sampling.predictor, config.sampling.corrector = "euler_maruyama", "none"
  experiment = builders.build_experiment(config)
  settings = experiment.sampler
  assert settings.method == method
  sde = experiment.sampling_sde
  # The exact score of N(0, I) data under any process: -x / (alpha^2 + sigma^2).
  score_fn = lambda x, t: -x / (sde.alpha(t) ** 2 + sde.sigma(t) ** 2)[:, None]
  x, info = builders.SAMPLERS[method][0](jax.random.key(0), sde, score_fn, (4, 2), **settings.kwargs)
  assert x.shape == (4, 2) and bool(jnp.all(jnp.isfinite(x)))
  if expected_nfe is not None:
    assert int(info.nfe) == expected_nfe


def test_unknown_sampling_method_names_the_field():
  config = toy_2d.get_config()
  config.sampling.method = "heun"
  with pytest.raises(builders.ConfigError, match=r"config.sampling.method must be one of .*'dpm_solver'.*got 'heun'"):
    builders.build_experiment(config)
