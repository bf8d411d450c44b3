r"""The probability-flow ODE core: one adaptive solve, one error control, one status code.

.. math:: \frac{dx}{dt} = \tilde f(x, t) = f(t)\,x - \tfrac12 g(t)^2\, s_\theta(x, t)

(Song et al. 2021, Eq. 13) is solved by an adaptive explicit Runge-Kutta method of diffrax (Dormand-Prince 5(4),
Tsit5, Dopri8, Bosh3) with a PID step-size controller, on device inside one `while_loop`, in the normalised time
:math:`s = (t - t_0)/(t_1 - t_0) \in [0, 1]` so that both directions are the same program. :func:`solve_flow`
is the solve of :func:`~scoreflow.ode_sample` (from `T` to `eps`), :func:`~scoreflow.decode` (the same) and
:func:`~scoreflow.encode` (from `eps` to `T`); :func:`~scoreflow.log_likelihood` runs the same :func:`integrate`
on the state augmented with the divergence integral. Given the same solver, tolerances and end times,
`decode(z)` and `ode_sample(x_T=z)` therefore return the same samples.

Error control. `error_control="example"` (the default): the controller's error norm is the largest, over the
examples, of each example's RMS error over its coordinates, so every example meets `rtol`/`atol`.
`error_control="batch"`: the RMS over the whole batch, as in the 2021 code's `solve_ivp` on the flattened batch,
which needs fewer steps but lets single examples miss the tolerance (bench/RESULTS.md has the measured costs).
Either way the batch shares its steps; `per_example=True` gives each example its own (a `vmap` of the solve).

Status (:class:`SolveStatus`, per example): `SUCCESS`, `MAX_STEPS_REACHED`, `NONFINITE` (a finished solve whose
result is NaN or infinite), `SOLVER_FAILED`. Failed examples are NaN.
"""

from __future__ import annotations

import enum
from typing import Literal, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

from scoreflow._validation import concrete_value
from scoreflow.sde import AbstractSDE

ErrorControl = Literal["example", "batch"]
SOLVERS = {"tsit5": diffrax.Tsit5, "dopri5": diffrax.Dopri5, "dopri8": diffrax.Dopri8, "bosh3": diffrax.Bosh3}


class SolveStatus(enum.IntEnum):
  """Per-example outcome of an ODE solve, as stored in the `status` field of the info tuples."""

  SUCCESS = 0
  MAX_STEPS_REACHED = 1  # The solve stopped at `max_steps` before reaching its end time.
  NONFINITE = 2  # The solve finished but its result (state or log-density) is NaN or infinite.
  SOLVER_FAILED = 3  # Any other solver failure (e.g. the end time was not reached).


class ODESolveInfo(NamedTuple):
  """What a probability-flow solve (:func:`~scoreflow.encode`, :func:`~scoreflow.decode`) reports besides its result."""

  nfe: jax.Array  # [B] int32 drift evaluations of each example's solve.
  num_steps: jax.Array  # [B] int32 attempted steps (accepted + rejected).
  num_rejected_steps: jax.Array  # [B] int32 rejected steps.
  status: jax.Array  # [B] int32 SolveStatus code.

  @property
  def success(self):
    """`[B]` bool: the solve of each example succeeded (`status == SolveStatus.SUCCESS`)."""
    return self.status == SolveStatus.SUCCESS



def resolve_solver(solver):
  if isinstance(solver, str):
    if solver not in SOLVERS:
      raise ValueError(f"solver must be one of {sorted(SOLVERS)} or a diffrax explicit Runge-Kutta solver "
                       f"instance, got {solver!r}.")
    return SOLVERS[solver]()
  if not (isinstance(solver, diffrax.AbstractERK) and isinstance(solver, diffrax.AbstractAdaptiveSolver)):
    raise ValueError("solver must be one of " + str(sorted(SOLVERS)) + " or an adaptive explicit Runge-Kutta "
                     f"solver of diffrax (e.g. diffrax.Tsit5()), got {solver!r}.")
  return solver


def solver_nfe(solver, num_steps):
  """Vector-field evaluations of an explicit RK solve: `num_stages` per attempted step, one less if FSAL."""
  tableau = solver.tableau
  fsal = int(tableau.fsal)
  return (tableau.num_stages - fsal) * num_steps + fsal


def _error_norm(batch_ndim: int, error_control: ErrorControl):
  """The controller's error norm: the max over leaves of the RMS over each leaf's event axes and then the max over
  examples (`"example"`), or of the RMS over all of a leaf's axes, batch included (`"batch"`)."""

  def norm(scaled_error):
    per_leaf = []
    for leaf in jax.tree.leaves(scaled_error):
      axes = tuple(range(batch_ndim if error_control == "example" else 0, leaf.ndim))
      per_leaf.append(jnp.sqrt(jnp.mean(jnp.square(leaf), axis=axes)) if axes else jnp.abs(leaf))
    return jnp.max(jnp.stack(per_leaf))

  return norm


