r"""Forward diffusion processes: the VE, VP, sub-VP and cosine-VP SDEs and their discrete chains.

Every continuous process here is linear in `x`,

.. math::  dx = f(t)\, x\, dt + g(t)\, dw,

so its perturbation kernel is Gaussian and closed-form,

.. math::  p_{0t}(x_t \mid x_0) = \mathcal N\big(\alpha(t)\, x_0,\ \sigma(t)^2 I\big),
    \qquad f = \frac{d \log \alpha}{dt}, \qquad g^2 = \frac{d\sigma^2}{dt} - 2 f \sigma^2 .

A process is therefore described by `log_alpha(t)`, `sigma(t)`, `f(t)` and `g2(t)`, each in closed
form; everything else (drift, marginals, reverse-time and probability-flow drifts, exact one-step
transitions, log-SNR and its inverse) is shared. Processes are frozen dataclasses registered as pytrees:
float hyper-parameters are leaves, so changing them does not recompile a jitted function that takes the
process as an argument; anything that fixes a shape (a chain's number of steps) is static.

Shapes: `x: [B, *D]`; `t: [B]` (one time per example) or a scalar. Per-example scalars such as `sigma(t)`
have the shape of `t`.

References:
  Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole. Score-Based Generative Modeling through Stochastic
  Differential Equations. ICLR 2021. (Eqs. 9-11, 13 and Appendix B.)
  Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020.
  Song, Ermon. Generative Modeling by Estimating Gradients of the Data Distribution. NeurIPS 2019.
  Nichol, Dhariwal. Improved Denoising Diffusion Probabilistic Models. ICML 2021. (Cosine schedule.)
"""

from __future__ import annotations

import abc
import math
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp

from scoreflow._validation import (as_float_time, check_hyperparameters, check_time, concrete_value,
                                   per_example)
from scoreflow._pytree import pytree_dataclass, static_field

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]


