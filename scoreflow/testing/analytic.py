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


# --- Labelled mixtures: exact class-conditional scores and time-dependent classifiers. ---------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LabelledGaussianMixture:
  r"""A Gaussian mixture whose components carry class labels: :math:`p(x, y) = \sum_{k: c_k = y} w_k N_k(x)`.

  Under a process with kernel :math:`N(\alpha_t x_0, \sigma_t^2 I)` every class-conditional marginal is again a
  mixture (of the class's components, renormalised), so everything guidance needs is exact at every time:

  .. math:: \log p_t(y \mid x) = \log\sum_{k: c_k = y} w_k N_{k,t}(x) - \log\sum_k w_k N_{k,t}(x), \qquad
      \nabla\log p_t(x \mid y) = -\sum_{k: c_k = y} r_{k \mid y}(x)\, \frac{x - \alpha_t\mu_k}{\alpha_t^2 s_k^2 +
      \sigma_t^2},

  with :math:`N_{k,t} = N(\alpha_t \mu_k, \mathrm{diag}(\alpha_t^2 s_k^2 + \sigma_t^2))` and :math:`r_{k \mid y}`
  the responsibilities within class :math:`y`.

  Attributes:
    mixture: the joint mixture over all classes (:class:`GaussianMixture`).
    labels: the class :math:`c_k \ge 0` of each component, `[K]` integers; every class in
      `0 .. num_classes - 1` must own at least one component.
  """

  mixture: GaussianMixture
  labels: jax.Array

  @property
  def num_classes(self) -> int:
    """The number of classes, `max(labels) + 1` (needs concrete labels)."""
    return int(jnp.max(self.labels)) + 1

  def class_weights(self):
    """:math:`p(y = c)`, `[num_classes]`."""
    return jax.ops.segment_sum(self.mixture.weights, self.labels, num_segments=self.num_classes)

  def class_mixture(self, label: int) -> GaussianMixture:
    """The class-conditional distribution :math:`p(x \\mid y = label)` as a mixture (for a concrete `label`)."""
    members = [k for k, c in enumerate(jax.device_get(self.labels).tolist()) if c == int(label)]
    if not members:
      raise ValueError(f"LabelledGaussianMixture.class_mixture: no component has label {label}; labels are "
                       f"{jax.device_get(self.labels).tolist()}.")
    index = jnp.asarray(members)
    weights = self.mixture.weights[index]
    return GaussianMixture(weights / jnp.sum(weights), self.mixture.means[index], self.mixture.stds[index])

  def _component_log_joint(self, x, t, sde: AbstractSDE):
    """:math:`\\log w_k + \\log N_{k,t}(x)`, `[B, K]`, for `x: [B, *D]` and `t: [B]` or scalar."""
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    means, variances = self.mixture._component_terms(x, sde.alpha(t), sde.sigma(t))
    sum_axes = tuple(range(2, means.ndim))
    log_norm = -0.5 * jnp.sum(jnp.log(2 * jnp.pi * variances), axis=sum_axes)
    quad = -0.5 * jnp.sum((x[:, None] - means) ** 2 / variances, axis=sum_axes)
    return jnp.log(self.mixture.weights)[None] + log_norm + quad, means, variances

  def _in_class(self, label, null_label):
    """`[B, K]` booleans: component k belongs to the requested class (every component for the null label)."""
    label = jnp.asarray(label)[:, None]
    return (self.labels[None] == label) | (label == null_label)

  def conditional_score(self, sde: AbstractSDE, null_label: int = -1):
    """`score_fn(x [B, *D], t [B], label [B]) -> [B, *D]`: the exact :math:`\\nabla\\log p_t(x \\mid y)`, and the
    unconditional :math:`\\nabla\\log p_t(x)` where `label == null_label`."""

    def score_fn(x, t, label):
      log_joint, means, variances = self._component_log_joint(x, t, sde)
      log_joint = jnp.where(self._in_class(label, null_label), log_joint, -jnp.inf)
      responsibilities = jax.nn.softmax(log_joint, axis=1)
      return jnp.einsum("bk,bk...->b...", responsibilities, -(x[:, None] - means) / variances)

    return score_fn

  def log_prob_label_t(self, sde: AbstractSDE):
    """`log_prob(x [B, *D], t [B], label [B]) -> [B]`: the exact time-dependent classifier
    :math:`\\log p_t(y \\mid x)`."""

    def log_prob(x, t, label):
      log_joint, _, _ = self._component_log_joint(x, t, sde)
      in_class = self._in_class(label, null_label=None)
      return (jax.nn.logsumexp(jnp.where(in_class, log_joint, -jnp.inf), axis=1)
              - jax.nn.logsumexp(log_joint, axis=1))

    return log_prob


