r"""The training state as one pytree, the optimizer and the exponential moving average of the parameters.

Everything a run needs to continue exactly where it stopped lives in :class:`TrainState`: the step, the
parameters, their exponential moving average (EMA), the optimizer state, the base PRNG key and the count of
skipped non-finite steps. Per-step randomness is `fold_in(rng, step)`, so the key never changes and a resumed
run draws the same numbers as an uninterrupted one.

The optimizer is Adam or AdamW (optax) after global-norm gradient clipping, with a linear learning-rate warm-up
as in Song et al. (2021): :math:`\eta_n = \eta\min(n/W, 1)` for update `n = 1, 2, ...`, optionally followed by a
cosine or linear decay.

The EMA (Polyak averaging) is :math:`\bar\theta_n = \beta_n\bar\theta_{n-1} + (1-\beta_n)\theta_n` with
:math:`\beta_n = \beta` or, with warm-up, :math:`\beta_n = \min(\beta, (1+n)/(10+n))` (the schedule of
TensorFlow's `ExponentialMovingAverage(num_updates=n)`), which lets early averages forget the initialisation.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import flax.struct
import jax
import jax.numpy as jnp
import optax

Schedule = Literal["constant", "cosine", "linear"]
OptimizerName = Literal["adam", "adamw"]

_OPTIMIZERS = ("adam", "adamw")
_SCHEDULES = ("constant", "cosine", "linear")


class TrainState(flax.struct.PyTreeNode):
  """What a training run carries from step to step; a pytree, so it is jitted, sharded and checkpointed whole.

  Attributes:
    step: `[]` int32, the number of train steps taken (skipped non-finite steps included).
    params: the network parameters (any pytree of float arrays).
    ema_params: their exponential moving average, same structure.
    opt_state: the optax optimizer state.
    rng: `[2]` uint32, raw data of the base PRNG key (see :attr:`key`); constant through training.
    nonfinite_steps: `[]` int32, how many steps had a non-finite loss or gradient and were not applied.
  """

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: optax.OptState
  rng: jax.Array
  nonfinite_steps: jax.Array

  @classmethod
  def create(cls, params, optimizer: optax.GradientTransformation, key) -> "TrainState":
    """A fresh state at step 0 with the EMA equal to (a copy of) the parameters.

    Args:
      params: initial parameters.
      optimizer: the optax transformation whose `init` builds `opt_state`.
      key: the run's base PRNG key (typed `jax.random.key` or raw uint32 key data).

    Returns:
      A `TrainState`. The EMA is a separate buffer, not an alias of `params`: donating aliased buffers
      crashes multi-device CPU programs.
    """
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
      key = jax.random.key_data(key)
    return cls(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
               opt_state=optimizer.init(params), rng=jnp.asarray(key, jnp.uint32),
               nonfinite_steps=jnp.zeros((), jnp.int32))

  @property
  def key(self):
    """The base PRNG key as a typed key."""
    return jax.random.wrap_key_data(self.rng)

  def step_key(self):
    """The key for the current step, `fold_in(key, step)`."""
    return jax.random.fold_in(self.key, self.step)


def learning_rate_schedule(learning_rate: float, *, warmup_steps: int = 0, schedule: Schedule = "constant",
                           total_steps: int | None = None, final_lr_ratio: float = 0.0) -> Callable:
  r"""The learning rate as a function of the optax update count `count = 0, 1, ...`.

  .. math:: \eta(\text{count}) = \eta\,\min\Big(\frac{\text{count}+1}{W}, 1\Big)\,d(\text{count}),

  so the first update already moves (score_sde's :math:`\eta\min(n/W, 1)` with `n = count + 1`); the decay
  :math:`d` is 1 (`"constant"`), or goes from 1 to `final_lr_ratio` over `[W, total_steps]` by a half cosine
  (`"cosine"`) or linearly (`"linear"`).

  Raises:
    ValueError: for a negative rate or warm-up, an unknown schedule, or a decaying schedule without
      `total_steps > warmup_steps`.
  """
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}.")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps!r}.")
  if schedule not in _SCHEDULES:
    raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}.")
  if schedule != "constant" and (total_steps is None or total_steps <= warmup_steps):
    raise ValueError(f"schedule={schedule!r} decays over [warmup_steps, total_steps] and needs total_steps > "
                     f"warmup_steps={warmup_steps}, got total_steps={total_steps!r}.")
  if not 0 <= final_lr_ratio <= 1:
    raise ValueError(f"final_lr_ratio must lie in [0, 1], got {final_lr_ratio!r}.")

  def rate(count):
    count = jnp.asarray(count, jnp.float32)
    warmup = jnp.minimum((count + 1) / warmup_steps, 1.0) if warmup_steps else jnp.ones_like(count)
    if schedule == "constant":
      return learning_rate * warmup
    progress = jnp.clip((count - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
    if schedule == "cosine":
      decay = 0.5 * (1 + jnp.cos(jnp.pi * progress))
    else:
      decay = 1 - progress
    return learning_rate * warmup * (final_lr_ratio + (1 - final_lr_ratio) * decay)

  return rate


def make_optimizer(learning_rate: float = 2e-4, *, optimizer: OptimizerName = "adam", b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0, grad_clip: float | None = 1.0,
                   warmup_steps: int = 0, schedule: Schedule = "constant", total_steps: int | None = None,
                   final_lr_ratio: float = 0.0) -> optax.GradientTransformation:
  """Global-norm clipping followed by Adam or AdamW on the schedule of :func:`learning_rate_schedule`.

  The defaults are those of Song et al. (2021): Adam, rate 2e-4, :math:`\\beta_1 = 0.9`, :math:`\\epsilon=10^{-8}`,
  clipping at norm 1 (their configs add a 5000-step warm-up).

  Args:
    learning_rate: peak learning rate.
    optimizer: `"adam"` (weight decay must be 0) or `"adamw"` (decoupled weight decay).
    b1, b2, eps: Adam's moment rates and denominator offset.
    weight_decay: AdamW's decoupled decay.
    grad_clip: clip gradients to this global norm before the update; `None` or 0 disables clipping.
    warmup_steps, schedule, total_steps, final_lr_ratio: see :func:`learning_rate_schedule`.

  Returns:
    An `optax.GradientTransformation`.

  Raises:
    ValueError: naming the bad argument.
  """
  if optimizer not in _OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {optimizer!r}.")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
  if optimizer == "adam" and weight_decay:
    raise ValueError(f"optimizer='adam' has no weight decay, got weight_decay={weight_decay!r}; use "
                     "optimizer='adamw' for decoupled weight decay.")
  if grad_clip is not None and grad_clip < 0:
    raise ValueError(f"grad_clip must be > 0 (or None / 0 to disable clipping), got {grad_clip!r}.")
  rate = learning_rate_schedule(learning_rate, warmup_steps=warmup_steps, schedule=schedule,
                                total_steps=total_steps, final_lr_ratio=final_lr_ratio)
  if optimizer == "adam":
    update = optax.adam(rate, b1=b1, b2=b2, eps=eps)
  else:
    update = optax.adamw(rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if grad_clip:
    return optax.chain(optax.clip_by_global_norm(grad_clip), update)
  return update


def ema_decay(step, rate: float, warmup: bool = False):
  r"""The EMA decay :math:`\beta_n` for update number `n = step + 1`: `rate`, or
  :math:`\min(\beta, (1+n)/(10+n))` with warm-up."""
  if not warmup:
    return rate
  n = jnp.asarray(step, jnp.float32) + 1
  return jnp.minimum(rate, (1 + n) / (10 + n))


def update_ema(ema_params, params, decay):
  r""":math:`\bar\theta \leftarrow \beta\bar\theta + (1-\beta)\theta`, leafwise, in each leaf's dtype."""

  def update(e, p):
    beta = jnp.asarray(decay, e.dtype)
    return (beta * e + (1 - beta) * p).astype(e.dtype)

  return jax.tree.map(update, ema_params, params)


def check_ema_rate(rate) -> None:
  """Raises a ValueError unless `0 <= rate < 1`."""
  if not 0 <= rate < 1:
    raise ValueError(f"ema_rate must lie in [0, 1), got {rate!r}; 0.9999 (DDPM++) and 0.999 (NCSN++) are "
                     "the paper's values.")
