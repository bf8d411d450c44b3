r"""Closed-form ground truth: Gaussian-mixture data under every linear SDE of :mod:`scoreflow.sde`.

If the data are a mixture of diagonal Gaussians :math:`\sum_k w_k N(\mu_k, \mathrm{diag}\,s_k^2)`, then under a
process with kernel :math:`N(\alpha(t) x_0, \sigma(t)^2 I)` every perturbed marginal is again such a mixture,

.. math:: p_t(x) = \sum_k w_k\, N\big(x;\ \alpha(t)\mu_k,\ \mathrm{diag}(\alpha(t)^2 s_k^2 + \sigma(t)^2)\big),

so the exact score :math:`\nabla_x\log p_t` and the exact log-density are available at every time. Tests use
these to prove losses, samplers and likelihoods; users can use them to check their own code the same way.

Shapes: mixtures have `K` components over events of shape `D` (any rank); `x: [B, *D]`, `t: [B]` or scalar.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from scoreflow._validation import per_example
from scoreflow.sde import AbstractSDE


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  r"""A mixture of Gaussians with diagonal covariances.

  Attributes:
    weights: mixture weights :math:`w_k`, `[K]`, positive and summing to one.
    means: component means :math:`\mu_k`, `[K, *D]`.
    stds: component standard deviations :math:`s_k`, `[K, *D]` (zero allowed: a point mass, which is
      fine at any `t > 0`).
  """

  weights: jax.Array
  means: jax.Array
  stds: jax.Array

  @classmethod
  def gaussian(cls, mean, std):
    """The single Gaussian :math:`N(\\mu, \\mathrm{diag}\\,s^2)`; `mean`, `std`: `[*D]`."""
    mean = jnp.asarray(mean)
    std = jnp.broadcast_to(jnp.asarray(std, mean.dtype), mean.shape)
    return cls(jnp.ones((1,), mean.dtype), mean[None], std[None])

  @property
  def event_shape(self):
    return self.means.shape[1:]

  @property
  def num_dims(self):
    return math.prod(self.event_shape)

  def sample(self, key, num_samples):
    """Exact samples `[num_samples, *D]`."""
    key_component, key_noise = jax.random.split(key)
    component = jax.random.categorical(key_component, jnp.log(self.weights), shape=(num_samples,))
    noise = jax.random.normal(key_noise, (num_samples,) + self.event_shape, self.means.dtype)
    return self.means[component] + self.stds[component] * noise

  def perturbed(self, sde: AbstractSDE, t):
    """The marginal :math:`p_t` as a mixture, for a scalar time `t`."""
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    return GaussianMixture(self.weights, alpha * self.means,
                           jnp.sqrt(alpha**2 * self.stds**2 + sigma**2))

  def _component_terms(self, x, alpha, sigma):
    # x: [B, *D]; alpha, sigma: [B]. Returns per-component means [B, K, *D], variances [B, K, *D].
    a = per_example(alpha, x)[:, None]
    s = per_example(sigma, x)[:, None]
    means = a * self.means[None]
    variances = a**2 * self.stds[None] ** 2 + s**2
    return means, variances

  def _log_prob(self, x, alpha, sigma):
    means, variances = self._component_terms(x, alpha, sigma)
    sum_axes = tuple(range(2, means.ndim))
    log_norm = -0.5 * jnp.sum(jnp.log(2 * jnp.pi * variances), axis=sum_axes)
    quad = -0.5 * jnp.sum((x[:, None] - means) ** 2 / variances, axis=sum_axes)
    return jax.nn.logsumexp(jnp.log(self.weights)[None] + log_norm + quad, axis=1)

  def log_prob(self, x):
    """Log-density of the data distribution at `x: [B, *D]` -> `[B]` (needs all `stds > 0`)."""
    ones = jnp.ones(x.shape[:1], x.dtype)
    return self._log_prob(x, ones, 0 * ones)

  def log_prob_t(self, sde: AbstractSDE, x, t):
    """Exact :math:`\\log p_t(x)`: `x: [B, *D]`, `t: [B]` or scalar -> `[B]`."""
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    return self._log_prob(x, sde.alpha(t), sde.sigma(t))

  def score_at(self, x, alpha, sigma):
    r"""The exact score of the mixture perturbed by the kernel :math:`N(\alpha x_0, \sigma^2 I)`.

    .. math:: \nabla_x\log p(x) = -\sum_k r_k(x)\,\frac{x - \alpha\mu_k}{\alpha^2 s_k^2 + \sigma^2},
        \qquad r_k(x) = \text{posterior responsibility of component } k.

    `x: [B, *D]`; `alpha`, `sigma`: `[B]`. Works for discrete chains too (their per-level alpha, sigma).
    """
    means, variances = self._component_terms(x, alpha, sigma)
    sum_axes = tuple(range(2, means.ndim))
    log_norm = -0.5 * jnp.sum(jnp.log(2 * jnp.pi * variances), axis=sum_axes)
    quad = -0.5 * jnp.sum((x[:, None] - means) ** 2 / variances, axis=sum_axes)
    responsibilities = jax.nn.softmax(jnp.log(self.weights)[None] + log_norm + quad, axis=1)
    return jnp.einsum("bk,bk...->b...", responsibilities, -(x[:, None] - means) / variances)

  def log_prob_at(self, x, alpha, sigma):
    r"""Log-density `[B]` of the mixture perturbed by :math:`N(\alpha x_0, \sigma^2 I)`; `alpha, sigma: [B]`."""
    return self._log_prob(x, alpha, sigma)

  def score(self, sde: AbstractSDE):
    """The exact score function `score_fn(x, t)` of :math:`p_t` under `sde` (see :meth:`score_at`)."""

    def score_fn(x, t):
      t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
      return self.score_at(x, sde.alpha(t), sde.sigma(t))

    return score_fn

  def mean(self):
    """The mixture mean `[*D]`."""
    return jnp.einsum("k,k...->...", self.weights, self.means)

  def covariance(self):
    """The full covariance of the flattened mixture, `[prod(D), prod(D)]`."""
    means = self.means.reshape(self.means.shape[0], -1)
    stds = self.stds.reshape(self.stds.shape[0], -1)
    centred = means - jnp.einsum("k,kd->d", self.weights, means)[None]
    return (jnp.einsum("k,kd,ke->de", self.weights, centred, centred)
            + jnp.diag(jnp.einsum("k,kd->d", self.weights, stds**2)))

  def entropy(self):
    """Differential entropy in nats; closed form only for a single component (raises otherwise)."""
    if self.weights.shape[0] != 1:
      raise ValueError("GaussianMixture.entropy: closed form only for a single Gaussian (K = 1); "
                       f"this mixture has K = {self.weights.shape[0]}.")
    return 0.5 * jnp.sum(jnp.log(2 * jnp.pi * jnp.e * self.stds[0] ** 2))

  def kl_to_isotropic_gaussian(self, std):
    """:math:`KL(p \\,\\|\\, N(0, std^2 I))` in nats for a single Gaussian (raises otherwise)."""
    if self.weights.shape[0] != 1:
      raise ValueError("GaussianMixture.kl_to_isotropic_gaussian: closed form only for K = 1; "
                       f"this mixture has K = {self.weights.shape[0]}.")
    var, mean = self.stds[0] ** 2, self.means[0]
    return 0.5 * jnp.sum(var / std**2 + mean**2 / std**2 - 1 - jnp.log(var / std**2))