# --- A full-covariance Gaussian: exact scores and exact posteriors of linear observations. -----------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MultivariateGaussian:
  r"""The Gaussian :math:`N(\mu, \Sigma)` on :math:`\mathbb{R}^d` with a full covariance.

  Under a process with kernel :math:`N(\alpha_t x_0, \sigma_t^2 I)` its marginal is
  :math:`N(\alpha_t\mu,\ \alpha_t^2\Sigma + \sigma_t^2 I)`, with score
  :math:`-(\alpha_t^2\Sigma + \sigma_t^2 I)^{-1}(x - \alpha_t\mu)`; given a linear observation
  :math:`y = A x_0 + n`, :math:`n \sim N(0, \sigma_y^2 I)`, the posterior is the Gaussian of :meth:`condition`.

  Attributes:
    mean: :math:`\mu`, `[d]`.
    cov: :math:`\Sigma`, `[d, d]`, symmetric positive semi-definite (positive definite for :meth:`score` at
      `t = 0`; any `t > 0` is fine).
  """

  mean: jax.Array
  cov: jax.Array

  @property
  def dim(self) -> int:
    return self.mean.shape[0]

  def sample(self, key, num_samples):
    """Exact samples `[num_samples, d]` (through an eigendecomposition, so a singular `cov` is fine)."""
    eigenvalues, eigenvectors = jnp.linalg.eigh(self.cov)
    root = eigenvectors * jnp.sqrt(jnp.clip(eigenvalues, 0))[None]
    noise = jax.random.normal(key, (num_samples, self.dim), self.mean.dtype)
    return self.mean[None] + noise @ root.T

  def perturbed(self, sde: AbstractSDE, t):
    """The marginal :math:`p_t = N(\\alpha_t\\mu, \\alpha_t^2\\Sigma + \\sigma_t^2 I)` for a scalar `t`."""
    alpha, sigma = sde.alpha(t), sde.sigma(t)
    eye = jnp.eye(self.dim, dtype=self.cov.dtype)
    return MultivariateGaussian(alpha * self.mean, alpha**2 * self.cov + sigma**2 * eye)

  def log_prob(self, x):
    """Log-density at `x: [B, d]` -> `[B]` (needs a positive definite `cov`)."""
    centred = x - self.mean[None]
    solved = jnp.linalg.solve(self.cov, centred.T).T
    _, log_det = jnp.linalg.slogdet(self.cov)
    return -0.5 * (jnp.sum(centred * solved, axis=1) + log_det + self.dim * jnp.log(2 * jnp.pi))

  def log_prob_t(self, sde: AbstractSDE, x, t):
    """Exact :math:`\\log p_t(x)` for `x: [B, d]` and a scalar `t`."""
    return self.perturbed(sde, t).log_prob(x)

  def score(self, sde: AbstractSDE):
    """The exact score `score_fn(x [B, d], t [B] or scalar) -> [B, d]` of :math:`p_t` under `sde`."""

    def score_fn(x, t):
      t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
      alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]  # [B, 1]
      # With Sigma = U diag(lambda) U^T: (alpha^2 Sigma + sigma^2 I)^{-1} = U diag(1 / (alpha^2 lambda + sigma^2)) U^T.
      eigenvalues, eigenvectors = jnp.linalg.eigh(self.cov)
      centred = (x - alpha * self.mean[None]) @ eigenvectors
      return -(centred / (alpha**2 * eigenvalues[None] + sigma**2)) @ eigenvectors.T

    return score_fn

  def condition(self, A, y, noise_std=0.0) -> MultivariateGaussian:
    r"""The exact posterior :math:`p(x \mid y)` for :math:`y = A x + n`, :math:`n \sim N(0, \sigma_y^2 I)`:

    .. math:: K = \Sigma A^\top (A\Sigma A^\top + \sigma_y^2 I)^{-1}, \quad \mu_{\rm post} = \mu + K(y - A\mu),
        \quad \Sigma_{\rm post} = \Sigma - K A \Sigma.

    `A: [m, d]`, `y: [m]`, `noise_std` a scalar :math:`\ge 0` (0 needs :math:`A\Sigma A^\top` invertible).
    """
    A = jnp.asarray(A, self.cov.dtype)
    innovation = A @ self.cov @ A.T + noise_std**2 * jnp.eye(A.shape[0], dtype=self.cov.dtype)
    gain = jnp.linalg.solve(innovation, A @ self.cov).T
    cov = self.cov - gain @ A @ self.cov
    return MultivariateGaussian(self.mean + gain @ (y - A @ self.mean), 0.5 * (cov + cov.T))