class AbstractSDE(abc.ABC):
  r"""A linear forward SDE :math:`dx = f(t) x\,dt + g(t)\,dw` on :math:`t \in [0, T]`.

  Subclasses give the closed forms of :math:`\log\alpha(t)`, :math:`\sigma(t)`, :math:`f(t)`,
  :math:`g(t)^2`, the log-SNR inverse and the prior; the methods below derive the rest.

  What a training step or a sampler needs to know of a process, besides its maths, is said by two class
  attributes that the discrete chains set too, so that no caller has to test a process's type:
  `chain_loss` (None for an SDE; the name of the loss that trains a chain) and `network_target` (None: any
  parameterization; else the one a chain's loss trains), with :attr:`continuous_sde` the SDE to sample from.
  """

  chain_loss: ClassVar[str | None] = None
  network_target: ClassVar[str | None] = None

  @property
  def continuous_sde(self) -> "AbstractSDE":
    """The continuous SDE that samples of this process are drawn from: the SDE itself."""
    return self

  # --- What each process defines. -------------------------------------------------------------

  @property
  @abc.abstractmethod
  def T(self):
    """The terminal time."""

  @abc.abstractmethod
  def log_alpha(self, t):
    r""":math:`\log\alpha(t)`, the log of the mean coefficient of the perturbation kernel. Shape of `t`."""

  @abc.abstractmethod
  def sigma(self, t):
    r""":math:`\sigma(t)`, the standard deviation of the perturbation kernel. Shape of `t`."""

  @abc.abstractmethod
  def f(self, t):
    r""":math:`f(t) = d\log\alpha/dt`, the drift coefficient (drift is :math:`f(t)\,x`). Shape of `t`."""

  @abc.abstractmethod
  def g2(self, t):
    r""":math:`g(t)^2`, the squared diffusion coefficient. Shape of `t`."""

  @abc.abstractmethod
  def t_from_log_snr(self, log_snr):
    r"""The inverse of :meth:`log_snr`: the time at which :math:`\log(\alpha^2/\sigma^2)` equals `log_snr`."""

  @property
  @abc.abstractmethod
  def prior_std(self):
    """Standard deviation of the isotropic Gaussian prior :math:`\\pi = N(0, prior\\_std^2 I)`."""

  @abc.abstractmethod
  def transition_variance(self, s, t):
    r"""Variance of :math:`x_t \mid x_s` for :math:`s \le t`: :math:`\sigma_t^2 - (\alpha_t/\alpha_s)^2\sigma_s^2`."""

  # --- Derived quantities. ---------------------------------------------------------------------

  def alpha(self, t):
    r""":math:`\alpha(t) = \exp\log\alpha(t)`. Shape of `t`."""
    return jnp.exp(self.log_alpha(t))

  def diffusion(self, t):
    """:math:`g(t)`. Shape of `t`."""
    return jnp.sqrt(self.g2(t))

  def log_snr(self, t):
    r""":math:`\lambda(t) = \log(\alpha(t)^2 / \sigma(t)^2)`, decreasing in `t`. Shape of `t`."""
    return 2.0 * (self.log_alpha(t) - jnp.log(self.sigma(t)))

  def drift(self, x, t):
    """The forward drift :math:`f(t)\\,x`. `x: [B, *D]`, `t: [B]` or scalar; returns `[B, *D]`."""
    self._check_time(t)
    return per_example(self.f(t), x) * x

  def sde(self, x, t):
    """`(drift [B, *D], diffusion [B])` of the forward SDE at `(x, t)`."""
    return self.drift(x, t), self.diffusion(t)

  def marginal(self, x0, t):
    r"""Mean and standard deviation of :math:`p_{0t}(x_t \mid x_0) = N(\alpha(t) x_0, \sigma(t)^2 I)`.

    Args:
      x0: data, `[B, *D]`.
      t: times, `[B]` or a scalar, in `[0, T]`.

    Returns:
      `(mean, std)`: `mean: [B, *D]` and `std` with the shape of `t`, in the dtype of `x0`.
    """
    self._check_time(t)
    return per_example(self.alpha(t), x0) * x0, self.sigma(t).astype(x0.dtype)

  def sample_marginal(self, key, x0, t):
    r"""Draws :math:`x_t = \alpha(t) x_0 + \sigma(t)\epsilon` with :math:`\epsilon \sim N(0, I)`.

    Returns:
      `(x_t, noise)`, both `[B, *D]`, so that losses can reuse `noise`.
    """
    mean, std = self.marginal(x0, t)
    noise = jax.random.normal(key, x0.shape, x0.dtype)
    return mean + per_example(std, x0) * noise, noise

  def prior_sample(self, key, shape, dtype=jnp.float32):
    """Draws from the prior :math:`N(0, prior\\_std^2 I)`; `shape` is the full `[B, *D]`."""
    return jax.random.normal(key, shape, dtype) * jnp.asarray(self.prior_std, dtype)

  def prior_logp(self, z):
    r"""Log-density of the prior, summed over all but the leading (batch) axis: `z: [B, *D] -> [B]`.

    .. math:: \log\pi(z) = -\tfrac{D}{2}\log(2\pi s^2) - \tfrac{\|z\|^2}{2 s^2}, \quad s = prior\_std.
    """
    dims = math.prod(z.shape[1:])
    sum_axes = tuple(range(1, z.ndim))
    s2 = jnp.asarray(self.prior_std, z.dtype) ** 2
    return -0.5 * dims * jnp.log(2 * jnp.pi * s2) - 0.5 * jnp.sum(z * z, axis=sum_axes) / s2

  def reverse_drift(self, score_fn: ScoreFn, x, t):
    r"""Drift of the reverse-time SDE :math:`dx = [f(t)x - g(t)^2 \nabla_x\log p_t(x)]\,dt + g\,d\bar w`.

    Integrated backwards in time (from `T` to `0`), with `score_fn(x, t) -> [B, *D]`.
    """
    return self.drift(x, t) - per_example(self.g2(t), x) * score_fn(x, t)

  def probability_flow_drift(self, score_fn: ScoreFn, x, t):
    r"""Drift of the probability-flow ODE :math:`dx/dt = f(t)x - \tfrac12 g(t)^2\nabla_x\log p_t(x)`.

    Its solutions share the marginals :math:`p_t` of the SDE (Song et al. 2021, Eq. 13).
    """
    return self.drift(x, t) - 0.5 * per_example(self.g2(t), x) * score_fn(x, t)

  def transition(self, s, t):
    r"""The exact kernel :math:`x_t \mid x_s = N(a\, x_s, v I)` for :math:`s \le t`: returns `(a, sqrt(v))`."""
    return jnp.exp(self.log_alpha(t) - self.log_alpha(s)), jnp.sqrt(self.transition_variance(s, t))

  def discretize(self, x, t, dt):
    r"""One forward step :math:`x_t = x_{t-\Delta t} + f_i + G_i z` of the exact transition kernel.

    Reverse-diffusion predictors invert it (Song et al. 2021, Eq. 46):
    :math:`x_{t-\Delta t} = x_t - f_i + G_i^2 s_\theta(x_t, t) + G_i z`. With :math:`\Delta t = T/N`
    this is the DDPM chain for VP processes and the SMLD ladder for VE, up to how each discretises
    its schedule.

    Args:
      x: current state, `[B, *D]`.
      t: current time, `[B]` or scalar.
      dt: step size, scalar or `[B]`, with `0 < dt <= t`.

    Returns:
      `(f_i, G_i)`: `f_i = (a - 1) x` of shape `[B, *D]` and `G_i` with the shape of `t`.
    """
    self._check_time(t)
    a, std = self.transition(t - dt, t)
    return (per_example(a, x) - 1) * x, std.astype(x.dtype)

  def _check_time(self, t):
    check_time(type(self).__name__, t, self.T)


