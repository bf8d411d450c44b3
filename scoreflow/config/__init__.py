"""The one boundary from an `ml_collections` config to typed objects.

* :mod:`~scoreflow.config.fields`: checked getters (errors name `config.<field>`), configs as flat JSON and their
  differences.
* :mod:`~scoreflow.config.experiment`: the tables from config strings to objects (SDEs, parameterizations, losses,
  samplers), the training run's settings and :func:`build_experiment`, and which fields a resumed run may change.
* :mod:`~scoreflow.config.evaluation`: the `eval` section's defaults (:func:`eval_config`), checked into
  :class:`EvalSettings`, and the fields that define what a checkpoint means.

`run_train.py` and `run_eval.py` call the builders once and pass the typed objects down. Config files
(`configs/*.py`) import :func:`eval_config` from here; the experiment builders (which import the models,
samplers and the train step) are loaded on first use only, so loading a config loads no engine.
"""

from scoreflow.config.evaluation import EvalSettings as EvalSettings
from scoreflow.config.evaluation import build_eval_settings as build_eval_settings
from scoreflow.config.evaluation import eval_config as eval_config
from scoreflow.config.fields import ConfigError as ConfigError
from scoreflow.config.fields import config_to_dict as config_to_dict

_LAZY = {"Experiment": "experiment", "build_experiment": "experiment", "resumable_changes": "experiment",
         "resume_notes": "experiment"}


def __getattr__(name):
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top

    return getattr(importlib.import_module(f"scoreflow.config.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'scoreflow.config' has no attribute {name!r}")
