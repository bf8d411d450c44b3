"""Small helpers shared by the training tests: a tiny Flax score network and a ready-made train step."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import scoreflow as sf
from scoreflow.train import state as state_lib
from scoreflow.train import step as step_lib


class TinyNet(nn.Module):
  """`[B, *D] x [B] -> [B, *D]`: one hidden layer on the flattened input and a scalar conditioning feature."""

  features: int = 16
  dropout: float = 0.0
  dtype: object = None

  @nn.compact
  def __call__(self, x, cond, train: bool = False):
    batch = x.shape[0]
    cond = jnp.broadcast_to(jnp.asarray(cond, x.dtype), (batch,))
    h = jnp.concatenate([x.reshape(batch, -1), jnp.log1p(jnp.abs(cond))[:, None]], axis=1)
    h = nn.swish(nn.Dense(self.features, dtype=self.dtype)(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.Dense(x[0].size, dtype=self.dtype)(h).reshape(x.shape)


def init_params(model, shape, dtype=jnp.float32, seed=0):
  x = jnp.zeros(shape, dtype)
  params = model.init(jax.random.key(seed), x, jnp.zeros(shape[:1], dtype))["params"]
  return jax.tree.map(lambda a: a.astype(dtype), params)


def tiny_setup(shape=(8, 2), dtype=jnp.float32, *, dropout=0.0, loss="dsm", steps_per_call=1, nonfinite="skip",
               learning_rate=1e-2, compute_dtype=None, ema_rate=0.9):
  """Returns `(state, train_step, optimizer)` for a tiny network on a VP SDE (or the chain that fits `loss`)."""
  model = TinyNet(dropout=dropout)
  params = init_params(model, shape, dtype)
  optimizer = state_lib.make_optimizer(learning_rate, warmup_steps=3, grad_clip=1.0)
  process = {"dsm": sf.VPSDE(), "edm": sf.VPSDE(), "ddpm": sf.DDPMChain(num_steps=100),
             "smld": sf.SMLDChain(num_scales=10)}[loss]
  parameterization = sf.EpsilonParameterization() if loss in ("dsm", "edm") else None
  objective = step_lib.make_objective(model.apply, process, parameterization=parameterization, loss=loss,
                                      compute_dtype=compute_dtype)
  train_step = step_lib.make_train_step(objective, optimizer, ema_rate=ema_rate, nonfinite=nonfinite,
                                        steps_per_call=steps_per_call)
  state = state_lib.TrainState.create(params, optimizer, jax.random.key(1))
  return state, train_step, optimizer, objective


def read_checkpoint(workdir, step=None):
  """`(state, meta)` of a checkpoint (`step`, or the newest) as nested dicts of arrays on one local device, whatever
  the device topology that wrote it."""
  import orbax.checkpoint as ocp

  from scoreflow.train import checkpoint

  ckpt = checkpoint.Checkpointer(workdir)
  if step is None:
    _, step = ckpt.latest()
  kind = next(k for k, steps in ckpt.steps().items() if step in steps)
  manager = ckpt.manager(kind)
  metadata = manager.item_metadata(step)["state"]
  metadata = metadata.tree if hasattr(metadata, "tree") else metadata
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
  restored = manager.restore(step, args=args)
  return restored["state"], restored["meta"]


def save_fresh_run(workdir, config, element_shape, *, step: int = 1, seed: int = 0, perturb: float = 0.05):
  """A workdir whose checkpoint `step` holds a freshly initialised state of `config`'s experiment, every parameter
  perturbed by `perturb` standard normals (so that no zero-initialised output hides a path), with its config.json:
  what `run_eval.py` reads, without training."""
  from scoreflow.config import build_experiment, config_to_dict
  from scoreflow.train import checkpoint

  experiment = build_experiment(config)
  state = experiment.init_train_state(tuple(element_shape), jax.random.key(seed))
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  params = jax.tree.unflatten(tree, [leaf + perturb * jax.random.normal(k, leaf.shape, leaf.dtype)
                                     for leaf, k in zip(leaves, keys)])
  state = state.replace(params=params, ema_params=params, step=jnp.asarray(step, jnp.int32))
  checkpointer = checkpoint.Checkpointer(workdir, async_save=False)
  checkpointer.save(step, state)
  checkpointer.close()
  checkpoint.check_workdir_config(workdir, config_to_dict(config))
  return params