class _LinearBetaSchedule:
  r"""The linear schedule :math:`\beta(t) = \beta_0 + t(\beta_1 - \beta_0)` on :math:`[0, 1]`, shared by
  :class:`VPSDE` and :class:`SubVPSDE` (whose dataclasses hold `beta_min`, `beta_max`)."""

  beta_min: float
  beta_max: float

  def __post_init__(self):
    check_hyperparameters(
        type(self).__name__, "0 <= beta_min <= beta_max and beta_max > 0",
        lambda beta_min, beta_max: (beta_min >= 0) & (beta_max >= beta_min) & (beta_max > 0),
        beta_min=self.beta_min, beta_max=self.beta_max)

  @property
  def T(self):
    return 1.0

  def beta(self, t):
    return self.beta_min + as_float_time(t) * (self.beta_max - self.beta_min)

  def integrated_beta(self, t):
    r""":math:`B(t) = \int_0^t \beta = \beta_0 t + \tfrac12(\beta_1-\beta_0)t^2`."""
    t = as_float_time(t)
    return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

  def t_from_integrated_beta(self, integrated_beta):
    """Inverse of :meth:`integrated_beta`, in the form that stays finite when `beta_max == beta_min`."""
    b0, b1 = self.beta_min, self.beta_max
    return 2 * integrated_beta / (b0 + jnp.sqrt(b0**2 + 2 * (b1 - b0) * integrated_beta))


class AbstractVPSDE(AbstractSDE):
  r"""Variance-preserving processes :math:`dx = -\tfrac12\beta(t)x\,dt + \sqrt{\beta(t)}\,dw`.

  With :math:`B(t) = \int_0^t\beta(s)ds`: :math:`\alpha = e^{-B/2}`, :math:`\sigma^2 = 1 - e^{-B}`,
  prior :math:`N(0, I)`. Subclasses give :math:`\beta(t)`, :math:`B(t)` and :math:`B^{-1}`.
  """

  @abc.abstractmethod
  def beta(self, t):
    r""":math:`\beta(t)`."""

  @abc.abstractmethod
  def integrated_beta(self, t):
    r""":math:`B(t) = \int_0^t \beta(s)\,ds`."""

  @abc.abstractmethod
  def t_from_integrated_beta(self, integrated_beta):
    """The inverse of :meth:`integrated_beta`."""

  @property
  def prior_std(self):
    return 1.0

  def log_alpha(self, t):
    return -0.5 * self.integrated_beta(as_float_time(t))

  def sigma(self, t):
    return jnp.sqrt(-jnp.expm1(-self.integrated_beta(as_float_time(t))))

  def f(self, t):
    return -0.5 * self.beta(as_float_time(t))

  def g2(self, t):
    return self.beta(as_float_time(t))

  def log_snr(self, t):
    return -jnp.log(jnp.expm1(self.integrated_beta(as_float_time(t))))

  def t_from_log_snr(self, log_snr):
    # sigma^2 / alpha^2 = e^B - 1 = e^{-lambda}  =>  B = log(1 + e^{-lambda}).
    return self.t_from_integrated_beta(jax.nn.softplus(-as_float_time(log_snr)))

  def transition_variance(self, s, t):
    # 1 - (alpha_t / alpha_s)^2, computed without cancellation.
    return -jnp.expm1(-(self.integrated_beta(as_float_time(t)) - self.integrated_beta(as_float_time(s))))


