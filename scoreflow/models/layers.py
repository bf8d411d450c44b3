r"""Building blocks of the score networks: noise embeddings, FIR resampling, residual and attention blocks.

Layout is NHWC (`x: [B, H, W, C]`) for images and `[B, F]` for features. Every module takes a `dtype`
(the computation dtype; parameters stay in `param_dtype`, float32 by default), so a network computes in
bfloat16 with float32 parameters by passing `dtype=jnp.bfloat16`. The pure functions follow the dtype of their
input.

The FIR resampling functions implement `upfirdn2d` (upsample by zero insertion, pad, convolve with a finite
impulse response filter, downsample by striding) and the resamplers of StyleGAN2 built on it, which NCSN++
uses (Karras et al. 2020; Song et al. 2021, Appendix H): with the normalised filter
:math:`k = k_1 k_1^\top/(\sum k_1)^2` (e.g. :math:`k_1 = [1, 3, 3, 1]`),

* `upsample_2d` zero-inserts and convolves with :math:`\text{factor}^2\,k`,
* `downsample_2d` convolves with :math:`k` and keeps every `factor`-th pixel,

with pixels outside the image taken as zero. For a symmetric filter the two are adjoint up to the factor
:math:`\text{factor}^2`: :math:`\langle \mathrm{up}(y), x\rangle = \text{factor}^2\langle y, \mathrm{down}(x)\rangle`.
With :math:`k_1 = [1, 1]` they reduce to nearest-neighbour upsampling and 2x2 average pooling.

References:
  Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020. (Residual blocks, attention,
  sinusoidal embedding, the DDPM initialisation.)
  Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole. Score-Based Generative Modeling through Stochastic
  Differential Equations. ICLR 2021. (Appendix H: NCSN++/DDPM++.)
  Karras, Laine, Aittala, Hellsten, Lehtinen, Aila. Analyzing and Improving the Image Quality of StyleGAN.
  CVPR 2020. (FIR up/down-sampling.)
  Brock, Donahue, Simonyan. Large Scale GAN Training for High Fidelity Natural Image Synthesis. ICLR 2019.
  (BigGAN residual blocks.)
  Tancik et al. Fourier Features Let Networks Learn High Frequency Functions. NeurIPS 2020.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scoreflow._validation import check_labels

Dtype = Any
NoiseConditioningKind = Literal["time", "sigma", "log_sigma", "log_snr", "index"]
NOISE_CONDITIONING_KINDS = ("time", "sigma", "log_sigma", "log_snr", "index")


# --- Initialisers. --------------------------------------------------------------------------------

def default_init(scale: float = 1.0):
  r"""The DDPM initialiser: variance scaling with fan-average, uniform,
  :math:`W \sim U(-a, a)`, :math:`a = \sqrt{3\,\text{scale}/((\text{fan}_{in}+\text{fan}_{out})/2)}`.

  `scale=0` gives exact zeros (the 2021 reference used a variance of 1e-10 instead, which is zero to
  within rounding of every later layer); a zero output layer makes the network output exactly 0 at
  initialisation, and a zero last layer in a residual branch makes that block the identity.
  """
  if scale < 0:
    raise ValueError(f"default_init: scale must be >= 0, got {scale}.")
  if scale == 0:
    return nn.initializers.zeros
  return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


def conv(features: int, kernel_size: int = 3, stride: int = 1, init_scale: float = 1.0, use_bias: bool = True,
         dtype: Dtype = None, name: Optional[str] = None) -> nn.Conv:
  """A `kernel_size` x `kernel_size` convolution ('SAME' padding) with the DDPM initialiser and zero bias."""
  return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride), padding="SAME",
                 use_bias=use_bias, kernel_init=default_init(init_scale), dtype=dtype, name=name)


def dense(features: int, init_scale: float = 1.0, dtype: Dtype = None, name: Optional[str] = None) -> nn.Dense:
  """A dense layer over the last axis (the DDPM 'NIN' on images) with the DDPM initialiser and zero bias."""
  return nn.Dense(features, kernel_init=default_init(init_scale), dtype=dtype, name=name)


def num_groups(channels: int, max_groups: int = 32) -> int:
  """GroupNorm groups for `channels`: `min(channels // 4, 32)` (the NCSN++ rule; it equals the DDPM's 32
  for every width >= 128), lowered to the nearest divisor of `channels` so that any width works."""
  groups = max(1, min(channels // 4, max_groups))
  while channels % groups:
    groups -= 1
  return groups


def _group_sums(per_channel, groups: int):
  """`[B, C] -> [B, G]`: the sum over each group's channels."""
  batch, channels = per_channel.shape
  return per_channel.reshape(batch, groups, channels // groups).sum(-1)


def _broadcast_groups(per_group, x):
  """`[B, G] -> [B, 1, ..., 1, C]`: each group's value on its channels, broadcastable against `x`."""
  batch, groups = per_group.shape
  per_channel = jnp.repeat(per_group, x.shape[-1] // groups, axis=-1)
  return per_channel.reshape((batch,) + (1,) * (x.ndim - 2) + (x.shape[-1],))


def _channels_last(per_channel, x):
  """`[C] -> [1, ..., 1, C]`, broadcastable against `x`."""
  return per_channel.reshape((1,) * (x.ndim - 1) + (-1,))


def _group_mean(v, groups: int):
  """`[B, ..., C] -> [B, 1, ..., 1, C]`: the mean of each example's group over its pixels and channels, on each of
  the group's channels. The sum runs first over the pixels, per channel (along the contiguous channel axis), then
  over each group's channels."""
  count = math.prod(v.shape[1:-1]) * (v.shape[-1] // groups)
  return _broadcast_groups(_group_sums(jnp.sum(v, tuple(range(1, v.ndim - 1))), groups) / count, v)


def _group_moments(x, groups: int, epsilon: float):
  r"""Each group's mean and :math:`(\sigma^2 + \epsilon)^{-1/2}`, `[B, 1, ..., 1, C]` each, with
  :math:`\sigma^2 = E[x^2] - E[x]^2` (clipped at 0; Flax's fast variance)."""
  mean = _group_mean(x, groups)
  return mean, jax.lax.rsqrt(jnp.maximum(_group_mean(x * x, groups) - mean * mean, 0) + epsilon)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def group_norm_apply(x, scale, bias, groups: int, epsilon: float = 1e-6):
  r"""GroupNorm of `x: [B, ..., C]` over its pixels and each of `groups` groups of consecutive channels:

  .. math:: y = \hat x\,\gamma + \beta,\qquad \hat x = (x - \mu_g)\,r_g,\qquad
      r_g = (\sigma_g^2 + \epsilon)^{-1/2},

  with :math:`\mu_g, \sigma_g^2` the mean and variance of example `b`'s group `g` (Wu & He 2018), equal to
  `flax.linen.GroupNorm` up to rounding. Its derivative is written out (a custom JVP, so forward and reverse
  mode both work):

  .. math:: \dot y = r_g\,\gamma\,\bigl(\dot x - E_g[\dot x] - \hat x\,E_g[\hat x\,\dot x]\bigr)
      + \hat x\,\dot\gamma + \dot\beta,

  whose transpose, the backward pass, is per-channel sums over the pixels and one elementwise pass. The sums
  run along the contiguous channel axis first and over each group's channels second. On 2 CPU cores this made
  the digits and CIFAR-10 DDPM++ train steps 2-8 % faster than `flax.linen.GroupNorm`, which XLA
  differentiates through its statistics (bench/RESULTS.md).

  Args:
    x: `[B, ..., C]`, with `C` divisible by `groups`; computed in `x`'s dtype.
    scale, bias: `[C]`.
    groups: the number of channel groups.
    epsilon: added to the variance.
  """
  scale, bias = _channels_last(scale, x), _channels_last(bias, x)
  mean, inv_std = _group_moments(x, groups, epsilon)
  a = inv_std * scale
  return x * a + (bias - mean * a)


@group_norm_apply.defjvp
def _group_norm_jvp(groups, epsilon, primals, tangents):
  x, scale, bias = primals
  scale, bias = _channels_last(scale, x), _channels_last(bias, x)
  dx, dscale, dbias = tangents
  dscale, dbias = _channels_last(dscale, x), _channels_last(dbias, x)
  mean, inv_std = _group_moments(x, groups, epsilon)
  x_hat = (x - mean) * inv_std
  dx_hat = inv_std * (dx - _group_mean(dx, groups) - x_hat * _group_mean(x_hat * dx, groups))
  return x_hat * scale + bias, dx_hat * scale + x_hat * dscale + dbias


class GroupNorm(nn.Module):
  """`flax.linen.GroupNorm` over `[B, ..., C]` with the same parameters (`scale`, `bias`: `[C]`) and results (to
  rounding), computed by :func:`group_norm_apply` in at least float32; the output is in `dtype` (default, as Flax:
  the input's dtype promoted with `param_dtype`)."""
  num_groups: int
  epsilon: float = 1e-6
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    if x.ndim < 3 or channels % self.num_groups:
      raise ValueError(f"GroupNorm: expected [B, ..., C] with C divisible by num_groups={self.num_groups}, got "
                       f"shape {x.shape}.")
    scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
    compute = jnp.promote_types(x.dtype, jnp.float32)
    y = group_norm_apply(x.astype(compute), scale.astype(compute), bias.astype(compute), self.num_groups,
                         self.epsilon)
    return y.astype(self.dtype or jnp.promote_types(x.dtype, self.param_dtype))


def group_norm(channels: int, dtype: Dtype = None, name: Optional[str] = None) -> GroupNorm:
  return GroupNorm(num_groups=num_groups(channels), epsilon=1e-6, dtype=dtype, name=name)


# --- Noise-level embeddings. ----------------------------------------------------------------------

def embedding_dtype(dtype) -> jnp.dtype:
  """At least float32: a sinusoid of `999 t` is meaningless in bfloat16."""
  return jnp.promote_types(dtype, jnp.float32)


def sinusoidal_embedding(cond, embedding_dim: int, max_positions: float = 10_000.0, dtype=None):
  r"""The transformer/DDPM positional embedding of a scalar per example.

  .. math:: e(c) = [\sin(c\,\omega_0), \dots, \sin(c\,\omega_{h-1}), \cos(c\,\omega_0), \dots,
      \cos(c\,\omega_{h-1})],\qquad \omega_j = \text{max\_positions}^{-j/(h-1)},\quad h = \lfloor d/2\rfloor,

  zero-padded to `embedding_dim` when it is odd.

  Args:
    cond: `[B]` conditioning values, float or integer (an integer level is embedded as its value).
    embedding_dim: `d`, at least 4 (so that `h - 1 > 0`).
    max_positions: the period scale (10000 as in Vaswani et al. 2017 and Ho et al. 2020).
    dtype: output dtype; default float32, or float64 for float64 input.

  Returns:
    `[B, embedding_dim]`.
  """
  if embedding_dim < 4:
    raise ValueError(f"sinusoidal_embedding: embedding_dim must be >= 4, got {embedding_dim}.")
  cond = jnp.asarray(cond)
  if cond.ndim != 1:
    raise ValueError(f"sinusoidal_embedding: cond must have shape [B], got shape {cond.shape}.")
  if dtype is None:
    dtype = embedding_dtype(cond.dtype if jnp.issubdtype(cond.dtype, jnp.floating) else jnp.float32)
  half = embedding_dim // 2
  frequencies = np.exp(-math.log(max_positions) * np.arange(half) / (half - 1))
  angles = cond.astype(dtype)[:, None] * jnp.asarray(frequencies, dtype)[None, :]
  embedding = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
  if embedding_dim % 2:
    embedding = jnp.pad(embedding, ((0, 0), (0, 1)))
  return embedding


def fourier_frequencies(num_frequencies: int, scale: float, seed: int = 0) -> np.ndarray:
  """The fixed frequencies :math:`\\omega_j \\sim \\mathcal N(0, \\text{scale}^2)` of a Gaussian Fourier embedding.

  They are drawn once from a NumPy generator with `seed`, so they are constants of the network rather than
  parameters: identical on every host and device, never touched by an optimizer or weight decay (the 2021
  reference stored them as a parameter under `stop_gradient`, which is the same function).
  """
  return scale * np.random.default_rng(seed).standard_normal(num_frequencies)


def fourier_embedding(cond, num_frequencies: int, scale: float = 16.0, seed: int = 0, dtype=None,
                      frequencies=None):
  r"""Gaussian Fourier features (Tancik et al. 2020; Song et al. 2021, NCSN++):
  :math:`e(c) = [\sin(2\pi c\,\omega), \cos(2\pi c\,\omega)]`, :math:`\omega` from :func:`fourier_frequencies`
  or given.

  Args:
    cond: `[B]` conditioning values (NCSN++ embeds :math:`\log\sigma`).
    num_frequencies: number of frequencies; the embedding has twice as many features.
    scale: standard deviation of the frequencies (16 in NCSN++).
    seed: seed of the frequencies.
    dtype: output dtype (default: float32, or float64 for float64 input).
    frequencies: `[num_frequencies]` frequencies :math:`\omega` to use instead of the seed's (e.g. an imported
      checkpoint's frozen `W`); may be traced.

  Returns:
    `[B, 2 * num_frequencies]`.
  """
  cond = jnp.asarray(cond)
  if cond.ndim != 1:
    raise ValueError(f"fourier_embedding: cond must have shape [B], got shape {cond.shape}.")
  if dtype is None:
    dtype = embedding_dtype(cond.dtype if jnp.issubdtype(cond.dtype, jnp.floating) else jnp.float32)
  if frequencies is None:
    omega = jnp.asarray(2 * np.pi * fourier_frequencies(num_frequencies, scale, seed), dtype)
    angles = cond.astype(dtype)[:, None] * omega[None, :]
  elif jnp.shape(frequencies) != (num_frequencies,):
    raise ValueError(f"fourier_embedding: frequencies must have shape ({num_frequencies},), got "
                     f"{jnp.shape(frequencies)}.")
  else:
    # (c w) 2 pi, in the references' order of operations: the same rounding as theirs.
    angles = (cond.astype(dtype)[:, None] * jnp.asarray(frequencies, dtype)[None, :]) * jnp.asarray(2 * np.pi, dtype)
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)


def check_noise_conditioning(owner: str, noise_conditioning: str, scale_by_sigma: bool) -> None:
  """Validates the pair (what `cond` holds, whether to divide the output by sigma) at construction."""
  if noise_conditioning not in NOISE_CONDITIONING_KINDS:
    raise ValueError(f"{owner}: noise_conditioning must be one of {NOISE_CONDITIONING_KINDS} (the `kind` of the "
                     f"parameterization's NoiseConditioning), got {noise_conditioning!r}.")
  if scale_by_sigma and noise_conditioning not in ("sigma", "log_sigma"):
    raise ValueError(
        f"{owner}: scale_by_sigma=True divides the output by sigma, which the network reads from its "
        f"conditioning input, so noise_conditioning must be 'sigma' or 'log_sigma', got {noise_conditioning!r}. "
        "Use NoiseConditioning('sigma') in the parameterization, or put the 1/sigma in the parameterization "
        "(e.g. EpsilonParameterization) and set scale_by_sigma=False.")


def conditioning_to_embedding_input(cond, noise_conditioning: str, dtype):
  r"""What the embedding sees: :math:`\log\sigma` when `cond` is :math:`\sigma` (as NCSN++), else `cond`."""
  cond = cond.astype(dtype)
  if noise_conditioning == "sigma":
    return jnp.log(cond)
  return cond


def conditioning_to_sigma(cond, noise_conditioning: str, dtype):
  """:math:`\\sigma` from the conditioning input (`cond` itself, or `exp(cond)` for log-sigma)."""
  cond = cond.astype(dtype)
  if noise_conditioning == "log_sigma":
    return jnp.exp(cond)
  return cond


def broadcast_conditioning(owner: str, cond, batch_size: int):
  """`cond` as a `[B]` array: a scalar is broadcast, any other shape than `[B]` is an error."""
  cond = jnp.asarray(cond)
  if cond.ndim == 0:
    return jnp.broadcast_to(cond, (batch_size,))
  if cond.shape != (batch_size,):
    raise ValueError(f"{owner}: cond must have shape [B] = ({batch_size},) to match x, got shape {cond.shape}.")
  return cond


def check_square_images(owner: str, x, ch_mult) -> None:
  """Raises unless `x` is square NHWC images whose size the U-Net's `len(ch_mult) - 1` halvings divide."""
  if x.ndim != 4 or x.shape[1] != x.shape[2]:
    raise ValueError(f"{owner}: x must be square images [B, H, W, C] (NHWC), got shape {x.shape}.")
  factor = 2 ** (len(ch_mult) - 1)
  if x.shape[1] % factor:
    raise ValueError(f"{owner}: the image size {x.shape[1]} must be divisible by 2**(len(ch_mult) - 1) = {factor} "
                     f"for ch_mult={tuple(ch_mult)}; pad the images or use fewer levels.")


def check_num_classes(owner: str, num_classes) -> None:
  """Validates a network's `num_classes` field at construction: an int >= 0 (0: no class conditioning)."""
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 0:
    raise ValueError(f"{owner}: num_classes must be an int >= 0 (0: an unconditional network), got {num_classes!r}.")


def class_labels(owner: str, label, num_classes: int, batch_size: int):
  """A class-conditional network's `label` as int `[B]`, checked against `num_classes` at trace time.

  Labels take the values `0 .. num_classes`, where `num_classes` is the null class ("unconditional") of
  classifier-free guidance. A scalar is broadcast to the batch. Values are checked when they are concrete
  (outside `jit`); a traced out-of-range label (negative or above `num_classes`) reads a NaN row of the embedding
  (:class:`ClassEmbedding`), so the output is NaN rather than silently another class's.

  Returns:
    None for an unconditional network (`num_classes == 0`, `label is None`), else int `[B]`.

  Raises:
    ValueError: a label for an unconditional network, no label for a conditional one, a non-integer label, a
      shape other than scalar or `[B]`, or a concrete value outside `0 .. num_classes`.
  """
  if num_classes == 0:
    if label is not None:
      raise ValueError(f"{owner}: got a class label, but this network is unconditional (num_classes=0); pass "
                       "label=None, or build the network with num_classes > 0 to condition it on classes.")
    return None
  if label is None:
    raise ValueError(f"{owner}: this network is class-conditional (num_classes={num_classes}) and needs label, int "
                     f"[B] in 0..{num_classes} (the last, {num_classes}, is the null class: 'unconditional'); got "
                     "None.")
  return check_labels(owner, label, batch_size, num_classes + 1, name="label",
                      meaning=f"(num_classes={num_classes} classes, and {num_classes} for the null class)")


class ClassEmbedding(nn.Module):
  r"""A learned embedding of class labels, one row per class plus the null class (Ho & Salimans 2022).

  `label: [B]` in `0 .. num_classes` -> `[B, features]`; row `num_classes` is the null class, "unconditional";
  any other label gives a row of NaN.
  Rows start as :math:`N(0, 1)` draws (PyTorch's `nn.Embedding`, as in the class-conditional U-Net of Dhariwal &
  Nichol 2021), the scale of the noise embedding they are added to.

  Parameters: `embedding`, `[num_classes + 1, features]`.
  """

  num_classes: int
  features: int
  dtype: Dtype = None

  @nn.compact
  def __call__(self, label):
    table = self.param("embedding", nn.initializers.normal(stddev=1.0), (self.num_classes + 1, self.features),
                       jnp.float32)
    dtype = self.dtype if self.dtype is not None else table.dtype
    # Out-of-range labels (negative ones included, which jnp.take would wrap) read NaN rows.
    label = jnp.where(label < 0, self.num_classes + 1, label)
    return jnp.take(table.astype(dtype), label, axis=0, mode="fill", fill_value=jnp.nan)


class NoiseEmbedding(nn.Module):
  """Embeds the conditioning input, then a two-layer SiLU MLP (the DDPM/NCSN++ time embedding).

  Attributes:
    features: width of the output (4 * nf in the U-Nets).
    embedding_type: `"positional"` (sinusoidal, `embedding_dim` features) or `"fourier"` (Gaussian Fourier,
      `embedding_dim` frequencies, `2 * embedding_dim` features; NCSN++).
    embedding_dim: see `embedding_type`.
    fourier_scale: frequency scale of the Fourier embedding.
    noise_conditioning: what `cond` holds (see :func:`conditioning_to_embedding_input`).

  Parameters: `Dense_0`, `Dense_1`; with the Fourier embedding, optionally `frequencies` (`[embedding_dim]`): a
  checkpoint's frozen frequencies, used (under `stop_gradient`) instead of the seed's when the params hold them.
  `init` never creates it; :mod:`scoreflow.models.importers` adds it for the 2021 reference's NCSN++ weights, whose
  frequencies were drawn at random and frozen.
  """

  features: int
  embedding_type: Literal["positional", "fourier"] = "positional"
  embedding_dim: int = 128
  fourier_scale: float = 16.0
  noise_conditioning: str = "time"
  dtype: Dtype = None

  @nn.compact
  def __call__(self, cond):
    dtype = embedding_dtype(self.dtype)
    value = conditioning_to_embedding_input(cond, self.noise_conditioning, dtype)
    if self.embedding_type == "fourier":
      # An imported checkpoint's frozen frequencies, when the params hold them (a fresh `init` creates none).
      frequencies = None
      if self.has_variable("params", "frequencies"):
        frequencies = jax.lax.stop_gradient(self.get_variable("params", "frequencies"))
      embedding = fourier_embedding(value, self.embedding_dim, self.fourier_scale, dtype=dtype,
                                    frequencies=frequencies)
    else:
      embedding = sinusoidal_embedding(value, self.embedding_dim, dtype=dtype)
    embedding = embedding.astype(self.dtype)
    temb = dense(self.features, dtype=self.dtype)(embedding)
    return dense(self.features, dtype=self.dtype)(nn.silu(temb))


# --- FIR up/down-sampling. ------------------------------------------------------------------------

def fir_filter(kernel: Sequence[float] | np.ndarray) -> np.ndarray:
  """The normalised 2-D filter of a 1-D (separable, outer product) or 2-D FIR kernel; it sums to 1."""
  k = np.asarray(kernel, dtype=np.float64)
  if k.ndim == 1:
    k = np.outer(k, k)
  if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] < 1:
    raise ValueError(f"fir_filter: kernel must be 1-D or square 2-D, got shape {np.shape(kernel)}.")
  total = k.sum()
  if total == 0:
    raise ValueError(f"fir_filter: kernel must not sum to zero, got {np.asarray(kernel).tolist()}.")
  return k / total


def upfirdn2d(x, filter_2d, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)):
  r"""Upsample by zero insertion, pad, convolve with an FIR filter, downsample by striding.

  Per spatial axis, with the input :math:`x` of length `n`: :math:`u_{m\cdot up} = x_m` (zeros elsewhere,
  length `n * up`), padded with `pad[0]` zeros before and `pad[1]` after (negative pads crop), then the full
  2-D convolution with `filter_2d` (valid part) and every `down`-th output kept.

  The convolution is a weighted sum of strided shifted slices, which XLA fuses into elementwise loops: one pass
  per axis for a separable (rank-1) filter, as every `fir_filter` of a 1-D kernel is, else one 2-D pass. A
  depthwise `conv_general_dilated` computes the same but took 58% of an NCSN++ train step on a CPU, where
  grouped convolutions have no fast kernel.

  Args:
    x: `[B, H, W, C]`.
    filter_2d: `[k, k]` filter with concrete values (NumPy, or a JAX array outside `jit`).
    up, down: integer factors.
    pad: padding of both spatial axes.

  Returns:
    `[B, (H*up + pad[0] + pad[1] - k)//down + 1, (same for W), C]`, dtype of `x`.
  """
  if x.ndim != 4:
    raise ValueError(f"upfirdn2d: x must be [B, H, W, C], got shape {x.shape}.")
  try:
    k = np.asarray(filter_2d, np.float64)
  except jax.errors.TracerArrayConversionError:
    raise ValueError("upfirdn2d: filter_2d must have concrete values (a fixed FIR filter), not a traced "
                     "array.") from None
  if k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise ValueError(f"upfirdn2d: filter_2d must be a square [k, k] array, got shape {k.shape}.")
  spatial = (pad[0], pad[1] + up - 1, up - 1)
  x = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), spatial, spatial, (0, 0, 0)))
  # A true convolution flips the filter; the sums below correlate.
  flipped = k[::-1, ::-1]
  factors = _rank_one_factors(flipped)
  if factors is not None:
    column, row = factors
    return _correlate_1d(_correlate_1d(x, column, axis=1, stride=down), row, axis=2, stride=down)
  out_h, out_w = ((x.shape[axis] - k.shape[0]) // down + 1 for axis in (1, 2))
  terms = [float(tap) * jax.lax.slice(x, (0, i, j, 0),
                                      (x.shape[0], i + (out_h - 1) * down + 1, j + (out_w - 1) * down + 1,
                                       x.shape[3]), (1, down, down, 1))
           for (i, j), tap in np.ndenumerate(flipped) if tap != 0.0]
  return sum(terms[1:], terms[0]) if terms else jnp.zeros((x.shape[0], out_h, out_w, x.shape[3]), x.dtype)


def _rank_one_factors(k: np.ndarray):
  """`(c, r)` with `outer(c, r) == k` when the 2-D filter `k` is separable (to rounding), else None."""
  i, j = np.unravel_index(np.argmax(np.abs(k)), k.shape)
  if k[i, j] == 0.0:
    return None
  column, row = k[:, j] / k[i, j], k[i, :]
  return (column, row) if np.allclose(np.outer(column, row), k, rtol=1e-12, atol=1e-15 * abs(k[i, j])) else None


def _correlate_1d(x, taps: np.ndarray, *, axis: int, stride: int):
  """`y[m] = sum_i taps[i] x[m * stride + i]` along `axis` (valid part), as strided shifted slices."""
  size = (x.shape[axis] - len(taps)) // stride + 1
  terms = [float(tap) * jax.lax.slice_in_dim(x, i, i + (size - 1) * stride + 1, stride=stride, axis=axis)
           for i, tap in enumerate(taps) if tap != 0.0]  # Rank-one factors always hold a nonzero tap.
  return sum(terms[1:], terms[0])


def upsample_2d(x, kernel: Sequence[float] = (1, 3, 3, 1), factor: int = 2, gain: float = 1.0):
  """FIR upsampling of `x: [B, H, W, C]` to `[B, H*factor, W*factor, C]` (StyleGAN2's `upsample_2d`).

  A constant image stays constant (times `gain`) away from a border of about `len(kernel)/2` pixels,
  where the zero padding enters.
  """
  k = fir_filter(kernel) * (gain * factor**2)
  p = k.shape[0] - factor
  return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x, kernel: Sequence[float] = (1, 3, 3, 1), factor: int = 2, gain: float = 1.0):
  """FIR downsampling of `x: [B, H, W, C]` to `[B, H//factor, W//factor, C]` (StyleGAN2's `downsample_2d`)."""
  k = fir_filter(kernel) * gain
  p = k.shape[0] - factor
  return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def naive_upsample_2d(x, factor: int = 2):
  """Nearest-neighbour upsampling of `[B, H, W, C]`."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x, factor: int = 2):
  """Average pooling over `factor` x `factor` blocks of `[B, H, W, C]`."""
  b, h, w, c = x.shape
  return jnp.mean(x.reshape(b, h // factor, factor, w // factor, factor, c), axis=(2, 4))


def upsample_conv_2d(x, weight, kernel: Sequence[float] = (1, 3, 3, 1)):
  """A 2x transposed convolution with `weight: [k, k, C_in, C_out]` followed by the FIR filter, padded once
  (StyleGAN2's fused `upsample_conv_2d` for factor 2). `[B, H, W, C_in] -> [B, 2H, 2W, C_out]`."""
  factor = 2
  k = fir_filter(kernel) * factor**2
  conv_size = weight.shape[0]
  full = jax.lax.conv_general_dilated(x, weight.astype(x.dtype), window_strides=(1, 1),
                                      padding=((conv_size - 1, conv_size - 1),) * 2,
                                      lhs_dilation=(factor, factor),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  p = (k.shape[0] - factor) - (conv_size - 1)
  return upfirdn2d(full, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x, weight, kernel: Sequence[float] = (1, 3, 3, 1)):
  """The FIR filter followed by a stride-2 convolution with `weight: [k, k, C_in, C_out]`, padded once
  (StyleGAN2's fused `conv_downsample_2d` for factor 2). `[B, H, W, C_in] -> [B, H/2, W/2, C_out]`."""
  factor = 2
  k = fir_filter(kernel)
  conv_size = weight.shape[0]
  p = (k.shape[0] - factor) + (conv_size - 1)
  x = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
  return jax.lax.conv_general_dilated(x, weight.astype(x.dtype), window_strides=(factor, factor),
                                      padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


class FIRConv(nn.Module):
  """A 3x3 convolution fused with FIR 2x up- or down-sampling (`upsample_conv_2d` / `conv_downsample_2d`)."""

  features: int
  up: bool = False
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  kernel_size: int = 3
  init_scale: float = 1.0
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    weight = self.param("kernel", default_init(self.init_scale),
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    dtype = self.dtype if self.dtype is not None else x.dtype
    x = x.astype(dtype)
    if self.up:
      h = upsample_conv_2d(x, weight.astype(dtype), self.fir_kernel)
    else:
      h = conv_downsample_2d(x, weight.astype(dtype), self.fir_kernel)
    return h + bias.astype(dtype).reshape(1, 1, 1, -1)


class Upsample(nn.Module):
  """2x upsampling: nearest or FIR, optionally with a 3x3 convolution to `out_ch` channels."""

  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x):
    out_ch = self.out_ch or x.shape[-1]
    if self.fir:
      if self.with_conv:
        return FIRConv(out_ch, up=True, fir_kernel=self.fir_kernel, dtype=self.dtype)(x)
      return upsample_2d(x, self.fir_kernel)
    h = naive_upsample_2d(x)
    if self.with_conv:
      h = conv(out_ch, dtype=self.dtype)(h)
    return h


class Downsample(nn.Module):
  """2x downsampling: average pooling / strided 3x3 convolution, or FIR (optionally fused with a convolution)."""

  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x):
    out_ch = self.out_ch or x.shape[-1]
    if self.fir:
      if self.with_conv:
        return FIRConv(out_ch, up=False, fir_kernel=self.fir_kernel, dtype=self.dtype)(x)
      return downsample_2d(x, self.fir_kernel)
    if self.with_conv:
      # 'SAME' with stride 2 pads one zero row/column after the image, as the DDPM's explicit (0, 1) padding.
      return conv(out_ch, stride=2, dtype=self.dtype)(x)
    return naive_downsample_2d(x)


# --- Residual and attention blocks. ---------------------------------------------------------------

@jax.custom_jvp
def residual_stream_barrier(x):
  """The identity, whose tangent (and so its cotangent in the backward pass) XLA:CPU computes into a buffer of
  its own.

  XLA:CPU fuses an elementwise producer into each of its consumers, duplicating it. Along the residual stream of
  a U-Net level the backward pass is elementwise (the skip connections and GroupNorm's elementwise part), so
  every consumer of one block's cotangent recomputed the cotangents of all the blocks after it: work quadratic
  in the depth of a level, 0.4 s of the 3.8 s CIFAR-10 DDPM++ train step on 2 CPU cores (bench/RESULTS.md).
  A conditional is a boundary XLA cannot fuse across (XLA:CPU drops `optimization_barrier`), so on CPU the
  tangent passes through one; on other platforms this is the identity.
  """
  return x


@residual_stream_barrier.defjvp
def _residual_stream_barrier_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents

  def through_conditional(dx):
    # The predicate only has to be unknown to the compiler; a finite x passes its tangent on unchanged.
    finite = jnp.isfinite(x.reshape(-1)[0])
    return jax.lax.cond(finite, lambda v: v, lambda v: v * jnp.asarray(jnp.nan, v.dtype), dx)

  return x, jax.lax.platform_dependent(dx, cpu=through_conditional, default=lambda v: v)


def _skip(x, h, skip_rescale: bool):
  out = (x + h) * jnp.asarray(1 / np.sqrt(2.0), h.dtype) if skip_rescale else x + h
  return residual_stream_barrier(out)


class ResnetBlockDDPM(nn.Module):
  r"""The DDPM residual block (Ho et al. 2020), with the DDPM++ option of skip rescaling:

  :math:`h = \mathrm{Conv}(\mathrm{Drop}(\mathrm{act}(\mathrm{GN}(\mathrm{Conv}(\mathrm{act}(\mathrm{GN}(x)))
  + \mathrm{Dense}(\mathrm{act}(t_{emb}))))))`, output :math:`x' + h` or :math:`(x' + h)/\sqrt2`, where
  :math:`x'` is `x` or its 1x1 ('NIN') / 3x3 projection when the width changes.

  Attributes:
    out_ch: output channels (default: input channels).
    conv_shortcut: project the skip path with a 3x3 convolution instead of a 1x1 when the width changes.
    dropout: dropout rate before the second convolution.
    skip_rescale: divide the sum by :math:`\sqrt 2`.
    init_scale: initialiser scale of the second convolution (0: the block starts as the identity).
  """

  out_ch: Optional[int] = None
  conv_shortcut: bool = False
  dropout: float = 0.1
  skip_rescale: bool = False
  init_scale: float = 0.0
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x, temb=None, train: bool = False):
    channels = x.shape[-1]
    out_ch = self.out_ch or channels
    h = nn.silu(group_norm(channels, self.dtype)(x))
    h = conv(out_ch, dtype=self.dtype)(h)
    if temb is not None:
      h = h + dense(out_ch, dtype=self.dtype)(nn.silu(temb))[:, None, None, :]
    h = nn.silu(group_norm(out_ch, self.dtype)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv(out_ch, init_scale=self.init_scale, dtype=self.dtype)(h)
    if channels != out_ch:
      x = conv(out_ch, dtype=self.dtype)(x) if self.conv_shortcut else dense(out_ch, 0.1, self.dtype)(x)
    return _skip(x, h, self.skip_rescale)


class ResnetBlockBigGAN(nn.Module):
  r"""The BigGAN-style residual block of NCSN++/DDPM++: as :class:`ResnetBlockDDPM`, but it can resample
  (2x up or down, FIR or nearest/average, applied to both paths after the first normalisation) and its skip
  path is a 1x1 convolution whenever the width changes or it resamples.

  Attributes:
    up, down: resample by 2 (at most one).
    out_ch: output channels (default: input channels).
    dropout: dropout rate.
    fir, fir_kernel: FIR resampling and its kernel.
    skip_rescale: divide the sum by :math:`\sqrt 2`.
    init_scale: initialiser scale of the second convolution.
  """

  up: bool = False
  down: bool = False
  out_ch: Optional[int] = None
  dropout: float = 0.1
  fir: bool = False
  fir_kernel: Sequence[float] = (1, 3, 3, 1)
  skip_rescale: bool = True
  init_scale: float = 0.0
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x, temb=None, train: bool = False):
    channels = x.shape[-1]
    out_ch = self.out_ch or channels
    h = nn.silu(group_norm(channels, self.dtype)(x))
    if self.up:
      resample = (lambda v: upsample_2d(v, self.fir_kernel)) if self.fir else naive_upsample_2d
    elif self.down:
      resample = (lambda v: downsample_2d(v, self.fir_kernel)) if self.fir else naive_downsample_2d
    else:
      resample = None
    if resample is not None:
      h, x = resample(h), resample(x)
    h = conv(out_ch, dtype=self.dtype)(h)
    if temb is not None:
      h = h + dense(out_ch, dtype=self.dtype)(nn.silu(temb))[:, None, None, :]
    h = nn.silu(group_norm(out_ch, self.dtype)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv(out_ch, init_scale=self.init_scale, dtype=self.dtype)(h)
    if channels != out_ch or self.up or self.down:
      x = conv(out_ch, kernel_size=1, dtype=self.dtype)(x)
    return _skip(x.astype(h.dtype), h, self.skip_rescale)


class AttnBlock(nn.Module):
  r"""Single-head self-attention over all pixels (DDPM), with optional skip rescaling (NCSN++):
  :math:`x + W_o\,\mathrm{softmax}(QK^\top/\sqrt C)\,V` with :math:`Q, K, V` 1x1 projections of
  :math:`\mathrm{GN}(x)`.

  Attributes:
    skip_rescale: divide the sum by :math:`\sqrt 2`.
    init_scale: initialiser scale of the output projection.
  """

  skip_rescale: bool = False
  init_scale: float = 0.0
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x):
    b, height, width, channels = x.shape
    h = group_norm(channels, self.dtype)(x)
    q = dense(channels, 0.1, self.dtype)(h).reshape(b, height * width, channels)
    k = dense(channels, 0.1, self.dtype)(h).reshape(b, height * width, channels)
    v = dense(channels, 0.1, self.dtype)(h).reshape(b, height * width, channels)
    logits = jnp.einsum("bic,bjc->bij", q, k) * jnp.asarray(1 / np.sqrt(channels), q.dtype)
    weights = jax.nn.softmax(logits.astype(embedding_dtype(logits.dtype)), axis=-1).astype(v.dtype)
    h = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, height, width, channels)
    h = dense(channels, self.init_scale, self.dtype)(h)
    return _skip(x.astype(h.dtype), h, self.skip_rescale)


class Combine(nn.Module):
  """Merges the progressive input pyramid into the features: a 1x1 convolution of `x` to the width of `y`,
  then concatenation (`"cat"`) or sum (`"sum"`)."""

  method: Literal["cat", "sum"] = "cat"
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x, y):
    h = conv(y.shape[-1], kernel_size=1, dtype=self.dtype)(x)
    if self.method == "cat":
      return jnp.concatenate([h, y.astype(h.dtype)], axis=-1)
    return h + y
