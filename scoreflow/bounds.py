r"""Variational bounds on the negative log-likelihood of discrete (8-bit) data, in bits per dimension.

Two bounds, each a pure per-example function `(key, x_raw [B, *D], model, process) -> [B]` that sits inside a
user's `jax.jit` / `jax.vmap` (an evaluation loop averages the `[B]` values over a dataset and takes their
standard error over examples):

* :func:`continuous_bound_bpd`, the continuous-time bound of score-based models (Song, Durkan, Murray, Ermon
  2021): uniform dequantization, then the denoising-score-matching bound on :math:`-\log p_\epsilon` of Theorem 3
  (:func:`scoreflow.losses.dsm_likelihood_bound`), then a Gaussian decoder for the interval :math:`[0, \epsilon]`
  (:func:`continuous_nll_bound` works on continuous data, in nats).
* :func:`ddpm_vlb_bpd`, the discrete variational bound of DDPM (Ho, Jain, Abbeel 2020, Eq. 5) with the
  discretized Gaussian decoder of their Eq. 13, summed exactly over all steps or estimated with one random step
  (:func:`ddpm_vlb_terms` returns its three parts in nats; :func:`ddpm_kl_term` one step's KL).

Bits per dimension are nats divided by :math:`D\ln 2`. Discrete data enter as integer levels
:math:`k \in \{0, \dots, L-1\}^D` (`L = num_levels`, 256 for 8-bit images), never as values already scaled to the
model's range: the scaling is part of the bound (its log-Jacobian for the continuous bound, the bin width for the
DDPM decoder), so it is given here as the plain numbers `scale` and `shift` of the affine map
:math:`x = \mathrm{scale}\cdot\tilde k + \mathrm{shift}` (the fields of :class:`scoreflow.data.AffineScaler`).

Invalid data. Levels outside `0 .. L-1` or non-integral values raise a `ValueError` when `x_raw` is a concrete
array; under `jit` (where its values are unknown at trace time) the affected examples' bounds are NaN instead.

References:
  Song, Durkan, Murray, Ermon. Maximum Likelihood Training of Score-Based Diffusion Models. NeurIPS 2021.
    (Theorem 3; the decoder for :math:`[0, \epsilon]` is the `eps_offset` of their `bound_likelihood.py`.)
  Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020. (Eqs. 5, 7, 11, 13.)
  Theis, van den Oord, Bethge. A note on the evaluation of generative models. ICLR 2016. (Dequantization.)
"""

from __future__ import annotations

import math
from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr

from scoreflow.data.scaling import AffineScaler
from scoreflow.losses import dsm_likelihood_bound, sample_uniform
from scoreflow.sde import AbstractSDE, DDPMChain

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]
EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
Variance = Literal["beta", "beta_tilde"]
Estimator = Literal["exact", "sampled"]
TimeSampling = Literal["iid", "stratified", "antithetic"]


# --- Checks. ---------------------------------------------------------------------------------------------------


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_positive_int(name, argument, value, minimum):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name}: {argument} must be an int >= {minimum}, got {value!r}.")


def _float_dtype(name, x_raw, dtype):
  if dtype is None:
    return x_raw.dtype if jnp.issubdtype(x_raw.dtype, jnp.floating) else jnp.dtype(jnp.float32)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name}: dtype must be a floating dtype, got {dtype}.")
  return jnp.dtype(dtype)


def _levels(name, x_raw, num_levels, dtype):
  """`(levels [B, *D] floating, valid [B] bool)` from raw integer levels, validated.

  Raises at trace time for bad shapes and dtypes, and for bad values when `x_raw` is concrete; under `jit`
  `valid` marks the examples whose every entry is an integer in `0 .. num_levels - 1`.
  """
  _check_positive_int(name, "num_levels", num_levels, 2)
  if not hasattr(x_raw, "shape") or not hasattr(x_raw, "dtype"):
    x_raw = np.asarray(x_raw)
  if x_raw.ndim < 2:
    raise ValueError(f"{name}: x_raw must have shape [B, *D] (a batch of examples with at least one data axis), "
                     f"got shape {x_raw.shape}; add a batch axis (x[None]) or a data axis (x[:, None]).")
  if not (jnp.issubdtype(x_raw.dtype, jnp.integer) or jnp.issubdtype(x_raw.dtype, jnp.floating)):
    raise ValueError(f"{name}: x_raw must hold integer levels (e.g. uint8 images), got dtype {x_raw.dtype}.")
  dtype = _float_dtype(name, x_raw, dtype)
  top = num_levels - 1
  if _is_concrete(x_raw):
    values = np.asarray(x_raw)
    bad = ~((values >= 0) & (values <= top) & (np.floor(values) == values))
    if bad.any():
      raise ValueError(
          f"{name}: x_raw must hold integer levels in 0 .. {top} (raw {num_levels}-level data, e.g. uint8 images), "
          f"got {int(bad.sum())} entries outside that set (values range over [{values.min()}, {values.max()}]). "
          "Pass the raw levels, not data already scaled to the model's range; the bound applies the scaling "
          "itself (scale, shift).")
  levels = jnp.asarray(x_raw)
  in_set = (levels >= 0) & (levels <= top) & (jnp.floor(levels) == levels)
  valid = jnp.all(in_set.reshape(in_set.shape[0], -1), axis=1)
  return levels.astype(dtype), valid