@pytree_dataclass
class VPSDE(_LinearBetaSchedule, AbstractVPSDE):
  r"""The variance-preserving SDE of DDPM with a linear schedule :math:`\beta(t) = \beta_0 + t(\beta_1-\beta_0)`.

  .. math:: \log\alpha(t) = -\tfrac14 t^2(\beta_1-\beta_0) - \tfrac12 t\beta_0, \qquad T = 1.

  Example:
    >>> import jax.numpy as jnp, scoreflow as sf
    >>> sde = sf.VPSDE(beta_min=0.1, beta_max=20.0)
    >>> mean, std = sde.marginal(jnp.ones((2, 3)), jnp.array([0.5, 1.0]))
    >>> mean.shape, std.shape
    ((2, 3), (2,))

  Raises:
    ValueError: if `beta_min < 0` or `beta_max <= 0` or `beta_max < beta_min`.
  """

  beta_min: float = 0.1
  beta_max: float = 20.0


@pytree_dataclass
class CosineVPSDE(AbstractVPSDE):
  r"""The variance-preserving SDE with the cosine schedule of Nichol & Dhariwal (2021).

  .. math:: \alpha(t) = \frac{\cos u(t)}{\cos u(0)}, \quad u(t) = \frac{t + s}{1 + s}\frac{\pi}{2},
      \qquad \beta(t) = -\frac{d\log\alpha^2}{dt} = \frac{\pi}{1+s}\tan u(t).

  :math:`\beta` diverges at `t = 1`, so the process stops at `T < 1`; the default `T = 0.9946`
  (Lu et al. 2022, DPM-Solver) ends at log-SNR of about -9.56, close to the linear VPSDE's -10.05.

  Raises:
    ValueError: if `s <= 0` or `T` is not in `(0, 1)`.
  """

  s: float = 0.008
  T: float = 0.9946

  def __post_init__(self):
    check_hyperparameters("CosineVPSDE", "s > 0 and 0 < T < 1",
                          lambda s, T: (s > 0) & (T > 0) & (T < 1), s=self.s, T=self.T)

  def _u(self, t):
    return (as_float_time(t) + self.s) / (1 + self.s) * (jnp.pi / 2)

  def beta(self, t):
    return jnp.pi / (1 + self.s) * jnp.tan(self._u(t))

  def integrated_beta(self, t):
    return -2.0 * (jnp.log(jnp.cos(self._u(t))) - jnp.log(jnp.cos(self._u(0.0))))

  def t_from_integrated_beta(self, integrated_beta):
    u = jnp.arccos(jnp.cos(self._u(0.0)) * jnp.exp(-0.5 * integrated_beta))
    return u * (2 / jnp.pi) * (1 + self.s) - self.s


