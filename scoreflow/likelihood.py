r"""Exact likelihoods through the probability-flow ODE: log-density, divergence estimators, bits/dim, encode/decode.

The probability-flow ODE of a forward SDE (Song et al. 2021, Eq. 13),

.. math:: \frac{dx}{dt} = \tilde f(x, t) = f(t)\,x - \tfrac12 g(t)^2\, s_\theta(x, t),

has the marginals :math:`p_t` of the SDE and an invertible flow. By the instantaneous change of variables
(Chen et al. 2018, Theorem 1), :math:`\frac{d}{dt}\log p_t(x(t)) = -\nabla\cdot\tilde f(x(t), t)`, so solving from
:math:`\epsilon` to :math:`T`,

.. math:: \log p_\epsilon(x) = \log p_T(x(T)) + \int_\epsilon^T \nabla\cdot\tilde f(x(t), t)\,dt
    \qquad (\text{Song et al. 2021, Eq. 39}),

with :math:`p_T` replaced by the prior :math:`\pi` (`sde.prior_logp`), which it approximates: the ODE ends on the
true marginal :math:`p_T`, not on :math:`\pi` (pass `prior_logp_fn` to use another terminal density).

Implementation. The augmented state :math:`(x, \Delta/D)` with :math:`\Delta = \int\nabla\cdot\tilde f\,dt` is
integrated by an adaptive explicit Runge-Kutta method of diffrax (the Dormand-Prince 5(4) pair by default, the
RK45 of the 2021 code; or Tsit5, Dopri8, Bosh3) with a PID step-size controller, inside one jit-compiled
program: no host round trip per step. The divergence integral is carried per dimension (nats/dim), so `rtol`
and `atol` mean the same for it as for each coordinate of `x`; the error norm of one example is the larger of
the RMS over the coordinates of `x` and the RMS over the probe integrals, so neither the state nor the
log-density can hide behind the other. Two modes:

* `per_example=False` (default): one solve over the whole batch with shared steps, whose error norm is the
  maximum of the per-example norms, so every example meets the tolerance (`error_control="batch"`: the RMS over
  the whole batch, as in the 2021 code, fewer steps but single examples may miss the tolerance).
* `per_example=True`: every example is solved with its own adaptive steps (`vmap` of the solve), so one stiff
  example does not shrink everyone's steps and one failing example does not fail the others. The compiled
  loop still runs until the slowest example is done, evaluating the drift on the whole batch each iteration.

The default is the shared solve, which was as fast or faster in `bench/bench_likelihood.py` (numbers in
bench/RESULTS.md). Use `per_example=True` for batches that mix easy and stiff examples or may contain failures.
The solve itself is the probability-flow core of :mod:`scoreflow.flow`.

Divergences: the exact trace (one Jacobian-vector product per dimension, for low dimensions) or the
Hutchinson-Skilling estimator :math:`\nabla\cdot\tilde f \approx v^\top (\partial\tilde f/\partial x)\, v` with
Rademacher or Gaussian probes :math:`v` (Hutchinson 1989; Skilling 1989; Grathwohl et al. 2019). Probes are
drawn once per example and held fixed along the solve, so each probe's integral is an unbiased estimate of
:math:`\Delta`; with `num_probes > 1` their spread gives a standard error for the log-likelihood.

Shapes: `x: [B, *D]` with `D` the event shape (any rank); log-densities `[B]`.

References:
  Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole. Score-Based Generative Modeling through Stochastic
  Differential Equations. ICLR 2021. (Section 4.3, Appendix D.2.)
  Chen, Rubanova, Bettencourt, Duvenaud. Neural Ordinary Differential Equations. NeurIPS 2018.
  Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud. FFJORD. ICLR 2019.
  Hutchinson. A stochastic estimator of the trace of the influence matrix. 1989.
  Theis, van den Oord, Bethge. A note on the evaluation of generative models. ICLR 2016. (Dequantization.)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from scoreflow import flow
from scoreflow._validation import concrete_value
from scoreflow.data.scaling import AffineScaler, uniform_dequantize
from scoreflow.flow import ODESolveInfo as ODESolveInfo  # Re-exported: the info of encode and decode.
from scoreflow.flow import SolveStatus
from scoreflow.sde import AbstractSDE

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]
Divergence = Literal["hutchinson", "exact"]
Probe = Literal["rademacher", "gaussian"]

class LikelihoodInfo(NamedTuple):
  """What :func:`log_likelihood` reports besides the log-density and the latent."""

  nfe: jax.Array  # [B] int32 drift+divergence evaluations of each example's solve.
  num_steps: jax.Array  # [B] int32 attempted steps (accepted + rejected).
  num_rejected_steps: jax.Array  # [B] int32 rejected steps.
  status: jax.Array  # [B] int32 SolveStatus code.
  logp_stderr: jax.Array  # [B] Hutchinson standard error of logp (0 for the exact trace; NaN for one probe
  #                          or a failed solve).

  @property
  def success(self):
    """`[B]` bool: the solve of each example succeeded (`status == SolveStatus.SUCCESS`)."""
    return self.status == SolveStatus.SUCCESS


# --- Divergence estimators. ------------------------------------------------------------------------


def sample_probes(key, shape, num_probes: int = 1, probe: Probe = "rademacher", dtype=jnp.float32):
  r"""Draws Hutchinson probes :math:`v` with :math:`E[v v^\top] = I`: `[num_probes, *shape]`.

  Args:
    key: PRNG key.
    shape: the shape `[B, *D]` of the states the probes multiply.
    num_probes: number of independent probes `K` per example.
    probe: `"rademacher"` (entries :math:`\pm 1`, the lower-variance choice) or `"gaussian"` (:math:`N(0, 1)`).
    dtype: floating dtype of the probes.

  Raises:
    ValueError: for an unknown probe or `num_probes < 1`.
  """
  _check_probe_options(probe, num_probes)
  full_shape = (num_probes,) + tuple(shape)
  if probe == "rademacher":
    return jax.random.rademacher(key, full_shape, dtype)
  return jax.random.normal(key, full_shape, dtype)


def hutchinson_divergence(fn, x, probes):
  r"""`fn(x)` and Hutchinson-Skilling estimates of its per-example divergence, one per probe.

  .. math:: \nabla\cdot f(x) = \mathrm{tr}\,\frac{\partial f}{\partial x}
      = E_v\Big[v^\top \frac{\partial f}{\partial x} v\Big] \quad\text{for } E[v v^\top] = I,

  computed with forward-mode Jacobian-vector products (one linearization of `fn`, then one JVP per probe).
  The variance of one estimate is :math:`2\|A_s\|_F^2` for Gaussian probes and
  :math:`2(\|A_s\|_F^2 - \sum_i A_{s,ii}^2)` for Rademacher probes, with :math:`A_s` the symmetric part of
  the Jacobian; the mean over `K` probes has `1/K` of it.

  Args:
    fn: `fn(x [B, *D]) -> [B, *D]` acting on each example independently (example `b` of the output depends
      only on example `b` of the input).
    x: `[B, *D]`.
    probes: `[K, B, *D]`, e.g. from :func:`sample_probes`.

  Returns:
    `(fn(x) [B, *D], divergence estimates [K, B])`; average over axis 0 for the `K`-probe estimate.

  Raises:
    ValueError: if `probes` is not `[K, *x.shape]`.
  """
  if probes.ndim != x.ndim + 1 or probes.shape[1:] != x.shape:
    raise ValueError(f"hutchinson_divergence: probes must have shape [K, *x.shape] = "
                     f"[K, {', '.join(map(str, x.shape))}], got {probes.shape}; draw them with "
                     "sample_probes(key, x.shape, num_probes).")
  fx, fn_jvp = jax.linearize(fn, x)
  jvps = jax.vmap(fn_jvp)(probes.astype(x.dtype))
  estimates = jnp.sum((probes * jvps).reshape(probes.shape[:2] + (-1,)), axis=-1)
  return fx, estimates


def exact_divergence(fn, x):
  r"""`fn(x)` and its exact per-example divergence :math:`\mathrm{tr}\,\partial f/\partial x`.

  Costs one Jacobian-vector product per dimension of the event (vectorised), so it is meant for low
  dimensions; use :func:`hutchinson_divergence` beyond a few hundred.

  Args:
    fn: `fn(x [B, *D]) -> [B, *D]` acting on each example independently.
    x: `[B, *D]`.

  Returns:
    `(fn(x) [B, *D], divergence [B])`.
  """
  num_dims = math.prod(x.shape[1:])
  fx, fn_jvp = jax.linearize(fn, x)
  basis = jnp.eye(num_dims, dtype=x.dtype).reshape((num_dims, 1) + x.shape[1:])
  jvps = jax.vmap(fn_jvp)(jnp.broadcast_to(basis, (num_dims,) + x.shape))
  # jvps[i, b] is column i of example b's Jacobian; its entry i is the diagonal element.
  return fx, jnp.trace(jvps.reshape(num_dims, x.shape[0], num_dims), axis1=0, axis2=2)


# --- The solve (the ODE core is scoreflow.flow). -------------------------------------------------------


@eqx.filter_jit
def _log_likelihood_impl(key, sde, score_fn, prior_logp_fn, x, eps, rtol, atol, *, divergence, probe, num_probes,
                         solver, max_steps, per_example, node_types):
  del node_types  # Only a cache key (see _node_types).
  batch, num_dims = x.shape[0], math.prod(x.shape[1:])
  flow.check_score_output("log_likelihood", score_fn, x, jnp.full((batch,), eps, x.dtype))
  t1 = jnp.asarray(sde.T, x.dtype)
  probes = None
  if divergence == "hutchinson":
    probes = sample_probes(key, x.shape, num_probes, probe, x.dtype)  # [K, B, *D]
  num_integrals = num_probes if divergence == "hutchinson" else 1

  def drift_and_divergence(x_t, t, probes_t):
    # x_t: [n, *D], t: [n], probes_t: [K, n, *D] or None -> ([n, *D], [n, K] divergence per dimension).
    def drift_fn(y):
      return sde.probability_flow_drift(score_fn, y, t).astype(y.dtype)

    if probes_t is None:
      dx, div = exact_divergence(drift_fn, x_t)
      div = div[:, None]
    else:
      dx, div = hutchinson_divergence(drift_fn, x_t, probes_t)
      div = div.T
    return dx, div / num_dims

  solve = dict(solver=solver, rtol=rtol, atol=atol, max_steps=max_steps)
  if per_example:

    def solve_one(x_b, probes_b):
      def vector_field(t, y, args):
        dx, div = drift_and_divergence(y[0][None], t[None], None if probes_b is None else probes_b[:, None])
        return dx[0], div[0]

      y0 = (x_b, jnp.zeros((num_integrals,), x.dtype))
      return flow.integrate(vector_field, y0, eps, t1, batch_ndim=0, **solve)

    probe_axis = None if probes is None else 1
    (z, delta), status, num_steps, num_rejected = jax.vmap(solve_one, in_axes=(0, probe_axis))(x, probes)
  else:

    def vector_field(t, y, args):
      return drift_and_divergence(y[0], jnp.broadcast_to(t, (batch,)), probes)

    y0 = (x, jnp.zeros((batch, num_integrals), x.dtype))
    (z, delta), status, num_steps, num_rejected = flow.integrate(vector_field, y0, eps, t1, batch_ndim=1, **solve)

  prior_logp = sde.prior_logp(z) if prior_logp_fn is None else prior_logp_fn(z)
  if getattr(prior_logp, "shape", None) != (batch,):
    raise ValueError(f"log_likelihood: prior_logp_fn(z) must return log-densities of shape [B] = ({batch},) "
                     f"for z: {z.shape}; got {getattr(prior_logp, 'shape', type(prior_logp).__name__)}.")
  logp_per_probe = prior_logp.astype(x.dtype)[:, None] + num_dims * delta  # [B, K]
  logp = jnp.mean(logp_per_probe, axis=1)
  if divergence == "exact":
    stderr = jnp.zeros((batch,), x.dtype)
  elif num_probes == 1:
    stderr = jnp.full((batch,), jnp.nan, x.dtype)
  else:
    stderr = jnp.std(logp_per_probe, axis=1, ddof=1) / math.sqrt(num_probes)

  status = flow.finalize_status(status, jnp.isfinite(logp) & flow.all_finite(z), batch)
  ok = status == SolveStatus.SUCCESS
  logp, stderr = jnp.where(ok, logp, jnp.nan), jnp.where(ok, stderr, jnp.nan)
  z = jnp.where(ok.reshape((batch,) + (1,) * (x.ndim - 1)), z, jnp.nan)
  num_steps = jnp.broadcast_to(num_steps, (batch,)).astype(jnp.int32)
  info = LikelihoodInfo(nfe=flow.solver_nfe(solver, num_steps), num_steps=num_steps,
                        num_rejected_steps=jnp.broadcast_to(num_rejected, (batch,)).astype(jnp.int32),
                        status=status, logp_stderr=stderr)
  return logp, z, info


@eqx.filter_jit
def _flow_impl(sde, score_fn, x, t0, t1, rtol, atol, *, solver, max_steps, per_example, error_control, node_types):
  del node_types  # Only a cache key (see flow.node_types).
  flow.check_score_output("encode/decode", score_fn, x, jnp.full((x.shape[0],), t0, x.dtype))
  return flow.solve_flow(sde, score_fn, x, t0, t1, rtol, atol, solver=solver, max_steps=max_steps,
                         per_example=per_example, error_control=error_control)


# --- Argument checks (at trace time, before anything compiles). -------------------------------------


def _check_probe_options(probe, num_probes):
  if probe not in ("rademacher", "gaussian"):
    raise ValueError(f"probe must be 'rademacher' or 'gaussian', got {probe!r}.")
  if not isinstance(num_probes, int) or isinstance(num_probes, bool) or num_probes < 1:
    raise ValueError(f"num_probes must be an int >= 1, got {num_probes!r}.")


# --- Public API. --------------------------------------------------------------------------------------


def log_likelihood(key, sde: AbstractSDE, score_fn: ScoreFn, x, *, eps=1e-5, rtol=1e-5, atol=1e-5,
                   divergence: Divergence = "hutchinson", probe: Probe = "rademacher", num_probes: int = 1,
                   solver="dopri5", max_steps: int = 4096, per_example: bool = False,
                   prior_logp_fn: Callable[[jax.Array], jax.Array] | None = None):
  r"""Log-density :math:`\log p_\epsilon(x)` of the model, through the probability-flow ODE.

  .. math:: \log p_\epsilon(x) = \log\pi(z) + \int_\epsilon^T \nabla\cdot\tilde f(x(t), t)\,dt, \quad
      z = x(T), \quad \tilde f(x, t) = f(t)x - \tfrac12 g(t)^2 s_\theta(x, t)

  (Song et al. 2021, Eq. 39), solved from `eps` to `T` in one compiled program (see the module docstring for
  the error norm and the two stepping modes). Examples whose solve fails get NaN `logp` and `z` and a
  non-zero `info.status` (:class:`SolveStatus`): `MAX_STEPS_REACHED` when the step budget ran out (also what
  a score returning NaN or inf leads to, since the controller rejects every step that produces one),
  `NONFINITE` when a finished solve's latent or log-density is not finite. In the shared-step mode a solver
  failure (the step budget) fails the whole batch; `per_example=True` confines it to its example.

  Args:
    key: PRNG key for the Hutchinson probes (unused, and may be None, with `divergence="exact"`).
    sde: the forward process.
    score_fn: `score_fn(x [B, *D], t [B]) -> [B, *D]`, acting on each example independently. The program
      is compiled once per callable: pass the same object on repeated calls. A closure over parameters bakes
      them into the program as constants; a pytree callable such as `jax.tree_util.Partial(apply, params)`
      has its arrays traced instead (new parameters then do not recompile), and so does a closure inside
      your own `jax.jit` that takes the parameters as an argument.
    x: data in model space, `[B, *D]`, floating; the output dtype follows it.
    eps: start time of the ODE (the likelihood is that of :math:`p_\epsilon`, the data perturbed up to `eps`).
    rtol, atol: tolerances of the step-size controller, for each coordinate of `x` and for the log-density
      per dimension (nats/dim).
    divergence: `"hutchinson"` (stochastic trace, any dimension) or `"exact"` (full Jacobian trace).
    probe: `"rademacher"` or `"gaussian"` Hutchinson probes.
    num_probes: Hutchinson probes per example, averaged; with more than one, `info.logp_stderr` estimates the
      standard error of `logp`.
    solver: `"dopri5"` (default: the Dormand-Prince pair, RK45 of the 2021 code, so NFE compare with the
      paper's), `"tsit5"`, `"dopri8"`, `"bosh3"`, or an adaptive explicit Runge-Kutta solver instance of diffrax
      (their measured costs and errors: bench/RESULTS.md).
    max_steps: cap on attempted steps per solve; reaching it is reported as `SolveStatus.MAX_STEPS_REACHED`.
    per_example: give each example its own adaptive steps (`True`) or share steps across the batch (`False`).
    prior_logp_fn: terminal log-density `z [B, *D] -> [B]`; defaults to `sde.prior_logp`.

  Returns:
    `(logp [B], z [B, *D], info)`: log-density in nats, the latent :math:`x(T)`, and a :class:`LikelihoodInfo`.

  Raises:
    ValueError: for a badly shaped or non-floating `x`, a `score_fn` whose output shape differs from `x`,
      unknown options, non-positive tolerances, `eps` outside `(0, T)`, or a missing key.

  Example:
    >>> import jax, jax.numpy as jnp, scoreflow as sf
    >>> from scoreflow.testing.analytic import GaussianMixture
    >>> sde, data = sf.VPSDE(), GaussianMixture.gaussian(jnp.zeros(2), jnp.ones(2))
    >>> x = data.sample(jax.random.key(0), 4)
    >>> logp, z, info = sf.log_likelihood(None, sde, data.score(sde), x, divergence="exact")
    >>> logp.shape, z.shape, bool(info.success.all())
    ((4,), (4, 2), True)
  """
  name = "log_likelihood"
  x = jnp.asarray(x) if isinstance(x, np.ndarray) else x
  flow.check_state(name, x, "x")
  flow.check_solve_options(name, sde, score_fn, eps, rtol, atol, max_steps)
  if divergence not in ("hutchinson", "exact"):
    raise ValueError(f"{name}: divergence must be 'hutchinson' or 'exact', got {divergence!r}.")
  _check_probe_options(probe, num_probes)
  if divergence == "hutchinson" and key is None:
    raise ValueError(f"{name}: the Hutchinson estimator needs a PRNG key (got key=None); pass "
                     "jax.random.key(seed), or use divergence='exact'.")
  if prior_logp_fn is not None and not callable(prior_logp_fn):
    raise ValueError(f"{name}: prior_logp_fn must be a callable z [B, *D] -> [B], got {type(prior_logp_fn).__name__}.")
  if not isinstance(per_example, bool):
    raise ValueError(f"{name}: per_example must be True or False, got {per_example!r}.")
  sde = flow.as_leaf_arrays(sde)
  return _log_likelihood_impl(
      key if divergence == "hutchinson" else None, sde, score_fn, prior_logp_fn, x,
      jnp.asarray(eps, x.dtype), jnp.asarray(rtol, x.dtype), jnp.asarray(atol, x.dtype),
      divergence=divergence, probe=probe, num_probes=num_probes if divergence == "hutchinson" else 1,
      solver=flow.resolve_solver(solver), max_steps=max_steps, per_example=per_example,
      node_types=flow.node_types((sde, score_fn, prior_logp_fn)))


def _flow(name, sde, score_fn, x, forward, eps, rtol, atol, solver, max_steps, per_example, error_control):
  x = jnp.asarray(x) if isinstance(x, np.ndarray) else x
  flow.check_state(name, x, "x" if forward else "z")
  flow.check_solve_options(name, sde, score_fn, eps, rtol, atol, max_steps)
  if not isinstance(per_example, bool):
    raise ValueError(f"{name}: per_example must be True or False, got {per_example!r}.")
  flow.check_error_control(name, error_control)
  sde = flow.as_leaf_arrays(sde)
  start, end = jnp.asarray(eps, x.dtype), jnp.asarray(sde.T, x.dtype)
  if not forward:
    start, end = end, start
  return _flow_impl(sde, score_fn, x, start, end, jnp.asarray(rtol, x.dtype), jnp.asarray(atol, x.dtype),
                    solver=flow.resolve_solver(solver), max_steps=max_steps, per_example=per_example,
                    error_control=error_control, node_types=flow.node_types((sde, score_fn)))


def encode(sde: AbstractSDE, score_fn: ScoreFn, x, *, eps=1e-5, rtol=1e-5, atol=1e-5, solver="dopri5",
           max_steps: int = 4096, per_example: bool = False, error_control: flow.ErrorControl = "example"):
  r"""Maps data to latents, :math:`z = x(T)`, by solving the probability-flow ODE forward from `eps` to `T`.

  The map is deterministic and invertible (:func:`decode` is its inverse up to the solver tolerance), so
  latents can be interpolated and decoded back (Song et al. 2021, Section 4.3).

  Args:
    sde, score_fn, eps, rtol, atol, solver, max_steps, per_example: as in :func:`log_likelihood`.
    error_control: `"example"` (every example meets the tolerance) or `"batch"` (the RMS over the batch does;
      the 2021 code's control), see :mod:`scoreflow.flow`.
    x: data in model space, `[B, *D]`.

  Returns:
    `(z [B, *D], info)` with an :class:`ODESolveInfo`; failed examples have NaN latents and a non-zero status.

  Raises:
    ValueError: as in :func:`log_likelihood`.
  """
  return _flow("encode", sde, score_fn, x, True, eps, rtol, atol, solver, max_steps, per_example, error_control)


def decode(sde: AbstractSDE, score_fn: ScoreFn, z, *, eps=1e-5, rtol=1e-5, atol=1e-5, solver="dopri5",
           max_steps: int = 4096, per_example: bool = False, error_control: flow.ErrorControl = "example"):
  r"""Maps latents to data, :math:`x = x(\epsilon)`, by solving the probability-flow ODE backward from `T` to `eps`.

  The inverse of :func:`encode` up to the solver tolerance; decoding prior samples is ODE sampling: with the same
  solver, tolerances and `eps`, `decode(z)` equals `ode_sample(..., x_T=z)` (both run
  :func:`scoreflow.flow.solve_flow`).

  Args:
    sde, score_fn, eps, rtol, atol, solver, max_steps, per_example: as in :func:`log_likelihood`.
    error_control: as in :func:`encode`.
    z: latents, `[B, *D]`.

  Returns:
    `(x [B, *D], info)` with an :class:`ODESolveInfo`; failed examples have NaN outputs and a non-zero status.

  Raises:
    ValueError: as in :func:`log_likelihood`.
  """
  return _flow("decode", sde, score_fn, z, False, eps, rtol, atol, solver, max_steps, per_example, error_control)


# --- Bits per dimension. -------------------------------------------------------------------------------


def _event_size_and_log_scale(name, event_shape, scale):
  if isinstance(event_shape, (int, np.integer)) and not isinstance(event_shape, bool):
    event_shape = (int(event_shape),)
  event_shape = tuple(event_shape)
  if not event_shape or any(not isinstance(d, (int, np.integer)) or d < 1 for d in event_shape):
    raise ValueError(f"{name}: event_shape must be a positive int D or a shape tuple like x.shape[1:], "
                     f"got {event_shape!r}.")
  scale = jnp.asarray(scale)
  try:
    broadcast = np.broadcast_shapes(scale.shape, event_shape)
  except ValueError:
    broadcast = None
  if broadcast != event_shape:
    raise ValueError(f"{name}: scale must be a scalar or broadcast to the event shape {event_shape}, "
                     f"got shape {scale.shape}.")
  concrete = concrete_value(scale)
  if concrete is not None and np.any(concrete == 0):
    raise ValueError(f"{name}: scale must be non-zero (the scaler must be invertible), got {concrete.tolist()}.")
  num_dims = math.prod(event_shape)
  log_scale_sum = jnp.sum(jnp.broadcast_to(jnp.log(jnp.abs(scale)), event_shape))
  return num_dims, log_scale_sum


def bits_per_dim(logp, event_shape, *, num_levels: int = 256, scale=2.0):
  r"""Bits per dimension of discrete data from the model's log-density of dequantized, scaled data.

  Discrete data :math:`v \in \{0, \dots, L-1\}^D` (`L = num_levels`) are dequantized to the unit cube,
  :math:`y = (v + u)/L` with :math:`u \sim U[0, 1)^D`, and scaled to model space by the affine map
  :math:`x = a \odot y + b` (`a = scale`, a scalar or per dimension; the shift `b` does not enter). Then

  .. math:: \log P(v) \;\ge\; E_u\big[\log p_X(x)\big] + \sum_d \log|a_d| - D\log L

  (the cell of `v` has volume :math:`L^{-D}` in `y`-space; Jensen's inequality for the dequantization;
  Theis et al. 2016), and per example

  .. math:: \mathrm{bpd} = -\frac{\log p_X(x) + \sum_d\log|a_d| - D\log L}{D\log 2}
      = -\frac{\log p_X(x)}{D \log 2} - \frac1D\sum_d\log_2|a_d| + \log_2 L,

  whose mean over `u` (and data) bounds the discrete negative log-likelihood in bits from above. For 8-bit
  images centred to `[-1, 1]` (`a = 2`, `L = 256`) the offset is :math:`8 - 1 = 7` bits; for images kept in
  `[0, 1]` (`a = 1`) it is 8 bits: the two constants the 2021 code hard-coded. If a scaler is written in
  terms of the integer values, :math:`x = c\,v + b`, pass `scale = c * num_levels`.

  Args:
    logp: log-densities in nats of the dequantized data in model space, any shape (e.g. `[B]`).
    event_shape: the data's event shape `x.shape[1:]`, or the number of dimensions `D` as an int.
    num_levels: number of quantization levels `L` per dimension (256 for 8-bit images, 17 for scikit-learn's
      digits, whose values are 0-16).
    scale: the scaler's multiplier `a` from the unit cube to model space: a scalar or an array that
      broadcasts to `event_shape`.

  Returns:
    Bits per dimension, the shape and dtype of `logp`.

  Raises:
    ValueError: for a bad `event_shape`, `num_levels < 2`, or a zero or mis-shaped `scale`.

  Example:
    >>> import jax.numpy as jnp, scoreflow as sf
    >>> d = 3 * 32 * 32
    >>> logp_uniform = -d * jnp.log(2.0)  # The uniform density on [-1, 1]^D costs exactly 8 bits/dim.
    >>> round(float(sf.bits_per_dim(logp_uniform, (32, 32, 3), num_levels=256, scale=2.0)), 4)
    8.0
  """
  name = "bits_per_dim"
  if not isinstance(num_levels, (int, np.integer)) or isinstance(num_levels, bool) or num_levels < 2:
    raise ValueError(f"{name}: num_levels must be an int >= 2, got {num_levels!r}.")
  logp = jnp.asarray(logp)
  if not jnp.issubdtype(logp.dtype, jnp.floating):
    raise ValueError(f"{name}: logp must be floating point, got dtype {logp.dtype}.")
  num_dims, log_scale_sum = _event_size_and_log_scale(name, event_shape, scale)
  log_scale_sum = log_scale_sum.astype(logp.dtype)
  return -(logp + log_scale_sum - num_dims * math.log(num_levels)) / (num_dims * math.log(2.0))


def dequantize(key, values, *, num_levels: int = 256, scale=2.0, shift=-1.0, dtype=jnp.float32):
  r"""Uniformly dequantized, scaled data :math:`x = a\,(v + u)/L + b` with :math:`u \sim U[0, 1)^D`.

  The defaults map 8-bit images to `[-1, 1)`: :math:`x = 2(v + u)/256 - 1`. Use the same `num_levels` and
  `scale` in :func:`bits_per_dim`. This is the rule of the input pipeline too
  (:meth:`scoreflow.data.AffineScaler.dequantize` of the dequantized scaler :math:`s = a/L`): values stay in the
  cell of their level, so the scaler decodes them back to `v`.

  Args:
    key: PRNG key.
    values: discrete data `[B, *D]` with entries in `0 .. num_levels - 1` (integer or float).
    num_levels: number of quantization levels `L`.
    scale, shift: the affine scaler from the unit cube to model space (scalars or broadcastable to `[*D]`).
    dtype: floating dtype of the result.

  Returns:
    `[B, *D]` continuous data in `dtype`.
  """
  values = jnp.asarray(values)
  if values.ndim < 2:
    raise ValueError(f"dequantize: values must have shape [B, *D], got shape {values.shape}.")
  scaler = AffineScaler(jnp.asarray(scale, dtype) / num_levels, jnp.asarray(shift, dtype), num_levels=num_levels,
                        dequantized=True)
  return uniform_dequantize(key, values, dtype, scaler=scaler)


class BitsPerDimEstimate(NamedTuple):
  """Dataset bits/dim from `R` dequantization (and probe) draws of each of `N` examples (host NumPy values);
  :func:`summarize_bits_per_dim` makes it."""

  mean: float  # Mean bits/dim over the examples whose draws are all finite, and their draws.
  stderr: float  # Standard error of `mean` as an estimate of the data distribution's bits/dim: the std of the
  #                per-example means over the examples / sqrt(N) (it includes the dequantization and probe noise,
  #                as each example's mean over draws is an independent draw).
  dequantization_stderr: float  # Monte-Carlo error of `mean` for these N examples: std of `repeat_means` /
  #                               sqrt(R) (NaN for R = 1).
  repeat_means: np.ndarray  # [R] dataset mean of each draw.
  example_means: np.ndarray  # [N] each example's mean over draws.
  num_failed: int  # Examples with a non-finite draw (a failed solve); left out of `mean` and the errors.


def summarize_bits_per_dim(draws) -> BitsPerDimEstimate:
  """The one reduction of per-example bits/dim draws `[R, N]` (NaN for failed solves) to a dataset estimate.

  Examples with any non-finite draw are counted in `num_failed` and left out.
  """
  draws = np.asarray(draws, np.float64)
  if draws.ndim != 2 or draws.size == 0:
    raise ValueError(f"summarize_bits_per_dim: draws must be a non-empty [R, N] array, got shape {draws.shape}.")
  num_repeats = draws.shape[0]
  example_means = draws.mean(axis=0)
  finite = np.isfinite(example_means)
  good = draws[:, finite]
  repeat_means = good.mean(axis=1) if good.size else np.full(num_repeats, np.nan)
  count = int(finite.sum())
  stderr = float(np.std(example_means[finite], ddof=1) / math.sqrt(count)) if count > 1 else float("nan")
  dequantization_stderr = (float(np.std(repeat_means, ddof=1) / math.sqrt(num_repeats))
                           if num_repeats > 1 and good.size else float("nan"))
  return BitsPerDimEstimate(mean=float(good.mean()) if good.size else float("nan"), stderr=stderr,
                            dequantization_stderr=dequantization_stderr, repeat_means=repeat_means,
                            example_means=example_means, num_failed=int(draws.shape[1] - count))


@eqx.filter_jit
def _batch_bits_per_dim(key, sde, score_fn, values, *, num_levels, scale, shift, dtype, likelihood_kwargs,
                        node_types):
  del node_types  # Only a cache key (see _node_types).
  key_dequantize, key_likelihood = jax.random.split(key)
  x = dequantize(key_dequantize, values, num_levels=num_levels, scale=scale, shift=shift, dtype=dtype)
  logp, _, info = log_likelihood(key_likelihood, sde, score_fn, x, **dict(likelihood_kwargs))
  return bits_per_dim(logp, x.shape[1:], num_levels=num_levels, scale=scale), info.success


def evaluate_bits_per_dim(key, sde: AbstractSDE, score_fn: ScoreFn, batches: Iterable[Any], *, num_levels: int = 256,
                          scale=2.0, shift=-1.0, num_repeats: int = 5, dtype=jnp.float32,
                          **likelihood_kwargs) -> BitsPerDimEstimate:
  r"""Bits/dim of a dataset, averaged over `num_repeats` dequantization (and probe) draws per example.

  For every batch of discrete data and every repeat `r`, draws :math:`u`, computes
  :math:`x = a(v + u)/L + b`, its :func:`log_likelihood` and :func:`bits_per_dim`. One pass over the data;
  each batch is one compiled call per repeat (batches of one shape compile once).

  Args:
    key: PRNG key.
    sde, score_fn: as in :func:`log_likelihood`.
    batches: iterable of discrete data batches `[B, *D]` (NumPy or JAX) with values in `0 .. num_levels - 1`.
    num_levels, scale, shift: quantization levels and the affine scaler, as in :func:`dequantize`.
    num_repeats: dequantization draws per example (at least 2 for a standard error).
    dtype: floating dtype of the model's inputs.
    **likelihood_kwargs: passed on to :func:`log_likelihood` (`eps`, `rtol`, `atol`, `divergence`, ...).

  Returns:
    A :class:`BitsPerDimEstimate`.

  Raises:
    ValueError: for `num_repeats < 1` or an empty `batches`.
  """
  if not isinstance(num_repeats, int) or num_repeats < 1:
    raise ValueError(f"evaluate_bits_per_dim: num_repeats must be an int >= 1, got {num_repeats!r}.")
  kwargs = tuple(sorted(likelihood_kwargs.items()))
  per_batch = []
  for index, values in enumerate(batches):
    draws = []
    for repeat in range(num_repeats):
      draw_key = jax.random.fold_in(jax.random.fold_in(key, index), repeat)
      bpd, success = _batch_bits_per_dim(draw_key, sde, score_fn, jnp.asarray(values), num_levels=num_levels,
                                         scale=scale, shift=shift, dtype=dtype, likelihood_kwargs=kwargs,
                                         node_types=flow.node_types((sde, score_fn, kwargs)))
      draws.append(np.where(np.asarray(success), np.asarray(bpd, np.float64), np.nan))
    per_batch.append(np.stack(draws))  # [R, B]
  if not per_batch:
    raise ValueError("evaluate_bits_per_dim: batches yielded no data.")
  return summarize_bits_per_dim(np.concatenate(per_batch, axis=1))