def _log_scale_sum(name, scale, event_shape, dtype):
  r""":math:`\sum_d\log|s_d|` for a scale that is a scalar or broadcasts to the event shape."""
  scale = jnp.asarray(scale, dtype)
  try:
    broadcast = np.broadcast_shapes(scale.shape, tuple(event_shape))
  except ValueError:
    broadcast = None
  if broadcast != tuple(event_shape):
    raise ValueError(f"{name}: scale must be a scalar or broadcast to the event shape {tuple(event_shape)}, "
                     f"got shape {scale.shape}.")
  if _is_concrete(scale) and np.any(np.asarray(scale) == 0):
    raise ValueError(f"{name}: scale must be nonzero (the affine map must be invertible), got {np.asarray(scale)}.")
  return jnp.sum(jnp.broadcast_to(jnp.log(jnp.abs(scale)), tuple(event_shape)))


def _check_model_output(name, fn_name, fn, x, t):
  out = jax.eval_shape(fn, x, t)
  if getattr(out, "shape", None) != x.shape:
    raise ValueError(f"{name}: {fn_name}(x, t) must return an array of the shape of x, {x.shape}, for x: [B, *D] "
                     f"and t: [B]; got {getattr(out, 'shape', type(out).__name__)}.")


def _per_example(coefficient, x):
  """A per-example `[B]` (or scalar) coefficient reshaped to broadcast against `x: [B, *D]`."""
  coefficient = jnp.asarray(coefficient, x.dtype)
  return coefficient.reshape(coefficient.shape + (1,) * (x.ndim - coefficient.ndim))


def _sum_over_data(values):
  return jnp.sum(values, axis=tuple(range(1, values.ndim)))


def _mean_over_draws(fn, key, num_samples):
  """The mean of `fn(key_s)` over `num_samples` independent keys, one draw at a time (memory of one draw)."""
  if num_samples == 1:
    return fn(key)

  def body(total, key_s):
    return total + fn(key_s), None

  first, *rest = jax.random.split(key, num_samples)
  total, _ = jax.lax.scan(body, fn(first), jnp.stack(rest))
  return total / num_samples


# --- The continuous-time bound. --------------------------------------------------------------------------------