@pytree_dataclass
class SubVPSDE(_LinearBetaSchedule, AbstractSDE):
  r"""The sub-variance-preserving SDE of Song et al. (2021), Eq. 11, with a linear :math:`\beta(t)`.

  .. math:: dx = -\tfrac12\beta(t)x\,dt + \sqrt{\beta(t)(1 - e^{-2B(t)})}\,dw, \qquad
      \alpha = e^{-B/2}, \quad \sigma = 1 - e^{-B} = 1 - \alpha^2,

  whose variance is below the VP SDE's at every `t`. Prior :math:`N(0, I)`, `T = 1`.

  Raises:
    ValueError: if `beta_min < 0` or `beta_max <= 0` or `beta_max < beta_min`.
  """

  beta_min: float = 0.1
  beta_max: float = 20.0

  @property
  def prior_std(self):
    return 1.0

  def log_alpha(self, t):
    return -0.5 * self.integrated_beta(t)

  def sigma(self, t):
    return -jnp.expm1(-self.integrated_beta(t))

  def f(self, t):
    return -0.5 * self.beta(t)

  def g2(self, t):
    return self.beta(t) * -jnp.expm1(-2.0 * self.integrated_beta(t))

  def t_from_log_snr(self, log_snr):
    # With a = alpha^2 and S = e^lambda: S (1 - a)^2 = a, whose root in (0, 1) is
    # a = 2S / (2S + 1 + sqrt(4S + 1)) (the other root is 1/a).
    snr = jnp.exp(as_float_time(log_snr))
    alpha2 = 2 * snr / (2 * snr + 1 + jnp.sqrt(4 * snr + 1))
    return self.t_from_integrated_beta(-jnp.log(alpha2))

  def transition_variance(self, s, t):
    a2 = jnp.exp(2 * (self.log_alpha(t) - self.log_alpha(s)))
    return self.sigma(t) ** 2 - a2 * self.sigma(s) ** 2


@pytree_dataclass
class VESDE(AbstractSDE):
  r"""The variance-exploding SDE of SMLD/NCSN (Song et al. 2021, Eq. 9).

  .. math:: \sigma_{\rm sched}(t) = \sigma_{\min}(\sigma_{\max}/\sigma_{\min})^t, \quad
      dx = \sigma_{\rm sched}(t)\sqrt{2\log(\sigma_{\max}/\sigma_{\min})}\,dw,

  so the perturbation kernel is exact as :math:`N(x_0, [\sigma_{\rm sched}(t)^2 - \sigma_{\min}^2] I)`
  (the paper's Eq. 29): `kernel="exact"`, the default. The 2021 reference code uses :math:`\sigma_{\rm sched}(t)`
  itself as the kernel's standard deviation, i.e. it treats the data as already perturbed at
  :math:`\sigma_{\min}`: `kernel="reference"` reproduces it, so that the published VE checkpoints are trained on,
  sampled and evaluated as in the paper (the SMLD ladder, :class:`SMLDChain`, follows that convention too). The
  two share the drift, the diffusion :math:`g` and every transition :math:`x_s \to x_t` (their variances differ by
  the same :math:`\sigma_{\min}^2` at both ends); only the marginals near `t = 0` differ. Prior
  :math:`N(0, \sigma_{\max}^2 I)`, `T = 1`.

  Raises:
    ValueError: unless `0 < sigma_min < sigma_max` and `kernel` is `"exact"` or `"reference"`.
  """

  sigma_min: float = 0.01
  sigma_max: float = 50.0
  kernel: str = static_field(default="exact")

  def __post_init__(self):
    check_hyperparameters("VESDE", "0 < sigma_min < sigma_max",
                          lambda sigma_min, sigma_max: (sigma_min > 0) & (sigma_max > sigma_min),
                          sigma_min=self.sigma_min, sigma_max=self.sigma_max)
    if self.kernel not in ("exact", "reference"):
      raise ValueError(f"VESDE: kernel must be 'exact' (the SDE's own marginals, Eq. 29) or 'reference' (the 2021 "
                       f"code's sigma_min (sigma_max / sigma_min)^t), got {self.kernel!r}.")

  @property
  def T(self):
    return 1.0

  @property
  def prior_std(self):
    return self.sigma_max

  def _log_ratio(self):
    return jnp.log(self.sigma_max) - jnp.log(self.sigma_min)

  def sigma_schedule(self, t):
    r"""The noise scale :math:`\sigma_{\min}(\sigma_{\max}/\sigma_{\min})^t` of the paper. Shape of `t`."""
    return self.sigma_min * jnp.exp(as_float_time(t) * self._log_ratio())

  def log_alpha(self, t):
    return jnp.zeros_like(as_float_time(t))

  def sigma(self, t):
    if self.kernel == "reference":
      return self.sigma_schedule(t)
    return self.sigma_min * jnp.sqrt(jnp.expm1(2 * as_float_time(t) * self._log_ratio()))

  def f(self, t):
    return jnp.zeros_like(as_float_time(t))

  def g2(self, t):
    return self.sigma_schedule(t) ** 2 * (2 * self._log_ratio())

  def t_from_log_snr(self, log_snr):
    if self.kernel == "reference":  # sigma(t)^2 = sigma_min^2 r^{2t} = e^{-lambda}.
      return (-0.5 * as_float_time(log_snr) - jnp.log(self.sigma_min)) / self._log_ratio()
    # sigma(t)^2 = sigma_min^2 (r^{2t} - 1) = e^{-lambda}.
    return jnp.log1p(jnp.exp(-as_float_time(log_snr)) / self.sigma_min**2) / (2 * self._log_ratio())

  def transition_variance(self, s, t):
    s = as_float_time(s)
    return self.sigma_schedule(s) ** 2 * jnp.expm1(2 * (as_float_time(t) - s) * self._log_ratio())


