r"""The EDM sampler (Karras, Aittala, Aila, Laine 2022, Algorithm 2): Heun's method in the noise level with optional
stochastic churn, for any linear process through the :math:`\sigma(t)` mapping.

Every process here has :math:`x_t = \alpha_t(x_0 + \tilde\sigma_t\epsilon)` with
:math:`\tilde\sigma_t = \sigma_t/\alpha_t = e^{-\lambda_t/2}`. In the scaled variable :math:`\tilde x = x/\alpha` the
probability-flow ODE becomes the EDM ODE

.. math:: \frac{d\tilde x}{d\tilde\sigma} = \frac{\tilde x - D(\tilde x; \tilde\sigma)}{\tilde\sigma}, \qquad
    D(\tilde x; \tilde\sigma) = \tilde x + \tilde\sigma^2\alpha_t\, s_\theta(\alpha_t\tilde x, t),

where `t` solves :math:`\tilde\sigma_t = \tilde\sigma`, i.e. `t = sde.t_from_log_snr(-2 log sigma)`, and `D` is
Tweedie's denoiser. The noise levels follow Karras et al. Eq. 5,

.. math:: \tilde\sigma_i = \big(\tilde\sigma_{\max}^{1/\rho} + \tfrac{i}{N-1}(\tilde\sigma_{\min}^{1/\rho}
    - \tilde\sigma_{\max}^{1/\rho})\big)^\rho, \quad i < N, \qquad \tilde\sigma_N = 0,

with :math:`\tilde\sigma_{\max} = \tilde\sigma_T` and :math:`\tilde\sigma_{\min} = \tilde\sigma_\epsilon`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scoreflow._validation import per_example
from scoreflow.sde import AbstractSDE
from scoreflow.sampling import _common
from scoreflow.sampling._common import SampleInfo, ScoreFn


def edm_sigmas(sde: AbstractSDE, num_steps: int, *, rho=7.0, eps=1e-3, dtype=jnp.float32):
  r"""The `num_steps + 1` noise levels :math:`\tilde\sigma_0 > \dots > \tilde\sigma_{N-1} > \tilde\sigma_N = 0`
  of Karras et al. (2022), Eq. 5, between :math:`\tilde\sigma_T` and :math:`\tilde\sigma_\epsilon`. `[N + 1]`."""
  _common.check_num_steps("edm_sigmas", num_steps)
  _common.check_eps("edm_sigmas", sde, eps)
  _common.check_range("edm_sigmas", "rho", rho, low=0, low_open=True)
  T, eps = jnp.asarray(sde.T, dtype), jnp.asarray(eps, dtype)
  sigma_max = jnp.exp(-0.5 * sde.log_snr(T))
  sigma_min = jnp.exp(-0.5 * sde.log_snr(eps))
  fraction = jnp.arange(num_steps, dtype=dtype) / max(num_steps - 1, 1)
  inv_rho = 1 / jnp.asarray(rho, dtype)
  sigmas = (sigma_max**inv_rho + fraction * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
  return jnp.concatenate([sigmas, jnp.zeros((1,), dtype)]).astype(dtype)


def edm_sample(key, sde: AbstractSDE, score_fn: ScoreFn, shape, *, num_steps: int = 18, rho=7.0, s_churn=0.0,
               s_min=0.0, s_max=float("inf"), s_noise=1.0, eps=1e-3, dtype=jnp.float32,
               x_T=None) -> tuple[jax.Array, SampleInfo]:
  r"""Samples with Karras et al. (2022), Algorithm 2, ending at :math:`\tilde\sigma = 0` (so it always denoises).

  At each level :math:`i < N`:

  1. Increase noise temporarily: :math:`\gamma_i = \min(S_{\rm churn}/N, \sqrt2 - 1)` if
     :math:`S_{\min} \le \tilde\sigma_i \le S_{\max}` else 0; :math:`\hat\sigma = (1+\gamma_i)\tilde\sigma_i`;
     :math:`\hat x = \tilde x_i + \sqrt{\hat\sigma^2 - \tilde\sigma_i^2}\,S_{\rm noise}\,z`.
  2. Euler step: :math:`d = (\hat x - D(\hat x; \hat\sigma))/\hat\sigma`,
     :math:`\tilde x_{i+1} = \hat x + (\tilde\sigma_{i+1} - \hat\sigma)\,d`.
  3. Apply 2nd order correction if :math:`\tilde\sigma_{i+1} \neq 0`:
     :math:`d' = (\tilde x_{i+1} - D(\tilde x_{i+1}; \tilde\sigma_{i+1}))/\tilde\sigma_{i+1}`,
     :math:`\tilde x_{i+1} = \hat x + (\tilde\sigma_{i+1} - \hat\sigma)(d + d')/2`.

  The last step (to :math:`\tilde\sigma_N = 0`) is an Euler step, which returns :math:`D(\hat x; \hat\sigma)`.
  With churn, :math:`\hat\sigma` may exceed :math:`\tilde\sigma_T`; `score_fn` then sees times beyond `T`
  (set `s_max` below :math:`\tilde\sigma_T` to avoid it). The first `N - 1` levels run as a `lax.scan`.

  `shape`, `num_steps` and `dtype` must be Python values (close over them when jitting); the floats may be traced.

  Args:
    key: PRNG key.
    sde: the forward process.
    score_fn: `score_fn(x [B, *D], t [B]) -> [B, *D]`.
    shape: sample shape `[B, *D]`.
    num_steps: number of noise levels `N` (18 in Karras et al. for CIFAR-10).
    rho: the schedule exponent :math:`\rho` (7).
    s_churn, s_min, s_max, s_noise: the stochasticity parameters :math:`S_{\rm churn}, S_{\min}, S_{\max},
      S_{\rm noise}` (0, 0, inf, 1 is the deterministic sampler; Karras et al. use e.g. 80, 0.05, 50, 1.003 on
      ImageNet-64), in units of :math:`\tilde\sigma`.
    eps: the time whose :math:`\tilde\sigma_\epsilon` is the smallest non-zero level.
    dtype: floating dtype of the samples.
    x_T: optional initial state `[B, *D]` (in `x`, not :math:`\tilde x`) replacing the prior draw.

  Returns:
    `(x, info)`: samples `[B, *D]` and a :class:`~scoreflow.sampling.SampleInfo` with `nfe = 2N - 1`.

  Raises:
    ValueError: for `num_steps < 1`, `rho <= 0`, negative `s_churn` or `s_noise`, `eps` outside `(0, T)`,
      a bad `shape`, or `x_T` of the wrong shape.

  References:
    Karras, Aittala, Aila, Laine. Elucidating the Design Space of Diffusion-Based Generative Models.
    NeurIPS 2022. (Algorithm 2, Eq. 5.)

  Example:
    >>> import jax, jax.numpy as jnp, scoreflow as sf
    >>> from scoreflow.testing import GaussianMixture
    >>> sde = sf.VESDE(sigma_max=80.0)
    >>> score_fn = GaussianMixture.gaussian(jnp.zeros(2), 1.0).score(sde)
    >>> x, info = sf.edm_sample(jax.random.key(0), sde, score_fn, (8, 2), num_steps=18)
    >>> x.shape, int(info.nfe)
    ((8, 2), 35)
  """
  owner = "edm_sample"
  key_init, key_steps = jax.random.split(key)
  shape, dtype, score_fn, x = _common.start(owner, key_init, sde, score_fn, shape, dtype, eps, x_T, num_steps)
  _common.check_range(owner, "s_churn", s_churn, low=0)
  _common.check_range(owner, "s_noise", s_noise, low=0)
  _common.check_range(owner, "rho", rho, low=0, low_open=True)
  sigmas = edm_sigmas(sde, num_steps, rho=rho, eps=eps, dtype=dtype)
  T = jnp.asarray(sde.T, dtype)
  x_scaled = x / per_example(sde.alpha(_common.batch_time(T, x)), x)
  gamma_max = jnp.minimum(jnp.asarray(s_churn, dtype) / num_steps, jnp.sqrt(jnp.asarray(2.0, dtype)) - 1)

  def denoise(x_scaled, sigma):
    """:math:`D(\\tilde x; \\tilde\\sigma)`; `sigma` scalar > 0."""
    t = _common.batch_time(sde.t_from_log_snr(-2 * jnp.log(sigma)), x_scaled)
    alpha = per_example(sde.alpha(t), x_scaled)
    return x_scaled + sigma**2 * alpha * score_fn(alpha * x_scaled, t)

  def churn(key, x_scaled, sigma):
    # 1. Increase noise temporarily.
    gamma = jnp.where((sigma >= s_min) & (sigma <= s_max), gamma_max, 0)
    sigma_hat = sigma * (1 + gamma)
    noise = s_noise * jax.random.normal(key, x_scaled.shape, dtype)
    # sqrt(sigma_hat^2 - sigma^2) written so that gamma = 0 gives exactly 0: the difference of squares can round
    # (fused multiply-add) to a tiny negative number, whose square root is NaN.
    return x_scaled + sigma * jnp.sqrt(gamma * (2 + gamma)) * noise, sigma_hat

  def heun_step(x_scaled, inputs):
    key, sigma, sigma_next = inputs
    x_hat, sigma_hat = churn(key, x_scaled, sigma)
    # 2. Euler step.
    slope = (x_hat - denoise(x_hat, sigma_hat)) / sigma_hat
    x_next = x_hat + (sigma_next - sigma_hat) * slope
    # 3. Apply 2nd order correction.
    slope_next = (x_next - denoise(x_next, sigma_next)) / sigma_next
    return x_hat + (sigma_next - sigma_hat) * 0.5 * (slope + slope_next), None

  step_keys = jax.random.split(key_steps, num_steps)
  x_scaled, _ = jax.lax.scan(heun_step, x_scaled, (step_keys[:-1], sigmas[:-2], sigmas[1:-1]))
  # The last step goes to sigma = 0: an Euler step, which lands on the denoiser's output.
  x_hat, sigma_hat = churn(step_keys[-1], x_scaled, sigmas[-2])
  x = denoise(x_hat, sigma_hat)  # alpha(0) = 1, so x_0 = x_scaled at sigma = 0.
  return x, _common.fixed_step_info(2 * num_steps - 1, num_steps)