def continuous_nll_bound(key, x0, score_fn: ScoreFn, sde: AbstractSDE, *, eps: float = 1e-5,
                         importance_sampling: bool = True, t_sampling: TimeSampling = "iid", decoder: bool = True,
                         num_samples: int = 1):
  r"""An unbiased estimate, per example, of an upper bound on :math:`-\log p_\theta(x_0)` in nats.

  The model. The score model defines, through its reverse SDE started at the prior :math:`\pi`, a density
  :math:`p^{\rm SDE}_{\theta,\epsilon}` at time :math:`\epsilon`; the interval :math:`[0, \epsilon]` is bridged
  by a Gaussian decoder with Tweedie's mean (Song, Durkan, Murray, Ermon 2021, the `eps_offset` of their
  `bound_likelihood.py`; with :math:`x_\epsilon = \alpha_\epsilon x_0 + \sigma_\epsilon z`):

  .. math:: p_\theta(x_0) = \int p^{\rm SDE}_{\theta,\epsilon}(x_\epsilon)\,
      N\Big(x_0;\ \frac{x_\epsilon + \sigma_\epsilon^2 s_\theta(x_\epsilon, \epsilon)}{\alpha_\epsilon},\
      \frac{\sigma_\epsilon^2}{\alpha_\epsilon^2} I\Big)\,dx_\epsilon .

  The bound. Jensen's inequality with the forward kernel :math:`q(x_\epsilon\mid x_0) =
  N(\alpha_\epsilon x_0, \sigma_\epsilon^2 I)` as the proposal, then Theorem 3 for the process started at
  :math:`q(\cdot\mid x_0)` (:func:`~scoreflow.losses.dsm_likelihood_bound`, whose
  :math:`\mathcal L_{\rm DSM}(x_0) \ge E_q[-\log p^{\rm SDE}_{\theta,\epsilon}(x_\epsilon)]`):

  .. math:: -\log p_\theta(x_0) \le E_q\big[-\log p^{\rm SDE}_{\theta,\epsilon}(x_\epsilon)\big]
      + E_q\big[-\log N(x_0; \cdot)\big] - H\big(q(\cdot\mid x_0)\big)
      \le \mathcal L_{\rm DSM}(x_0) + E_z\Big[\tfrac12\|\sigma_\epsilon s_\theta(x_\epsilon,\epsilon) + z\|^2\Big]
      - \tfrac D2 - D\log\alpha_\epsilon,

  where the decoder's reconstruction term and the kernel's entropy :math:`\tfrac D2\log(2\pi e\sigma_\epsilon^2)`
  combine into the last three terms (:math:`x_0 - \text{mean} = -\tfrac{\sigma_\epsilon}{\alpha_\epsilon}
  (z + \sigma_\epsilon s_\theta)`), which keeps :math:`1/\sigma_\epsilon^2` out of the arithmetic. With the exact
  score the decoder costs :math:`E_{x_\epsilon}KL(p(x_0\mid x_\epsilon)\,\|\,\text{decoder}) \ge 0` over
  :math:`H(p_0)`: for data :math:`N(\mu, s^2)` per dimension, :math:`\tfrac12(\rho - 1 - \log\rho)` with
  :math:`\rho = \alpha_\epsilon^2 s^2/(\alpha_\epsilon^2 s^2 + \sigma_\epsilon^2)`, negligible at
  :math:`\epsilon = 10^{-5}`.

  With `decoder=False` the value is :math:`\mathcal L_{\rm DSM}(x_0)` alone, the bound at time :math:`\epsilon`
  (on the cross-entropy of :math:`x_\epsilon \sim q(\cdot\mid x_0)`), which is not a bound on
  :math:`-\log p_\theta(x_0)` itself; the paper's reported numbers include the decoder.

  Args:
    key: PRNG key.
    x0: continuous data in model space, `[B, *D]`, floating.
    score_fn: `score_fn(x [B, *D], t [B]) -> [B, *D]`.
    sde: the forward process.
    eps: the time :math:`\epsilon` where the decoder takes over, in `(0, T)`.
    importance_sampling: draw `t` with density :math:`\propto g^2/\sigma^2` (lower variance; see
      :func:`~scoreflow.losses.dsm_likelihood_bound`).
    t_sampling: `"iid"`, `"stratified"` or `"antithetic"` draws of the time variable across the batch
      (:func:`~scoreflow.losses.sample_uniform`); only `"iid"` gives independent per-example values.
    decoder: add the Gaussian decoder for :math:`[0, \epsilon]` (True: a bound on :math:`-\log p_\theta(x_0)`).
    num_samples: independent draws of `(t, noise, z)` averaged per example (each evaluates `score_fn` twice).

  Returns:
    `[B]` bound estimates in nats, unbiased for the bound of each example.

  Raises:
    ValueError: for bad shapes or dtypes, `eps` outside `(0, T)`, `num_samples < 1`, or a `score_fn` whose output
      does not have the shape of `x0`.

  Example:
    >>> import jax, jax.numpy as jnp, scoreflow as sf
    >>> from scoreflow.bounds import continuous_nll_bound
    >>> x0 = jnp.zeros((4, 2))
    >>> continuous_nll_bound(jax.random.key(0), x0, lambda x, t: -x, sf.VPSDE()).shape
    (4,)
  """
  name = "continuous_nll_bound"
  _check_positive_int(name, "num_samples", num_samples, 1)
  if not hasattr(x0, "ndim") or x0.ndim < 2 or not jnp.issubdtype(x0.dtype, jnp.floating):
    raise ValueError(f"{name}: x0 must be a floating array of shape [B, *D], got "
                     f"{getattr(x0, 'dtype', type(x0).__name__)} of shape {getattr(x0, 'shape', None)}.")
  _check_model_output(name, "score_fn", score_fn, x0, jnp.full(x0.shape[:1], eps, x0.dtype))
  num_dims = math.prod(x0.shape[1:])

  def one_draw(key):
    key_bound, key_decoder = jax.random.split(key)
    # 1. The bound at time eps, Theorem 3 (prior term in closed form).
    bound = dsm_likelihood_bound(key_bound, x0, score_fn, sde, eps=eps, importance_sampling=importance_sampling,
                                 t_sampling=t_sampling)
    if not decoder:
      return bound
    # 2. The Gaussian decoder for [0, eps]: reconstruction minus the entropy of q(x_eps | x0).
    t = jnp.full(x0.shape[:1], eps, x0.dtype)
    x_eps, z = sde.sample_marginal(key_decoder, x0, t)
    sigma = sde.sigma(t)
    residual = _sum_over_data((_per_example(sigma, x0) * score_fn(x_eps, t) + z) ** 2)
    return bound + 0.5 * residual - 0.5 * num_dims - num_dims * sde.log_alpha(t).astype(x0.dtype)

  return _mean_over_draws(one_draw, key, num_samples)


