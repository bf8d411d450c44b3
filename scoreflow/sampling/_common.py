"""What every sampler shares: the info record, time grids, the initial state and argument checks.

Shapes: samples `x: [B, *D]`; the score model is `score_fn(x [B, *D], t [B]) -> [B, *D]`.
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

from scoreflow._validation import concrete_value
from scoreflow.parameterization import score_to_x0
from scoreflow.sde import AbstractSDE

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]
Spacing = Literal["uniform", "log_snr"]


class SampleInfo(NamedTuple):
  """What a sampler reports besides its samples (all scalars; batched under `vmap`).

  `nfe` counts calls of `score_fn` on the whole batch, i.e. score evaluations per sample.
  """

  nfe: jax.Array  # [] int32: exact number of score-function evaluations.
  num_steps: jax.Array  # [] int32: solver steps taken (accepted and rejected for adaptive solvers).
  num_rejected_steps: jax.Array  # [] int32: steps rejected by the adaptive step-size controller (else 0).
  status: jax.Array  # [] int32: 0 success; 1 max_steps reached; 2 minimum step size reached; 3 other failure.


class Start(NamedTuple):
  """A sampler's checked arguments and its initial state (see :func:`start`)."""

  shape: tuple[int, ...]
  dtype: np.dtype
  score_fn: ScoreFn  # The model, its output cast to the dtype of x.
  x: jax.Array  # [B, *D]: x_T, or a draw from the prior.


def start(owner: str, key, sde: AbstractSDE, score_fn: ScoreFn, shape, dtype, eps, x_T,
          num_steps: int | None = None) -> Start:
  """What every sampler does first: checks `shape`, `dtype`, `num_steps` (when the sampler has one) and `eps`,
  casts the score to the samples' dtype and takes the initial state (`x_T`, checked, or a prior draw from `key`)."""
  shape = check_shape(owner, shape)
  dtype = check_dtype(owner, dtype)
  if num_steps is not None:
    check_num_steps(owner, num_steps)
  check_eps(owner, sde, eps)
  return Start(shape, dtype, in_dtype_of_x(score_fn), initial_state(key, sde, shape, dtype, x_T, owner))


def fixed_step_info(nfe: int, num_steps: int) -> SampleInfo:
  """The info record of a fixed-step sampler."""
  return SampleInfo(nfe=jnp.asarray(nfe, jnp.int32), num_steps=jnp.asarray(num_steps, jnp.int32),
                    num_rejected_steps=jnp.zeros((), jnp.int32), status=jnp.zeros((), jnp.int32))


def time_grid(sde: AbstractSDE, num_steps: int, eps=1e-3, spacing: Spacing = "uniform", dtype=jnp.float32):
  r"""The `num_steps + 1` decreasing times :math:`T = t_0 > t_1 > \dots > t_N = \epsilon` of a sampler.

  Args:
    sde: the forward process (gives `T`, and the log-SNR :math:`\lambda(t)` for `"log_snr"` spacing).
    num_steps: the number of steps `N >= 1`.
    eps: the last time :math:`\epsilon \in (0, T)`.
    spacing: `"uniform"` (equal steps in `t`) or `"log_snr"` (equal steps in :math:`\lambda`, mapped back with
      :meth:`~scoreflow.sde.AbstractSDE.t_from_log_snr`; Lu et al. 2022). The end points are exact in both.
    dtype: the samples' floating dtype; the grid is in :func:`time_dtype` of it (at least float32).

  Returns:
    `[N + 1]` times in `time_dtype(dtype)`.

  Raises:
    ValueError: for `num_steps < 1`, an `eps` outside `(0, T)` or an unknown `spacing`.
  """
  check_num_steps("time_grid", num_steps)
  check_eps("time_grid", sde, eps)
  dtype = time_dtype(dtype)
  T = jnp.asarray(sde.T, dtype)
  eps = jnp.asarray(eps, dtype)
  if spacing == "uniform":
    return jnp.linspace(T, eps, num_steps + 1, dtype=dtype)
  if spacing == "log_snr":
    lambdas = jnp.linspace(sde.log_snr(T), sde.log_snr(eps), num_steps + 1, dtype=dtype)
    interior = sde.t_from_log_snr(lambdas[1:-1]).astype(dtype)
    return jnp.concatenate([T[None], interior, eps[None]])
  raise ValueError(f"time_grid: spacing must be 'uniform' or 'log_snr', got {spacing!r}.")


