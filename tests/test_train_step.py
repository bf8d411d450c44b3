"""The pure train step: exact update, lax.scan multi-step, non-finite guard, jit hygiene, mixed precision."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import scoreflow as sf
from scoreflow.train import step as step_lib
from scoreflow.train import state as state_lib

from _train_fixtures import TinyNet, tiny_setup


def _batch(key, shape=(8, 2), dtype=jnp.float32):
  return {"x": jax.random.normal(key, shape, dtype), "label": jnp.zeros(shape[:1], jnp.int32)}


def test_step_matches_manual_update(getkey):
  state, train_step, optimizer, objective = tiny_setup(dtype=jnp.float64, ema_rate=0.9)
  batch = _batch(getkey(), dtype=jnp.float64)
  new_state, metrics = jax.jit(train_step)(state, batch)


  @jax.jit
  def manual(state, x):
    key = jax.random.fold_in(jax.random.key(1), 0)
    (loss, _), grads = jax.value_and_grad(objective, has_aux=True)(state.params, key, x)
    updates, _ = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.params, params)
    return loss, grads, params, ema

  loss, grads, params, ema = manual(state, batch["x"])
  for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(params)):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
  for got, want in zip(jax.tree.leaves(new_state.ema_params), jax.tree.leaves(ema)):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], step_lib.global_norm(grads), rtol=1e-6)
  assert int(new_state.step) == 1 and int(metrics["nonfinite"]) == 0


@pytest.mark.parametrize("loss", ["dsm", "edm", "ddpm", "smld"])
def test_scan_of_k_steps_equals_k_calls(getkey, loss):
  k = 3
  batches = jax.random.normal(getkey(), (k, 8, 2), jnp.float64)
  state, one, _, _ = tiny_setup(dtype=jnp.float64, loss=loss, dropout=0.1)
  _, many, _, _ = tiny_setup(dtype=jnp.float64, loss=loss, dropout=0.1, steps_per_call=k)
  state_many, metrics_many = jax.jit(many)(state, {"x": batches})
  one = jax.jit(one)
  losses = []
  for i in range(k):
    state, metrics = one(state, {"x": batches[i]})
    losses.append(metrics["loss"])
  assert int(state_many.step) == int(state.step) == k
  for got, want in zip(jax.tree.leaves(state_many), jax.tree.leaves(state)):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(metrics_many["loss"], np.mean(losses), rtol=1e-10)


@pytest.mark.parametrize("policy", ["skip", "halt"])
def test_nonfinite_steps_are_not_applied(getkey, policy):
  state, train_step, _, _ = tiny_setup(nonfinite=policy)
  train_step = jax.jit(train_step)
  good, bad = _batch(getkey()), _batch(getkey())
  bad["x"] = bad["x"].at[0, 0].set(jnp.nan)
  state, _ = train_step(state, good)
  before = jax.tree.map(np.asarray, state)
  state, metrics = train_step(state, bad)
  assert int(metrics["nonfinite"]) == 1 and np.isnan(metrics["loss"])
  assert int(state.nonfinite_steps) == 1
  for name in ("params", "ema_params", "opt_state"):
    for got, want in zip(jax.tree.leaves(getattr(state, name)), jax.tree.leaves(getattr(before, name))):
      np.testing.assert_array_equal(got, want)
  # "skip" moves on to the next step; "halt" freezes the state at the failing step.
  assert int(state.step) == (2 if policy == "skip" else 1)
  state, metrics = train_step(state, good)
  if policy == "skip":
    assert int(metrics["nonfinite"]) == 0 and int(state.step) == 3
    assert not np.array_equal(state.params["Dense_0"]["kernel"], before.params["Dense_0"]["kernel"])
  else:  # Frozen: later calls change nothing, the count included.
    assert int(state.step) == 1 and int(state.nonfinite_steps) == 1 and int(metrics["nonfinite"]) == 1
    np.testing.assert_array_equal(state.params["Dense_0"]["kernel"], before.params["Dense_0"]["kernel"])
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(leaf))


def test_nonfinite_gradient_with_finite_loss_is_skipped(getkey):
  # sqrt at 0 has a finite value and an infinite derivative.
  def objective(params, key, x0):
    return jnp.sqrt(jnp.sum(params["w"] ** 2) * 0.0 + jnp.abs(params["w"][0])), None

  optimizer = state_lib.make_optimizer(1e-2, grad_clip=None)
  state = state_lib.TrainState.create({"w": jnp.zeros(2, jnp.float32)}, optimizer, jax.random.key(0))
  train_step = step_lib.make_train_step(objective, optimizer)
  state, metrics = jax.jit(train_step)(state, {"x": jnp.zeros((2, 1), jnp.float32)})
  assert int(metrics["nonfinite"]) == 1 and int(state.nonfinite_steps) == 1
  np.testing.assert_array_equal(state.params["w"], 0.0)


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_overflowing_update_is_skipped(grad_clip):
  # Every gradient entry (1e20) is finite in float32, but its square is not: the global norm overflows (clipping
  # would scale the update to zero) and Adam's second moment would become infinite.
  def objective(params, key, x0):
    return jnp.sum(params["w"]) * 1e20, None

  optimizer = state_lib.make_optimizer(1e-2, grad_clip=grad_clip)
  state = state_lib.TrainState.create({"w": jnp.zeros(2, jnp.float32)}, optimizer, jax.random.key(0))
  before = jax.tree.map(np.asarray, state)
  state, metrics = jax.jit(step_lib.make_train_step(objective, optimizer))(state, {"x": jnp.zeros((2, 1))})
  assert int(metrics["nonfinite"]) == 1 and int(state.nonfinite_steps) == 1 and int(state.step) == 1
  for got, want in zip(jax.tree.leaves((state.params, state.opt_state)), jax.tree.leaves((before.params,
                                                                                          before.opt_state))):
    np.testing.assert_array_equal(got, want)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state))


def test_halt_counts_only_new_nonfinite_steps(getkey):
  # A run that skipped a step under "skip" and continues under "halt" halts at its next non-finite step only.
  state, skip_step, optimizer, objective = tiny_setup(nonfinite="skip")
  bad = _batch(getkey())
  bad["x"] = bad["x"].at[0, 0].set(jnp.inf)
  state, _ = jax.jit(skip_step)(state, bad)
  assert int(state.nonfinite_steps) == 1
  halt_step = jax.jit(step_lib.make_train_step(objective, optimizer, ema_rate=0.9, nonfinite="halt",
                                               skipped_before=1))
  state, metrics = halt_step(state, _batch(getkey()))
  assert int(metrics["nonfinite"]) == 0 and int(state.step) == 2
  state, metrics = halt_step(state, bad)
  assert int(metrics["nonfinite"]) == 1 and int(state.step) == 2 and int(state.nonfinite_steps) == 2
  state, metrics = halt_step(state, _batch(getkey()))
  assert int(state.step) == 2 and int(state.nonfinite_steps) == 2


def test_no_recompilation_and_donation(getkey):
  traces = []
  state, train_step, _, _ = tiny_setup()

  def counted(state, batch):
    traces.append(None)
    return train_step(state, batch)

  jitted = jax.jit(counted, donate_argnums=0)
  for _ in range(3):
    old = state
    state, metrics = jitted(state, _batch(getkey()))
    assert old.params["Dense_0"]["kernel"].is_deleted()
  jax.block_until_ready(metrics)
  assert len(traces) == 1 and jitted._cache_size() == 1


def test_mixed_precision_keeps_float32_params(getkey):
  state, train_step, _, _ = tiny_setup(compute_dtype=jnp.bfloat16)
  state, metrics = jax.jit(train_step)(state, _batch(getkey()))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim)
  assert np.isfinite(metrics["loss"]) and metrics["loss"].dtype == jnp.float32
  # The forward pass really runs in bfloat16: the Dense kernels the network sees are bfloat16.
  seen = []

  def apply(variables, x, c, **kwargs):
    seen.extend(jax.tree.leaves(variables))
    return TinyNet().apply(variables, x, c, **kwargs)

  network = step_lib.make_network(apply, train=False, compute_dtype=jnp.bfloat16)
  out = network(state.params, jnp.ones((2, 2), jnp.float32), jnp.ones((2,), jnp.float32))
  assert out.dtype == jnp.float32 and all(leaf.dtype == jnp.bfloat16 for leaf in seen)


def test_learning_rate_metric(getkey):
  state, _, optimizer, objective = tiny_setup()
  rate = state_lib.learning_rate_schedule(1e-2, warmup_steps=3)
  train_step = jax.jit(step_lib.make_train_step(objective, optimizer, learning_rate_fn=rate))
  for expected in (1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2):
    state, metrics = train_step(state, _batch(getkey()))
    np.testing.assert_allclose(metrics["learning_rate"], expected, rtol=1e-6)


def test_objective_errors():
  apply = TinyNet().apply
  with pytest.raises(ValueError, match="loss='ddpm' needs a DDPMChain, got VPSDE"):
    step_lib.make_objective(apply, sf.VPSDE(), loss="ddpm")
  with pytest.raises(ValueError, match="continuous-time loss and needs an SDE"):
    step_lib.make_objective(apply, sf.DDPMChain(), parameterization=sf.EpsilonParameterization())
  with pytest.raises(ValueError, match="needs a parameterization"):
    step_lib.make_objective(apply, sf.VPSDE())
  with pytest.raises(ValueError, match="loss must be one of"):
    step_lib.make_objective(apply, sf.VPSDE(), loss="l2")


def test_train_step_errors():
  objective = lambda p, k, x: (jnp.sum(p), None)  # noqa: E731
  tx = state_lib.make_optimizer()
  with pytest.raises(ValueError, match="nonfinite must be one of"):
    step_lib.make_train_step(objective, tx, nonfinite="ignore")
  with pytest.raises(ValueError, match="steps_per_call must be an int >= 1"):
    step_lib.make_train_step(objective, tx, steps_per_call=0)
  with pytest.raises(ValueError, match=r"ema_rate must lie in \[0, 1\)"):
    step_lib.make_train_step(objective, tx, ema_rate=1.0)
  with pytest.raises(ValueError, match="skipped_before must be an int >= 0"):
    step_lib.make_train_step(objective, tx, nonfinite="halt", skipped_before=-1)
  state, train_step, _, _ = tiny_setup(steps_per_call=2)
  with pytest.raises(ValueError, match=r"batch\['x'\] must have shape \[2, B, \*D\]"):
    train_step(state, {"x": jnp.zeros((3, 8, 2), jnp.float32)})