def continuous_bound_bpd(key, x_raw, score_fn: ScoreFn, sde: AbstractSDE, *, scale, shift, num_levels: int = 256,
                         eps: float = 1e-5, importance_sampling: bool = True, t_sampling: TimeSampling = "iid",
                         decoder: bool = True, num_samples: int = 1, dtype=None):
  r"""The continuous-time variational bound on the discrete data's negative log-likelihood, in bits per dimension.

  Uniform dequantization (Theis et al. 2016): the levels :math:`k` are spread over their unit cells,
  :math:`\tilde k = k + u`, :math:`u \sim U[0, 1)^D`, and mapped to model space by
  :math:`x = \mathrm{scale}\cdot\tilde k + \mathrm{shift}`. The model's density of :math:`\tilde k` is
  :math:`p_\theta(x)\prod_d|\mathrm{scale}_d|`, and the probability of the cell of :math:`k` (volume 1) obeys,
  by Jensen's inequality,

  .. math:: -\log P_\theta(k) = -\log \int_{[0,1)^D} p_\theta(x(k + u))\prod_d|\mathrm{scale}_d|\,du
      \le E_u\big[-\log p_\theta(x)\big] - \sum_d\log|\mathrm{scale}_d|
      \le E_u\big[\mathcal B(x)\big] - \sum_d\log|\mathrm{scale}_d|,

  with :math:`\mathcal B` the bound of :func:`continuous_nll_bound` (Theorem 3 at :math:`\epsilon` plus the
  Gaussian decoder for :math:`[0, \epsilon]`). Per example, one draw of `(u, t, noise, z)` (or the mean of
  `num_samples` draws) gives the unbiased estimate

  .. math:: \mathrm{bpd} = \frac{\mathcal B(x) - \sum_d\log|\mathrm{scale}_d|}{D\ln 2},

  whose mean over a dataset bounds the dataset's discrete NLL in bits/dim from above. For 8-bit images and the
  centred dequantized scaler (`scale = 2/256`, `shift = -1`, :math:`x \in [-1, 1)`) the Jacobian term is the
  familiar `+7` bits (`+8` for `scale = 1/256`, :math:`x \in [0, 1)`).

  Args:
    key: PRNG key.
    x_raw: integer levels `[B, *D]` in `0 .. num_levels - 1` (e.g. uint8 images), any integer or integral float
      dtype.
    score_fn: `score_fn(x [B, *D], t [B]) -> [B, *D]` on model-space data.
    sde: the forward process.
    scale, shift: the affine map from dequantized levels to model space; `scale` a nonzero scalar or an array
      broadcasting to `[*D]`. Pass the model's training scaler, e.g. `AffineScaler.centred(256,
      dequantized=True)`'s `scale=2/256, shift=-1.0`.
    num_levels: number of levels `L` (256 for 8-bit data).
    eps, importance_sampling, t_sampling, decoder: as in :func:`continuous_nll_bound`.
    num_samples: independent draws of `(u, t, noise, z)` averaged per example.
    dtype: floating dtype of the model's inputs; default: that of `x_raw` if floating, else float32.

  Returns:
    `[B]` bits/dim estimates in `dtype`; NaN for examples with entries outside `0 .. L-1` when `x_raw` is traced.

  Raises:
    ValueError: for a bad shape, dtype or value of `x_raw` (concrete values outside `0 .. L-1`, e.g. data already
      scaled to `[-1, 1]`), a zero or mis-shaped `scale`, and the errors of :func:`continuous_nll_bound`.

  Example:
    >>> import jax, jax.numpy as jnp, scoreflow as sf
    >>> from scoreflow.bounds import continuous_bound_bpd
    >>> images = jnp.full((2, 4, 4, 1), 128, jnp.uint8)
    >>> bpd = continuous_bound_bpd(jax.random.key(0), images, lambda x, t: -x, sf.VPSDE(), scale=2 / 256,
    ...                            shift=-1.0)
    >>> bpd.shape, bpd.dtype
    ((2,), dtype('float32'))
  """
  name = "continuous_bound_bpd"
  _check_positive_int(name, "num_samples", num_samples, 1)
  levels, valid = _levels(name, x_raw, num_levels, dtype)
  event_shape = levels.shape[1:]
  log_scale_sum = _log_scale_sum(name, scale, event_shape, levels.dtype)
  shift = jnp.asarray(shift, levels.dtype)
  try:
    shift_broadcasts = np.broadcast_shapes(shift.shape, event_shape) == tuple(event_shape)
  except ValueError:
    shift_broadcasts = False
  if not shift_broadcasts:
    raise ValueError(f"{name}: shift must be a scalar or broadcast to the event shape {tuple(event_shape)}, "
                     f"got shape {shift.shape}.")
  # [1, *D]: explicit batch axis (no implicit rank promotion).
  scale = jnp.broadcast_to(jnp.asarray(scale, levels.dtype), event_shape)[None]
  shift = jnp.broadcast_to(shift, event_shape)[None]

  # The one dequantization rule (values stay in their level's cell; see AffineScaler.dequantize).
  scaler = AffineScaler(scale, shift, num_levels=num_levels, dequantized=True)

  def one_draw(key):
    key_u, key_bound = jax.random.split(key)
    x = scaler.dequantize(levels, jax.random.uniform(key_u, levels.shape, levels.dtype))
    return continuous_nll_bound(key_bound, x, score_fn, sde, eps=eps, importance_sampling=importance_sampling,
                                t_sampling=t_sampling, decoder=decoder)

  nll = _mean_over_draws(one_draw, key, num_samples)
  num_dims = math.prod(event_shape)
  bpd = (nll - log_scale_sum) / (num_dims * math.log(2.0))
  return jnp.where(valid, bpd, jnp.nan).astype(levels.dtype)


# --- The discrete DDPM bound. ----------------------------------------------------------------------------------