def in_dtype_of_x(score_fn: ScoreFn) -> ScoreFn:
  """`score_fn` with its output cast to the dtype of `x`, so that the sampler's state keeps the requested dtype."""

  def score_in_dtype(x, t):
    return score_fn(x, t).astype(x.dtype)

  return score_in_dtype


def finish(sde: AbstractSDE, score_fn: ScoreFn, x, eps, denoise: bool, info: SampleInfo):
  r"""Optionally applies Tweedie's denoiser :math:`\hat x_0 = (x + \sigma_\epsilon^2 s(x, \epsilon))/\alpha_\epsilon`
  at the final time (counting its evaluation); returns `(x, info)`."""
  if not denoise:
    return x, info
  t = batch_time(eps, x)
  return score_to_x0(sde, score_fn(x, t), x, t), info._replace(nfe=info.nfe + 1)


def time_dtype(dtype):
  """The dtype of sampling times for samples in `dtype`: `dtype`, but at least float32.

  A bfloat16 grid of 1000 steps on [1e-3, 1] holds only 254 distinct times (most steps would have `dt = 0`),
  and float16 spaces them unevenly, so times stay in float32 when the samples are in a half-precision dtype;
  coefficients that multiply the samples are cast to their dtype where they meet them.
  """
  return jnp.promote_types(dtype, jnp.float32)


def batch_time(t, x):
  """A scalar time broadcast to `[B]` in :func:`time_dtype` of `x: [B, *D]`."""
  return jnp.full(x.shape[:1], t, time_dtype(x.dtype))


def initial_state(key, sde: AbstractSDE, shape, dtype, x_T, owner: str):
  """`x_T` if given (checked against `shape`, cast to `dtype`), else a draw from the prior."""
  if x_T is None:
    return sde.prior_sample(key, shape, dtype)
  if tuple(x_T.shape) != tuple(shape):
    raise ValueError(f"{owner}: x_T must have the sample shape {tuple(shape)}, got {tuple(x_T.shape)}; "
                     "pass x_T=None to draw it from the prior.")
  return jnp.asarray(x_T, dtype)


def check_shape(owner: str, shape) -> tuple:
  if (not isinstance(shape, (tuple, list)) or len(shape) < 2
      or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape)):
    raise ValueError(f"{owner}: shape must be a tuple of positive ints [B, *D] with at least one data axis, "
                     f"got {shape!r}; e.g. shape=(512, 2) for 512 two-dimensional samples.")
  return tuple(int(d) for d in shape)


def check_dtype(owner: str, dtype):
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{owner}: dtype must be a floating dtype such as jnp.float32, got {dtype!r}.")
  return jnp.dtype(dtype)


def check_num_steps(owner: str, num_steps, minimum: int = 1, name: str = "num_steps") -> None:
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < minimum:
    raise ValueError(f"{owner}: {name} must be a Python int >= {minimum} (it fixes the loop length, so it "
                     f"is static), got {num_steps!r}.")


def check_eps(owner: str, sde: AbstractSDE, eps) -> None:
  eps_value, T_value = concrete_value(eps), concrete_value(sde.T)
  if eps_value is None or T_value is None:
    return
  if not (np.ndim(eps_value) == 0 and np.isfinite(eps_value) and 0 < eps_value < T_value):
    raise ValueError(f"{owner}: eps (the last sampling time) must be a scalar in (0, T) = (0, {float(T_value)}), "
                     f"got {np.asarray(eps_value).tolist()}; the 2021 code uses 1e-3 for VP and 1e-5 for VE.")


def check_range(owner: str, name: str, value, low=None, high=None, low_open=False, high_open=False) -> None:
  """Raises if a concrete scalar `value` lies outside the interval; traced values pass unchecked."""
  v = concrete_value(value)
  if v is None:
    return
  ok = np.ndim(v) == 0 and not np.isnan(v)
  if ok and low is not None:
    ok = v > low if low_open else v >= low
  if ok and high is not None:
    ok = v < high if high_open else v <= high
  if not ok:
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    raise ValueError(f"{owner}: {name} must be a scalar in {interval}, got {np.asarray(v).tolist()}.")


def choose(owner: str, name: str, value, table):
  """Looks `value` up in an explicit table of named choices, with an error listing them."""
  if isinstance(value, str):
    if value not in table:
      raise ValueError(f"{owner}: unknown {name} {value!r}; choose one of {sorted(table)}.")
    return table[value]
  return value
