r"""A noise-conditional classifier :math:`p_t(y \mid x_t)` for classifier guidance.

Song et al. (2021, Sec. 5 and Appendix I.1) steer an unconditional score model towards a class with the gradient
of a *time-dependent* classifier trained on perturbed data, :math:`\nabla_x\log p_t(y \mid x)` (their
controllable-generation setup trains a noise-conditional Wide-ResNet on CIFAR-10 in the same way). Here the
classifier is the downsampling half of :class:`~scoreflow.models.UNet`: the same noise embedding of `cond`, the
same residual blocks (with the embedding added in each) and attention, then the middle block, a final
GroupNorm-SiLU, global average pooling over the pixels and a dense layer to `num_classes` logits:

.. math:: \mathrm{logits}(x, t) = W\,\tfrac{1}{HW}\textstyle\sum_{ij}\mathrm{SiLU}(\mathrm{GN}(h_{ij})) + b,
    \qquad h = \mathrm{Encoder}(x, t_{emb}(\mathrm{cond}(t))).

It is trained with :func:`scoreflow.losses.noisy_classifier_loss` (cross-entropy at :math:`x_t \sim p_t(x_t \mid
x_0)`, :math:`t \sim U[\epsilon, T]`) and plugged into guidance by
:func:`scoreflow.parameterization.make_classifier_log_prob_fn`.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from scoreflow.models import layers
from scoreflow.models.layers import AttnBlock, Downsample, NoiseEmbedding, ResnetBlockBigGAN, ResnetBlockDDPM, conv
from scoreflow.models.layers import dense, group_norm


class NoiseConditionalClassifier(nn.Module):
  r"""Logits of :math:`p_t(y \mid x_t)`: `x [B, H, W, C]`, `cond [B]` -> `[B, num_classes]`.

  Attributes:
    num_classes: the number of classes (>= 2), the width of the output.
    nf, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv, embedding_type, fourier_scale,
      noise_conditioning, resblock_type, skip_rescale, fir, fir_kernel, init_scale, centered, dtype: as in
      :class:`~scoreflow.models.UNet` (its downsampling path and middle block).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from scoreflow.models import NoiseConditionalClassifier
    >>> model = NoiseConditionalClassifier(num_classes=10, nf=16, ch_mult=(1, 2), num_res_blocks=1)
    >>> x, cond = jnp.zeros((2, 8, 8, 1)), jnp.full((2,), 500.0)
    >>> variables = model.init(jax.random.key(0), x, cond)
    >>> model.apply(variables, x, cond).shape
    (2, 10)

  Raises:
    ValueError: at construction for an unknown option or `num_classes < 2`; at call time for inputs that are not
      square `[B, H, W, C]` images with `H` divisible by `2**(len(ch_mult) - 1)`, or `cond` that is not `[B]`.
  """

  num_classes: int = 10
  nf: int = 32
  ch_mult: Sequence[int] = (1, 2)
  num_res_blocks: int = 1
  attn_resolutions: Sequence[int] = ()
  dropout: float = 0.0
  resamp_with_conv: bool = True
  embedding_type: Literal["positional", "fourier"] = "positional"
  fourier_scale: float = 16.0
  noise_conditioning: layers.NoiseConditioningKind = "time"
  resblock_type: Literal["biggan", "ddpm"] = "biggan"
  skip_rescale: bool = True
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  init_scale: float = 0.0
  centered: bool = True
  dtype: Any = None

  def __post_init__(self):
    owner = "NoiseConditionalClassifier"
    if self.embedding_type not in ("positional", "fourier"):
      raise ValueError(f"{owner}: embedding_type must be one of ('positional', 'fourier'), got "
                       f"{self.embedding_type!r}.")
    if self.resblock_type not in ("biggan", "ddpm"):
      raise ValueError(f"{owner}: resblock_type must be one of ('biggan', 'ddpm'), got {self.resblock_type!r}.")
    layers.check_noise_conditioning(owner, self.noise_conditioning, False)
    if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, (int, np.integer)) \
        or self.num_classes < 2:
      raise ValueError(f"{owner}: num_classes must be an int >= 2 (the number of logits), got {self.num_classes!r}.")
    if self.nf < 4 or len(self.ch_mult) < 1 or any(m < 1 for m in self.ch_mult) or self.num_res_blocks < 1:
      raise ValueError(f"{owner}: need nf >= 4, a non-empty ch_mult of positive ints and num_res_blocks >= 1, "
                       f"got nf={self.nf}, ch_mult={tuple(self.ch_mult)}, num_res_blocks={self.num_res_blocks}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"{owner}: dropout must lie in [0, 1), got {self.dropout}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, cond, train: bool = False):
    """Args: `x: [B, H, W, C]`, `cond: [B]` (the parameterization's noise conditioning), `train`: enables dropout.
    Returns the logits, `[B, num_classes]`, in the dtype of `x`."""
    owner = "NoiseConditionalClassifier"
    layers.check_square_images(owner, x, self.ch_mult)
    cond = layers.broadcast_conditioning(owner, cond, x.shape[0])
    out_dtype = x.dtype
    dtype = self.dtype if self.dtype is not None else x.dtype
    x = x.astype(dtype)
    num_levels = len(self.ch_mult)
    fir_kernel = tuple(self.fir_kernel)

    temb = NoiseEmbedding(4 * self.nf, self.embedding_type, self.nf, self.fourier_scale, self.noise_conditioning,
                          dtype=dtype)(cond)

    def resblock(out_ch=None, down=False):
      if self.resblock_type == "ddpm":
        return ResnetBlockDDPM(out_ch=out_ch, dropout=self.dropout, skip_rescale=self.skip_rescale,
                               init_scale=self.init_scale, dtype=dtype)
      return ResnetBlockBigGAN(down=down, out_ch=out_ch, dropout=self.dropout, fir=self.fir, fir_kernel=fir_kernel,
                               skip_rescale=self.skip_rescale, init_scale=self.init_scale, dtype=dtype)

    def attention(h):
      return AttnBlock(skip_rescale=self.skip_rescale, init_scale=self.init_scale, dtype=dtype)(h)

    if not self.centered:
      x = 2 * x - 1
    # 1. The U-Net's downsampling path.
    h = conv(self.nf, dtype=dtype)(x)
    for level in range(num_levels):
      resolution = x.shape[1] // 2**level
      for _ in range(self.num_res_blocks):
        h = resblock(out_ch=self.nf * self.ch_mult[level])(h, temb, train)
        if resolution in self.attn_resolutions:
          h = attention(h)
      if level != num_levels - 1:
        if self.resblock_type == "ddpm":
          h = Downsample(with_conv=self.resamp_with_conv, fir=self.fir, fir_kernel=fir_kernel, dtype=dtype)(h)
        else:
          h = resblock(down=True)(h, temb, train)
    # 2. Middle: residual block, attention, residual block.
    h = resblock()(h, temb, train)
    h = attention(h)
    h = resblock()(h, temb, train)
    # 3. Normalise, pool over the pixels, read out the logits.
    h = nn.silu(group_norm(h.shape[-1], dtype)(h))
    pooled = jnp.mean(h, axis=(1, 2))
    return dense(self.num_classes, dtype=dtype)(pooled).astype(out_dtype)