def affine_score_moments(sde: AbstractSDE, score_fn, dim: int, eps, *, stochastic: bool, denoise: bool = False,
                         num_steps: int = 2000, mean_T=None, cov_T=None, dtype=None):
  r"""The exact output distribution of a sampler driven by a score that is affine in `x` (e.g. any guided score of
  Gaussian data): mean `[d]` and covariance `[d, d]` of :math:`x_\epsilon`.

  If :math:`s(x, t) = -\Lambda_t x + h_t` (read off `score_fn` by `jax.jacfwd` at :math:`x = 0`), the reverse
  SDE (`stochastic=True`) and the probability-flow ODE (`stochastic=False`), run from
  :math:`x_T \sim N(m_T, V_T)` (default: the prior), keep :math:`x` Gaussian; with :math:`\tau = T - t`,

  .. math:: \frac{dm}{d\tau} = B_\tau m + c_\tau, \qquad \frac{dV}{d\tau} = B_\tau V + V B_\tau^\top + k\, g^2 I,
      \qquad B_\tau = -f I - \tfrac{1+k}{2}\, g^2 \Lambda, \quad c_\tau = \tfrac{1+k}{2}\, g^2 h,

  with :math:`k = 1` for the SDE and :math:`k = 0` for the ODE, integrated with classical Runge-Kutta (order 4) on
  `num_steps` equal steps in `t`. With `denoise=True` the result is mapped through Tweedie's denoiser
  :math:`(x + \sigma_\epsilon^2 s(x, \epsilon))/\alpha_\epsilon`, which is affine too. Samplers that converge to
  the SDE or ODE then converge to this distribution; when the score is the exact score of a family of marginals
  started from :math:`p_T`, it is :math:`p_\epsilon`.

  Args:
    sde: the forward process.
    score_fn: `score_fn(x [1, d], t [1]) -> [1, d]`, affine in `x` at each `t`.
    dim: `d`.
    eps: the final time.
    stochastic: the reverse SDE (True) or the probability-flow ODE (False).
    denoise: apply the final Tweedie step.
    num_steps: RK4 steps (the error falls as `num_steps**-4`).
    mean_T, cov_T: the initial distribution (default `0` and `prior_std**2 I`).
    dtype: the float type of the computation (default: JAX's default float, float64 under x64).

  Returns:
    `(mean [d], cov [d, d])`.
  """
  dtype = jnp.result_type(float) if dtype is None else dtype
  T = jnp.asarray(sde.T, dtype)
  mean = jnp.zeros(dim, dtype) if mean_T is None else jnp.asarray(mean_T, dtype)
  cov = (jnp.asarray(sde.prior_std, dtype) ** 2 * jnp.eye(dim, dtype=dtype) if cov_T is None
         else jnp.asarray(cov_T, dtype))
  k = 1.0 if stochastic else 0.0

  def affine(t):
    def score_of(x):
      return score_fn(x[None], jnp.full((1,), t, dtype))[0]

    zero = jnp.zeros(dim, dtype)
    return -jax.jacfwd(score_of)(zero), score_of(zero)  # Lambda_t [d, d], h_t [d].

  def rate(state, t):
    m, V = state
    precision, shift = affine(t)
    g2 = sde.g2(t)
    B = -sde.f(t) * jnp.eye(dim, dtype=dtype) - 0.5 * (1 + k) * g2 * precision
    return B @ m + 0.5 * (1 + k) * g2 * shift, B @ V + V @ B.T + k * g2 * jnp.eye(dim, dtype=dtype)

  def rk4(state, t):
    h = (T - eps) / num_steps  # A step in tau = T - t.
    add = lambda s, d, c: jax.tree_util.tree_map(lambda a, b: a + c * b, s, d)  # noqa: E731
    k1 = rate(state, t)
    k2 = rate(add(state, k1, h / 2), t - h / 2)
    k3 = rate(add(state, k2, h / 2), t - h / 2)
    k4 = rate(add(state, k3, h), t - h)
    increment = jax.tree_util.tree_map(lambda a, b, c, d: (a + 2 * b + 2 * c + d) / 6, k1, k2, k3, k4)
    return add(state, increment, h), None

  times = jnp.linspace(T, jnp.asarray(eps, dtype), num_steps + 1, dtype=dtype)[:-1]
  (mean, cov), _ = jax.lax.scan(rk4, (mean, cov), times)
  if denoise:
    precision, shift = affine(jnp.asarray(eps, dtype))
    alpha, sigma2 = sde.alpha(jnp.asarray(eps, dtype)), sde.sigma(jnp.asarray(eps, dtype)) ** 2
    M = (jnp.eye(dim, dtype=dtype) - sigma2 * precision) / alpha
    mean, cov = M @ mean + sigma2 * shift / alpha, M @ cov @ M.T
  return mean, 0.5 * (cov + cov.T)