# --- Discrete chains. ---------------------------------------------------------------------------


def _check_index(owner, i, num_steps):
  value = concrete_value(i)
  if value is not None and (value.size and (value.min() < 0 or value.max() >= num_steps)):
    raise ValueError(f"{owner}: step index must lie in [0, {num_steps - 1}], got {value.tolist()}.")


@pytree_dataclass
class DDPMChain:
  r"""The DDPM Markov chain :math:`q(x_i \mid x_{i-1}) = N(\sqrt{1-\beta_i}\,x_{i-1}, \beta_i I)`.

  Levels :math:`i = 0, \dots, N-1`, with :math:`x_{-1} = x_0^{\rm data}` and
  :math:`\beta_i` = `linspace(beta_min / N, beta_max / N, N)` (Ho et al. 2020 use
  :math:`10^{-4} \dots 0.02` at `N = 1000`, i.e. `beta_min = 0.1`, `beta_max = 20`). Closed form:

  .. math:: q(x_i \mid x_0) = N(\sqrt{\bar\alpha_i}\,x_0, (1-\bar\alpha_i) I), \quad
      \bar\alpha_i = \prod_{j \le i}(1 - \beta_j).

  As :math:`N \to \infty`, level `i` at time :math:`t = (i+1)/N` converges to :class:`VPSDE` with the
  same `beta_min`, `beta_max`.

  Raises:
    ValueError: if `num_steps < 2`, `beta_min < 0`, `beta_max < beta_min` or `beta_max >= num_steps`.
  """

  beta_min: float = 0.1
  beta_max: float = 20.0
  num_steps: int = static_field(default=1000)

  chain_loss: ClassVar[str] = "ddpm"  # trained by scoreflow.ddpm_loss,
  network_target: ClassVar[str] = "eps"  # which trains a noise predictor.

  @property
  def continuous_sde(self) -> VPSDE:
    """The :class:`VPSDE` this chain discretizes (with the same `beta_min`, `beta_max`): the one to sample."""
    return VPSDE(beta_min=self.beta_min, beta_max=self.beta_max)

  def __post_init__(self):
    if not isinstance(self.num_steps, int) or self.num_steps < 2:
      raise ValueError(f"DDPMChain: num_steps must be an int >= 2, got {self.num_steps!r}.")
    check_hyperparameters(
        "DDPMChain", "0 <= beta_min <= beta_max < num_steps (so that every beta_i < 1)",
        lambda beta_min, beta_max, num_steps: (beta_min >= 0) & (beta_max >= beta_min) & (beta_max < num_steps),
        beta_min=self.beta_min, beta_max=self.beta_max, num_steps=self.num_steps)

  @property
  def betas(self):
    """:math:`\\beta_i`, `[N]`."""
    n = self.num_steps
    return jnp.linspace(self.beta_min / n, self.beta_max / n, n)

  @property
  def log_alphas_cumprod(self):
    r""":math:`\log\bar\alpha_i = \sum_{j\le i}\log(1-\beta_j)`, `[N]`."""
    return jnp.cumsum(jnp.log1p(-self.betas))

  def time(self, i):
    """The continuous time `(i + 1) / N` that level `i` approximates."""
    return (jnp.asarray(i) + 1) / self.num_steps

  def marginal(self, x0, i):
    r"""Mean `[B, *D]` and std (shape of `i`) of :math:`q(x_i \mid x_0)`; `i` integer, `[B]` or scalar."""
    _check_index("DDPMChain", i, self.num_steps)
    log_abar = self.log_alphas_cumprod[i]
    return per_example(jnp.exp(0.5 * log_abar), x0) * x0, jnp.sqrt(-jnp.expm1(log_abar)).astype(x0.dtype)

  def sample_marginal(self, key, x0, i):
    """Draws `x_i` from :math:`q(x_i \\mid x_0)` without simulating the chain; returns `(x_i, noise)`."""
    mean, std = self.marginal(x0, i)
    noise = jax.random.normal(key, x0.shape, x0.dtype)
    return mean + per_example(std, x0) * noise, noise

  def discretize(self, x, i):
    r"""`(f_i, G_i)` with :math:`x_i = x_{i-1} + f_i + G_i z`: :math:`f_i = (\sqrt{1-\beta_i}-1)x`, :math:`G_i=\sqrt{\beta_i}`."""
    _check_index("DDPMChain", i, self.num_steps)
    beta = self.betas[i]
    return (per_example(jnp.sqrt(1 - beta), x) - 1) * x, jnp.sqrt(beta).astype(x.dtype)

  def step(self, key, x_prev, i):
    r"""One forward transition: draws :math:`x_i \sim q(x_i \mid x_{i-1} = x_{\rm prev})`."""
    f, G = self.discretize(x_prev, i)
    return x_prev + f + per_example(G, x_prev) * jax.random.normal(key, x_prev.shape, x_prev.dtype)

  def posterior(self, x0, x, i):
    r"""Mean and std of :math:`q(x_{i-1} \mid x_i = x, x_0)` for :math:`i \ge 1` (Ho et al. 2020, Eq. 7).

    .. math:: \tilde\mu = \frac{\sqrt{\bar\alpha_{i-1}}\beta_i}{1-\bar\alpha_i}x_0
        + \frac{\sqrt{1-\beta_i}(1-\bar\alpha_{i-1})}{1-\bar\alpha_i}x_i, \qquad
        \tilde\beta_i = \frac{1-\bar\alpha_{i-1}}{1-\bar\alpha_i}\beta_i.

    At `i = 0` the previous level is the data itself: the mean is `x0` and the std 0.
    """
    _check_index("DDPMChain", i, self.num_steps)
    log_abar = self.log_alphas_cumprod
    beta = self.betas[i]
    one_minus_abar = -jnp.expm1(log_abar[i])
    prev_log_abar = jnp.where(i > 0, log_abar[jnp.maximum(i - 1, 0)], 0.0)
    prev_one_minus_abar = -jnp.expm1(prev_log_abar)
    coef_x0 = jnp.exp(0.5 * prev_log_abar) * beta / one_minus_abar
    coef_x = jnp.sqrt(1 - beta) * prev_one_minus_abar / one_minus_abar
    std = jnp.sqrt(prev_one_minus_abar / one_minus_abar * beta)
    return per_example(coef_x0, x0) * x0 + per_example(coef_x, x) * x, std.astype(x.dtype)


