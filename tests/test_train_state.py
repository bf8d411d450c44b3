"""TrainState, optimizer schedule and EMA: closed-form values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scoreflow.train import state as state_lib


def test_warmup_then_constant():
  rate = state_lib.learning_rate_schedule(2e-4, warmup_steps=4)
  values = np.asarray([rate(c) for c in range(6)])
  # The first update already moves: eta * min((count + 1) / W, 1).
  np.testing.assert_allclose(values, 2e-4 * np.asarray([0.25, 0.5, 0.75, 1, 1, 1]), rtol=1e-6)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_schedules_end_at_final_ratio(schedule):
  rate = state_lib.learning_rate_schedule(1.0, warmup_steps=10, schedule=schedule, total_steps=110,
                                          final_lr_ratio=0.1)
  np.testing.assert_allclose(float(rate(9)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(rate(110)), 0.1, rtol=1e-6)
  # Half way through the decay: cosine gives (1 + cos(pi/2))/2 = 0.5, linear 0.5 as well.
  np.testing.assert_allclose(float(rate(60)), 0.1 + 0.9 * 0.5, rtol=1e-6)
  # Every count, where the two schedules differ (at a quarter: cosine 0.854, linear 0.75): warm-up (c + 1) / 10,
  # then 0.1 + 0.9 d(p) with p = (c - 10) / 100 clipped to [0, 1]. float32 arithmetic: a few ulp (< 1e-6).
  count = np.arange(0, 131)
  progress = np.clip((count - 10) / 100, 0, 1)
  decay = 0.5 * (1 + np.cos(np.pi * progress)) if schedule == "cosine" else 1 - progress
  expected = np.minimum((count + 1) / 10, 1) * (0.1 + 0.9 * decay)
  np.testing.assert_allclose(np.asarray(jax.vmap(rate)(count)), expected, rtol=1e-6, atol=1e-7)
  other = 0.5 * (1 + np.cos(np.pi * 0.25)) if schedule == "linear" else 0.75
  assert abs(float(rate(35)) - (0.1 + 0.9 * other)) > 0.05


def test_schedule_errors():
  with pytest.raises(ValueError, match="schedule='cosine' .* needs total_steps"):
    state_lib.learning_rate_schedule(1.0, warmup_steps=10, schedule="cosine")
  with pytest.raises(ValueError, match="schedule must be one of"):
    state_lib.learning_rate_schedule(1.0, schedule="exp")
  with pytest.raises(ValueError, match="learning_rate must be > 0"):
    state_lib.learning_rate_schedule(0.0)


def test_optimizer_errors():
  with pytest.raises(ValueError, match="optimizer='adam' has no weight decay"):
    state_lib.make_optimizer(optimizer="adam", weight_decay=0.1)
  with pytest.raises(ValueError, match="optimizer must be one of"):
    state_lib.make_optimizer(optimizer="sgd")
  with pytest.raises(ValueError, match="grad_clip must be > 0"):
    state_lib.make_optimizer(grad_clip=-1.0)


def test_optimizer_first_update_is_clipped_adam():
  # Adam's first step is -eta * g / (|g| + eps') elementwise (bias-corrected moments equal g and g^2).
  tx = state_lib.make_optimizer(0.1, warmup_steps=2, grad_clip=1.0)
  params = {"w": jnp.zeros(3, jnp.float32)}
  grads = {"w": jnp.asarray([3.0, -4.0, 0.0], jnp.float32)}  # norm 5: clipped to [0.6, -0.8, 0].
  updates, _ = tx.update(grads, tx.init(params), params)
  expected = -0.1 * 0.5 * np.asarray([1.0, -1.0, 0.0])  # warm-up factor 1/2 at the first update.
  np.testing.assert_allclose(np.asarray(updates["w"]), expected, atol=1e-6)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_first_update_includes_decoupled_decay(weight_decay):
  """AdamW (Loshchilov & Hutter 2019): the first update is -eta (g / (|g| + eps) + lambda theta), the decay
  added after Adam's normalisation and scaled by the learning rate, not by the normalisation."""
  tx = state_lib.make_optimizer(0.1, optimizer="adamw", weight_decay=weight_decay, grad_clip=None)
  params = jnp.asarray([5.0, -3.0, 2.0], jnp.float32)
  grads = jnp.asarray([0.5, -2.0, 0.0], jnp.float32)
  updates, _ = tx.update(grads, tx.init(params), params)
  expected = -0.1 * (np.sign([0.5, -2.0, 0.0]) + weight_decay * np.asarray([5.0, -3.0, 2.0]))
  # |g| / (|g| + 1e-8) differs from sign(g) by < 1e-7 here; float32 rounding is ~1e-7 relative.
  np.testing.assert_allclose(np.asarray(updates), expected, rtol=1e-6, atol=1e-7)


def test_adamw_minimises_quadratic():
  tx = state_lib.make_optimizer(0.1, optimizer="adamw", weight_decay=1e-4, grad_clip=None)
  params = jnp.asarray([5.0, -3.0], jnp.float32)

  def step(_, carry):
    params, opt_state = carry
    grads = jax.grad(lambda p: jnp.sum((p - 1.0) ** 2))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, _ = jax.jit(lambda p: jax.lax.fori_loop(0, 300, step, (p, tx.init(p))))(params)
  np.testing.assert_allclose(np.asarray(params), 1.0, atol=2e-2)


def test_ema_update_and_warmup():
  ema = {"w": jnp.asarray([1.0], jnp.float32)}
  new = state_lib.update_ema(ema, {"w": jnp.asarray([3.0], jnp.float32)}, 0.75)
  np.testing.assert_allclose(np.asarray(new["w"]), [0.75 * 1 + 0.25 * 3])
  assert new["w"].dtype == jnp.float32
  # Warm-up: min(rate, (1 + n) / (10 + n)) with n = step + 1.
  np.testing.assert_allclose(float(state_lib.ema_decay(0, 0.999, warmup=True)), 2 / 11, rtol=1e-6)
  np.testing.assert_allclose(float(state_lib.ema_decay(10**6, 0.999, warmup=True)), 0.999, rtol=1e-6)
  np.testing.assert_allclose(float(state_lib.ema_decay(0, 0.999)), 0.999, rtol=1e-6)


def test_create_copies_params_for_ema():
  tx = state_lib.make_optimizer(1e-3)
  params = {"w": jnp.ones((2, 2), jnp.float32)}
  state = state_lib.TrainState.create(params, tx, jax.random.key(3))
  assert state.ema_params["w"].unsafe_buffer_pointer() != state.params["w"].unsafe_buffer_pointer()
  assert state.rng.dtype == jnp.uint32 and state.rng.shape == (2,)
  assert state.step.dtype == jnp.int32 and int(state.step) == 0
  assert jax.random.key_data(state.key).tolist() == jax.random.key_data(jax.random.key(3)).tolist()
  # The per-step key is fold_in(key, step).
  expected = jax.random.key_data(jax.random.fold_in(jax.random.key(3), 0))
  np.testing.assert_array_equal(jax.random.key_data(state.step_key()), expected)