# --- Expected variational bounds for Gaussian data: ground truth for scoreflow.bounds. ------------------------------
# Closed forms (and one-dimensional quadrature over time) of what the bounds of scoreflow.bounds average to when data
# and model are single diagonal Gaussians; derived from the decompositions of the papers, not from the estimators.


def _single_gaussian(name, mixture):
  if mixture.weights.shape[0] != 1:
    raise ValueError(f"{name}: closed form only for a single Gaussian (K = 1), got K = {mixture.weights.shape[0]}.")
  return mixture.means[0], mixture.stds[0]


@dataclasses.dataclass(frozen=True)
class ContinuousBoundTerms:
  r"""The expected continuous-time bound of :func:`scoreflow.bounds.continuous_nll_bound`, in nats, by parts.

  Attributes:
    entropy: :math:`H(p_\epsilon)`, the entropy of the data perturbed to time :math:`\epsilon`.
    prior_kl: :math:`KL(p_T\,\|\,\pi)`.
    score_error: :math:`\tfrac12\int_\epsilon^T g^2\,E_{p_t}\|s_\theta - \nabla\log p_t\|^2\,dt`.
    decoder: :math:`E[-\log N(x_0; \text{decoder})] - E\,H(q(x_\epsilon\mid x_0))` (0 without the decoder).
  """

  entropy: jax.Array
  prior_kl: jax.Array
  score_error: jax.Array
  decoder: jax.Array

  @property
  def total(self):
    return self.entropy + self.prior_kl + self.score_error + self.decoder


