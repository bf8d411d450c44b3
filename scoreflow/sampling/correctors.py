r"""Correctors: MCMC steps that move samples towards :math:`p_t` at a fixed time `t` (Song et al. 2021, Sec. 4.2).

Every corrector is a pure function

.. code-block:: python

    x, x_mean = corrector(key, sde, score_fn, x, t, snr=..., n_steps=..., alpha=1.0)

with `x: [B, *D]` and `t: [B]`, running `n_steps` Langevin steps (`n_steps` a Python int) and returning the last
state and its noise-free mean. `alpha` (`[B]`, or a scalar) scales the step size: Song et al. (2021,
Algorithms 4 and 5) use :math:`\alpha_i = 1 - \beta_i`, the signal kept by one step of the discrete VP chain, for
the VP and sub-VP SDEs and 1 for the VE SDE; :func:`~scoreflow.sampling.pc_sample` passes the SDE's one-step
factor :math:`(\alpha(t_i)/\alpha(t_{i+1}))^2` of its grid, which is that. :data:`CORRECTORS` maps the names
that :func:`~scoreflow.sampling.pc_sample` accepts to :class:`Corrector` records.

References:
  Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole. Score-Based Generative Modeling through Stochastic
  Differential Equations. ICLR 2021. (Algorithm 4.)
  Song, Ermon. Generative Modeling by Estimating Gradients of the Data Distribution. NeurIPS 2019. (Algorithm 1.)
"""

from __future__ import annotations

import types
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from scoreflow._validation import per_example
from scoreflow.sde import AbstractSDE
from scoreflow.sampling._common import ScoreFn


def _langevin_chain(key, score_fn, x, t, n_steps, step_size_fn, alpha):
  """`n_steps` of :math:`x \\leftarrow x + \\epsilon s(x, t) + \\sqrt{2\\epsilon} z`, with
  :math:`\\epsilon` = `alpha * step_size_fn(score, noise)`."""

  def body(_, carry):
    key, x, _ = carry
    key, noise_key = jax.random.split(key)
    score = score_fn(x, t)
    noise = jax.random.normal(noise_key, x.shape, x.dtype)
    step_size = per_example(alpha * step_size_fn(score, noise), x)
    x_mean = x + step_size * score
    return key, x_mean + jnp.sqrt(2 * step_size) * noise, x_mean

  _, x, x_mean = jax.lax.fori_loop(0, n_steps, body, (key, x, x))
  return x, x_mean


def _batch_mean_norm(v):
  return jnp.mean(jnp.sqrt(jnp.sum(v.reshape(v.shape[0], -1) ** 2, axis=1)))


def langevin_corrector(key, sde: AbstractSDE, score_fn: ScoreFn, x, t, *, snr, n_steps: int, alpha=1.0):
  r"""Langevin MCMC with the step size set by a target signal-to-noise ratio (Song et al. 2021, Algorithms 4, 5):

  .. math:: \epsilon = 2\alpha\Big(r\,\frac{\|z\|}{\|s_\theta(x, t)\|}\Big)^2, \qquad
      x \leftarrow x + \epsilon\, s_\theta(x, t) + \sqrt{2\epsilon}\, z,

  where :math:`r` is `snr`, :math:`\alpha` is `alpha` (see the module docstring) and the norms are per-example L2
  norms averaged over the batch, as in the 2021 code (a per-example ratio would blow up near the modes of
  low-dimensional data). The step size is therefore shared across the batch; under `vmap` each mapped batch has
  its own.
  """

  def step_size(score, noise):
    return 2 * (snr * _batch_mean_norm(noise) / _batch_mean_norm(score)) ** 2

  return _langevin_chain(key, score_fn, x, t, n_steps, step_size, alpha)


def annealed_langevin_corrector(key, sde: AbstractSDE, score_fn: ScoreFn, x, t, *, snr, n_steps: int, alpha=1.0):
  r"""Annealed Langevin dynamics of NCSN (Song & Ermon 2019, Algorithm 1) with the step size tied to the noise level:

  .. math:: \epsilon = 2\alpha\,(r\,\sigma_t)^2, \qquad
      x \leftarrow x + \epsilon\, s_\theta(x, t) + \sqrt{2\epsilon}\, z,

  per example, where :math:`r` is `snr`, :math:`\alpha` is `alpha` (as in the 2021 code) and :math:`\sigma_t` the
  perturbation kernel's standard deviation. NCSN's step :math:`\alpha_i^{\rm NCSN} = \delta\,\sigma_i^2/\sigma_L^2`
  (base rate :math:`\delta`, its step being :math:`\alpha_i^{\rm NCSN}/2` times the score) is this with
  :math:`\delta = 4 r^2 \sigma_L^2` and :math:`\alpha = 1`.
  """
  sigma2 = sde.sigma(t) ** 2

  def step_size(score, noise):
    return 2 * snr**2 * sigma2

  return _langevin_chain(key, score_fn, x, t, n_steps, step_size, alpha)


def none_corrector(key, sde: AbstractSDE, score_fn: ScoreFn, x, t, *, snr, n_steps: int, alpha=1.0):
  """The identity (no score evaluation): a predictor-only sampler."""
  del key, sde, score_fn, t, snr, n_steps, alpha
  return x, x


CorrectorFn = Callable[..., tuple]


class Corrector(NamedTuple):
  """A corrector function and its number of score evaluations per corrector step."""

  update: CorrectorFn  # (key, sde, score_fn, x [B,*D], t [B], *, snr, n_steps, alpha) -> (x, x_mean).
  nfe_per_step: int  # score evaluations per step; a call makes nfe_per_step * n_steps.


CORRECTORS = types.MappingProxyType({
    "langevin": Corrector(langevin_corrector, nfe_per_step=1),
    "ald": Corrector(annealed_langevin_corrector, nfe_per_step=1),
    "none": Corrector(none_corrector, nfe_per_step=0),
})
"""The correctors :func:`~scoreflow.sampling.pc_sample` accepts by name (`"ald"`: annealed Langevin dynamics)."""