def integrate(vector_field, y0, t0, t1, *, solver, rtol, atol, max_steps, batch_ndim, error_control="example"):
  r"""Adaptive solve from `t0` to `t1`; returns `(y(t1), status, num_steps, num_rejected_steps)`.

  The solve runs in the normalised time :math:`s = (t - t_0)/(t_1 - t_0) \in [0, 1]` (either direction of
  `t`) with `dt0=None`: diffrax then has no traced time interval to check with a host callback (which would
  keep the program out of JAX's persistent compilation cache), and for an ODE term its first step is 1% of the
  interval, without evaluating the vector field.
  """
  dtype = t0.dtype
  span = t1 - t0

  def normalised_field(s, y, args):
    dy = vector_field((t0 + s * span).astype(dtype), y, args)
    return jax.tree.map(lambda leaf: span.astype(leaf.dtype) * leaf, dy)

  s0, s1 = np.zeros((), dtype), np.ones((), dtype)
  controller = diffrax.PIDController(rtol=rtol, atol=atol, norm=_error_norm(batch_ndim, error_control))
  solver_state = None
  if solver.tableau.fsal:
    # An FSAL pair reuses the last stage of a step as the first of the next. Left to itself, diffrax evaluates
    # the first stage at t0 again after every rejection of the first step; handing it f(t0, y0) makes the
    # count exact: (num_stages - 1) evaluations per attempted step plus this one.
    solver_state = (jnp.array(False), normalised_field(s0, y0, None))
  solution = diffrax.diffeqsolve(
      diffrax.ODETerm(normalised_field), solver, s0, s1, None, y0, solver_state=solver_state,
      saveat=diffrax.SaveAt(t1=True), stepsize_controller=controller, max_steps=max_steps, throw=False)
  y1 = jax.tree.map(lambda leaf: leaf[0], solution.ys)
  status = jnp.where(
      solution.result == diffrax.RESULTS.successful,
      jnp.where(solution.ts[0] == s1, SolveStatus.SUCCESS, SolveStatus.SOLVER_FAILED),
      jnp.where(solution.result == diffrax.RESULTS.max_steps_reached, SolveStatus.MAX_STEPS_REACHED,
                SolveStatus.SOLVER_FAILED))
  return y1, status, solution.stats["num_steps"], solution.stats["num_rejected_steps"]


def finalize_status(status, finite, batch):
  """Per-example status `[B]`: the solver's outcome, else NONFINITE where the result is not finite."""
  status = jnp.broadcast_to(status, (batch,)).astype(jnp.int32)
  return jnp.where((status == SolveStatus.SUCCESS) & ~finite, jnp.int32(SolveStatus.NONFINITE), status)


def all_finite(x):
  return jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)


def node_types(tree):
  """The type of every node of a pytree, as a hashable cache key for the compiled programs below.

  `PyTreeDef` equality need not tell apart two `register_dataclass` classes with the same number of fields
  (e.g. `VESDE` and `VPSDE`; see shared/ENVIRONMENT.md), so `eqx.filter_jit` could reuse one process's program
  for the other; passing this key as a static argument keeps them apart.
  """

  def walk(treedef):
    data = treedef.node_data()
    return (None if data is None else data[0], tuple(walk(child) for child in treedef.children()))

  return walk(jax.tree.structure(tree))


def check_score_output(name, score_fn, x, t):
  out = jax.eval_shape(score_fn, x, t)
  if getattr(out, "shape", None) != x.shape:
    raise ValueError(f"{name}: score_fn(x, t) must return an array of the shape of x, {x.shape}, for x: [B, *D] and "
                     f"t: [B]; got {getattr(out, 'shape', type(out).__name__)}.")


