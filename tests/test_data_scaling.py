"""AffineScaler and uniform dequantization: ranges, inverses, Jacobian, dtypes and jit hygiene."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoreflow.data import AffineScaler, uniform_dequantize

LEVELS = (17, 256)


@pytest.mark.parametrize("num_levels", LEVELS)
@pytest.mark.parametrize("constructor, low, high", [(AffineScaler.centred, -1.0, 1.0),
                                                     (AffineScaler.unit_interval, 0.0, 1.0)])
def test_ranges_of_levels_and_dequantized_values(constructor, low, high, num_levels):
  levels = np.arange(num_levels, dtype=np.uint8)
  scaler = constructor(num_levels)
  x = scaler.forward(levels)
  assert x.dtype == np.float32 and isinstance(x, np.ndarray)
  np.testing.assert_allclose([x[0], x[-1]], [low, high], rtol=0, atol=1e-6)
  dequantized = constructor(num_levels, dequantized=True)
  # (x_raw + u) / L: level 0 starts the range, the open end L maps to its top.
  np.testing.assert_allclose(dequantized.forward(np.array([0.0, num_levels])), [low, high], atol=1e-12)
  assert dequantized.scale * num_levels == pytest.approx(high - low)  # the w = s L of the docstring


@pytest.mark.parametrize("dequantized", [False, True])
@pytest.mark.parametrize("num_levels", LEVELS)
def test_to_levels_inverts_forward(num_levels, dequantized):
  rng = np.random.default_rng(0)
  scaler = AffineScaler.centred(num_levels, dequantized=dequantized)
  levels = rng.integers(0, num_levels, size=(64, 3))
  raw = levels + (rng.random(levels.shape) if dequantized else 0.0)
  x = scaler.forward(raw)
  np.testing.assert_allclose(scaler.inverse(x), raw, rtol=0, atol=1e-9)
  np.testing.assert_array_equal(scaler.to_levels(x), levels)
  np.testing.assert_array_equal(scaler.to_levels(jnp.asarray(x)), levels)
  image = scaler.to_uint8(x)
  assert image.dtype == np.uint8
  np.testing.assert_array_equal(image, np.round(levels * 255 / (num_levels - 1)))
  np.testing.assert_array_equal(scaler.to_levels(np.array([-5.0, 5.0])), [0, num_levels - 1])


@pytest.mark.parametrize("num_levels", LEVELS)
@pytest.mark.parametrize("constructor, width", [(AffineScaler.centred, 2.0), (AffineScaler.unit_interval, 1.0)])
def test_uniform_model_density_costs_log2_levels_bits(constructor, width, num_levels):
  # A density uniform on the model range [b, b + w)^D has log p = -D log w; its bits/dim for the dequantized
  # data must be log2(L), the cost of a uniform guess: bpd = -(log p + log_det_jacobian(D)) / (D ln 2).
  num_dims = 3 * 8 * 8
  scaler = constructor(num_levels, dequantized=True)
  bpd = -(-num_dims * math.log(width) + scaler.log_det_jacobian(num_dims)) / (num_dims * math.log(2))
  assert bpd == pytest.approx(math.log2(num_levels), rel=1e-12)


@pytest.mark.parametrize("num_levels", LEVELS)
@pytest.mark.parametrize("constructor", [AffineScaler.centred, AffineScaler.unit_interval])
def test_agrees_with_the_likelihood_bits_per_dim(constructor, num_levels, getkey):
  from scoreflow.likelihood import bits_per_dim  # pylint: disable=g-import-not-at-top

  event_shape = (8, 8, 1)
  num_dims = 64
  scaler = constructor(num_levels, dequantized=True)
  logp = jax.random.normal(getkey(), (5,), jnp.float64) * 50
  expected = -(logp + scaler.log_det_jacobian(num_dims)) / (num_dims * math.log(2))
  actual = bits_per_dim(logp, event_shape, num_levels=scaler.num_levels, scale=scaler.unit_cube_scale)
  np.testing.assert_allclose(actual, expected, rtol=1e-12)


def test_dtypes_follow_the_input():
  scaler = AffineScaler.centred(256)
  assert scaler.forward(np.zeros(3, np.float64)).dtype == np.float64
  assert scaler.forward(np.zeros(3, np.float32)).dtype == np.float32
  assert scaler.forward(jnp.zeros(3, jnp.float32)).dtype == jnp.float32
  assert scaler.forward(jnp.zeros(3, jnp.uint8)).dtype == jnp.float32
  assert scaler.inverse(jnp.zeros(3, jnp.float64)).dtype == jnp.float64


def test_pytree_under_jit_without_recompilation():
  traces = []

  @jax.jit
  def apply(scaler, x):
    traces.append(None)
    return scaler.forward(x), scaler.log_det_jacobian(4)

  x = jnp.arange(4, dtype=jnp.float32)
  y, log_det = apply(AffineScaler.centred(256), x)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, 2 * np.arange(4) / 255 - 1, rtol=1e-6)
  np.testing.assert_allclose(log_det, 4 * math.log(2 / 255), rtol=1e-12)
  y, _ = apply(AffineScaler(0.5, 1.0), x)  # new leaf values, same structure and types
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, 0.5 * np.arange(4) + 1)
  assert len(traces) == 1


def test_uniform_dequantize(getkey):
  levels = jnp.tile(jnp.arange(17, dtype=jnp.uint8), 1000)
  y = uniform_dequantize(getkey(), levels)
  assert y.dtype == jnp.float32 and y.shape == levels.shape
  u = np.asarray(y, np.float64) - np.asarray(levels)
  assert u.min() >= 0 and u.max() < 1
  # U[0, 1) has mean 1/2 and std 1/sqrt(12): 5 standard errors.
  assert abs(u.mean() - 0.5) < 5 / math.sqrt(12 * u.size)
  assert uniform_dequantize(getkey(), levels, jnp.float64).dtype == jnp.float64


def test_uniform_dequantize_stays_below_the_next_level(getkey):
  # In float32, 255 + u rounds up to 256 for u >= 1 - 2^-17: 2^6 of jax's 2^23 float32 uniforms, so about 32
  # of these 2^22 draws (the chance of none is e^-32).
  levels = jnp.full((2**22,), 255, jnp.uint8)
  y = np.asarray(uniform_dequantize(getkey(), levels))
  assert y.max() < 256 and np.all(np.floor(y) == 255)
  assert y.max() == np.nextafter(np.float32(256), np.float32(0))
  np.testing.assert_array_equal(AffineScaler.centred(256, dequantized=True).to_levels(y[-1000:]), 255)


def test_errors():
  with pytest.raises(ValueError, match="num_levels must be an int >= 2, got 1"):
    AffineScaler.centred(1)
  with pytest.raises(ValueError, match="finite nonzero scale"):
    AffineScaler(0.0, 1.0)
