r"""DDIM: denoising diffusion implicit models (Song, Meng, Ermon 2021), for any process with Gaussian kernels.

With :math:`\hat\epsilon = -\sigma_t s_\theta(x_t, t)` and :math:`\hat x_0 = (x_t - \sigma_t\hat\epsilon)/\alpha_t`,
one step from `t` to `s < t` is

.. math:: x_s = \alpha_s\hat x_0 + \sqrt{\sigma_s^2 - c^2}\,\hat\epsilon + c\,z, \qquad
    c = \eta\,\frac{\sigma_s}{\sigma_t}\sqrt{v}, \quad v = \sigma_t^2 - \frac{\alpha_t^2}{\alpha_s^2}\sigma_s^2,

(the paper's Eq. 12 and 16 with :math:`\bar\alpha = \alpha^2`, :math:`\sqrt{1-\bar\alpha} = \sigma` for VP;
for other processes the same formula in :math:`(\alpha_t, \sigma_t)`). :math:`\eta = 0` is deterministic: the Euler
method for the probability-flow ODE written in :math:`\bar x = x/\alpha` against :math:`\bar\sigma = \sigma/\alpha`,
:math:`d\bar x/d\bar\sigma = \hat\epsilon`. :math:`\eta = 1` draws from the posterior
:math:`q(x_s \mid x_t, \hat x_0)`: the ancestral (DDPM) sampler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from scoreflow._validation import per_example
from scoreflow.sde import AbstractSDE
from scoreflow.sampling import _common
from scoreflow.sampling._common import SampleInfo, ScoreFn, Spacing


def ddim_step(key, sde: AbstractSDE, score_fn: ScoreFn, x, t, t_next, eta):
  r"""One DDIM step from `t` to `t_next < t` (see the module docstring); `x: [B, *D]`, `t, t_next: [B]`.

  Returns:
    `(x_next, x_next_mean)`, both `[B, *D]`: the step with and without its noise :math:`c z`.
  """
  alpha_t, sigma_t = per_example(sde.alpha(t), x), per_example(sde.sigma(t), x)
  alpha_s, sigma_s = per_example(sde.alpha(t_next), x), per_example(sde.sigma(t_next), x)
  eps_hat = -sigma_t * score_fn(x, t)
  x0_hat = (x - sigma_t * eps_hat) / alpha_t
  _, transition_std = sde.transition(t_next, t)
  c = eta * sigma_s / sigma_t * per_example(transition_std, x)
  x_mean = alpha_s * x0_hat + jnp.sqrt(jnp.maximum(sigma_s**2 - c**2, 0)) * eps_hat
  return x_mean + c * jax.random.normal(key, x.shape, x.dtype), x_mean


def ddim_sample(key, sde: AbstractSDE, score_fn: ScoreFn, shape, *, num_steps: int = 50, eta=0.0, eps=1e-3,
                spacing: Spacing = "uniform", denoise: bool = False, dtype=jnp.float32,
                x_T=None) -> tuple[jax.Array, SampleInfo]:
  r"""Samples with DDIM steps on the grid :math:`T = t_0 > \dots > t_N = \epsilon`, as one `lax.scan`.

  `shape`, `num_steps`, `spacing`, `denoise` and `dtype` must be Python values (close over them when jitting);
  `eta` and `eps` may be traced.

  Args:
    key: PRNG key.
    sde: the forward process (DDIM was written for VP; any process with Gaussian kernels works).
    score_fn: `score_fn(x [B, *D], t [B]) -> [B, *D]`.
    shape: sample shape `[B, *D]`.
    num_steps: number of steps `N` (= score evaluations).
    eta: :math:`\eta \in [0, 1]`; 0 is deterministic, 1 is ancestral sampling.
    eps: the final time :math:`\epsilon`.
    spacing: `"uniform"` in `t` or uniform in log-SNR (`"log_snr"`).
    denoise: if True, finish with Tweedie's :math:`\hat x_0` at :math:`\epsilon` (one more evaluation).
    dtype: floating dtype of the samples.
    x_T: optional initial state `[B, *D]` replacing the prior draw.

  Returns:
    `(x, info)`: samples `[B, *D]` and a :class:`~scoreflow.sampling.SampleInfo` with `nfe = N` (+1 with `denoise`).

  Raises:
    ValueError: for `eta` outside `[0, 1]`, `num_steps < 1`, `eps` outside `(0, T)`, an unknown spacing,
      a bad `shape`, or `x_T` of the wrong shape.

  References:
    Song, Meng, Ermon. Denoising Diffusion Implicit Models. ICLR 2021.

  Example:
    >>> import jax, jax.numpy as jnp, scoreflow as sf
    >>> from scoreflow.testing import GaussianMixture
    >>> sde = sf.VPSDE()
    >>> score_fn = GaussianMixture.gaussian(jnp.zeros(2), 1.0).score(sde)
    >>> x, info = sf.ddim_sample(jax.random.key(0), sde, score_fn, (8, 2), num_steps=20)
    >>> x.shape, int(info.nfe)
    ((8, 2), 20)
  """
  owner = "ddim_sample"
  key_init, key_steps = jax.random.split(key)
  shape, dtype, score_fn, x = _common.start(owner, key_init, sde, score_fn, shape, dtype, eps, x_T, num_steps)
  _common.check_range(owner, "eta", eta, low=0, high=1)
  times = _common.time_grid(sde, num_steps, eps, spacing, dtype)
  eta = jnp.asarray(eta, dtype)

  def step(x, inputs):
    step_key, t, t_next = inputs
    x, _ = ddim_step(step_key, sde, score_fn, x, _common.batch_time(t, x), _common.batch_time(t_next, x), eta)
    return x, None

  x, _ = jax.lax.scan(step, x, (jax.random.split(key_steps, num_steps), times[:-1], times[1:]))
  return _common.finish(sde, score_fn, x, eps, denoise, _common.fixed_step_info(num_steps, num_steps))