def solve_flow(sde, score_fn, x, t0, t1, rtol, atol, *, solver, max_steps: int, per_example: bool = False,
               error_control: ErrorControl = "example"):
  r"""Solves the probability-flow ODE :math:`dx/dt = f(t)x - \tfrac12 g(t)^2 s(x, t)` from `t0` to `t1` (either
  direction): the one solve behind :func:`~scoreflow.ode_sample`, :func:`~scoreflow.encode` and
  :func:`~scoreflow.decode` (and, with the divergence integral, :func:`~scoreflow.log_likelihood`).

  Pure and traceable; arguments are checked by the callers. See the module docstring for the error control.

  Args:
    sde, score_fn: the process and `score_fn(x [B, *D], t [B]) -> [B, *D]`.
    x: the state at `t0`, `[B, *D]`.
    t0, t1: start and end times (scalars in `x.dtype`).
    rtol, atol: tolerances of the PID step-size controller.
    solver: a diffrax adaptive explicit Runge-Kutta solver instance (:func:`resolve_solver`).
    max_steps: the step budget (attempted steps).
    per_example: every example its own steps (`vmap` of the solve) instead of shared steps.
    error_control: `"example"` (every example meets the tolerance) or `"batch"` (the RMS over the batch does).

  Returns:
    `(x(t1) [B, *D], ODESolveInfo)`; examples whose solve failed are NaN, with a non-zero status.
  """
  batch = x.shape[0]
  solve = dict(solver=solver, rtol=rtol, atol=atol, max_steps=max_steps)
  if per_example:

    def solve_one(x_b):
      def vector_field(t, y, args):
        return sde.probability_flow_drift(score_fn, y[None], t[None])[0].astype(y.dtype)

      return integrate(vector_field, x_b, t0, t1, batch_ndim=0, **solve)

    y, status, num_steps, num_rejected = jax.vmap(solve_one)(x)
  else:

    def vector_field(t, y, args):
      return sde.probability_flow_drift(score_fn, y, jnp.broadcast_to(t, (batch,))).astype(y.dtype)

    y, status, num_steps, num_rejected = integrate(vector_field, x, t0, t1, batch_ndim=1, error_control=error_control,
                                                **solve)
  status = finalize_status(status, all_finite(y), batch)
  y = jnp.where((status == SolveStatus.SUCCESS).reshape((batch,) + (1,) * (x.ndim - 1)), y, jnp.nan)
  num_steps = jnp.broadcast_to(num_steps, (batch,)).astype(jnp.int32)
  return y, ODESolveInfo(nfe=solver_nfe(solver, num_steps), num_steps=num_steps,
                         num_rejected_steps=jnp.broadcast_to(num_rejected, (batch,)).astype(jnp.int32),
                         status=status)


def check_state(name, x, what):
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{name}: {what} must be an array of shape [B, *D], got {type(x).__name__}.")
  if x.ndim < 2:
    raise ValueError(f"{name}: {what} must have shape [B, *D] with at least one data axis, got shape {x.shape}; "
                     f"add a trailing axis for scalar data ({what}[:, None]).")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}: {what} must be floating point, got dtype {x.dtype}; dequantize integer data "
                     "first (see scoreflow.dequantize).")
  if jnp.finfo(x.dtype).bits < 32:
    raise ValueError(f"{name}: {what} must be float32 or float64, got {x.dtype}: the adaptive ODE solve and its "
                     "divergence integral need more than a half-precision mantissa. Cast it to float32 (the score "
                     "network may still compute in bfloat16).")


def check_solve_options(name, sde, score_fn, eps, rtol, atol, max_steps):
  if not isinstance(sde, AbstractSDE):
    raise ValueError(f"{name}: sde must be a continuous-time process such as scoreflow.VPSDE(), got "
                     f"{type(sde).__name__}.")
  if not callable(score_fn):
    raise ValueError(f"{name}: score_fn must be a callable score_fn(x [B, *D], t [B]) -> [B, *D], got "
                     f"{type(score_fn).__name__}.")
  if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
    raise ValueError(f"{name}: max_steps must be an int >= 1, got {max_steps!r}.")
  for arg, value in (("rtol", rtol), ("atol", atol)):
    concrete = concrete_value(value)
    if concrete is not None and not (np.ndim(concrete) == 0 and concrete > 0):
      raise ValueError(f"{name}: {arg} must be a positive scalar, got {np.asarray(concrete).tolist()}.")
  eps_value, T_value = concrete_value(eps), concrete_value(sde.T)
  if eps_value is not None and not (np.ndim(eps_value) == 0 and (T_value is None or 0 < eps_value < T_value)):
    raise ValueError(f"{name}: eps must be a scalar time in (0, T) = (0, {T_value}), got "
                     f"{np.asarray(eps_value).tolist()}; the usual choice is 1e-5.")


def check_error_control(name, error_control):
  if error_control not in ("example", "batch"):
    raise ValueError(f"{name}: error_control must be 'example' (every example meets the tolerance) or 'batch' (the "
                     f"RMS over the batch does), got {error_control!r}.")


def as_leaf_arrays(sde):
  """Python-number hyper-parameters as (weakly typed) arrays, so that changing them does not recompile."""
  return jax.tree.map(jnp.asarray, sde)
