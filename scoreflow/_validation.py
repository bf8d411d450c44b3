"""Checks shared by the library: concrete-value validation that stays silent under tracing."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp


def concrete_value(x):
  """Returns `x` as a NumPy array if its value is known at trace time, else None.

  Pytree dataclasses are rebuilt by JAX with tracers (or placeholder objects) as leaves; validation
  must then stay silent, because the value was already checked when the user built the object.
  """
  if isinstance(x, jax.core.Tracer):
    return None
  if isinstance(x, (bool, int, float, np.number, np.ndarray, jax.Array)):
    try:
      return np.asarray(x)
    except Exception:  # A deleted or otherwise unreadable buffer: nothing to check.
      return None
  return None


def check_hyperparameters(owner: str, condition: str, ok, **values) -> None:
  """Raises a ValueError naming `owner`, the violated `condition` and the offending values.

  `ok` is evaluated only when every value is concrete; it receives them as floats (or arrays).
  """
  concrete = {name: concrete_value(v) for name, v in values.items()}
  if any(v is None for v in concrete.values()):
    return
  if not np.all(ok(**concrete)):
    got = ", ".join(f"{name}={np.asarray(v).tolist()}" for name, v in concrete.items())
    raise ValueError(f"{owner}: expected {condition}, got {got}.")


def check_time(owner: str, t, T) -> None:
  """Raises a ValueError if a concrete time lies outside [0, T] or is not finite."""
  t_value, T_value = concrete_value(t), concrete_value(T)
  if t_value is None or T_value is None:
    return
  if not np.all(np.isfinite(t_value)) or np.any(t_value < 0) or np.any(t_value > T_value * (1 + 1e-6)):
    bad = t_value[~((t_value >= 0) & (t_value <= T_value * (1 + 1e-6)))] if t_value.ndim else t_value
    raise ValueError(
        f"{owner}: time t must lie in [0, T] = [0, {float(T_value)}], got {np.asarray(bad).tolist()}. "
        "Sample t in [eps, T] (e.g. eps=1e-5) or rescale integer steps to continuous time."
    )


def as_float_time(t):
  """`t` as a floating JAX array (integers and Python numbers become the default float type)."""
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.floating):
    t = t.astype(jnp.result_type(float))
  return t


def per_example(coefficient, x):
  """Reshapes a per-example coefficient `[B]` (or a scalar) to broadcast against `x: [B, *D]`."""
  coefficient = jnp.asarray(coefficient)
  if coefficient.ndim > x.ndim or x.shape[: coefficient.ndim] != coefficient.shape:
    raise ValueError(
        f"per-example time/coefficient of shape {coefficient.shape} does not match the leading "
        f"(batch) dimensions of x with shape {x.shape}; pass t with shape [B] for x of shape [B, *D], "
        "or a scalar t."
    )
  return coefficient.reshape(coefficient.shape + (1,) * (x.ndim - coefficient.ndim)).astype(x.dtype)


def check_labels(owner: str, labels, batch_size: int, num_values: int, *, name: str = "labels",
                 meaning: str = "") -> jax.Array:
  """Class labels as int `[B]` (a scalar is broadcast); concrete values must lie in `0 .. num_values - 1`.

  Args:
    owner: who checks (starts the message).
    labels: the labels.
    batch_size: `B`.
    num_values: how many label values are valid (classes, plus one for a network's null class).
    name: the argument's name in messages.
    meaning: what the valid values are, for the range message (e.g. "for 10 classes").
  """
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{owner}: {name} must be integers (an integer array of shape [B]), got dtype {labels.dtype}; "
                     f"e.g. jnp.asarray({name}, jnp.int32).")
  if labels.ndim == 0:
    labels = jnp.broadcast_to(labels, (batch_size,))
  if labels.shape != (batch_size,):
    raise ValueError(f"{owner}: {name} must have shape [B] = ({batch_size},) to match the batch (or be a scalar), "
                     f"got shape {labels.shape}.")
  values = concrete_value(labels)
  if values is not None and values.size and (values.min() < 0 or values.max() >= num_values):
    raise ValueError(f"{owner}: labels must lie in 0..{num_values - 1} {meaning}, got values from {values.min()} "
                     f"to {values.max()}.")
  return labels
