r"""What a network predicts, and how that becomes a score.

For every process here :math:`x_t = \alpha_t x_0 + \sigma_t\epsilon`, so a network may predict any of

* the score :math:`s = \nabla_x\log p_t(x)`;
* the noise :math:`\epsilon`, with :math:`s = -\epsilon/\sigma_t` (Ho et al. 2020);
* the data :math:`x_0`, with :math:`s = (\alpha_t x_0 - x)/\sigma_t^2` (Tweedie's formula);
* the velocity :math:`v = \alpha_t\epsilon - \sigma_t x_0` (Salimans & Ho 2022), with
  :math:`\epsilon = (\sigma_t x + \alpha_t v)/(\alpha_t^2 + \sigma_t^2)`;
* the EDM-preconditioned denoiser of Karras et al. (2022), Table 1: in the scaled variables
  :math:`\tilde x = x/\alpha_t`, :math:`\tilde\sigma = \sigma_t/\alpha_t`,
  :math:`D(\tilde x) = c_{\rm skip}\tilde x + c_{\rm out} F(c_{\rm in}\tilde x, c_{\rm noise})` with
  :math:`c_{\rm skip} = \sigma_d^2/(\tilde\sigma^2+\sigma_d^2)`,
  :math:`c_{\rm out} = \tilde\sigma\sigma_d/\sqrt{\tilde\sigma^2+\sigma_d^2}`,
  :math:`c_{\rm in} = 1/\sqrt{\tilde\sigma^2+\sigma_d^2}`, :math:`c_{\rm noise} = \tfrac14\ln\tilde\sigma`.

The free functions convert between these quantities exactly; a parameterization object also says what the
network sees (its input scaling and its noise conditioning), and :func:`make_score_fn` turns
`(apply_fn, params)` into the `score_fn(x, t)` that every loss, sampler and likelihood takes
(:func:`make_conditional_score_fn`: a class-conditional network as `cond_score_fn(x, t, label)`;
:func:`make_classifier_log_prob_fn`: a noise-conditional classifier as :math:`\log p_t(y \mid x)`).

Shapes: `x, output, score: [B, *D]`; `t: [B]` or scalar.
"""

from __future__ import annotations

import abc
from typing import Callable, Literal

import jax
import jax.numpy as jnp

from scoreflow._validation import as_float_time, check_hyperparameters, check_labels, per_example
from scoreflow._pytree import pytree_dataclass, static_field
from scoreflow.sde import AbstractSDE


# --- Exact conversions. ---------------------------------------------------------------------------

def eps_to_score(sde: AbstractSDE, eps, t):
  r""":math:`s = -\epsilon/\sigma_t`."""
  return -eps / per_example(sde.sigma(t), eps)


def score_to_eps(sde: AbstractSDE, score, t):
  r""":math:`\epsilon = -\sigma_t s`."""
  return -per_example(sde.sigma(t), score) * score


def x0_to_score(sde: AbstractSDE, x0, x, t):
  r""":math:`s = (\alpha_t x_0 - x)/\sigma_t^2`."""
  return (per_example(sde.alpha(t), x) * x0 - x) / per_example(sde.sigma(t) ** 2, x)


def score_to_x0(sde: AbstractSDE, score, x, t):
  r""":math:`x_0 = (x + \sigma_t^2 s)/\alpha_t` (Tweedie's formula)."""
  return (x + per_example(sde.sigma(t) ** 2, x) * score) / per_example(sde.alpha(t), x)


def v_to_score(sde: AbstractSDE, v, x, t):
  r""":math:`s = -\epsilon/\sigma_t` with :math:`\epsilon = (\sigma_t x + \alpha_t v)/(\alpha_t^2+\sigma_t^2)`."""
  alpha, sigma = per_example(sde.alpha(t), x), per_example(sde.sigma(t), x)
  eps = (sigma * x + alpha * v) / (alpha**2 + sigma**2)
  return -eps / sigma


def score_to_v(sde: AbstractSDE, score, x, t):
  r""":math:`v = \alpha_t\epsilon - \sigma_t x_0`, with :math:`\epsilon` and :math:`x_0` from the score."""
  alpha, sigma = per_example(sde.alpha(t), x), per_example(sde.sigma(t), x)
  eps = -sigma * score
  x0 = (x - sigma * eps) / alpha
  return alpha * eps - sigma * x0


# --- Noise conditioning: what the network is told about t. -----------------------------------------

NoiseConditioningKind = Literal["time", "sigma", "log_sigma", "log_snr", "index"]


