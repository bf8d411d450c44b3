r"""Predictors: one reverse-time step of the reverse SDE from `t` to `t_next < t` (Song et al. 2021, Sec. 4.2).

Every predictor is a pure function

.. code-block:: python

    x_next, x_next_mean = predictor(key, sde, score_fn, x, t, t_next)

with `x: [B, *D]` and `t, t_next: [B]`; `x_next_mean` is the update without its noise (what a final
denoising step returns). :data:`PREDICTORS` maps the names that :func:`~scoreflow.sampling.pc_sample` accepts to
:class:`Predictor` records holding the function and its number of score evaluations per call.

References:
  Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole. Score-Based Generative Modeling through Stochastic
  Differential Equations. ICLR 2021. (Algorithms 2-3, Eq. 46 and Appendix E/F.)
  Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020. (Eq. 7, Algorithm 2.)
"""

from __future__ import annotations

import types
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from scoreflow._validation import per_example
from scoreflow.parameterization import score_to_x0
from scoreflow.sde import AbstractSDE
from scoreflow.sampling._common import ScoreFn


def euler_maruyama_predictor(key, sde: AbstractSDE, score_fn: ScoreFn, x, t, t_next):
  r"""One Euler–Maruyama step of the reverse SDE, :math:`\Delta t = t_{\rm next} - t < 0`:

  .. math:: x_{\rm next} = x + [f(t)x - g(t)^2 s_\theta(x, t)]\,\Delta t + g(t)\sqrt{-\Delta t}\,z .
  """
  dt = per_example(t_next - t, x)
  x_mean = x + sde.reverse_drift(score_fn, x, t) * dt
  noise = jax.random.normal(key, x.shape, x.dtype)
  return x_mean + per_example(sde.diffusion(t), x) * jnp.sqrt(-dt) * noise, x_mean


def reverse_diffusion_predictor(key, sde: AbstractSDE, score_fn: ScoreFn, x, t, t_next):
  r"""The reverse of the forward discretisation :math:`x_t = x_{t_{\rm next}} + f_i + G_i z` (Eq. 46):

  .. math:: x_{\rm next} = x - f_i + G_i^2\, s_\theta(x, t) + G_i z,

  with :math:`(f_i, G_i)` = `sde.discretize(x, t, t - t_next)`, the exact one-step kernel.
  """
  f, G = sde.discretize(x, t, t - t_next)
  G = per_example(G, x)
  x_mean = x - f + G**2 * score_fn(x, t)
  return x_mean + G * jax.random.normal(key, x.shape, x.dtype), x_mean


def ancestral_posterior(sde: AbstractSDE, x0, x, t, t_next):
  r"""Mean `[B, *D]` and std `[B]` of :math:`q(x_s \mid x_t = x, x_0)` for :math:`s = t_{\rm next} < t`.

  With the exact kernels :math:`x_s \mid x_0 = N(\alpha_s x_0, \sigma_s^2 I)` and
  :math:`x_t \mid x_s = N(a\, x_s, v I)` (`sde.transition(s, t)`), so that :math:`\sigma_t^2 = a^2\sigma_s^2 + v`:

  .. math:: \tilde\mu = \frac{\alpha_s v\, x_0 + a\sigma_s^2\, x}{\sigma_t^2}, \qquad
      \tilde\sigma^2 = \frac{\sigma_s^2 v}{\sigma_t^2}.

  For a VP process this is the DDPM posterior (Ho et al. 2020, Eq. 7, with :math:`1-\beta_i = a^2`,
  :math:`\bar\alpha = \alpha^2`); for VE it is the SMLD posterior
  :math:`x_0 + \tfrac{\sigma_s^2}{\sigma_t^2}(x - x_0)` (see :meth:`~scoreflow.sde.DDPMChain.posterior`,
  :meth:`~scoreflow.sde.SMLDChain.posterior`).
  """
  a, transition_std = sde.transition(t_next, t)
  v = transition_std**2
  alpha_s, sigma_s2 = sde.alpha(t_next), sde.sigma(t_next) ** 2
  sigma_t2 = a**2 * sigma_s2 + v
  mean = per_example(alpha_s * v / sigma_t2, x) * x0 + per_example(a * sigma_s2 / sigma_t2, x) * x
  return mean, jnp.sqrt(sigma_s2 * v / sigma_t2).astype(x.dtype)


def ancestral_predictor(key, sde: AbstractSDE, score_fn: ScoreFn, x, t, t_next):
  r"""Ancestral sampling: draw :math:`x_s \sim q(x_s \mid x_t, \hat x_0)` with the Tweedie estimate
  :math:`\hat x_0 = (x_t + \sigma_t^2 s_\theta(x_t, t))/\alpha_t` (see :func:`ancestral_posterior`).

  For a VP process this is the DDPM sampler of Ho et al. (2020) with the posterior variance
  :math:`\tilde\beta`; for VE the SMLD ancestral sampler of Song et al. (2021, Eq. 47).
  """
  x0 = score_to_x0(sde, score_fn(x, t), x, t)
  x_mean, std = ancestral_posterior(sde, x0, x, t, t_next)
  return x_mean + per_example(std, x) * jax.random.normal(key, x.shape, x.dtype), x_mean


def none_predictor(key, sde: AbstractSDE, score_fn: ScoreFn, x, t, t_next):
  """The identity (no score evaluation): a corrector-only sampler such as annealed Langevin dynamics."""
  del key, sde, score_fn, t, t_next
  return x, x


PredictorFn = Callable[..., tuple]


class Predictor(NamedTuple):
  """A predictor function and its number of score evaluations per call."""

  update: PredictorFn  # (key, sde, score_fn, x [B,*D], t [B], t_next [B]) -> (x_next, x_next_mean).
  nfe: int  # score evaluations per call.


PREDICTORS = types.MappingProxyType({
    "euler_maruyama": Predictor(euler_maruyama_predictor, nfe=1),
    "reverse_diffusion": Predictor(reverse_diffusion_predictor, nfe=1),
    "ancestral": Predictor(ancestral_predictor, nfe=1),
    "none": Predictor(none_predictor, nfe=0),
})
"""The predictors :func:`~scoreflow.sampling.pc_sample` accepts by name."""
