r"""Controllable generation: conditional scores and inverse problems, as pure functions of a score function.

Conditioning on :math:`y` changes only the score (Song et al. 2021, Sec. 5):

.. math:: \nabla_x\log p_t(x \mid y) = \nabla_x\log p_t(x) + \nabla_x\log p_t(y \mid x).

Every function here therefore either returns a new `score_fn(x [B, *D], t [B]) -> [B, *D]` that any sampler of
:mod:`scoreflow.sampling` accepts (:func:`classifier_free_score`, :func:`classifier_guided_score`,
:func:`conditional_score`, :func:`linear_inverse_score`, :func:`masked_inverse_score`), or is a predictor-corrector
sampler that imposes an observation by replacement (:func:`inpaint_sample`, :func:`colorize_sample`). All are pure
and traceable: they run inside a user's `jax.jit` and `jax.vmap`, and the samplers are one `lax.scan`.

Which method is exact (proved in `tests/test_guidance*.py` against the closed forms of
:mod:`scoreflow.testing.analytic`):

* :func:`classifier_free_score` with `guidance_scale=0`, and :func:`classifier_guided_score` with the exact
  time-dependent classifier and `scale=1`, give the exact class-conditional score. For `guidance_scale > 0` the
  combined score is in general not the score of any family of marginals; for Gaussian classes it is affine, and
  what a sampler draws is then a Gaussian that :func:`scoreflow.testing.affine_score_moments` predicts.
* :func:`linear_inverse_score` with `method="tweedie"` is the exact posterior score for Gaussian data
  (any covariance); `"pigdm"` is exact for isotropic Gaussian data of standard deviation `data_std`; `"dps"` is
  biased (it drops the spread of :math:`x_0` given :math:`x_t`). :func:`masked_inverse_score` is the same for a
  mask (a selection `A`), without the matrix.
* Replacement (:func:`inpaint_sample`, :func:`colorize_sample`) is exact when the observed and unobserved
  coordinates are independent under the data distribution, and biased otherwise, even for Gaussian data: it feeds
  the score the *prior* draw :math:`\alpha_t y + \sigma_t z` of the observed coordinates rather than their
  posterior given the rest. Reconstruction guidance (`inpaint_sample(guidance="pigdm")`) shrinks that bias.

References:
  Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole. Score-Based Generative Modeling through Stochastic
  Differential Equations. ICLR 2021. (Sec. 5, Appendix I.)
  Ho, Salimans. Classifier-Free Diffusion Guidance. 2022.
  Ho, Salimans, Gritsenko, Chan, Norouzi, Fleet. Video Diffusion Models. NeurIPS 2022. (Reconstruction guidance.)
  Dhariwal, Nichol. Diffusion Models Beat GANs on Image Synthesis. NeurIPS 2021.
  Chung, Kim, Mccann, Klasky, Ye. Diffusion Posterior Sampling for General Noisy Inverse Problems. ICLR 2023.
  Song, Vahdat, Mardani, Kautz. Pseudoinverse-Guided Diffusion Models for Inverse Problems. ICLR 2023.
  Boys, Girolami, Pidstrigach, Reich, Mosca, Akyildiz. Tweedie Moment Projected Diffusions for Inverse
  Problems. 2023.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import numpy as np
import jax
import jax.numpy as jnp

from scoreflow._validation import concrete_value, per_example
from scoreflow.parameterization import score_to_x0
from scoreflow.sampling import Corrector, Predictor, SampleInfo, pc_sample
from scoreflow.sde import AbstractSDE

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]
CondScoreFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
LinearInverseMethod = Literal["tweedie", "pigdm", "dps"]
MaskedInverseMethod = Literal["pigdm", "dps"]


# --- Small helpers (shape checks happen at trace time; value checks only on concrete values). ------------------

def _batch_time(owner: str, t, x):
  """`t` (scalar or `[B]`) as `[B]` for `x: [B, *D]`."""
  t = jnp.asarray(t)
  if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != x.shape[0]):
    raise ValueError(f"{owner}: t must be a scalar or have shape [B] = {x.shape[:1]} for x of shape {x.shape}, "
                     f"got shape {t.shape}.")
  return jnp.broadcast_to(t, x.shape[:1])


def _check_scalar_or_batch(owner: str, name: str, value, batch: int | None = None):
  value = jnp.asarray(value)
  if value.ndim > 1 or (batch is not None and value.ndim == 1 and value.shape[0] != batch):
    expected = "a scalar or shape [B]" if batch is None else f"a scalar or shape [B] = ({batch},)"
    raise ValueError(f"{owner}: {name} must be {expected}, got shape {value.shape}.")
  return value


# --- Conditional scores. ----------------------------------------------------------------------------------------

def classifier_free_score(cond_score_fn: CondScoreFn, label, guidance_scale, *, null_label: int = -1,
                          joint_batch: bool = True) -> ScoreFn:
  r"""The classifier-free guided score of Ho & Salimans (2022), as a `score_fn(x, t)` for any sampler.

  With a network trained on labels and, with label dropout, on the null label :math:`\varnothing`
  ("unconditional"), the guided score at guidance weight :math:`w \ge 0` is

  .. math:: \tilde s(x, t) = (1 + w)\, s_\theta(x, t \mid y) - w\, s_\theta(x, t \mid \varnothing)
      = s_\theta(x, t \mid \varnothing) + \gamma\,\big(s_\theta(x, t \mid y) - s_\theta(x, t \mid \varnothing)\big),
      \quad \gamma = 1 + w.

  This function takes the paper's :math:`w` as `guidance_scale`: `0` is the plain conditional score, and
  Stable-Diffusion-style "cfg scale" :math:`\gamma` is `guidance_scale = gamma - 1`. For :math:`w > 0` the
  result is in general not the score of any distribution's marginals (it sharpens towards :math:`p(y \mid x)^{1+w}`).

  Args:
    cond_score_fn: `cond_score_fn(x [N, *D], t [N], label [N] int) -> [N, *D]`, where `label == null_label`
      asks for the unconditional score.
    label: the requested class, an integer scalar (the same for the whole batch) or `[B]` integers.
    guidance_scale: :math:`w`, a scalar or `[B]` (traced values are fine).
    null_label: the label that means "unconditional" (default `-1`; use what the network was trained with, e.g.
      `num_classes`).
    joint_batch: evaluate the conditional and unconditional scores in one call on the `2B` stacked inputs (one
      network pass over a doubled batch, the usual choice on accelerators); False makes two calls on `B`.

  Returns:
    `score_fn(x [B, *D], t [B] or scalar) -> [B, *D]`.

  Raises:
    ValueError: if `label` is not integer-typed or not a scalar/`[B]`, if `null_label` is not an int, or (when
      the returned function is called) if `label` or `guidance_scale` does not match the batch of `x`.

  Example:
    >>> import jax.numpy as jnp, scoreflow as sf
    >>> from scoreflow.guidance import classifier_free_score
    >>> def cond_score_fn(x, t, label):  # Class c is N(c, 1) at t = 0; the null label -1 is N(0, 1).
    ...   return -(x - jnp.where(label >= 0, label, 0).astype(x.dtype)[:, None])
    >>> score_fn = classifier_free_score(cond_score_fn, 2, guidance_scale=1.0)
    >>> score_fn(jnp.zeros((1, 1)), jnp.zeros(1)).tolist()  # (1 + 1) * 2 - 1 * 0
    [[4.0]]
  """
  owner = "classifier_free_score"
  label = jnp.asarray(label)
  if not jnp.issubdtype(label.dtype, jnp.integer) or label.ndim > 1:
    raise ValueError(f"{owner}: label must be an integer scalar or an integer array of shape [B], got dtype "
                     f"{label.dtype} and shape {label.shape}; e.g. jnp.full((B,), c, jnp.int32).")
  if isinstance(null_label, bool) or not isinstance(null_label, (int, np.integer)):
    raise ValueError(f"{owner}: null_label must be a Python int (the label the network reads as "
                     f"'unconditional'), got {null_label!r}.")
  guidance_scale = _check_scalar_or_batch(owner, "guidance_scale", guidance_scale)

  def score_fn(x, t):
    batch = x.shape[0]
    t = _batch_time(owner, t, x)
    if label.ndim == 1 and label.shape[0] != batch:
      raise ValueError(f"{owner}: label has shape {label.shape} but x has batch size {batch}; pass a scalar "
                       "label or one label per example.")
    _check_scalar_or_batch(owner, "guidance_scale", guidance_scale, batch)
    labels = jnp.broadcast_to(label, (batch,))
    nulls = jnp.full((batch,), null_label, labels.dtype)
    if joint_batch:
      both = cond_score_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([labels, nulls]))
      cond, uncond = both[:batch], both[batch:]
    else:
      cond, uncond = cond_score_fn(x, t, labels), cond_score_fn(x, t, nulls)
    w = per_example(guidance_scale, x)
    return (1 + w) * cond - w * uncond

  return score_fn


def classifier_guided_score(score_fn: ScoreFn, log_prob_y_fn: Callable[[jax.Array, jax.Array], jax.Array],
                            scale=1.0) -> ScoreFn:
  r"""Classifier guidance (Song et al. 2021, Sec. 5; Dhariwal & Nichol 2021):

  .. math:: \tilde s(x, t) = s_\theta(x, t) + \lambda\, \nabla_x \log p_t(y \mid x).

  With the exact time-dependent (noise-conditional) classifier :math:`p_t(y \mid x_t)` and :math:`\lambda = 1`
  this is the exact score of :math:`p_t(x \mid y)` (Bayes' rule); :math:`\lambda > 1` sharpens.

  The gradient is `jax.grad` of the batch sum of `log_prob_y_fn`. That is the per-example gradient because
  examples are independent: :math:`\log p_t(y_b \mid x_b)` depends on :math:`x_b` only, so
  :math:`\partial_{x_b}\sum_{b'} \log p_t(y_{b'} \mid x_{b'}) = \partial_{x_b} \log p_t(y_b \mid x_b)`. (A
  classifier that mixes examples, e.g. batch normalisation in training mode, breaks this.)

  Args:
    score_fn: the unconditional score `score_fn(x [B, *D], t [B]) -> [B, *D]`.
    log_prob_y_fn: `log_prob_y_fn(x [B, *D], t [B]) -> [B]`, the differentiable log-probability of the requested
      labels (close over them: `lambda x, t: log_softmax(classifier(x, t))[jnp.arange(B), labels]`).
    scale: :math:`\lambda`, a scalar or `[B]`.

  Returns:
    `score_fn(x [B, *D], t [B] or scalar) -> [B, *D]`.

  Raises:
    ValueError: (when called) if `log_prob_y_fn` does not return shape `[B]`, or `scale` is not a scalar/`[B]`.
  """
  owner = "classifier_guided_score"
  scale = _check_scalar_or_batch(owner, "scale", scale)

  def guided(x, t):
    t = _batch_time(owner, t, x)
    _check_scalar_or_batch(owner, "scale", scale, x.shape[0])

    def total_log_prob(x):
      log_prob = log_prob_y_fn(x, t)
      if log_prob.shape != x.shape[:1]:
        raise ValueError(f"{owner}: log_prob_y_fn must return one log-probability per example, shape [B] = "
                         f"{x.shape[:1]}, got shape {log_prob.shape}.")
      return jnp.sum(log_prob)

    grad = jax.grad(total_log_prob)(x)
    return score_fn(x, t) + per_example(scale, x) * grad.astype(x.dtype)

  return guided


def conditional_score(score_fn: ScoreFn, log_likelihood_grad: ScoreFn) -> ScoreFn:
  r"""The conditional score for a user-supplied likelihood term:

  .. math:: \nabla_x \log p_t(x \mid y) = s_\theta(x, t) + \nabla_x \log p_t(y \mid x).

  Args:
    score_fn: `score_fn(x [B, *D], t [B]) -> [B, *D]`.
    log_likelihood_grad: `log_likelihood_grad(x [B, *D], t [B]) -> [B, *D]`, the gradient (or an approximation
      of it) of the log-likelihood of the observation, e.g. `jax.grad` of a differentiable constraint.

  Returns:
    `score_fn(x [B, *D], t [B] or scalar) -> [B, *D]`.

  Raises:
    ValueError: (when called) if `log_likelihood_grad` does not return the shape of `x`.
  """
  owner = "conditional_score"

  def conditioned(x, t):
    t = _batch_time(owner, t, x)
    grad = log_likelihood_grad(x, t)
    if grad.shape != x.shape:
      raise ValueError(f"{owner}: log_likelihood_grad must return the shape of x, {x.shape}, got {grad.shape}.")
    return score_fn(x, t) + grad.astype(x.dtype)

  return conditioned


def _check_noise_std(owner: str, noise_std, method: str, *, noiseless_method: str) -> None:
  """`noise_std` must be a scalar >= 0, and positive for `"dps"` (checked when its value is known)."""
  value = concrete_value(noise_std)
  if value is not None and (np.ndim(value) != 0 or not value >= 0):
    raise ValueError(f"{owner}: noise_std must be a scalar >= 0, got {np.asarray(value).tolist()}.")
  if method == "dps" and value is not None and value == 0:
    raise ValueError(f"{owner}: method 'dps' needs noise_std > 0 (its likelihood N(y; A x0_hat, noise_std^2 I) is "
                     f"degenerate otherwise); use method={noiseless_method!r} for noiseless observations.")


def _pigdm_variance(alpha, sigma2, data_std):
  r""":math:`r_t^2 = \sigma_t^2 s^2/(\alpha_t^2 s^2 + \sigma_t^2)`: :math:`\mathrm{Var}[x_0 \mid x_t]` per coordinate for
  data :math:`N(\mu, s^2 I)`, `s = data_std` (ΠGDM's assumption)."""
  s2 = jnp.asarray(data_std, sigma2.dtype) ** 2
  return sigma2 * s2 / (alpha**2 * s2 + sigma2)


def linear_inverse_score(score_fn: ScoreFn, sde: AbstractSDE, A, y, noise_std, *,
                         method: LinearInverseMethod = "tweedie", data_std=1.0, scale=1.0) -> ScoreFn:
  r"""The posterior score for a linear observation :math:`y = A x_0 + n`, :math:`n \sim N(0, \sigma_y^2 I)`.

  All three methods approximate :math:`p_t(y \mid x_t)` by a Gaussian around the Tweedie denoiser
  :math:`\hat x_0(x_t) = E[x_0 \mid x_t] = (x_t + \sigma_t^2 s_\theta(x_t, t))/\alpha_t`,

  .. math:: p_t(y \mid x_t) \approx N\big(y;\ A\hat x_0(x_t),\ S_t\big), \qquad
      \nabla_{x_t} \log p_t(y \mid x_t) \approx J^\top A^\top S_t^{-1} \big(y - A \hat x_0(x_t)\big),
      \quad J = \partial \hat x_0 / \partial x_t,

  and differ in :math:`S_t = A\,C_t A^\top + \sigma_y^2 I`, i.e. in the covariance :math:`C_t` they assume for
  :math:`x_0 \mid x_t`:

  * `"tweedie"` (moment projection; Boys et al. 2023): the exact second-order Tweedie covariance
    :math:`C_t = \mathrm{Cov}[x_0 \mid x_t] = (\sigma_t^2/\alpha_t)\, J`. For Gaussian data :math:`x_0 \mid x_t` is
    Gaussian with exactly these moments and :math:`\hat x_0` is affine, so this is the *exact* posterior score.
    Cost: one linearisation of the score plus `m` Jacobian-vector products (`m` = number of observations) and an
    `m x m` solve per example.
  * `"pigdm"` (Song, Vahdat, Mardani & Kautz 2023): :math:`C_t = r_t^2 I` with
    :math:`r_t^2 = \sigma_t^2 s^2/(\alpha_t^2 s^2 + \sigma_t^2)`, `s = data_std` (the paper's
    :math:`\sigma_t^2/(1+\sigma_t^2)` for VE and unit-variance data). Exact for data :math:`N(\mu, s^2 I)`.
  * `"dps"` (Chung et al. 2023, Gaussian-noise case): :math:`C_t = 0`, i.e. :math:`x_0 \mid x_t` taken as the point
    :math:`\hat x_0`. Needs :math:`\sigma_y > 0`. Known to be biased: it over-weights the observation at large
    `t`, where :math:`\hat x_0` is most uncertain (the paper instead tunes a step size :math:`\zeta`; `scale`
    plays that role here).

  The covariance :math:`S_t` is held fixed when differentiating (`lax.stop_gradient`), as in all three papers;
  for Gaussian data it does not depend on :math:`x_t` anyway.

  Args:
    score_fn: the prior score `score_fn(x [B, *D], t [B]) -> [B, *D]`.
    sde: the forward process (gives :math:`\alpha_t, \sigma_t`).
    A: the observation matrix `[m, d]` acting on flattened examples, `d = prod(D)`.
    y: observations, `[m]` (shared by the batch) or `[B, m]`.
    noise_std: :math:`\sigma_y \ge 0`, a scalar.
    method: `"tweedie"`, `"pigdm"` or `"dps"` (see above).
    data_std: the data standard deviation `s` that `"pigdm"` assumes (ignored by the other methods).
    scale: a multiplier :math:`\lambda` of the likelihood term, :math:`s_\theta + \lambda \nabla\log p_t(y\mid x_t)`
      (1 for the methods as derived).

  Returns:
    `score_fn(x [B, *D], t [B] or scalar) -> [B, *D]`.

  Raises:
    ValueError: for an unknown `method`, `A` not two-dimensional, `y` not `[m]`/`[B, m]`, a negative
      `noise_std`, `noise_std = 0` with `"dps"`, or (when called) `A` not matching the size of the examples.
  """
  owner = "linear_inverse_score"
  if method not in ("tweedie", "pigdm", "dps"):
    raise ValueError(f"{owner}: unknown method {method!r}; choose one of ['dps', 'pigdm', 'tweedie'].")
  A = jnp.asarray(A)
  if A.ndim != 2:
    raise ValueError(f"{owner}: A must be a matrix [m, d] acting on flattened examples, got shape {A.shape}; "
                     "for a single observation use A[None].")
  m = A.shape[0]
  y = jnp.asarray(y)
  if y.ndim not in (1, 2) or y.shape[-1] != m:
    raise ValueError(f"{owner}: y must have shape [m] = ({m},) or [B, m], got {y.shape} (A has shape {A.shape}).")
  _check_noise_std(owner, noise_std, method, noiseless_method="tweedie")
  scale = _check_scalar_or_batch(owner, "scale", scale)

  def guided(x, t):
    batch, d = x.shape[0], math.prod(x.shape[1:])
    if A.shape[1] != d:
      raise ValueError(f"{owner}: A has {A.shape[1]} columns but the examples of x (shape {x.shape}) have "
                       f"{d} entries; A must be [m, prod(D)].")
    if y.ndim == 2 and y.shape[0] != batch:
      raise ValueError(f"{owner}: y has shape {y.shape} but x has batch size {batch}; pass y as [m] or [B, m].")
    t = _batch_time(owner, t, x)
    A_x = A.astype(x.dtype)
    alpha = sde.alpha(t).astype(x.dtype)  # [B]
    sigma2 = (sde.sigma(t) ** 2).astype(x.dtype)  # [B]

    def denoise(x):
      return score_to_x0(sde, score_fn(x, t), x, t).astype(x.dtype)

    score = score_fn(x, t).astype(x.dtype)
    x0_hat, jvp_fn = jax.linearize(denoise, x)
    residual = jnp.broadcast_to(y.astype(x.dtype), (batch, m)) - x0_hat.reshape(batch, d) @ A_x.T  # [B, m]
    noise_var = jnp.asarray(noise_std, x.dtype) ** 2
    if method == "tweedie":
      # Rows of A as tangents [m, B, *D]; J a_i per example, then A (J a_i): S_b[j, i] = a_j . J_b a_i.
      tangents = jnp.broadcast_to(A_x[:, None, :], (m, batch, d)).reshape((m,) + x.shape)
      J_At = jax.vmap(jvp_fn)(tangents).reshape(m, batch, d)
      A_J_At = jnp.einsum("jd,ibd->bji", A_x, J_At)
      A_J_At = 0.5 * (A_J_At + jnp.swapaxes(A_J_At, 1, 2))  # J is symmetric for an exact score.
      S = (sigma2 / alpha)[:, None, None] * A_J_At
    elif method == "pigdm":
      r2 = _pigdm_variance(alpha, sigma2, data_std)  # [B]
      S = r2[:, None, None] * (A_x @ A_x.T)[None]
    else:
      S = jnp.zeros((batch, m, m), x.dtype)
    S = jax.lax.stop_gradient(S + noise_var * jnp.eye(m, dtype=x.dtype)[None])
    weighted = jnp.linalg.solve(S, residual[..., None])[..., 0]  # S^{-1} (y - A x0_hat), [B, m]
    cotangent = (weighted @ A_x).reshape(x.shape)
    (grad,) = jax.linear_transpose(jvp_fn, x)(cotangent)  # J^T A^T S^{-1} (y - A x0_hat)
    _check_scalar_or_batch(owner, "scale", scale, batch)
    return score + per_example(scale, x) * grad

  return guided


def masked_inverse_score(score_fn: ScoreFn, sde: AbstractSDE, y, mask, *, method: MaskedInverseMethod = "pigdm",
                         noise_std=0.0, data_std=1.0, scale=1.0, t_max=None) -> ScoreFn:
  r""":func:`linear_inverse_score` for inpainting: :math:`A` selects the coordinates where `mask == 1`, and is never
  formed.

  A selection has :math:`A A^\top = I`, so the `"pigdm"` and `"dps"` covariances are multiples of the identity,
  :math:`S_t = (c_t + \sigma_y^2) I` with :math:`c_t = r_t^2 = \sigma_t^2 s^2/(\alpha_t^2 s^2 + \sigma_t^2)`
  (`"pigdm"`, `s = data_std`) or :math:`c_t = 0` (`"dps"`), and the likelihood term is

  .. math:: \nabla_{x_t}\log p_t(y \mid x_t) \approx \frac{J^\top[m \odot (y - \hat x_0(x_t))]}{c_t + \sigma_y^2},
      \qquad J^\top v = \frac{v + \sigma_t^2\, (\partial s_\theta/\partial x_t)^\top v}{\alpha_t}.

  One network evaluation and one VJP per call, O(d) memory: what :func:`linear_inverse_score` computes with the
  explicit selection matrix (an `m x d` matrix and an `m x m` solve per example), for images of any size. Used with
  replacement by :func:`inpaint_sample` (`guidance=`), the combination that Ho et al. (2022) call reconstruction
  guidance: replacement keeps the observed coordinates on the forward process from `y`, the gradient pulls the
  unobserved ones towards completions whose denoised observed part agrees with `y`.

  With a trained network the term can only be trusted at low noise: :math:`J` divides the network's Jacobian by
  :math:`\alpha_t`, so at high noise (VP: :math:`\alpha_1 \approx 0.007`) any error in it is amplified a
  hundredfold and the sampler diverges (measured on the digits model: completions of magnitude 1e5). `t_max`
  switches the term off at :math:`t > t_{max}`, where the sampler then follows the prior score and the replacement
  alone, and skips the VJP there (`lax.cond`).

  Args:
    score_fn: the prior score `score_fn(x [B, *D], t [B]) -> [B, *D]`.
    sde: the forward process.
    y: the observation, `[B, *D]` (its values where `mask == 0` are ignored).
    mask: 1 (or True) where observed; broadcastable to `y` with the same number of axes.
    method: `"pigdm"` or `"dps"` (see :func:`linear_inverse_score`).
    noise_std: :math:`\sigma_y \ge 0`; `"dps"` needs it positive.
    data_std: the data standard deviation `"pigdm"` assumes.
    scale: the multiplier :math:`\lambda` of the likelihood term (a scalar or `[B]`).
    t_max: apply the likelihood term only at times :math:`t \le t_{max}` (None: at every time).

  Returns:
    `score_fn(x [B, *D], t [B] or scalar) -> [B, *D]`.

  Raises:
    ValueError: for an unknown `method`, a mask that does not broadcast or is not binary, a negative `noise_std`,
      `noise_std = 0` with `"dps"`, or a `t_max` that is not a positive number.
  """
  owner = "masked_inverse_score"
  if method not in ("pigdm", "dps"):
    raise ValueError(f"{owner}: unknown method {method!r}; choose 'pigdm' or 'dps' (for 'tweedie', pass the "
                     "selection matrix to linear_inverse_score).")
  y = jnp.asarray(y)
  observed = _check_mask(owner, mask, y.shape)
  _check_noise_std(owner, noise_std, method, noiseless_method="pigdm")
  scale = _check_scalar_or_batch(owner, "scale", scale)
  if t_max is not None and (isinstance(t_max, bool) or not isinstance(t_max, (int, float)) or not t_max > 0):
    raise ValueError(f"{owner}: t_max must be a positive time (or None for every time), got {t_max!r}.")

  def guided(x, t):
    if x.shape != y.shape:
      raise ValueError(f"{owner}: x has shape {x.shape} but the observation y has shape {y.shape}.")
    t = _batch_time(owner, t, x)
    _check_scalar_or_batch(owner, "scale", scale, x.shape[0])
    weight = per_example(scale, x)

    def with_likelihood(x):
      alpha, sigma2 = per_example(sde.alpha(t), x), per_example(sde.sigma(t) ** 2, x)
      score, score_vjp = jax.vjp(lambda x: score_fn(x, t).astype(x.dtype), x)
      x0_hat = (x + sigma2 * score) / alpha
      variance = jnp.asarray(noise_std, x.dtype) ** 2
      if method == "pigdm":
        variance = variance + _pigdm_variance(alpha, sigma2, data_std)
      weighted = jnp.where(observed, y.astype(x.dtype) - x0_hat, 0) / variance
      (score_grad,) = score_vjp(weighted)
      likelihood_grad = weight * (weighted + sigma2 * score_grad) / alpha
      if t_max is not None:  # A select, not a product: the term may overflow at the high noise it leaves out.
        likelihood_grad = jnp.where(per_example(t, x) <= t_max, likelihood_grad, 0)
      return score + likelihood_grad

    if t_max is None:
      return with_likelihood(x)
    return jax.lax.cond(jnp.any(t <= t_max), with_likelihood, lambda x: score_fn(x, t).astype(x.dtype), x)

  return guided


# --- Replacement samplers: inpainting and colorization. --------------------------------------------------------

def _check_mask(owner: str, mask, shape) -> jax.Array:
  """The boolean mask (broadcast to `shape`) of a 0/1 (or boolean) `mask` whose shape broadcasts to `shape`."""
  mask = jnp.asarray(mask)
  if mask.ndim != len(shape) or any(m not in (1, s) for m, s in zip(mask.shape, shape)):
    raise ValueError(f"{owner}: mask must have the shape of x_observed, {tuple(shape)}, or one that broadcasts to "
                     f"it with the same number of axes (e.g. [B, H, W, 1] for images [B, H, W, C]), got "
                     f"{mask.shape}.")
  value = concrete_value(mask)
  if value is not None and not np.all((value == 0) | (value == 1)):
    bad = np.unique(value[(value != 0) & (value != 1)])[:5]
    raise ValueError(f"{owner}: mask must be binary (1 = observed, 0 = to generate), got values such as "
                     f"{bad.tolist()}; threshold a soft mask first, e.g. mask > 0.5.")
  return jnp.broadcast_to(mask != 0, shape)


def _replacement_pc_sample(owner, key, sde, score_fn, y, observed, *, dtype, **pc_options):
  """:func:`~scoreflow.sampling.pc_sample` with the observed coordinates replaced by a forward-noised `y` after
  every predictor and corrector step (its `project` hook), and set exactly to `y` at the end. `y, observed:
  [B, *D]`; `pc_options`: the sampler's keyword arguments (checked by it)."""
  del owner  # pc_sample's checks name it.
  y = y.astype(dtype)

  def replace(key, x, t):
    # The observed coordinates become a fresh draw of x_t | x_0 = y.
    noisy = per_example(sde.alpha(t), x) * y + per_example(sde.sigma(t), x) * jax.random.normal(key, x.shape, dtype)
    return jnp.where(observed, noisy.astype(dtype), x)

  # Start from the prior, with the observed coordinates drawn from x_T | x_0 = y.
  key_init, key_replace, key_steps = jax.random.split(key, 3)
  t_start = jnp.full(y.shape[:1], sde.T, jnp.promote_types(dtype, jnp.float32))
  x_T = replace(key_replace, sde.prior_sample(key_init, y.shape, dtype), t_start)
  x, info = pc_sample(key_steps, sde, score_fn, y.shape, x_T=x_T, project=replace, dtype=dtype, **pc_options)
  # Put the observation back exactly, after the optional denoising (the 2021 code returned the noise-free mean of
  # the unmasked update here, so its observed pixels drifted).
  return jnp.where(observed, y, x), info


def _sample_dtype(owner: str, x, dtype):
  if dtype is None:
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{owner}: dtype must be a floating dtype such as jnp.float32, got {dtype!r}.")
  return jnp.dtype(dtype)


def inpaint_sample(key, sde: AbstractSDE, score_fn: ScoreFn, x_observed, mask, *,
                   predictor: str | Predictor = "reverse_diffusion", corrector: str | Corrector = "langevin",
                   num_steps: int = 1000, snr=0.16, n_corrector_steps: int = 1, eps=1e-3, denoise: bool = True,
                   corrector_first: bool = False, guidance: MaskedInverseMethod | None = None, guidance_scale=1.0,
                   data_std=1.0, noise_std=0.0, guidance_t_max=None, dtype=None) -> tuple[jax.Array, SampleInfo]:
  r"""Inpainting by replacement with a predictor-corrector sampler (Song et al. 2021, Appendix I.2), optionally
  with reconstruction guidance (Ho et al. 2022).

  On the grid :math:`T = t_0 > \dots > t_N = \epsilon` it runs :func:`~scoreflow.sampling.pc_sample`'s steps and,
  after every predictor step and every single corrector step (at time :math:`t`), replaces the observed
  coordinates (`mask == 1`) by a fresh draw of the forward process from the observation :math:`y`,

  .. math:: x \leftarrow (1 - m) \odot x + m \odot (\alpha(t)\, y + \sigma(t)\, z), \qquad z \sim N(0, I).

  At the end (after the optional Tweedie denoising of the whole state) the observed coordinates are set to
  :math:`y` itself, so they are preserved bitwise, whatever the predictor, corrector and `denoise`. (The 2021 code
  returned the noise-free mean of the last, unmasked update, so its observed pixels drifted.)

  Exactness: if the observed and unobserved coordinates are independent under the data distribution the score of
  the unobserved ones does not depend on the observed ones and this samples the exact conditional. Otherwise it is
  biased, even for Gaussian data: the score sees :math:`x_{t,o} \sim p(x_{t,o} \mid x_{0,o} = y)`, not
  :math:`p(x_{t,o} \mid x_{0,o} = y, x_{t,u})`. For strongly correlated coordinates prefer
  :func:`linear_inverse_score` with a selection matrix `A`, or add `guidance`: the sampler then follows
  :func:`masked_inverse_score` (`"pigdm"` or `"dps"`, weighted by `guidance_scale`) instead of the prior score,
  which tells the unobserved coordinates about the observation through the network's Jacobian (one VJP per
  network evaluation, about 3x the cost). Replacement and the exact observed values at the end stay.

  `num_steps`, `n_corrector_steps`, the names, `denoise`, `corrector_first` and `dtype` fix the program; jit with
  them (and `score_fn`) closed over. A new key, observation or mask does not recompile; it runs under `jax.vmap`.

  Args:
    key: PRNG key.
    sde: the forward process.
    score_fn: the unconditional score `score_fn(x [B, *D], t [B]) -> [B, *D]`.
    x_observed: :math:`y`, `[B, *D]`; its values where `mask == 0` are ignored.
    mask: 1 (or True) where observed, 0 where to generate; the shape of `x_observed` or broadcastable to it with
      the same number of axes (e.g. `[B, H, W, 1]` or `[1, H, W, 1]` for images `[B, H, W, C]`). Under a trace its
      values are not checked and any nonzero value counts as observed.
    predictor: a name in :data:`scoreflow.sampling.PREDICTORS` or a :class:`~scoreflow.sampling.Predictor`.
    corrector: a name in :data:`scoreflow.sampling.CORRECTORS` or a :class:`~scoreflow.sampling.Corrector`.
    num_steps: predictor steps `N`.
    snr: the Langevin corrector's signal-to-noise ratio.
    n_corrector_steps: corrector steps per level.
    eps: the last time :math:`\epsilon \in (0, T)`.
    denoise: finish with Tweedie's denoiser :math:`(x + \sigma_\epsilon^2 s(x, \epsilon))/\alpha_\epsilon`.
    corrector_first: correct before predicting at each level (the 2021 inpainting code's order).
    guidance: None (replacement only), `"pigdm"` or `"dps"`: the :func:`masked_inverse_score` to sample with.
    guidance_scale, data_std, noise_std, guidance_t_max: its `scale`, `data_std`, `noise_std` and `t_max` (used
      only with `guidance`).
    dtype: the samples' floating dtype (default: that of `x_observed`, else float32).

  Returns:
    `(x, info)`: samples `[B, *D]` with `x == x_observed` wherever `mask == 1`, and a
    :class:`~scoreflow.sampling.SampleInfo`.

  Raises:
    ValueError: for a mask of the wrong shape or with values other than 0 and 1, an unknown predictor or corrector,
      `num_steps < 1`, `n_corrector_steps < 0`, `snr <= 0`, or `eps` outside `(0, T)`.

  Example:
    >>> import jax, jax.numpy as jnp, scoreflow as sf
    >>> from scoreflow.guidance import inpaint_sample
    >>> from scoreflow.testing import GaussianMixture
    >>> sde = sf.VPSDE()
    >>> score_fn = GaussianMixture.gaussian(jnp.zeros(3), 1.0).score(sde)
    >>> y, mask = jnp.ones((4, 3)), jnp.array([[1, 0, 0]])
    >>> x, info = inpaint_sample(jax.random.key(0), sde, score_fn, y, mask, num_steps=50)
    >>> bool(jnp.all(x[:, 0] == 1.0)), int(info.nfe)
    (True, 101)
  """
  owner = "inpaint_sample"
  x_observed = jnp.asarray(x_observed)
  if x_observed.ndim < 2:
    raise ValueError(f"{owner}: x_observed must be a batch [B, *D] with at least one data axis, got shape "
                     f"{x_observed.shape}.")
  dtype = _sample_dtype(owner, x_observed, dtype)
  observed = _check_mask(owner, mask, x_observed.shape)
  if guidance is not None:
    score_fn = masked_inverse_score(score_fn, sde, x_observed.astype(dtype), observed, method=guidance,
                                    noise_std=noise_std, data_std=data_std, scale=guidance_scale,
                                    t_max=guidance_t_max)
  return _replacement_pc_sample(owner, key, sde, score_fn, x_observed, observed, predictor=predictor,
                                corrector=corrector, num_steps=num_steps, snr=snr,
                                n_corrector_steps=n_corrector_steps, eps=eps, denoise=denoise,
                                corrector_first=corrector_first, dtype=dtype)


def color_decoupling_matrix(dtype=jnp.float32) -> jax.Array:
  r"""The orthogonal `3 x 3` matrix :math:`Q` whose rows are an orthonormal basis of colour space with the grey axis
  first:

  .. math:: Q = \begin{pmatrix} 1/\sqrt3 & 1/\sqrt3 & 1/\sqrt3 \\ -2/\sqrt6 & 1/\sqrt6 & 1/\sqrt6 \\
      0 & 1/\sqrt2 & -1/\sqrt2 \end{pmatrix}, \qquad Q Q^\top = I.

  (Gram–Schmidt from :math:`(1,1,1)`, then :math:`(-2,1,1) \perp (1,1,1)`, then their cross product.) The latent
  :math:`u = Q x` of an RGB pixel has :math:`u_0 = \sqrt3\,\bar x`, :math:`\bar x` the grey level (channel mean),
  and :math:`u_1, u_2` the chroma. The 2021 code's matrix `M` is :math:`Q^\top` (it maps `x M`), up to the signs of
  its float32 digits.
  """
  q = np.array([[1.0, 1.0, 1.0], [-2.0, 1.0, 1.0], [0.0, 1.0, -1.0]])
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  return jnp.asarray(q, dtype)


def decouple_colors(x) -> jax.Array:
  """RGB `x: [..., 3]` to the grey/chroma latent :math:`u = Q x` per pixel (:func:`color_decoupling_matrix`)."""
  return x @ color_decoupling_matrix(x.dtype).T


def couple_colors(u) -> jax.Array:
  r"""The inverse of :func:`decouple_colors`: :math:`x = Q^\top u` per pixel, `u: [..., 3]`."""
  return u @ color_decoupling_matrix(u.dtype)


def colorize_sample(key, sde: AbstractSDE, score_fn: ScoreFn, grey, *,
                    predictor: str | Predictor = "reverse_diffusion", corrector: str | Corrector = "langevin",
                    num_steps: int = 1000, snr=0.16, n_corrector_steps: int = 1, eps=1e-3, denoise: bool = True,
                    corrector_first: bool = False, dtype=None) -> tuple[jax.Array, SampleInfo]:
  r"""Colorization: inpainting of the chroma in the decoupled colour space (Song et al. 2021, Appendix I.3).

  With the orthogonal :math:`Q` of :func:`color_decoupling_matrix` the latent :math:`u = Q x` (per pixel) has the
  grey channel :math:`u_0 = \sqrt3\,\bar x` apart from the chroma :math:`u_{1,2}`. Because :math:`Q` is orthogonal
  and every process of :mod:`scoreflow.sde` is isotropic, :math:`u` diffuses under the same SDE with score
  :math:`s_u(u, t) = Q\, s(Q^\top u, t)`; this function runs :func:`inpaint_sample`'s replacement sampler on
  :math:`u` with :math:`u_0` observed, and returns :math:`x = Q^\top u`.

  The observed grey channel is kept exactly in the latent space (bitwise :math:`u_0 = \sqrt3\,\bar x_{\rm grey}`);
  in pixel space the output's channel mean equals `grey` up to the round-off of one `3 x 3` product (a few ulp:
  float32 agrees to about 1e-6 relative, float64 to about 1e-15). As for inpainting, the result is exact when grey
  and chroma are independent under the data distribution, and biased otherwise.

  Args:
    key: PRNG key.
    sde: the forward process.
    score_fn: the unconditional score of RGB data `score_fn(x [B, *S, 3], t [B]) -> [B, *S, 3]`.
    grey: the grey levels (channel means) `[B, *S, 1]`; for an RGB image with equal channels pass
      `x.mean(-1, keepdims=True)`.
    predictor, corrector, num_steps, snr, n_corrector_steps, eps, denoise, corrector_first, dtype: as for
      :func:`inpaint_sample`.

  Returns:
    `(x, info)`: RGB samples `[B, *S, 3]` whose channel mean is `grey`, and a :class:`~scoreflow.sampling.SampleInfo`.

  Raises:
    ValueError: if `grey` is not `[B, *S, 1]`, and as :func:`inpaint_sample`.
  """
  owner = "colorize_sample"
  grey = jnp.asarray(grey)
  if grey.ndim < 2 or grey.shape[-1] != 1:
    raise ValueError(f"{owner}: grey must have shape [B, *S, 1] (one channel, the mean of R, G, B), got "
                     f"{grey.shape}; for RGB input with equal channels pass x.mean(-1, keepdims=True).")
  dtype = _sample_dtype(owner, grey, dtype)
  grey = grey.astype(dtype)
  q = color_decoupling_matrix(dtype)
  shape = grey.shape[:-1] + (3,)
  u_observed = jnp.concatenate([jnp.sqrt(jnp.asarray(3.0, dtype)) * grey, jnp.zeros(grey.shape[:-1] + (2,), dtype)],
                               axis=-1)
  observed = jnp.broadcast_to(jnp.arange(3) == 0, shape)

  def latent_score(u, t):
    return score_fn(u @ q, t).astype(u.dtype) @ q.T

  u, info = _replacement_pc_sample(owner, key, sde, latent_score, u_observed, observed, predictor=predictor,
                                   corrector=corrector, num_steps=num_steps, snr=snr,
                                   n_corrector_steps=n_corrector_steps, eps=eps, denoise=denoise,
                                   corrector_first=corrector_first, dtype=dtype)
  return u @ q, info