def expected_continuous_bound(data: GaussianMixture, model: GaussianMixture, sde: AbstractSDE, eps, *,
                              score_scale=1.0, decoder: bool = True, num_panels: int = 64,
                              nodes_per_panel: int = 16) -> ContinuousBoundTerms:
  r"""The expectation of :func:`scoreflow.bounds.continuous_nll_bound` for Gaussian data and a Gaussian model.

  Data :math:`x_0 \sim N(m, \mathrm{diag}\,v)` (`data`, a single Gaussian; zero stds give a point mass, i.e. the
  bound of one example); the score model is `score_scale` times the exact score of the single Gaussian `model`
  :math:`N(\mu, \mathrm{diag}\,s^2)` perturbed to time `t`, :math:`s_\theta = -c(x - \alpha\mu)/W`,
  :math:`W = \alpha^2 s^2 + \sigma^2`. Song et al.'s decomposition of the bound at :math:`\epsilon` (Fokker-Planck:
  :math:`dH(p_t)/dt = E\nabla\cdot f + \tfrac12 g^2 E\|\nabla\log p_t\|^2`) gives

  .. math:: E\,\mathcal L_{\rm DSM} = H(p_\epsilon) + KL(p_T\,\|\,\pi)
      + \tfrac12\int_\epsilon^T g^2\,E_{p_t}\|s_\theta - \nabla\log p_t\|^2\,dt,

  with :math:`p_t = N(\alpha m, V)`, :math:`V = \alpha^2 v + \sigma^2`, and per dimension
  :math:`E\|s_\theta - \nabla\log p_t\|^2 = (1 - cV/W)^2/V + c^2\alpha^2(m - \mu)^2/W^2`, integrated by
  Gauss-Legendre quadrature on geometric panels of :math:`[\epsilon, T]`. The Gaussian decoder
  :math:`N(x_0; (x_\epsilon + \sigma^2 s_\theta)/\alpha, \sigma^2/\alpha^2)` at :math:`\epsilon` adds, per dimension,

  .. math:: -\log\alpha - \tfrac12 + \tfrac12\Big[\frac{c^2\alpha^2\sigma^2((m-\mu)^2 + v)}{W^2}
      + \Big(1 - \frac{c\sigma^2}{W}\Big)^2\Big].

  Because the bound of one example is a quadratic function of :math:`x_0`, its mean over any data distribution
  depends only on the data's mean and variance: moment-matched Gaussian `data` give exact answers for, e.g.,
  uniformly dequantized cells.

  Returns:
    :class:`ContinuousBoundTerms` of scalars (nats).
  """
  import numpy as np  # The quadrature's final sum (see below).

  _single_gaussian("expected_continuous_bound", data)
  _single_gaussian("expected_continuous_bound", model)
  # Evaluated op by op, not under jit: XLA's CPU fusion of this integrand (expm1 of two arguments times a reduction
  # over a broadcast axis, as in the sub-VP SDE's g^2 and sigma) returned values up to 31 % off for 4096 or more
  # nodes (jax 0.10.2, float32 and float64), while the unfused operations agree with scipy.integrate.quad.
  entropy, prior_kl, t_weights, integrand, decoder_term = _expected_continuous_bound(
      data, model, sde, eps, score_scale, decoder, num_panels, nodes_per_panel)
  score_error = 0.5 * jnp.asarray(np.sum(np.asarray(t_weights, np.float64) * np.asarray(integrand, np.float64)),
                                  integrand.dtype)
  return ContinuousBoundTerms(entropy, prior_kl, score_error, decoder_term)


