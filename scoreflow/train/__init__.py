"""Training: the train state, one pure sharded train step, Orbax checkpoints and the training loop.

Modules: :mod:`~scoreflow.train.state` (TrainState, optimizer, EMA), :mod:`~scoreflow.train.step` (objective and
train step), :mod:`~scoreflow.train.sharding` (mesh, multi-host batches), :mod:`~scoreflow.train.checkpoint`
(Orbax), :mod:`~scoreflow.train.loop`
(`train_and_evaluate`), :mod:`~scoreflow.train.visualize` (sample grids, loss curve). The config boundary
(`build_experiment`, `Experiment`, `ConfigError`) lives in :mod:`scoreflow.config` and is re-exported here.
"""

from scoreflow.config.fields import ConfigError as ConfigError
from scoreflow.train.checkpoint import CheckpointError as CheckpointError
from scoreflow.train.checkpoint import Checkpointer as Checkpointer
from scoreflow.train.sharding import global_batch as global_batch
from scoreflow.train.sharding import initialize_distributed as initialize_distributed
from scoreflow.train.sharding import jit_train_step as jit_train_step
from scoreflow.train.sharding import make_mesh as make_mesh
from scoreflow.train.state import TrainState as TrainState
from scoreflow.train.state import ema_decay as ema_decay
from scoreflow.train.state import learning_rate_schedule as learning_rate_schedule
from scoreflow.train.state import make_optimizer as make_optimizer
from scoreflow.train.state import update_ema as update_ema
from scoreflow.train.step import make_network as make_network
from scoreflow.train.step import make_objective as make_objective
from scoreflow.train.step import make_train_step as make_train_step

_LAZY = {"Experiment": "scoreflow.config.experiment", "build_experiment": "scoreflow.config.experiment",
         "train_and_evaluate": "scoreflow.train.loop"}


def __getattr__(name):
  # Loaded on first use: scoreflow.config.experiment itself imports this package's state, step and sharding.
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top

    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'scoreflow.train' has no attribute {name!r}")