@pytree_dataclass
class NoiseConditioning:
  r"""Maps times `t: [B]` to the network's conditioning input `[B]`.

  Attributes:
    kind: `"time"`: `scale * t` (the 2021 DDPM++ continuous models use `scale = 999`);
      `"sigma"`: :math:`\sigma_t` (NCSN++ takes its log inside a Fourier embedding);
      `"log_sigma"`: :math:`\log\sigma_t`; `"log_snr"`: :math:`\lambda_t`;
      `"index"`: the discrete level `round(t / T * (num_steps - 1))`, for networks trained on a chain.
    scale: multiplies `t` for `kind="time"`.
    num_steps: the number of levels for `kind="index"`.
  """

  kind: NoiseConditioningKind = static_field(default="time")
  scale: float = 1.0
  num_steps: int = static_field(default=1000)

  def __post_init__(self):
    kinds = ("time", "sigma", "log_sigma", "log_snr", "index")
    if self.kind not in kinds:
      raise ValueError(f"NoiseConditioning: kind must be one of {kinds}, got {self.kind!r}.")

  def __call__(self, sde: AbstractSDE, t):
    t = as_float_time(t)
    if self.kind == "time":
      return self.scale * t
    if self.kind == "sigma":
      return sde.sigma(t)
    if self.kind == "log_sigma":
      return jnp.log(sde.sigma(t))
    if self.kind == "log_snr":
      return sde.log_snr(t)
    return jnp.round(t / sde.T * (self.num_steps - 1)).astype(jnp.int32)


# --- Parameterizations. ---------------------------------------------------------------------------

class AbstractParameterization(abc.ABC):
  """What the network sees and what its output means.

  `network_inputs` gives `(x_in [B, *D], conditioning [B])`; `to_score` maps the output `[B, *D]` to the
  score; `from_score` is its exact inverse (the output a perfect network produces).
  """

  conditioning: NoiseConditioning

  def network_inputs(self, sde: AbstractSDE, x, t):
    t = jnp.broadcast_to(as_float_time(t), x.shape[:1])
    return x, self.conditioning(sde, t)

  @abc.abstractmethod
  def to_score(self, sde: AbstractSDE, output, x, t):
    """The score implied by the network output."""

  @abc.abstractmethod
  def from_score(self, sde: AbstractSDE, score, x, t):
    """The network output that implies `score`."""


@pytree_dataclass
class ScoreParameterization(AbstractParameterization):
  """The network predicts the score itself."""

  conditioning: NoiseConditioning = NoiseConditioning("sigma")

  def to_score(self, sde, output, x, t):
    return output

  def from_score(self, sde, score, x, t):
    return score


@pytree_dataclass
class EpsilonParameterization(AbstractParameterization):
  r"""The network predicts the noise :math:`\epsilon`: :math:`s = -\epsilon/\sigma_t`."""

  conditioning: NoiseConditioning = NoiseConditioning("time", scale=999.0)

  def to_score(self, sde, output, x, t):
    return eps_to_score(sde, output, t)

  def from_score(self, sde, score, x, t):
    return score_to_eps(sde, score, t)


@pytree_dataclass
class DataParameterization(AbstractParameterization):
  r"""The network predicts the clean data :math:`x_0`: :math:`s = (\alpha_t x_0 - x)/\sigma_t^2`."""

  conditioning: NoiseConditioning = NoiseConditioning("log_sigma")

  def to_score(self, sde, output, x, t):
    return x0_to_score(sde, output, x, t)

  def from_score(self, sde, score, x, t):
    return score_to_x0(sde, score, x, t)


@pytree_dataclass
class VParameterization(AbstractParameterization):
  r"""The network predicts the velocity :math:`v = \alpha_t\epsilon - \sigma_t x_0`."""

  conditioning: NoiseConditioning = NoiseConditioning("log_snr")

  def to_score(self, sde, output, x, t):
    return v_to_score(sde, output, x, t)

  def from_score(self, sde, score, x, t):
    return score_to_v(sde, score, x, t)