def _expected_continuous_bound(data, model, sde, eps, score_scale, decoder, num_panels, nodes_per_panel):
  """The terms of :func:`expected_continuous_bound`, with the quadrature's nodes, weights and integrand."""
  import numpy as np  # Quadrature nodes only.

  m, v_std = data.means[0], data.stds[0]
  mu, s = model.means[0], model.stds[0]
  dtype = m.dtype
  v, s2, c = v_std**2, s**2, jnp.asarray(score_scale, dtype)
  eps, T = jnp.asarray(eps, dtype), jnp.asarray(sde.T, dtype)

  def at(t):
    """alpha, sigma^2 and g^2 at times `t` (a scalar or [n]), shaped to broadcast against [n?, *D]."""
    shape = t.shape + (1,) * m.ndim
    return (sde.alpha(t).reshape(shape), (sde.sigma(t) ** 2).reshape(shape), sde.g2(t).reshape(shape))

  alpha, sigma2, _ = at(eps)
  entropy = 0.5 * jnp.sum(jnp.log(2 * jnp.pi * jnp.e * (alpha**2 * v + sigma2)))
  alpha_T, sigma2_T, _ = at(T)
  prior_var = jnp.asarray(sde.prior_std, dtype) ** 2
  var_T = alpha_T**2 * v + sigma2_T
  prior_kl = 0.5 * jnp.sum(var_T / prior_var + (alpha_T * m) ** 2 / prior_var - 1 - jnp.log(var_T / prior_var))

  # Gauss-Legendre on panels with geometric edges eps (T/eps)^(k/P): the integrand varies on the scale of t.
  nodes, weights = (jnp.asarray(a, dtype) for a in np.polynomial.legendre.leggauss(nodes_per_panel))
  edges = eps * (T / eps) ** (jnp.arange(num_panels + 1, dtype=dtype) / num_panels)
  lo, hi = edges[:-1, None], edges[1:, None]
  t_nodes = (0.5 * (hi - lo) * nodes[None] + 0.5 * (hi + lo)).reshape(-1)
  t_weights = (0.5 * (hi - lo) * weights[None]).reshape(-1)
  a, sig2, g2 = at(t_nodes)  # [n, 1, ...] against the event shape's [1, *D] below.
  V, W = a**2 * v[None] + sig2, a**2 * s2[None] + sig2
  per_dim = (1 - c * V / W) ** 2 / V + c**2 * a**2 * (m - mu)[None] ** 2 / W**2
  integrand = g2.reshape(-1) * jnp.sum(per_dim.reshape(per_dim.shape[0], -1), axis=1)

  if decoder:
    W_eps = alpha**2 * s2 + sigma2
    decoder_term = jnp.sum(-jnp.log(alpha) - 0.5 + 0.5 * (c**2 * alpha**2 * sigma2 * ((m - mu) ** 2 + v) / W_eps**2
                                                           + (1 - c * sigma2 / W_eps) ** 2))
  else:
    decoder_term = jnp.zeros((), dtype)
  return entropy, prior_kl, t_weights, integrand, decoder_term



def ddpm_eps_fn(mixture: GaussianMixture, chain):
  r"""The exact noise prediction :math:`E[\epsilon\mid x_i] = -\sqrt{1-\bar\alpha_i}\,\nabla\log q(x_i)` of data
  `mixture` at the levels of a :class:`~scoreflow.sde.DDPMChain`: `eps_fn(x [B, *D], i [B] int) -> [B, *D]`."""

  def eps_fn(x, i):
    log_abar = chain.log_alphas_cumprod[i]
    alpha, sigma = jnp.exp(0.5 * log_abar), jnp.sqrt(-jnp.expm1(log_abar))
    return -per_example(sigma, x) * mixture.score_at(x, alpha, sigma)

  return eps_fn


@dataclasses.dataclass(frozen=True)
class DDPMBoundClosedForm:
  r"""Expected parts of the DDPM bound (nats): :math:`L_T` (`prior`, scalar) and :math:`L_{t-1}` for the chain's
  levels `1 .. N-1` (`kl`, `[N-1]`)."""

  prior: jax.Array
  kl: jax.Array