class DDPMBoundTerms(NamedTuple):
  r"""The three parts of the DDPM variational bound (Ho et al. 2020, Eq. 5), per example, in nats."""

  prior: jax.Array  # [B] L_T = KL(q(x_N | x_0) || N(0, I)), closed form.
  diffusion: jax.Array  # [B] sum_{t=2}^{N} L_{t-1} (exact sum over steps, or the one-step estimate).
  decoder: jax.Array  # [B] L_0 = -log p(x_0 | x_1), the discretized Gaussian decoder.

  @property
  def total(self):
    """`[B]` the whole bound in nats."""
    return self.prior + self.diffusion + self.decoder


def discretized_gaussian_log_prob(x_raw, mean, std, *, scale=2.0 / 255, shift=-1.0, num_levels: int = 256):
  r"""Log-probability of integer levels under a Gaussian discretized into bins (Ho et al. 2020, Eq. 13).

  Level :math:`k` sits at :math:`x = \mathrm{scale}\cdot k + \mathrm{shift}` and owns the bin
  :math:`[x - \mathrm{scale}/2,\ x + \mathrm{scale}/2]`, except that the lowest bin extends to :math:`-\infty`
  and the highest to :math:`+\infty`, so the probabilities of the `L` levels sum to one:

  .. math:: P(k) = \Phi\Big(\frac{\delta_+ - \mu}{\sigma}\Big) - \Phi\Big(\frac{\delta_- - \mu}{\sigma}\Big).

  The defaults are DDPM's: 8-bit levels on :math:`[-1, 1]`, bins of width `2/255`. The difference of normal CDFs
  is evaluated as :math:`\log\Phi(b) + \log(1 - e^{\log\Phi(a) - \log\Phi(b)})` on the side of the bin where
  :math:`\Phi` is small (by the symmetry :math:`\Phi(b) - \Phi(a) = \Phi(-a) - \Phi(-b)`), accurate in the tails.

  Args:
    x_raw: integer levels `[*S]` in `0 .. num_levels - 1` (integer or integral float dtype).
    mean: Gaussian means in model space, `[*S]`, floating.
    std: standard deviations, positive, broadcasting to `[*S]`.
    scale: the bin width (the model-space distance between neighbouring levels), positive.
    shift: the model-space position of level 0.
    num_levels: number of levels `L`.

  Returns:
    `[*S]` elementwise log-probabilities (nats), in the dtype of `mean`.

  Raises:
    ValueError: for `num_levels < 2`, a non-positive concrete `scale`, a non-floating `mean`, or shapes that do not
      match.
  """
  name = "discretized_gaussian_log_prob"
  _check_positive_int(name, "num_levels", num_levels, 2)
  mean = jnp.asarray(mean)
  if not jnp.issubdtype(mean.dtype, jnp.floating):
    raise ValueError(f"{name}: mean must be floating point, got dtype {mean.dtype}.")
  x_raw = jnp.asarray(x_raw)
  if x_raw.shape != mean.shape:
    raise ValueError(f"{name}: x_raw and mean must have the same shape, got {x_raw.shape} and {mean.shape}.")
  if _is_concrete(scale) and not np.all(np.asarray(scale) > 0):
    raise ValueError(f"{name}: scale (the bin width) must be positive, got {np.asarray(scale)}; for a decreasing "
                     "map, flip the levels (L - 1 - k) instead.")
  dtype = mean.dtype
  levels = x_raw.astype(dtype)
  scale, shift = jnp.asarray(scale, dtype), jnp.asarray(shift, dtype)
  inv_std = 1 / jnp.asarray(std, dtype)
  centre = scale * levels + shift
  lower = (centre - 0.5 * scale - mean) * inv_std
  upper = (centre + 0.5 * scale - mean) * inv_std
  is_bottom, is_top = levels <= 0, levels >= num_levels - 1
  # Work on the side of the bin where Phi is small: flip to (-upper, -lower) when the bin lies mostly above 0.
  flip = jnp.where(is_top, True, jnp.where(is_bottom, False, lower + upper > 0))
  a = jnp.where(flip, -upper, lower)  # The bin is [a, b] in standard units; a is ignored where it is open.
  b = jnp.where(flip, -lower, upper)
  open_end = jnp.where(flip, is_top, is_bottom)
  log_b = log_ndtr(b)
  # The open bins are P = Phi(b) exactly; a finite stand-in for a keeps the unused branch (and gradients) finite.
  log_a = log_ndtr(jnp.where(open_end, b - 1, a))
  closed = log_b + jnp.log(-jnp.expm1(jnp.minimum(log_a - log_b, 0.0)))
  return jnp.where(open_end, log_b, closed)


def _model_variances(chain: DDPMChain, variance: Variance):
  r"""`[N]` :math:`\sigma_i^2` of :math:`p_\theta(x_{i-1}\mid x_i)`; entry 0 is the decoder's variance.

  `"beta"`: :math:`\beta_i`; `"beta_tilde"`: :math:`\tilde\beta_i = \beta_i(1-\bar\alpha_{i-1})/(1-\bar\alpha_i)`;
  at level 0 (where :math:`\tilde\beta_0 = 0`) both use :math:`\tilde\beta_1`, as Ho et al.'s code does.
  """
  betas = chain.betas
  one_minus_abar = -jnp.expm1(chain.log_alphas_cumprod)
  beta_tilde = betas[1:] * one_minus_abar[:-1] / one_minus_abar[1:]
  per_step = betas[1:] if variance == "beta" else beta_tilde
  return jnp.concatenate([beta_tilde[:1], per_step])


