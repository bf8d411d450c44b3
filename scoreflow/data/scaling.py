r"""Affine maps between raw pixel levels and the model's data space, and uniform dequantization.

Images arrive as integer levels :math:`x_{raw} \in \{0, \dots, L-1\}` (`L = num_levels`: 256 for 8-bit
data, 17 for scikit-learn's 8x8 digits). The model sees

.. math:: x = s\,\tilde x + b,

where :math:`\tilde x` is either the raw level itself or, with uniform dequantization (Theis et al., 2016;
Song et al., 2021, App. D), the continuous value :math:`\tilde x = x_{raw} + u`, :math:`u \sim U[0, 1)^D`, which
lies in :math:`[0, L)^D`. The two conventions differ only in the denominator of :math:`s`:

=====================  ====================================  ==========================================
range                  levels (no dequantization)            dequantized (`(x_raw + u) / L`)
=====================  ====================================  ==========================================
centred `[-1, 1]`      :math:`s = 2/(L-1),\ b = -1`          :math:`s = 2/L,\ b = -1` (range `[-1, 1)`)
unit `[0, 1]`          :math:`s = 1/(L-1),\ b = 0`           :math:`s = 1/L,\ b = 0` (range `[0, 1)`)
=====================  ====================================  ==========================================

The dequantized unit convention is DESIGN.md's `(x * 255 + u) / 256` for 8-bit data.

Bits per dimension. A model density :math:`p(x)` over `D` dimensions is a density for
:math:`\tilde x` of :math:`p(x)\,|s|^D`, and for dequantized data :math:`-\log_2` of that density bounds the
discrete negative log-likelihood per image (Theis et al., 2016). Hence

.. math:: \mathrm{bpd} = -\frac{\log p(x) + D \log|s|}{D \ln 2}
          = -\frac{\log p(x) + \texttt{log\_det\_jacobian}(D)}{D \ln 2}.

:func:`scoreflow.likelihood.bits_per_dim` writes the same map from the unit cube,
:math:`x = a\,(x_{raw} + u)/L + b`, so it takes `scale = a = s L` (:attr:`AffineScaler.unit_cube_scale`:
2 for the centred and 1 for the unit dequantized scaler) and `num_levels = L`; the two formulas agree
because :math:`D \log|a| - D \log L = D \log|s|`. Example: a model density uniform on the centred range has
:math:`\log p = -D \log 2`, so :math:`\mathrm{bpd} = \log_2 L` (8 bits for 8-bit data), the bits of a
uniform guess.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from scoreflow._validation import check_hyperparameters
from scoreflow._pytree import pytree_dataclass, static_field


def _check_num_levels(num_levels) -> None:
  if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
    raise ValueError(f"AffineScaler: num_levels must be an int >= 2, got {num_levels!r}.")


def _denominator(num_levels: int, dequantized: bool) -> int:
  """`L` for dequantized values in `[0, L)`, `L - 1` for levels in `[0, L-1]`."""
  _check_num_levels(num_levels)
  return num_levels if dequantized else num_levels - 1


def _is_host_value(value) -> bool:
  return isinstance(value, (int, float, np.ndarray, np.generic))


_MAX_CELL_STEPS = 8  # Float steps a rounded value may need to reach its cell (a few ulps; see `dequantize`).


def _nudged_into_cells(x, levels, scale, shift, xp):
  """One float step of every value of `x` whose decoded level is not `levels`, towards its cell."""
  cells = xp.floor((x - shift) / scale)
  towards_higher_cells = xp.asarray(np.inf, x.dtype) * xp.sign(scale)
  direction = xp.where(cells > levels, -towards_higher_cells, towards_higher_cells)
  return xp.where(cells != levels, xp.nextafter(x, direction), x), cells != levels


def _settled_host(levels, u, scale, shift, num_levels):
  """:meth:`AffineScaler.dequantize` with NumPy; only the values whose `u` is near 0 or 1 can leave their cell,
  so only those are checked (the input pipeline dequantizes every pixel of every batch)."""
  x = scale * (levels + u) + shift
  margin = 64 * float(np.finfo(x.dtype).eps) * (num_levels + abs(float(shift / scale)))
  near = np.flatnonzero((u < margin) | (u > 1 - margin))
  if near.size:
    x.reshape(-1)[near] = _settle(levels.reshape(-1)[near], u.reshape(-1)[near], scale, shift, np)
  return x


def _settled_device(levels, u, scale, shift):
  """:meth:`AffineScaler.dequantize` with JAX: every value checked, `_MAX_CELL_STEPS` fused elementwise passes."""
  return _settle(levels, u, scale, shift, jnp, check=False)


def _settle(levels, u, scale, shift, xp, check=True):
  dequantized = levels + u
  # A rounded-up l + u (the difference is exact: Sterbenz) becomes the largest float below l + 1.
  dequantized = xp.where(dequantized - levels == 1, xp.nextafter(dequantized, xp.zeros_like(dequantized)),
                         dequantized)
  x = scale * dequantized + shift
  for _ in range(_MAX_CELL_STEPS):
    x, wrong = _nudged_into_cells(x, levels, scale, shift, xp)
    if check and not wrong.any():
      return x
  if check and (xp.floor((x - shift) / scale) != levels).any():
    raise RuntimeError(f"dequantize: values did not settle in their level's cell after {_MAX_CELL_STEPS} float "
                       f"steps (scale={scale}, shift={shift}); the scaler's cells are too narrow for {x.dtype}.")
  return x


@pytree_dataclass
class AffineScaler:
  r"""The affine map :math:`x = s\,\tilde x + b` from raw (or dequantized) levels to model space.

  `scale` and `shift` are pytree leaves (changing them does not recompile); `num_levels` and `dequantized`
  are static. Methods accept NumPy arrays (computed on the host with NumPy, as the input pipeline needs)
  or JAX arrays (pure, usable inside `jit`/`vmap`). Floating inputs keep their dtype; integer levels become
  float32.

  Attributes:
    scale: :math:`s`, nonzero.
    shift: :math:`b`.
    num_levels: the number of raw levels `L` (values `0 .. L-1`); 256 for 8-bit data.
    dequantized: whether the model sees :math:`x_{raw} + u` (`True`) or the levels themselves; decides how
      :meth:`to_levels` rounds back.

  Example:
    >>> scaler = AffineScaler.centred(256)
    >>> float(scaler.forward(np.array([0, 255], np.uint8))[1])
    1.0
  """

  scale: float | jax.Array
  shift: float | jax.Array
  num_levels: int = static_field(default=256)
  dequantized: bool = static_field(default=False)

  def __post_init__(self):
    _check_num_levels(self.num_levels)
    check_hyperparameters("AffineScaler", "a finite nonzero scale and a finite shift",
                          lambda scale, shift: np.isfinite(scale) & (scale != 0) & np.isfinite(shift),
                          scale=self.scale, shift=self.shift)

  @classmethod
  def centred(cls, num_levels: int = 256, *, dequantized: bool = False) -> AffineScaler:
    """Levels to `[-1, 1]` (`2 x / (L-1) - 1`), or dequantized values to `[-1, 1)` (`2 (x + u) / L - 1`)."""
    return cls(2.0 / _denominator(num_levels, dequantized), -1.0, num_levels=num_levels, dequantized=dequantized)

  @classmethod
  def unit_interval(cls, num_levels: int = 256, *, dequantized: bool = False) -> AffineScaler:
    """Levels to `[0, 1]` (`x / (L-1)`), or dequantized values to `[0, 1)` (`(x + u) / L`)."""
    return cls(1.0 / _denominator(num_levels, dequantized), 0.0, num_levels=num_levels, dequantized=dequantized)

  def as_dequantized(self) -> AffineScaler:
    """The dequantized scaler onto the same range: :math:`s = a/L` for a levels scaler :math:`s = a/(L-1)` (the
    map bits/dim is reported under: the data's cells fill the range); a dequantized scaler itself."""
    if self.dequantized:
      return self
    return AffineScaler(self.scale * (self.num_levels - 1) / self.num_levels, self.shift, num_levels=self.num_levels,
                        dequantized=True)

  def _coefficients(self, x):
    """`(xp, x, scale, shift)` with `x` floating and the coefficients cast to its dtype."""
    host = _is_host_value(x) and _is_host_value(self.scale) and _is_host_value(self.shift)
    xp = np if host else jnp
    x = xp.asarray(x)
    if not xp.issubdtype(x.dtype, xp.floating):
      x = x.astype(xp.float32)
    return xp, x, xp.asarray(self.scale, x.dtype), xp.asarray(self.shift, x.dtype)

  def dequantize(self, levels, u):
    r"""The one dequantization rule: model-space :math:`x = s\,(l + u) + b` of levels `l` with offsets `u` in
    :math:`[0, 1)`, kept in the cell of `l`, so that :meth:`to_levels` of a dequantized scaler gives `l` back.

    In floating point two roundings can push a value into the next cell: `l + u` rounds up to `l + 1` when `u`
    is within half an ulp of 1 (any `u >= 1 - 2^{-17}` for float32 levels from 128), which at the top level gives
    `x = 1`, outside the centred range `[-1, 1)`; and `s (l + u) + b` rounds again. Such values move one float
    step at a time into their own cell (the decoded level is monotone in `x`); all others are
    :math:`s(l + u) + b` as is. NumPy inputs are computed on the host (the input pipeline), JAX inputs on device
    (pure; :func:`uniform_dequantize`, :func:`scoreflow.dequantize`), with the same result.

    Args:
      levels: `[*S]` integer levels `l` in `0 .. num_levels - 1` (integer or integral float).
      u: `[*S]` offsets in `[0, 1)`, in the dtype of the result (float32 for integer levels).

    Returns:
      `[*S]` model-space values in the dtype of `u`.
    """
    xp, u, scale, shift = self._coefficients(u)
    levels = xp.asarray(levels).astype(u.dtype)
    if xp is np:
      return _settled_host(levels, u, scale, shift, self.num_levels)
    return _settled_device(levels, u, scale, shift)

  def forward(self, x_raw):
    r"""Model-space values :math:`s\,\tilde x + b` of raw levels or dequantized values `[*S]` -> `[*S]`."""
    _, x, scale, shift = self._coefficients(x_raw)
    return scale * x + shift

  def inverse(self, x):
    r"""Raw-level units :math:`(x - b) / s` of model-space values `[*S]` -> `[*S]` (not rounded)."""
    _, x, scale, shift = self._coefficients(x)
    return (x - shift) / scale

  @property
  def unit_cube_scale(self):
    r""":math:`a = s L`, the multiplier from the unit cube :math:`(x_{raw} + u)/L` to model space.

    Pass it as `scale` (with `num_levels=self.num_levels`) to :func:`scoreflow.likelihood.bits_per_dim`;
    meaningful for dequantized scalers, whose data fill the cube.
    """
    return self.scale * self.num_levels

  def log_det_jacobian(self, num_dims: int):
    r""":math:`\log|\det \partial x / \partial \tilde x| = D \log|s|` for `D = num_dims` dimensions.

    Add it to a model-space log-density to get the density of :math:`\tilde x`; see the module docstring
    for bits per dimension.
    """
    if _is_host_value(self.scale):
      return num_dims * math.log(abs(float(self.scale)))
    return num_dims * jnp.log(jnp.abs(self.scale))

  def to_levels(self, x):
    r"""The integer level (int32, in `0 .. L-1`) that model-space `x` encodes.

    Dequantized scalers decode :math:`\lfloor \tilde x \rfloor` (the cell :math:`[k, k+1)` that uniform
    noise filled); level scalers round to the nearest level. Values outside the range are clipped.
    """
    xp, _, _, _ = self._coefficients(x)
    raw = self.inverse(x)
    levels = xp.floor(raw) if self.dequantized else xp.round(raw)
    return xp.clip(levels, 0, self.num_levels - 1).astype(xp.int32)

  def to_uint8(self, x):
    """Model-space `x` as 8-bit intensities (`uint8`, levels stretched to `0 .. 255`) for image files."""
    xp, _, _, _ = self._coefficients(x)
    levels = self.to_levels(x)
    if self.num_levels == 256:
      return levels.astype(xp.uint8)
    return xp.round(levels.astype(xp.float32) * (255.0 / (self.num_levels - 1))).astype(xp.uint8)


def uniform_dequantize(key: jax.Array, x_raw: jax.Array, dtype=jnp.float32, *,
                       scaler: AffineScaler | None = None) -> jax.Array:
  r"""Uniform dequantization with :math:`u \sim U[0, 1)`: :meth:`AffineScaler.dequantize` of `x_raw` under
  `scaler` (a dequantized one), or, without a scaler, the raw values :math:`\tilde x = x_{raw} + u`.

  The input pipeline does the same on the host with NumPy (`make_dataset(..., dequantize=True)`), and
  :func:`scoreflow.dequantize` for the likelihood: one rule.

  Args:
    key: a PRNG key.
    x_raw: integer (or integral float) levels `[*S]` in `0 .. L-1`.
    dtype: floating dtype of the result.
    scaler: the map to model space; None: raw units (`scale = 1`, `shift = 0`).

  Returns:
    `[*S]` values in the cell of each level: :math:`[x_{raw}, x_{raw} + 1)` in raw units.
  """
  num_levels = scaler.num_levels if scaler is not None else 2
  scaler = scaler if scaler is not None else AffineScaler(1.0, 0.0, num_levels=num_levels, dequantized=True)
  levels = jnp.asarray(x_raw)
  return scaler.dequantize(levels, jax.random.uniform(key, levels.shape, dtype))
