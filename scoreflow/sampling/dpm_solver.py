r"""DPM-Solver++ (Lu, Zhou, Bao, Chen, Li, Zhu 2022): exponential integrators of the probability-flow ODE in the
data prediction :math:`\hat x_0`, first order (1) and multistep second order (2M).

With :math:`\lambda_t = \log(\alpha_t/\sigma_t)` (half the log-SNR) the probability-flow ODE of every linear process
has the exact solution

.. math:: x_t = \frac{\sigma_t}{\sigma_s}x_s + \sigma_t\int_{\lambda_s}^{\lambda_t} e^{\lambda}\,
    \hat x_0(x_\lambda, \lambda)\,d\lambda ,

and freezing :math:`\hat x_0` (order 1) or extrapolating it linearly in :math:`\lambda` from the last two
evaluations (2M) gives, with :math:`h_i = \lambda_{t_i} - \lambda_{t_{i-1}}` and :math:`r_i = h_{i-1}/h_i`,

.. math:: x_{t_i} = \frac{\sigma_{t_i}}{\sigma_{t_{i-1}}}x_{t_{i-1}} - \alpha_{t_i}(e^{-h_i} - 1)\,D_i, \qquad
    D_i = \Big(1 + \frac{1}{2r_i}\Big)\hat x_0(x_{t_{i-1}}) - \frac{1}{2r_i}\hat x_0(x_{t_{i-2}})

(order 1: :math:`D_i = \hat x_0(x_{t_{i-1}})`, which is DDIM with :math:`\eta = 0`; 2M takes a first-order first
step). One score evaluation per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scoreflow._validation import per_example
from scoreflow.parameterization import score_to_x0
from scoreflow.sde import AbstractSDE
from scoreflow.sampling import _common
from scoreflow.sampling._common import SampleInfo, ScoreFn, Spacing


def dpm_solver_pp_sample(key, sde: AbstractSDE, score_fn: ScoreFn, shape, *, num_steps: int = 20, order: int = 2,
                         spacing: Spacing = "log_snr", eps=1e-3, denoise: bool = False, dtype=jnp.float32,
                         x_T=None) -> tuple[jax.Array, SampleInfo]:
  r"""Samples with DPM-Solver++ (order 1 or 2M) from :math:`x_T \sim` prior at `T` to :math:`\epsilon`.

  `shape`, `num_steps`, `order`, `spacing`, `denoise` and `dtype` must be Python values (close over them when
  jitting); `eps` may be traced.

  Args:
    key: PRNG key (only used to draw `x_T`).
    sde: the forward process.
    score_fn: `score_fn(x [B, *D], t [B]) -> [B, *D]`; the solver uses :math:`\hat x_0 = (x + \sigma_t^2 s)/\alpha_t`.
    shape: sample shape `[B, *D]`.
    num_steps: number of steps `N` (= score evaluations).
    order: 1 (equal to DDIM with :math:`\eta=0`) or 2 (the multistep 2M solver).
    spacing: `"log_snr"` (uniform in :math:`\lambda`, recommended by Lu et al. for low resolutions) or
      `"uniform"` in `t`.
    eps: the final time :math:`\epsilon`.
    denoise: if True, finish with Tweedie's :math:`\hat x_0` at :math:`\epsilon` (one more evaluation).
    dtype: floating dtype of the samples.
    x_T: optional initial state `[B, *D]` replacing the prior draw.

  Returns:
    `(x, info)`: samples `[B, *D]` and a :class:`~scoreflow.sampling.SampleInfo` with `nfe = N` (+1 with `denoise`).

  Raises:
    ValueError: for `order` not in {1, 2}, `num_steps < 1`, `eps` outside `(0, T)`, an unknown spacing, a bad
      `shape`, or `x_T` of the wrong shape.

  References:
    Lu, Zhou, Bao, Chen, Li, Zhu. DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
    Models. 2022. (Algorithm 2.)
    Lu, Zhou, Bao, Chen, Li, Zhu. DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in
    Around 10 Steps. NeurIPS 2022.

  Example:
    >>> import jax, jax.numpy as jnp, scoreflow as sf
    >>> from scoreflow.testing import GaussianMixture
    >>> sde = sf.VPSDE()
    >>> score_fn = GaussianMixture.gaussian(jnp.zeros(2), 1.0).score(sde)
    >>> x, info = sf.dpm_solver_pp_sample(jax.random.key(0), sde, score_fn, (8, 2), num_steps=15)
    >>> x.shape, int(info.nfe)
    ((8, 2), 15)
  """
  owner = "dpm_solver_pp_sample"
  shape, dtype, score_fn, x = _common.start(owner, key, sde, score_fn, shape, dtype, eps, x_T, num_steps)
  if order not in (1, 2):
    raise ValueError(f"{owner}: order must be 1 or 2 (the multistep 2M solver), got {order!r}.")
  times = _common.time_grid(sde, num_steps, eps, spacing, dtype)

  def data_prediction(x, t):
    return score_to_x0(sde, score_fn(x, t), x, t)

  def half_log_snr(t):
    return sde.log_alpha(t) - jnp.log(sde.sigma(t))

  def step(carry, inputs):
    x, previous_x0, previous_h = carry
    index, t, t_next = inputs
    t, t_next = _common.batch_time(t, x), _common.batch_time(t_next, x)
    x0 = data_prediction(x, t)
    h = half_log_snr(t_next) - half_log_snr(t)
    if order == 2:
      r = previous_h / h
      extrapolated = (1 + 0.5 / per_example(r, x)) * x0 - 0.5 / per_example(r, x) * previous_x0
      x0_used = jnp.where(index > 0, extrapolated, x0)
    else:
      x0_used = x0
    x_next = (per_example(sde.sigma(t_next) / sde.sigma(t), x) * x
              - per_example(sde.alpha(t_next) * jnp.expm1(-h), x) * x0_used)
    return (x_next, x0, h), None

  carry = (x, jnp.zeros_like(x), jnp.ones(shape[:1], _common.time_dtype(dtype)))
  (x, _, _), _ = jax.lax.scan(step, carry, (jnp.arange(num_steps), times[:-1], times[1:]))
  return _common.finish(sde, score_fn, x, eps, denoise, _common.fixed_step_info(num_steps, num_steps))
