"""bits_per_dim, dequantize and evaluate_bits_per_dim against hand computations and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoreflow.likelihood import bits_per_dim, dequantize, evaluate_bits_per_dim
from scoreflow.testing.analytic import GaussianMixture

from _likelihood_fixtures import SDES, score_fn, terminal_logp_fn


@pytest.mark.parametrize("num_levels", [256, 17])
@pytest.mark.parametrize("scale", [2.0, 1.0, np.array([[0.5], [3.0]])])
def test_uniform_model_costs_log2_levels(num_levels, scale):
  # The uniform density on the model-space image of the unit cube, x = a y + b, has log p = -sum_d log|a_d|;
  # as a model of discrete data it gives every one of the L^D values probability L^-D: log2(L) bits/dim.
  event_shape = (2, 3)
  logp = -np.sum(np.broadcast_to(np.log(np.abs(scale)), event_shape))
  bpd = bits_per_dim(jnp.asarray([logp, logp]), event_shape, num_levels=num_levels, scale=scale)
  np.testing.assert_allclose(bpd, math.log2(num_levels), rtol=1e-12)


def test_hand_computation_and_the_2021_offsets():
  # CIFAR-10 shaped, 8-bit: bpd = -logp / (D ln 2) - log2(a) + log2(256).
  d, logp = 32 * 32 * 3, jnp.asarray([-1000.0, 2500.0])
  nats_term = -logp / (d * math.log(2))
  centred = bits_per_dim(logp, (32, 32, 3), num_levels=256, scale=2.0)  # Data in [-1, 1].
  unit = bits_per_dim(logp, d, num_levels=256, scale=1.0)  # Data in [0, 1].
  np.testing.assert_allclose(centred - nats_term, 7.0, rtol=1e-12)  # The 2021 code's "offset = 7".
  np.testing.assert_allclose(unit - nats_term, 8.0, rtol=1e-12)  # ... and its "offset = 8".
  np.testing.assert_allclose(centred, [1000 / (3072 * math.log(2)) + 7, -2500 / (3072 * math.log(2)) + 7])
  # Digits: 17 levels, 64 dimensions, per-dimension scale (a_d = 2 for half, 4 for the rest).
  scale = np.concatenate([np.full(32, 2.0), np.full(32, 4.0)]).reshape(8, 8)
  digits = bits_per_dim(jnp.asarray(-50.0), (8, 8), num_levels=17, scale=scale)
  np.testing.assert_allclose(digits, 50 / (64 * math.log(2)) - 1.5 + math.log2(17), rtol=1e-12)
  assert bits_per_dim(jnp.zeros((3,), jnp.float32), 4).dtype == jnp.float32


@pytest.mark.parametrize("kwargs, match", [
    (dict(event_shape=0), "event_shape must be a positive int"),
    (dict(num_levels=1), "num_levels must be an int >= 2"),
    (dict(scale=0.0), "scale must be non-zero"),
    (dict(scale=np.ones(4)), r"scale must be a scalar or broadcast to the event shape \(2, 3\)"),
])
def test_bits_per_dim_bad_arguments(kwargs, match):
  kwargs = dict(dict(event_shape=(2, 3)), **kwargs)
  with pytest.raises(ValueError, match=match):
    bits_per_dim(jnp.zeros(2), kwargs.pop("event_shape"), **kwargs)


def test_dequantize_fills_each_cell(getkey):
  values = jnp.arange(17)[:, None] * jnp.ones((1, 500), jnp.int32)
  x = dequantize(getkey(), values, num_levels=17, scale=2.0, shift=-1.0, dtype=jnp.float32)
  assert x.dtype == jnp.float32 and x.shape == values.shape
  lower = 2.0 * values / 17 - 1.0
  assert bool(jnp.all((x >= lower - 1e-6) & (x < lower + 2.0 / 17 + 1e-6)))
  # Uniform within each cell: mean at the centre, to 4 standard errors (cell width / sqrt(12 * 500)).
  np.testing.assert_allclose(jnp.mean(x, axis=1), lower[:, 0] + 1.0 / 17, atol=4 * (2 / 17) / np.sqrt(12 * 500))


def test_evaluate_bits_per_dim_matches_the_closed_form(getkey):
  # Model: N(mu, diag s^2) data under VP with the exact score and terminal density, so the ODE log-density of a
  # dequantized point x is log N(x; alpha mu, alpha^2 s^2 + sigma^2) at t = eps. With x = c + w u, u ~ U[0, 1),
  # c = a v / L + b, w = a / L: E_u (x - m)^2 = (c - m)^2 + (c - m) w + w^2 / 3, so E_u[bpd] is closed-form.
  sde, eps, levels, a, b = SDES["VP"], 1e-5, 17, 2.0, -1.0
  data = GaussianMixture.gaussian(jnp.array([0.2, -0.3, 0.0]), jnp.array([0.6, 0.4, 0.8]))
  values = jax.random.randint(getkey(), (24, 3), 0, levels)
  estimate = evaluate_bits_per_dim(getkey(), sde, score_fn(data, sde), [values[:8], values[8:16], values[16:]],
                                   num_levels=levels, scale=a, shift=b, num_repeats=8, dtype=jnp.float64,
                                   eps=eps, prior_logp_fn=terminal_logp_fn(data, sde))
  m = (sde.alpha(eps) * data.means[0])[None]
  var = (sde.alpha(eps) ** 2 * data.stds[0] ** 2 + sde.sigma(eps) ** 2)[None]
  c, w = a * values / levels + b, a / levels
  expected_logp = jnp.sum(-0.5 * jnp.log(2 * jnp.pi * var) - ((c - m) ** 2 + (c - m) * w + w**2 / 3) / (2 * var),
                          axis=1)
  expected = float(jnp.mean(bits_per_dim(expected_logp, 3, num_levels=levels, scale=a)))
  assert estimate.num_failed == 0
  assert estimate.repeat_means.shape == (8,) and estimate.example_means.shape == (24,)
  assert estimate.stderr > 0 and estimate.dequantization_stderr > 0
  # `expected` is the mean over the dequantization of these 24 examples, so the error of `mean` against it is the
  # dequantization (repeat) error: (mean - expected) / dequantization_stderr is Student-t with 7 degrees of
  # freedom (Hutchinson and dequantization noise over 8 independent repeats; solver error ~1e-6 bits/dim is
  # negligible): P(|t| > 6) = 5e-4.
  assert abs(estimate.mean - expected) < 6 * estimate.dequantization_stderr, (estimate.mean, expected,
                                                                              estimate.dequantization_stderr)
  # `stderr` is the error as an estimate of the data distribution's bits/dim: the spread over examples.
  assert estimate.stderr == pytest.approx(np.std(estimate.example_means, ddof=1) / np.sqrt(24), rel=1e-12)