@pytree_dataclass
class SMLDChain:
  r"""The SMLD/NCSN noise ladder: geometric :math:`\sigma_i`, :math:`q(x_i \mid x_0) = N(x_0, \sigma_i^2 I)`.

  Levels :math:`i = 0, \dots, N-1` with :math:`\sigma_i = \sigma_{\min}(\sigma_{\max}/\sigma_{\min})^{i/(N-1)}`
  increasing, so that larger `i` is noisier as in :class:`DDPMChain`. The chain
  :math:`x_i = x_{i-1} + \sqrt{\sigma_i^2 - \sigma_{i-1}^2}\,z` (with :math:`\sigma_{-1} = 0`) has exactly
  these marginals; it is the :class:`VESDE` at :math:`t = i/(N-1)` started from data already perturbed at
  :math:`\sigma_{\min}`, for every `N`.

  Raises:
    ValueError: unless `0 < sigma_min < sigma_max` and `num_scales >= 2`.
  """

  sigma_min: float = 0.01
  sigma_max: float = 50.0
  num_scales: int = static_field(default=1000)

  chain_loss: ClassVar[str] = "smld"  # trained by scoreflow.smld_loss,
  network_target: ClassVar[str] = "score"  # which trains a score network.

  @property
  def continuous_sde(self) -> VESDE:
    """The :class:`VESDE` this ladder discretizes (with the same `sigma_min`, `sigma_max`): the one to sample."""
    return VESDE(sigma_min=self.sigma_min, sigma_max=self.sigma_max)

  def __post_init__(self):
    if not isinstance(self.num_scales, int) or self.num_scales < 2:
      raise ValueError(f"SMLDChain: num_scales must be an int >= 2, got {self.num_scales!r}.")
    check_hyperparameters("SMLDChain", "0 < sigma_min < sigma_max",
                          lambda sigma_min, sigma_max: (sigma_min > 0) & (sigma_max > sigma_min),
                          sigma_min=self.sigma_min, sigma_max=self.sigma_max)

  @property
  def sigmas(self):
    """:math:`\\sigma_i`, increasing, `[N]`."""
    return jnp.exp(jnp.linspace(jnp.log(self.sigma_min), jnp.log(self.sigma_max), self.num_scales))

  def time(self, i):
    """The :class:`VESDE` time `i / (N - 1)` whose noise scale equals :math:`\\sigma_i`."""
    return jnp.asarray(i) / (self.num_scales - 1)

  def marginal(self, x0, i):
    """`(x0, sigma_i)`: mean `[B, *D]` and std (shape of `i`) of :math:`q(x_i \\mid x_0)`."""
    _check_index("SMLDChain", i, self.num_scales)
    return x0, self.sigmas[i].astype(x0.dtype)

  def sample_marginal(self, key, x0, i):
    """Draws `x_i` from :math:`q(x_i \\mid x_0)`; returns `(x_i, noise)`."""
    mean, std = self.marginal(x0, i)
    noise = jax.random.normal(key, x0.shape, x0.dtype)
    return mean + per_example(std, x0) * noise, noise

  def _previous_sigma(self, i):
    return jnp.where(i > 0, self.sigmas[jnp.maximum(i - 1, 0)], 0.0)

  def discretize(self, x, i):
    r"""`(f_i, G_i) = (0, \sqrt{\sigma_i^2 - \sigma_{i-1}^2})` with :math:`x_i = x_{i-1} + f_i + G_i z`."""
    _check_index("SMLDChain", i, self.num_scales)
    G = jnp.sqrt(self.sigmas[i] ** 2 - self._previous_sigma(i) ** 2)
    return jnp.zeros_like(x), G.astype(x.dtype)

  def step(self, key, x_prev, i):
    r"""One forward transition: draws :math:`x_i \sim q(x_i \mid x_{i-1} = x_{\rm prev})`."""
    f, G = self.discretize(x_prev, i)
    return x_prev + f + per_example(G, x_prev) * jax.random.normal(key, x_prev.shape, x_prev.dtype)

  def posterior(self, x0, x, i):
    r"""Mean and std of :math:`q(x_{i-1} \mid x_i = x, x_0)`:
    :math:`x_0 + \frac{\sigma_{i-1}^2}{\sigma_i^2}(x - x_0)` and
    :math:`\sqrt{\sigma_{i-1}^2(\sigma_i^2 - \sigma_{i-1}^2)/\sigma_i^2}` (SMLD ancestral sampling)."""
    _check_index("SMLDChain", i, self.num_scales)
    s2, prev_s2 = self.sigmas[i] ** 2, self._previous_sigma(i) ** 2
    mean = x0 + per_example(prev_s2 / s2, x) * (x - x0)
    return mean, jnp.sqrt(prev_s2 * (s2 - prev_s2) / s2).astype(x.dtype)
