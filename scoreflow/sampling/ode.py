r"""Sampling by integrating the probability-flow ODE from `T` down to :math:`\epsilon` (Song et al. 2021, Sec. 4.3).

.. math:: \frac{dx}{dt} = f(t)\,x - \tfrac12 g(t)^2\, s_\theta(x, t),

whose solutions started from :math:`p_T` have the marginals :math:`p_t` of the forward SDE. Adaptive integration
(Tsit5 or Dormand–Prince 5(4) with a PID step-size controller: the probability-flow core of :mod:`scoreflow.flow`)
runs on device inside one `while_loop`; fixed-step Euler and Heun run as a `lax.scan`.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from scoreflow import flow
from scoreflow.sde import AbstractSDE
from scoreflow.sampling import _common
from scoreflow.sampling._common import SampleInfo, ScoreFn, Spacing

OdeMethod = Literal["tsit5", "dopri5", "euler", "heun"]

_ADAPTIVE_METHODS = ("tsit5", "dopri5")
_FIXED_NFE_PER_STEP = {"euler": 1, "heun": 2}


def ode_sample(key, sde: AbstractSDE, score_fn: ScoreFn, shape, *, method: OdeMethod = "tsit5", rtol=1e-5,
               atol=1e-5, max_steps: int = 4096, error_control: flow.ErrorControl = "example",
               num_steps: int | None = None, spacing: Spacing = "uniform", eps=1e-3, denoise: bool = False,
               dtype=jnp.float32, x_T=None) -> tuple[jax.Array, SampleInfo]:
  r"""Draws samples by solving the probability-flow ODE from :math:`x_T \sim` prior at `T` to :math:`\epsilon`.

  Adaptive methods (`"tsit5"`, `"dopri5"`) run the probability-flow core :func:`scoreflow.flow.solve_flow`, the
  solve of :func:`~scoreflow.decode` too: the batch shares its steps, and with `error_control="example"` every
  example meets `rtol`/`atol` (`"batch"`: their RMS over the batch does, as with the 2021 code's `solve_ivp` on
  the flattened batch: fewer steps, looser worst case). They never raise under `jit`: check `info.status`
  (:class:`~scoreflow.flow.SolveStatus`: 0 success, 1 `max_steps` reached, 2 a non-finite result, 3 another
  failure; failed samples are NaN). Fixed-step methods take `num_steps` steps on a grid `uniform` in `t` or
  uniform in log-SNR (`spacing`):

  * `"euler"`: :math:`x_{i+1} = x_i + h_i v(x_i, t_i)`, 1 evaluation per step, order 1;
  * `"heun"`: :math:`x_{i+1} = x_i + \tfrac{h_i}{2}[v(x_i, t_i) + v(x_i + h_i v(x_i, t_i), t_{i+1})]`,
    2 evaluations per step, order 2.

  `shape`, `method`, `max_steps`, `num_steps`, `spacing`, `denoise` and `dtype` must be Python values (close
  over them, or list them in `static_argnames`, when jitting); `rtol`, `atol`, `eps` may be traced.

  Args:
    key: PRNG key (only used to draw `x_T`).
    sde: the forward process.
    score_fn: `score_fn(x [B, *D], t [B]) -> [B, *D]`.
    shape: sample shape `[B, *D]`.
    method: `"tsit5"` (Tsitouras 2011), `"dopri5"` (Dormand & Prince 1980), `"euler"` or `"heun"`.
    rtol, atol: tolerances of the adaptive methods.
    max_steps: step budget of the adaptive methods (accepted plus rejected).
    error_control: `"example"` or `"batch"`, the adaptive methods' error norm (see above).
    num_steps: number of steps of the fixed-step methods (required for them, ignored otherwise).
    spacing: time grid of the fixed-step methods, `"uniform"` or `"log_snr"`.
    eps: the final time :math:`\epsilon`.
    denoise: if True, finish with Tweedie's denoiser :math:`\hat x_0 = (x + \sigma_\epsilon^2 s_\theta(x, \epsilon))
      /\alpha_\epsilon` at :math:`\epsilon` (one more evaluation).
    dtype: floating dtype of the samples and of the integration.
    x_T: optional initial state `[B, *D]` replacing the prior draw.

  Returns:
    `(x, info)`: samples `[B, *D]` in `dtype` and a :class:`~scoreflow.sampling.SampleInfo`; for adaptive methods
    `nfe = 1 + 6 * info.num_steps` (plus one with `denoise`), counting rejected steps.

  Raises:
    ValueError: for an unknown method or spacing, a missing `num_steps` with `"euler"`/`"heun"`,
      non-positive tolerances, `eps` outside `(0, T)`, a bad `shape`, or `x_T` of the wrong shape.

  References:
    Song et al. Score-Based Generative Modeling through Stochastic Differential Equations. ICLR 2021. (Eq. 13.)
    Kidger. On Neural Differential Equations. PhD thesis, 2021. (diffrax.)

  Example:
    >>> import jax, jax.numpy as jnp, scoreflow as sf
    >>> from scoreflow.testing import GaussianMixture
    >>> sde = sf.VPSDE()
    >>> score_fn = GaussianMixture.gaussian(jnp.zeros(2), 1.0).score(sde)
    >>> x, info = sf.ode_sample(jax.random.key(0), sde, score_fn, (8, 2), rtol=1e-4, atol=1e-4)
    >>> x.shape, int(info.status)
    ((8, 2), 0)
  """
  owner = "ode_sample"
  shape, dtype, score_fn, x = _common.start(owner, key, sde, score_fn, shape, dtype, eps, x_T)
  if method not in _ADAPTIVE_METHODS and method not in _FIXED_NFE_PER_STEP:
    raise ValueError(f"{owner}: unknown method {method!r}; choose one of "
                     f"{sorted(_ADAPTIVE_METHODS) + sorted(_FIXED_NFE_PER_STEP)}.")

  if method in _ADAPTIVE_METHODS:
    _common.check_num_steps(owner, max_steps, name="max_steps")
    _common.check_range(owner, "rtol", rtol, low=0, low_open=True)
    _common.check_range(owner, "atol", atol, low=0, low_open=True)
    flow.check_error_control(owner, error_control)
    t0, t1 = jnp.asarray(sde.T, dtype), jnp.asarray(eps, dtype)
    x, solve_info = flow.solve_flow(sde, score_fn, x, t0, t1, jnp.asarray(rtol, dtype), jnp.asarray(atol, dtype),
                                    solver=flow.resolve_solver(method), max_steps=max_steps,
                                    error_control=error_control)
    # Shared steps: every example's counts are the batch's; a failure of any example is the batch's status.
    info = SampleInfo(nfe=jnp.max(solve_info.nfe), num_steps=jnp.max(solve_info.num_steps),
                      num_rejected_steps=jnp.max(solve_info.num_rejected_steps), status=jnp.max(solve_info.status))
  else:
    if num_steps is None:
      raise ValueError(f"{owner}: method={method!r} is a fixed-step method and needs num_steps (a Python int "
                       ">= 1); pass e.g. num_steps=100, or use method='tsit5' for adaptive steps.")
    _common.check_num_steps(owner, num_steps)
    times = _common.time_grid(sde, num_steps, eps, spacing, dtype)

    def velocity(x, t):
      return sde.probability_flow_drift(score_fn, x, _common.batch_time(t, x))

    def euler_step(x, ts):
      t, t_next = ts
      return x + (t_next - t).astype(x.dtype) * velocity(x, t), None

    def heun_step(x, ts):
      t, t_next = ts
      h = (t_next - t).astype(x.dtype)
      slope = velocity(x, t)
      slope_next = velocity(x + h * slope, t_next)
      return x + 0.5 * h * (slope + slope_next), None

    x, _ = jax.lax.scan(euler_step if method == "euler" else heun_step, x, (times[:-1], times[1:]))
    info = _common.fixed_step_info(_FIXED_NFE_PER_STEP[method] * num_steps, num_steps)

  return _common.finish(sde, score_fn, x, eps, denoise, info)