@pytree_dataclass
class EDMPreconditioning(AbstractParameterization):
  r"""The preconditioned denoiser of Karras et al. (2022), applied to any process through
  :math:`\tilde x = x/\alpha_t`, :math:`\tilde\sigma = \sigma_t/\alpha_t`.

  The network :math:`F` sees :math:`c_{\rm in}\tilde x` and :math:`c_{\rm noise} = \tfrac14\ln\tilde\sigma`;
  :math:`D = c_{\rm skip}\tilde x + c_{\rm out}F` is the :math:`x_0` prediction.

  Attributes:
    sigma_data: :math:`\sigma_d`, the data standard deviation (0.5 for images in [-1, 1]).

  Raises:
    ValueError: unless `sigma_data > 0`.
  """

  sigma_data: float = 0.5

  def __post_init__(self):
    check_hyperparameters("EDMPreconditioning", "sigma_data > 0", lambda sigma_data: sigma_data > 0,
                          sigma_data=self.sigma_data)

  def coefficients(self, sde: AbstractSDE, t):
    r"""`(c_skip, c_out, c_in, c_noise)` at `t`, each with the shape of `t`, and :math:`\alpha_t`."""
    t = as_float_time(t)
    alpha = sde.alpha(t)
    sigma = sde.sigma(t) / alpha
    sd = self.sigma_data
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / jnp.sqrt(sigma**2 + sd**2)
    c_in = 1 / jnp.sqrt(sigma**2 + sd**2)
    c_noise = 0.25 * jnp.log(sigma)
    return c_skip, c_out, c_in, c_noise, alpha

  def network_inputs(self, sde, x, t):
    t = jnp.broadcast_to(as_float_time(t), x.shape[:1])
    _, _, c_in, c_noise, alpha = self.coefficients(sde, t)
    return per_example(c_in / alpha, x) * x, c_noise

  def to_score(self, sde, output, x, t):
    c_skip, c_out, _, _, alpha = self.coefficients(sde, t)
    denoised = per_example(c_skip / alpha, x) * x + per_example(c_out, x) * output
    return x0_to_score(sde, denoised, x, t)

  def from_score(self, sde, score, x, t):
    c_skip, c_out, _, _, alpha = self.coefficients(sde, t)
    denoised = score_to_x0(sde, score, x, t)
    return (denoised - per_example(c_skip / alpha, x) * x) / per_example(c_out, x)


ApplyFn = Callable[..., jax.Array]


def make_score_fn(apply_fn: ApplyFn, params, sde: AbstractSDE, parameterization: AbstractParameterization,
                  label=None):
  r"""Turns a network into the `score_fn(x, t) -> [B, *D]` that losses, samplers and likelihoods take.

  Args:
    apply_fn: `apply_fn(params, x_in [B, *D], conditioning [B]) -> output [B, *D]`, e.g. a Flax
      module's `apply` (add `train=False` or rngs with `functools.partial`); with a `label` it is called as
      `apply_fn(params, x_in, conditioning, label=label)`.
    params: the network's parameters (any pytree).
    sde: the forward process.
    parameterization: what the network predicts (e.g. :class:`EpsilonParameterization`).
    label: for a class-conditional network, the class, int `[B]` (or a scalar); None for an unconditional one.
      The score is then that of :math:`p_t(x \mid y)`.

  Returns:
    A pure function of `(x, t)`; differentiate with respect to `params` by calling `make_score_fn` inside the
    function you differentiate.

  Example:
    >>> import jax.numpy as jnp, scoreflow as sf
    >>> sde = sf.VPSDE()
    >>> apply_fn = lambda params, x, c: params * x        # a toy "network"
    >>> score_fn = sf.make_score_fn(apply_fn, 0.0, sde, sf.EpsilonParameterization())
    >>> score_fn(jnp.ones((2, 3)), jnp.array([0.5, 0.5])).shape
    (2, 3)
  """
  extra = {} if label is None else {"label": label}

  def score_fn(x, t):
    x_in, conditioning = parameterization.network_inputs(sde, x, t)
    return parameterization.to_score(sde, apply_fn(params, x_in, conditioning, **extra), x, t)

  return score_fn


def make_conditional_score_fn(apply_fn: ApplyFn, params, sde: AbstractSDE,
                              parameterization: AbstractParameterization):
  r"""A class-conditional network as `cond_score_fn(x [B, *D], t [B], label [B]) -> [B, *D]`, the
  :math:`\nabla_x\log p_t(x \mid y)` that :func:`scoreflow.guidance.classifier_free_score` takes.

  `label` runs over `0 .. num_classes`, where `num_classes` (the network's null class) asks for the unconditional
  score: pass `null_label=num_classes` to `classifier_free_score`. The labels are an argument of the returned
  function (not closed over), so one compiled sampler serves every class.

  Args:
    apply_fn: `apply_fn(params, x_in, conditioning, label=label) -> output [B, *D]`.
    params: the network's parameters.
    sde: the forward process.
    parameterization: what the network predicts.

  Example:
    >>> import jax.numpy as jnp, scoreflow as sf
    >>> from scoreflow.guidance import classifier_free_score
    >>> apply_fn = lambda params, x, c, label: params * x * label[:, None]   # a toy "network"
    >>> cond_score_fn = sf.make_conditional_score_fn(apply_fn, 1.0, sf.VPSDE(), sf.ScoreParameterization())
    >>> score_fn = classifier_free_score(cond_score_fn, 2, guidance_scale=0.0, null_label=10)
    >>> score_fn(jnp.ones((1, 2)), jnp.array([0.5])).tolist()
    [[2.0, 2.0]]
  """

  def cond_score_fn(x, t, label):
    return make_score_fn(apply_fn, params, sde, parameterization, label=label)(x, t)

  return cond_score_fn