def _check_variance(name, variance):
  if variance not in ("beta", "beta_tilde"):
    raise ValueError(f"{name}: variance must be 'beta' (sigma_t^2 = beta_t) or 'beta_tilde' (sigma_t^2 = "
                     f"beta_tilde_t), got {variance!r}.")


def _model_mean(chain: DDPMChain, eps_fn: EpsFn, x, i, x0_range):
  r"""Mean of :math:`p_\theta(x_{i-1}\mid x_i)` from the noise prediction (Ho et al. 2020, Eq. 11).

  .. math:: \mu_\theta(x_i, i) = \frac{1}{\sqrt{1-\beta_i}}\Big(x_i - \frac{\beta_i}{\sqrt{1-\bar\alpha_i}}
      \epsilon_\theta(x_i, i)\Big),

  or, with `x0_range`, the posterior mean :math:`\tilde\mu(\hat x_0, x_i)` at the clipped prediction
  :math:`\hat x_0 = \mathrm{clip}((x_i - \sqrt{1-\bar\alpha_i}\,\epsilon_\theta)/\sqrt{\bar\alpha_i})` (the two
  agree without clipping). At level 0 both are :math:`\hat x_0`.
  """
  eps = eps_fn(x, i)
  log_abar = chain.log_alphas_cumprod[i]
  one_minus_abar = -jnp.expm1(log_abar)
  if x0_range is None:
    beta = chain.betas[i]
    return (x - _per_example(beta / jnp.sqrt(one_minus_abar), x) * eps) / _per_example(jnp.sqrt(1 - beta), x)
  x0_hat = (x - _per_example(jnp.sqrt(one_minus_abar), x) * eps) * _per_example(jnp.exp(-0.5 * log_abar), x)
  x0_hat = jnp.clip(x0_hat, x0_range[0], x0_range[1])
  mean, _ = chain.posterior(x0_hat, x, i)
  return mean


def ddpm_kl_term(key, x0, eps_fn: EpsFn, chain: DDPMChain, i, *, variance: Variance = "beta", x0_range=None):
  r"""One step of the DDPM bound, :math:`L_{t-1} = KL(q(x_{t-1}\mid x_t, x_0)\,\|\,p_\theta(x_{t-1}\mid x_t))`.

  In the chain's levels (level `i` is Ho et al.'s :math:`x_{i+1}`), for :math:`i \ge 1` and one draw
  :math:`x_i \sim q(x_i\mid x_0)`: the posterior :math:`N(\tilde\mu, \tilde\beta_i I)` (Eq. 7) against the
  model :math:`N(\mu_\theta(x_i, i), \sigma_i^2 I)` (Eq. 11),

  .. math:: L = \tfrac12\sum_d\Big[\frac{\tilde\beta_i}{\sigma_i^2} - 1 - \log\frac{\tilde\beta_i}{\sigma_i^2}
      + \frac{(\tilde\mu_d - \mu_{\theta,d})^2}{\sigma_i^2}\Big].

  Args:
    key: PRNG key (draws :math:`x_i`).
    x0: data in model space, `[B, *D]`, floating.
    eps_fn: `eps_fn(x_i [B, *D], i [B] int32) -> [B, *D]`, the noise prediction.
    chain: the DDPM chain.
    i: levels `[B]` (or a scalar), integers in `1 .. N-1`.
    variance: the model's :math:`\sigma_i^2`: `"beta"` (:math:`\beta_i`) or `"beta_tilde"` (:math:`\tilde\beta_i`).
    x0_range: `(low, high)` to clip the implied :math:`\hat x_0` to (as DDPM's evaluation did), or None.

  Returns:
    `[B]` KL estimates in nats (unbiased for :math:`E_{x_i\mid x_0}` of the KL).

  Raises:
    ValueError: for bad shapes, an unknown `variance`, or concrete levels outside `1 .. N-1`.
  """
  name = "ddpm_kl_term"
  _check_variance(name, variance)
  if not hasattr(x0, "ndim") or x0.ndim < 2 or not jnp.issubdtype(x0.dtype, jnp.floating):
    raise ValueError(f"{name}: x0 must be a floating array of shape [B, *D], got "
                     f"{getattr(x0, 'dtype', type(x0).__name__)} of shape {getattr(x0, 'shape', None)}.")
  i = jnp.broadcast_to(jnp.asarray(i, jnp.int32), x0.shape[:1])
  if _is_concrete(i) and (np.asarray(i).min() < 1 or np.asarray(i).max() > chain.num_steps - 1):
    raise ValueError(f"{name}: levels i must lie in 1 .. {chain.num_steps - 1} (level 0 is the decoder, see "
                     f"ddpm_vlb_terms), got values in [{np.asarray(i).min()}, {np.asarray(i).max()}].")
  _check_model_output(name, "eps_fn", eps_fn, x0, i)
  x_i, _ = chain.sample_marginal(key, x0, i)
  posterior_mean, posterior_std = chain.posterior(x0, x_i, i)
  model_mean = _model_mean(chain, eps_fn, x_i, i, x0_range)
  model_var = _model_variances(chain, variance)[i].astype(x0.dtype)
  log_ratio = 2 * jnp.log(posterior_std) - jnp.log(model_var)  # log(beta_tilde / sigma^2), [B]
  num_dims = math.prod(x0.shape[1:])
  variance_term = num_dims * (jnp.expm1(log_ratio) - log_ratio)  # D (r - 1 - log r)
  mean_term = _sum_over_data((posterior_mean - model_mean) ** 2) / model_var
  return 0.5 * (variance_term + mean_term)


