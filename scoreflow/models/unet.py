r"""The NCSN++ / DDPM++ U-Net family of Song et al. (2021), which contains the DDPM U-Net of Ho et al. (2020).

One configurable Flax Linen module, :class:`UNet`, covers the architectures of the 2021 paper's Appendix H:

* **DDPM** (Ho et al. 2020): `resblock_type="ddpm"`, sinusoidal embedding, no skip rescaling, plain
  resampling with convolutions, no progressive paths, attention after every upsampling-path block;
* **DDPM++** (best VP/sub-VP model): BigGAN residual blocks, skip rescaling, sinusoidal embedding;
* **NCSN++** (best VE model): as DDPM++ plus FIR resampling, a residual progressive input path and Gaussian
  Fourier embedding of :math:`\log\sigma`, with the output divided by :math:`\sigma`.

The presets in :mod:`scoreflow.models.presets` give the paper's exact settings.

Conditioning. The network is called as `model.apply(variables, x, cond, train=...)` with `cond: [B]` the
output of the parameterization's :class:`~scoreflow.parameterization.NoiseConditioning`. The module field
`noise_conditioning` states which kind that is, and only two things depend on it:

==============  ==================================  =====================================
kind            embedded value                      sigma used by `scale_by_sigma`
==============  ==================================  =====================================
`"time"`        `cond` (e.g. `999 t`)               not available
`"sigma"`       :math:`\log` `cond` (as NCSN++)     `cond`
`"log_sigma"`   `cond`                              :math:`\exp` `cond`
`"log_snr"`     `cond`                              not available
`"index"`       `cond` (an integer level)           not available
==============  ==================================  =====================================

Integer conditioning (the discrete chains' level `i`) is cast to float and embedded by value, which is the
DDPM's sinusoidal embedding of the timestep. With `scale_by_sigma=True` the output is divided by the
:math:`\sigma` read from `cond` (the SDE's marginal standard deviation when the parameterization uses
`NoiseConditioning("sigma")`), so the network predicts :math:`-\epsilon/\sigma`, the score, with an output of
unit scale; it is refused at construction for the other kinds. With `"sigma"` the conditioning must be
positive (VE's marginal standard deviation is 0 at `t = 0`: sample `t` in `[eps, T]`).

Class conditioning. With `num_classes = C > 0` the network also takes `label: [B]` in `0 .. C` and adds a learned
class embedding (:class:`~scoreflow.models.layers.ClassEmbedding`, `C + 1` rows of width `4 nf`) to the noise
embedding before it enters the residual blocks, :math:`t_{emb} \leftarrow t_{emb} + E[y]`; row `C` is the null
class, "unconditional", which label dropout trains for classifier-free guidance (Ho & Salimans 2022). With
`num_classes = 0` (every preset) there is no such parameter and no label.

References:
  Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole. Score-Based Generative Modeling through Stochastic
  Differential Equations. ICLR 2021. (Appendix H.)
  Ho, Jain, Abbeel. Denoising Diffusion Probabilistic Models. NeurIPS 2020. (Appendix B.)
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from scoreflow.models import layers
from scoreflow.models.layers import (AttnBlock, ClassEmbedding, Combine, Downsample, NoiseEmbedding,
                                     ResnetBlockBigGAN, ResnetBlockDDPM, Upsample, conv, group_norm)


def _check_choice(owner: str, name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{owner}: {name} must be one of {tuple(choices)}, got {value!r}.")


class UNet(nn.Module):
  r"""A noise-conditional U-Net score network: `[B, H, W, C]`, `cond [B]` -> `[B, H, W, C]`.

  The defaults are DDPM++ cont. (VP) of Song et al. (2021) for 32x32 images; see
  :data:`scoreflow.models.presets.PRESETS` for the paper's configurations.

  Attributes:
    nf: base number of channels.
    ch_mult: channel multiplier per resolution level (level `i` has `nf * ch_mult[i]` channels and
      resolution `H / 2**i`).
    num_res_blocks: residual blocks per level on the way down (one more on the way up).
    attn_resolutions: resolutions (in pixels, e.g. `(16,)`) at which self-attention follows each block of the
      downsampling path.
    attn_every_up_block: on the upsampling path, attention follows every block at those resolutions (the DDPM
      of Ho et al. 2020) rather than only the level's last block (NCSN++/DDPM++, and the 2021 reference's
      re-implementation of DDPM).
    dropout: dropout rate inside the residual blocks (active only with `train=True`).
    resamp_with_conv: DDPM-style resampling layers carry a 3x3 convolution.
    conditional: embed `cond` and add it in every residual block (False: an unconditional network).
    embedding_type: `"positional"` (sinusoidal, DDPM) or `"fourier"` (Gaussian Fourier features, NCSN++).
    fourier_scale: frequency scale of the Fourier embedding (16 in NCSN++).
    noise_conditioning: the kind of `cond` (see the module docstring).
    scale_by_sigma: divide the output by the :math:`\sigma` read from `cond`.
    resblock_type: `"biggan"` (NCSN++/DDPM++; resamples inside residual blocks) or `"ddpm"`.
    skip_rescale: scale every residual and skip sum by :math:`1/\sqrt2`.
    fir, fir_kernel: FIR resampling (StyleGAN2) with this 1-D kernel, instead of nearest/average.
    progressive: output path, `"none"`, `"output_skip"` (sum of per-level RGB outputs, upsampled) or
      `"residual"` (a residual upsampling path).
    progressive_input: input path, `"none"`, `"input_skip"` (the downsampled image merged at every level)
      or `"residual"` (a residual downsampling path).
    progressive_combine: how `"input_skip"` merges, `"sum"` or `"cat"`.
    init_scale: initialiser scale of the last layer of every residual branch and of the output layer
      (0: exact zeros, so the network outputs 0 at initialisation).
    centered: inputs are in [-1, 1]; with False they are in [0, 1] and mapped by :math:`2x - 1` first.
    dtype: computation dtype (None: that of `x`); parameters are float32. The output has the dtype of `x`.
    num_classes: class conditioning (see the module docstring): `C > 0` classes plus the null class `C`; 0 for
      an unconditional network. A conditional network is called (and initialised) with `label=` int `[B]`, as in
      :class:`~scoreflow.models.ScoreMLP`'s example.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from scoreflow.models import UNet
    >>> model = UNet(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
    >>> x, cond = jnp.zeros((2, 8, 8, 1)), jnp.full((2,), 500.0)
    >>> variables = model.init(jax.random.key(0), x, cond)
    >>> model.apply(variables, x, cond).shape
    (2, 8, 8, 1)

  Raises:
    ValueError: at construction for an unknown option or an inconsistent combination; at call time for an
      input that is not `[B, H, W, C]` with `H = W` divisible by `2**(len(ch_mult) - 1)`, `cond` that is
      not `[B]`, or a `label` that does not fit `num_classes` (see :func:`~scoreflow.models.layers.class_labels`).
  """

  nf: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  attn_every_up_block: bool = False
  dropout: float = 0.1
  resamp_with_conv: bool = True
  conditional: bool = True
  embedding_type: Literal["positional", "fourier"] = "positional"
  fourier_scale: float = 16.0
  noise_conditioning: layers.NoiseConditioningKind = "time"
  scale_by_sigma: bool = False
  resblock_type: Literal["biggan", "ddpm"] = "biggan"
  skip_rescale: bool = True
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  progressive: Literal["none", "output_skip", "residual"] = "none"
  progressive_input: Literal["none", "input_skip", "residual"] = "none"
  progressive_combine: Literal["sum", "cat"] = "sum"
  init_scale: float = 0.0
  centered: bool = True
  dtype: Any = None
  num_classes: int = 0

  def __post_init__(self):
    owner = "UNet"
    _check_choice(owner, "embedding_type", self.embedding_type, ("positional", "fourier"))
    _check_choice(owner, "resblock_type", self.resblock_type, ("biggan", "ddpm"))
    _check_choice(owner, "progressive", self.progressive, ("none", "output_skip", "residual"))
    _check_choice(owner, "progressive_input", self.progressive_input, ("none", "input_skip", "residual"))
    _check_choice(owner, "progressive_combine", self.progressive_combine, ("sum", "cat"))
    layers.check_noise_conditioning(owner, self.noise_conditioning, self.scale_by_sigma)
    layers.check_num_classes(owner, self.num_classes)
    if self.nf < 4 or len(self.ch_mult) < 1 or any(m < 1 for m in self.ch_mult) or self.num_res_blocks < 1:
      raise ValueError(f"UNet: need nf >= 4, a non-empty ch_mult of positive ints and num_res_blocks >= 1, got "
                       f"nf={self.nf}, ch_mult={tuple(self.ch_mult)}, num_res_blocks={self.num_res_blocks}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"UNet: dropout must lie in [0, 1), got {self.dropout}.")
    if self.init_scale < 0:
      raise ValueError(f"UNet: init_scale must be >= 0, got {self.init_scale}.")
    if self.fir and len(self.fir_kernel) < 2:
      raise ValueError(f"UNet: fir_kernel needs at least 2 taps for 2x resampling, got {tuple(self.fir_kernel)}.")
    super().__post_init__()

  def _check_inputs(self, x, cond):
    layers.check_square_images("UNet", x, self.ch_mult)
    return layers.broadcast_conditioning("UNet", cond, x.shape[0])

  @nn.compact
  def __call__(self, x, cond, train: bool = False, label=None):
    """Args: `x: [B, H, W, C]`, `cond: [B]` (float or integer), `train`: enables dropout (a Python bool; pass
    `rngs={"dropout": key}` to `apply` when `train=True` and `dropout > 0`), `label`: int `[B]` in
    `0 .. num_classes` (required when `num_classes > 0`, refused otherwise). Returns `[B, H, W, C]`."""
    cond = self._check_inputs(x, cond)
    label = layers.class_labels("UNet", label, self.num_classes, x.shape[0])
    out_dtype = x.dtype
    dtype = self.dtype if self.dtype is not None else x.dtype
    x = x.astype(dtype)
    channels = x.shape[-1]
    num_levels = len(self.ch_mult)
    resolutions = [x.shape[1] // 2**level for level in range(num_levels)]
    rescale = jnp.asarray(1 / np.sqrt(2.0), dtype) if self.skip_rescale else jnp.asarray(1.0, dtype)

    if self.conditional:
      temb = NoiseEmbedding(4 * self.nf, self.embedding_type, self.nf, self.fourier_scale,
                            self.noise_conditioning, dtype=dtype)(cond)
    else:
      temb = None
    if label is not None:
      class_embedding = ClassEmbedding(self.num_classes, 4 * self.nf, dtype=dtype, name="ClassEmbedding")(label)
      temb = class_embedding if temb is None else temb + class_embedding

    if self.resblock_type == "ddpm":
      def resblock(out_ch=None, up=False, down=False):
        return ResnetBlockDDPM(out_ch=out_ch, dropout=self.dropout, skip_rescale=self.skip_rescale,
                               init_scale=self.init_scale, dtype=dtype)
    else:
      def resblock(out_ch=None, up=False, down=False):
        return ResnetBlockBigGAN(up=up, down=down, out_ch=out_ch, dropout=self.dropout, fir=self.fir,
                                 fir_kernel=tuple(self.fir_kernel), skip_rescale=self.skip_rescale,
                                 init_scale=self.init_scale, dtype=dtype)

    def attention(h):
      return AttnBlock(skip_rescale=self.skip_rescale, init_scale=self.init_scale, dtype=dtype)(h)

    def output_conv(h, out_ch, init_scale):
      return conv(out_ch, init_scale=init_scale, dtype=dtype)(nn.silu(group_norm(h.shape[-1], dtype)(h)))

    fir_kernel = tuple(self.fir_kernel)
    if not self.centered:
      x = 2 * x - 1

    # 1. Downsampling path; `skips` holds every feature map the upsampling path concatenates.
    input_pyramid = x
    skips = [conv(self.nf, dtype=dtype)(x)]
    for level in range(num_levels):
      for _ in range(self.num_res_blocks):
        h = resblock(out_ch=self.nf * self.ch_mult[level])(skips[-1], temb, train)
        if resolutions[level] in self.attn_resolutions:
          h = attention(h)
        skips.append(h)
      if level != num_levels - 1:
        if self.resblock_type == "ddpm":
          h = Downsample(with_conv=self.resamp_with_conv, fir=self.fir, fir_kernel=fir_kernel, dtype=dtype)(skips[-1])
        else:
          h = resblock(down=True)(skips[-1], temb, train)
        if self.progressive_input == "input_skip":
          input_pyramid = Downsample(fir=self.fir, fir_kernel=fir_kernel, dtype=dtype)(input_pyramid)
          h = Combine(self.progressive_combine, dtype=dtype)(input_pyramid, h)
        elif self.progressive_input == "residual":
          input_pyramid = Downsample(out_ch=h.shape[-1], with_conv=True, fir=self.fir, fir_kernel=fir_kernel,
                                     dtype=dtype)(input_pyramid)
          input_pyramid = (input_pyramid + h) * rescale
          h = input_pyramid
        skips.append(h)

    # 2. Middle: residual block, attention, residual block.
    h = resblock()(skips[-1], temb, train)
    h = attention(h)
    h = resblock()(h, temb, train)

    # 3. Upsampling path, with the optional progressive output path `pyramid`.
    pyramid = None
    for level in reversed(range(num_levels)):
      for _ in range(self.num_res_blocks + 1):
        h = resblock(out_ch=self.nf * self.ch_mult[level])(jnp.concatenate([h, skips.pop()], axis=-1), temb, train)
        if self.attn_every_up_block and resolutions[level] in self.attn_resolutions:
          h = attention(h)
      if not self.attn_every_up_block and resolutions[level] in self.attn_resolutions:
        h = attention(h)
      if self.progressive == "output_skip":
        level_output = output_conv(h, channels, self.init_scale)
        if pyramid is None:
          pyramid = level_output
        else:
          pyramid = Upsample(fir=self.fir, fir_kernel=fir_kernel, dtype=dtype)(pyramid) + level_output
      elif self.progressive == "residual":
        if pyramid is None:
          pyramid = output_conv(h, h.shape[-1], 1.0)
        else:
          pyramid = Upsample(out_ch=h.shape[-1], with_conv=True, fir=self.fir, fir_kernel=fir_kernel,
                             dtype=dtype)(pyramid)
          pyramid = (pyramid + h) * rescale
          h = pyramid
      if level != 0:
        if self.resblock_type == "ddpm":
          h = Upsample(with_conv=self.resamp_with_conv, fir=self.fir, fir_kernel=fir_kernel, dtype=dtype)(h)
        else:
          h = resblock(up=True)(h, temb, train)

    # 4. Output.
    if self.progressive == "output_skip":
      h = pyramid
    else:
      h = output_conv(h, channels, self.init_scale)
    if self.scale_by_sigma:
      sigma = layers.conditioning_to_sigma(cond, self.noise_conditioning, h.dtype)
      h = h / sigma.reshape((-1, 1, 1, 1))
    return h.astype(out_dtype)