def classifier_inputs(sde: AbstractSDE, conditioning: AbstractParameterization | NoiseConditioning, x, t):
  """What a noise-conditional classifier sees at `(x, t)`: `(x_in [B, *D], cond [B])`.

  With a parameterization, its :meth:`~AbstractParameterization.network_inputs` (the score network's inputs, so a
  classifier and a score network of one run read `t` alike); with a bare :class:`NoiseConditioning`, `(x, cond(t))`.
  """
  if isinstance(conditioning, AbstractParameterization):
    return conditioning.network_inputs(sde, x, t)
  if isinstance(conditioning, NoiseConditioning):
    t = jnp.broadcast_to(as_float_time(t), x.shape[:1])
    return x, conditioning(sde, t)
  raise ValueError(f"classifier inputs: parameterization_or_conditioning must be a parameterization (e.g. "
                   f"EpsilonParameterization()) or a NoiseConditioning, got {type(conditioning).__name__}.")


def make_logits_fn(apply_fn: ApplyFn, params, sde: AbstractSDE,
                   parameterization_or_conditioning: AbstractParameterization | NoiseConditioning):
  """A noise-conditional classifier as `logits_fn(x [B, *D], t [B] or scalar) -> [B, num_classes]`, the model
  function of :func:`scoreflow.losses.noisy_classifier_loss`.

  Args:
    apply_fn: `apply_fn(params, x_in, cond) -> logits [B, num_classes]`.
    params: the classifier's parameters.
    sde: the forward process whose marginals the classifier was trained on.
    parameterization_or_conditioning: how `t` becomes the classifier's `cond` (see :func:`classifier_inputs`).
  """
  if not isinstance(parameterization_or_conditioning, (AbstractParameterization, NoiseConditioning)):
    raise ValueError(f"make_logits_fn: parameterization_or_conditioning must be a parameterization (e.g. "
                     f"EpsilonParameterization()) or a NoiseConditioning, got "
                     f"{type(parameterization_or_conditioning).__name__}.")

  def logits_fn(x, t):
    return apply_fn(params, *classifier_inputs(sde, parameterization_or_conditioning, x, t))

  return logits_fn


def make_classifier_log_prob_fn(apply_fn: ApplyFn, params, sde: AbstractSDE,
                                parameterization_or_conditioning: AbstractParameterization | NoiseConditioning):
  r"""A noise-conditional classifier as `log_prob_y_fn(x [B, *D], t [B], labels [B]) -> [B]`:

  .. math:: \log p_t(y \mid x) = \mathrm{logits}_y(x, t) - \log\textstyle\sum_c \exp \mathrm{logits}_c(x, t).

  Close over the labels to get what :func:`scoreflow.guidance.classifier_guided_score` takes:
  `classifier_guided_score(score_fn, functools.partial(log_prob_y_fn, labels=labels), scale)`.

  Args:
    apply_fn: `apply_fn(params, x_in, cond) -> logits [B, num_classes]` (e.g.
      `lambda p, x, c: classifier.apply({"params": p}, x, c)`).
    params: the classifier's parameters.
    sde: the forward process whose marginals the classifier was trained on.
    parameterization_or_conditioning: the parameterization (or bare :class:`NoiseConditioning`) it was trained
      with, which says how `t` becomes its `cond`.

  Returns:
    `log_prob_y_fn(x, t, labels)`; `labels`: int `[B]` (or a scalar) in `0 .. num_classes - 1`.

  Raises:
    ValueError: (when called) non-integer labels or labels of another shape than scalar or `[B]`; concrete
      labels outside `0 .. num_classes - 1`.
  """
  logits_fn = make_logits_fn(apply_fn, params, sde, parameterization_or_conditioning)

  def log_prob_y_fn(x, t, labels):
    logits = logits_fn(x, t)
    labels = check_classifier_labels("make_classifier_log_prob_fn", labels, logits.shape[0], logits.shape[-1])
    log_probs = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    return jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]

  return log_prob_y_fn


def check_classifier_labels(owner: str, labels, batch_size: int, num_classes: int):
  """Class labels for a classifier as int `[B]` (a scalar is broadcast); concrete values must lie in
  `0 .. num_classes - 1`."""
  return check_labels(owner, labels, batch_size, num_classes, meaning=f"for {num_classes} classes")