def ddpm_vlb_terms(key, x_raw, eps_fn: EpsFn, chain: DDPMChain, *, estimator: Estimator = "exact",
                   variance: Variance = "beta", clip_x0: bool = False, scale=2.0 / 255, shift=-1.0,
                   num_levels: int = 256, t_sampling: TimeSampling = "iid", dtype=None) -> DDPMBoundTerms:
  r"""The DDPM variational bound (Ho et al. 2020, Eq. 5) per example, in nats, as its three parts.

  .. math:: -\log p_\theta(x_0) \le \underbrace{KL(q(x_N\mid x_0)\,\|\,N(0, I))}_{L_T}
      + \sum_{t=2}^{N}\underbrace{KL(q(x_{t-1}\mid x_t, x_0)\,\|\,p_\theta(x_{t-1}\mid x_t))}_{L_{t-1}}
      \underbrace{- \log p_\theta(x_0\mid x_1)}_{L_0}

  for discrete :math:`x_0` (levels mapped to :math:`\mathrm{scale}\cdot k + \mathrm{shift}`), with
  :math:`p_\theta(x_{t-1}\mid x_t) = N(\mu_\theta, \sigma_t^2 I)`, :math:`\mu_\theta` from the noise prediction
  (Eq. 11) and :math:`L_0` the discretized Gaussian decoder (Eq. 13, :func:`discretized_gaussian_log_prob`).
  :math:`L_T` is closed form; :math:`L_0` uses one draw of :math:`x_1`. The middle sum is

  * `estimator="exact"`: every step, one draw of :math:`x_t` each (a `lax.scan` over the `N - 1` steps; `N`
    evaluations of `eps_fn`, the calculation of Ho et al.'s `calc_bpd_loop`);
  * `estimator="sampled"`: :math:`(N-1)\,L_{t-1}` for one step :math:`t` uniform on :math:`\{2, \dots, N\}`
    per example, unbiased for the sum (two evaluations of `eps_fn` in all).

  The variance. `variance="beta"` is :math:`\sigma_t^2 = \beta_t`, `"beta_tilde"` is :math:`\sigma_t^2 =
  \tilde\beta_t`; the decoder uses :math:`\sigma_1^2 = \tilde\beta_2` in both cases (with :math:`\tilde\beta_1 = 0`
  the small choice would be degenerate), as in Ho et al.'s code. The paper's CIFAR-10 number (3.70 bits/dim,
  Table 1) used `"beta"` (their `fixedlarge`, the default of `run_cifar.py`), evaluated with the implied
  :math:`\hat x_0` clipped to :math:`[-1, 1]` (their `calc_bpd_loop(clip_denoised=True)`): `clip_x0=True` here.

  Args:
    key: PRNG key.
    x_raw: integer levels `[B, *D]` in `0 .. num_levels - 1` (e.g. uint8 images).
    eps_fn: `eps_fn(x_i [B, *D], i [B] int32) -> [B, *D]`, the noise prediction at chain level `i`.
    chain: the DDPM chain (`N = chain.num_steps`).
    estimator: `"exact"` or `"sampled"` (see above).
    variance: `"beta"` or `"beta_tilde"`.
    clip_x0: clip the implied :math:`\hat x_0` to the data range :math:`[\mathrm{shift},
      \mathrm{shift} + \mathrm{scale}(L-1)]` before forming the mean (a different model, still a valid bound).
    scale, shift: the map from levels to model space, :math:`x_0 = \mathrm{scale}\cdot k + \mathrm{shift}`; `scale`
      is also the decoder's bin width. Defaults: DDPM's `2/255`, `-1` (8-bit data on :math:`[-1, 1]`).
    num_levels: number of levels `L`.
    t_sampling: how the uniform variable behind the sampled step is drawn (:func:`~scoreflow.losses.sample_uniform`).
    dtype: floating dtype of the model's inputs; default: that of `x_raw` if floating, else float32.

  Returns:
    :class:`DDPMBoundTerms` of `[B]` arrays in nats (NaN for invalid examples when `x_raw` is traced).

  Raises:
    ValueError: for a bad `x_raw` (shape, dtype, concrete values outside `0 .. L-1`), a non-positive or non-scalar
      `scale`, an unknown `estimator` or `variance`, or an `eps_fn` whose output does not have the shape of `x_raw`.
  """
  name = "ddpm_vlb_terms"
  _check_variance(name, variance)
  if estimator not in ("exact", "sampled"):
    raise ValueError(f"{name}: estimator must be 'exact' (sum over all steps) or 'sampled' (one random step), "
                     f"got {estimator!r}.")
  if np.ndim(scale) or np.ndim(shift):
    raise ValueError(f"{name}: scale and shift must be scalars (one bin width for all dimensions), got shapes "
                     f"{np.shape(scale)} and {np.shape(shift)}.")
  if _is_concrete(scale) and not float(scale) > 0:
    raise ValueError(f"{name}: scale (the bin width) must be positive, got {scale}.")
  levels, valid = _levels(name, x_raw, num_levels, dtype)
  dtype = levels.dtype
  batch, num_steps = levels.shape[0], chain.num_steps
  x0 = jnp.asarray(scale, dtype) * levels + jnp.asarray(shift, dtype)
  _check_model_output(name, "eps_fn", eps_fn, x0, jnp.zeros((batch,), jnp.int32))
  x0_range = (shift, shift + scale * (num_levels - 1)) if clip_x0 else None
  key_decoder, key_steps = jax.random.split(key)

  # L_T: KL(N(sqrt(abar) x0, 1 - abar) || N(0, 1)) = 1/2 [abar (x0^2 - 1) - log(1 - abar)] per dimension.
  abar_last = jnp.exp(chain.log_alphas_cumprod[-1]).astype(dtype)
  num_dims = math.prod(levels.shape[1:])
  prior = 0.5 * (abar_last * _sum_over_data(x0**2 - 1) - num_dims * jnp.log1p(-abar_last))

  # L_0: the discretized Gaussian decoder at level 0 with variance beta_tilde at level 1.
  level0 = jnp.zeros((batch,), jnp.int32)
  x_level0, _ = chain.sample_marginal(key_decoder, x0, level0)
  decoder_mean = _model_mean(chain, eps_fn, x_level0, level0, x0_range)
  decoder_std = jnp.sqrt(_model_variances(chain, variance)[0]).astype(dtype)
  decoder = -_sum_over_data(discretized_gaussian_log_prob(levels, decoder_mean, decoder_std, scale=scale,
                                                          shift=shift, num_levels=num_levels))

  # sum_{t=2}^{N} L_{t-1}: levels 1 .. N-1.
  def kl(key_i, i):
    return ddpm_kl_term(key_i, x0, eps_fn, chain, i, variance=variance, x0_range=x0_range)

  if estimator == "exact":
    def body(total, inputs):
      level, key_i = inputs
      return total + kl(key_i, jnp.full((batch,), level, jnp.int32)), None

    steps = jnp.arange(1, num_steps, dtype=jnp.int32)
    diffusion, _ = jax.lax.scan(body, jnp.zeros((batch,), dtype), (steps, jax.random.split(key_steps, num_steps - 1)))
  else:
    key_level, key_i = jax.random.split(key_steps)
    u = sample_uniform(key_level, batch, t_sampling, dtype)
    level = 1 + jnp.minimum(jnp.floor(u * (num_steps - 1)).astype(jnp.int32), num_steps - 2)
    diffusion = (num_steps - 1) * kl(key_i, level)

  nan_if_invalid = lambda v: jnp.where(valid, v, jnp.nan).astype(dtype)  # noqa: E731
  return DDPMBoundTerms(nan_if_invalid(prior), nan_if_invalid(diffusion), nan_if_invalid(decoder))