def expected_ddpm_kl_terms(data: GaussianMixture, model: GaussianMixture, chain, *, variance: str = "beta",
                           eps_scale=1.0) -> DDPMBoundClosedForm:
  r"""Expected :math:`L_T` and :math:`L_{t-1}` of the DDPM bound for Gaussian data and a linear noise predictor.

  Data :math:`x_0 \sim N(m, \mathrm{diag}\,v)` (zero stds: one fixed example); predictor `eps_scale` times the exact
  :math:`E[\epsilon\mid x_i]` of the single Gaussian `model` :math:`N(\mu, s^2)`, which is linear:
  :math:`\hat\epsilon(x) = c\,b(x - a\mu)/W` with :math:`a = \sqrt{\bar\alpha_i}`, :math:`b = \sqrt{1-\bar\alpha_i}`,
  :math:`W = a^2 s^2 + b^2`. Then Eq. 11's mean is linear in :math:`x_i = a x_0 + b z`, the gap to the posterior
  mean (Eq. 7) is :math:`d = (c_0 + A a)x_0 + A b z + C` with :math:`A = c_1 - (1 - c\beta_i/W)/\sqrt{1-\beta_i}`,
  :math:`C = -c\beta_i a\mu/(W\sqrt{1-\beta_i})`, and per dimension

  .. math:: E\,L_{t-1} = \tfrac12\Big[r - 1 - \log r + \frac{((c_0 + Aa)m + C)^2 + (c_0 + Aa)^2 v + A^2 b^2}
      {\sigma_i^2}\Big], \qquad r = \tilde\beta_i/\sigma_i^2 .

  Computed in float64 NumPy from the chain's definition (:math:`\beta_i` = `linspace(beta_min/N, beta_max/N, N)`).
  `variance` is `"beta"` (:math:`\sigma_i^2 = \beta_i`) or `"beta_tilde"` (:math:`\tilde\beta_i`).
  """
  import numpy as np

  if variance not in ("beta", "beta_tilde"):
    raise ValueError(f"expected_ddpm_kl_terms: variance must be 'beta' or 'beta_tilde', got {variance!r}.")
  m, v_std = (np.asarray(a, np.float64) for a in _single_gaussian("expected_ddpm_kl_terms", data))
  mu, s = (np.asarray(a, np.float64) for a in _single_gaussian("expected_ddpm_kl_terms", model))
  v, s2, c = v_std**2, s**2, float(eps_scale)
  n = chain.num_steps
  betas = np.linspace(float(chain.beta_min) / n, float(chain.beta_max) / n, n)
  abar = np.cumprod(1 - betas)
  prior = 0.5 * np.sum((1 - abar[-1]) + abar[-1] * (m**2 + v) - 1 - np.log(1 - abar[-1]))
  kl = []
  for i in range(1, n):
    beta, a, b2 = betas[i], np.sqrt(abar[i]), 1 - abar[i]
    c0 = np.sqrt(abar[i - 1]) * beta / b2
    c1 = np.sqrt(1 - beta) * (1 - abar[i - 1]) / b2
    beta_tilde = beta * (1 - abar[i - 1]) / b2
    model_var = beta if variance == "beta" else beta_tilde
    W = a**2 * s2 + b2
    A = c1 - (1 - c * beta / W) / np.sqrt(1 - beta)
    C = -c * beta * a * mu / (W * np.sqrt(1 - beta))
    k = c0 + A * a
    expected_d2 = (k * m + C) ** 2 + k**2 * v + A**2 * b2
    r = beta_tilde / model_var
    kl.append(0.5 * np.sum(r - 1 - np.log(r) + expected_d2 / model_var))
  return DDPMBoundClosedForm(np.float64(prior), np.asarray(kl))
