r"""A noise-conditional residual MLP for low-dimensional data (2-D toy densities, small vectors).

The input `x: [B, *D]` is flattened to `[B, prod(D)]`; the conditioning `cond: [B]` is embedded (sinusoidal or
Gaussian Fourier, as in the U-Nets) and passed through a two-layer SiLU MLP; then `depth` residual blocks

.. math:: h \leftarrow h + W_2\,\mathrm{Drop}\big(\mathrm{SiLU}(W_1\,\mathrm{SiLU}(h) + V\,\mathrm{SiLU}(t_{emb}))\big)

and a linear read-out to `prod(D)` features, reshaped to `[B, *D]`. The conditioning conventions
(`noise_conditioning`, `scale_by_sigma`, integer levels) are those of :class:`~scoreflow.models.UNet`, and so is
class conditioning: with `num_classes = C > 0` a learned embedding of `label` in `0 .. C` (`C`: the null class) is
added to :math:`t_{emb}`, :math:`t_{emb} \leftarrow t_{emb} + E[y]`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import flax.linen as nn

from scoreflow.models import layers
from scoreflow.models.layers import ClassEmbedding, NoiseEmbedding, dense


class ScoreMLP(nn.Module):
  """A time/noise-conditional residual MLP: `x [B, *D]`, `cond [B]` -> `[B, *D]`.

  Attributes:
    width: hidden width.
    depth: number of residual blocks.
    embedding_type: `"positional"` (sinusoidal; suits `cond` up to ~1000, e.g. `999 t` or an integer level) or
      `"fourier"` (Gaussian Fourier features; suits `cond` of order 1, e.g. `log sigma` or `t`).
    embedding_dim: features of the raw embedding (Fourier: `embedding_dim // 2` frequencies).
    fourier_scale: frequency scale of the Fourier embedding.
    noise_conditioning: the kind of `cond`, as in :class:`~scoreflow.models.UNet`.
    scale_by_sigma: divide the output by the :math:`\\sigma` read from `cond`.
    dropout: dropout rate inside the residual blocks (active only with `train=True`).
    init_scale: initialiser scale of the last layer of every block and of the read-out (0: exact zeros, so the
      network outputs 0 at initialisation).
    dtype: computation dtype (None: that of `x`); parameters are float32. The output has the dtype of `x`.
    num_classes: `C > 0` classes plus the null class `C` (the call then needs `label`); 0: unconditional.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from scoreflow.models import ScoreMLP
    >>> model = ScoreMLP(width=32, depth=2)
    >>> x, cond = jnp.zeros((5, 2)), jnp.arange(5)          # integer levels are embedded by value
    >>> variables = model.init(jax.random.key(0), x, cond)
    >>> model.apply(variables, x, cond).shape
    (5, 2)
    >>> model = ScoreMLP(width=32, depth=2, num_classes=3)   # labels 0..2, and 3: the null class
    >>> label = jnp.array([0, 1, 2, 3, 3])
    >>> variables = model.init(jax.random.key(0), x, cond, label=label)
    >>> model.apply(variables, x, cond, label=label).shape
    (5, 2)
  """

  width: int = 256
  depth: int = 3
  embedding_type: Literal["positional", "fourier"] = "positional"
  embedding_dim: int = 128
  fourier_scale: float = 16.0
  noise_conditioning: layers.NoiseConditioningKind = "time"
  scale_by_sigma: bool = False
  dropout: float = 0.0
  init_scale: float = 0.0
  dtype: Any = None
  num_classes: int = 0

  def __post_init__(self):
    if self.embedding_type not in ("positional", "fourier"):
      raise ValueError(f"ScoreMLP: embedding_type must be 'positional' or 'fourier', got {self.embedding_type!r}.")
    layers.check_noise_conditioning("ScoreMLP", self.noise_conditioning, self.scale_by_sigma)
    layers.check_num_classes("ScoreMLP", self.num_classes)
    if self.width < 1 or self.depth < 0 or self.embedding_dim < 4:
      raise ValueError(f"ScoreMLP: need width >= 1, depth >= 0 and embedding_dim >= 4, got width={self.width}, "
                       f"depth={self.depth}, embedding_dim={self.embedding_dim}.")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"ScoreMLP: dropout must lie in [0, 1), got {self.dropout}.")
    if self.init_scale < 0:
      raise ValueError(f"ScoreMLP: init_scale must be >= 0, got {self.init_scale}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, cond, train: bool = False, label=None):
    """Args: `x: [B, *D]`, `cond: [B]` (float or integer), `train`: enables dropout (a Python bool; pass
    `rngs={"dropout": key}` to `apply` when `train=True` and `dropout > 0`), `label`: int `[B]` in
    `0 .. num_classes` (required when `num_classes > 0`, refused otherwise). Returns `[B, *D]`."""
    if x.ndim < 2:
      raise ValueError(f"ScoreMLP: x must be [B, *D] with at least one data axis, got shape {x.shape}.")
    cond = layers.broadcast_conditioning("ScoreMLP", cond, x.shape[0])
    label = layers.class_labels("ScoreMLP", label, self.num_classes, x.shape[0])
    out_dtype = x.dtype
    dtype = self.dtype if self.dtype is not None else x.dtype
    data_shape = x.shape[1:]
    features = math.prod(data_shape)
    h = x.reshape(x.shape[0], features).astype(dtype)

    frequencies = self.embedding_dim // 2 if self.embedding_type == "fourier" else self.embedding_dim
    temb = NoiseEmbedding(self.width, self.embedding_type, frequencies, self.fourier_scale,
                          self.noise_conditioning, dtype=dtype)(cond)
    if label is not None:
      temb = temb + ClassEmbedding(self.num_classes, self.width, dtype=dtype, name="ClassEmbedding")(label)
    h = dense(self.width, dtype=dtype)(h)
    for _ in range(self.depth):
      r = dense(self.width, dtype=dtype)(nn.silu(h)) + dense(self.width, dtype=dtype)(nn.silu(temb))
      r = nn.Dropout(self.dropout)(nn.silu(r), deterministic=not train)
      h = h + dense(self.width, self.init_scale, dtype)(r)
    out = dense(features, self.init_scale, dtype)(nn.silu(h))
    if self.scale_by_sigma:
      out = out / layers.conditioning_to_sigma(cond, self.noise_conditioning, out.dtype)[:, None]
    return out.reshape(x.shape).astype(out_dtype)