def ddpm_vlb_bpd(key, x_raw, eps_fn: EpsFn, chain: DDPMChain, *, estimator: Estimator = "exact",
                 variance: Variance = "beta", clip_x0: bool = False, scale=2.0 / 255, shift=-1.0,
                 num_levels: int = 256, t_sampling: TimeSampling = "iid", dtype=None):
  r"""The DDPM variational bound (Ho et al. 2020, Eq. 5) per example in bits per dimension.

  :math:`(L_T + \sum_{t\ge2}L_{t-1} + L_0)/(D\ln 2)` from :func:`ddpm_vlb_terms` (see there for the terms, the
  estimators and the paper's settings). The decoder assigns probabilities to the discrete levels directly, so no
  dequantization or Jacobian enters.

  Returns:
    `[B]` bits/dim (NaN for invalid examples when `x_raw` is traced).

  Example:
    >>> import jax, jax.numpy as jnp, scoreflow as sf
    >>> from scoreflow.bounds import ddpm_vlb_bpd
    >>> chain = sf.DDPMChain(num_steps=10, beta_max=5.0)
    >>> images = jnp.full((2, 4, 4, 1), 128, jnp.uint8)
    >>> ddpm_vlb_bpd(jax.random.key(0), images, lambda x, i: jnp.zeros_like(x), chain).shape
    (2,)
  """
  terms = ddpm_vlb_terms(key, x_raw, eps_fn, chain, estimator=estimator, variance=variance, clip_x0=clip_x0,
                         scale=scale, shift=shift, num_levels=num_levels, t_sampling=t_sampling, dtype=dtype)
  num_dims = math.prod(np.shape(x_raw)[1:])
  return terms.total / (num_dims * math.log(2.0))
