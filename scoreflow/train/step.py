r"""One pure training step: loss, gradients, optimizer update, EMA, and a guard against non-finite values.

:func:`make_objective` turns a network into `objective(params, key, x0, labels=None) -> (loss, LossAux)` using the
losses of :mod:`scoreflow.losses` and :func:`scoreflow.make_score_fn`; :func:`make_train_step` turns an objective and
an optax optimizer into `train_step(state, batch) -> (state, metrics)`, a pure function that
:func:`scoreflow.train.sharding.jit_train_step` compiles over a device mesh with the state donated.

Labels. A class-conditional score network (`num_classes = C > 0`) is trained on the batch labels, each replaced by
the null class `C` with probability `label_dropout`: classifier-free guidance training (Ho & Salimans 2022), which
teaches one network both :math:`s(x, t \mid y)` and the unconditional :math:`s(x, t) = s(x, t \mid C)`. A
noise-conditional classifier (`loss="classifier"`) is trained on them with :func:`scoreflow.noisy_classifier_loss`.

A step whose loss, gradient norm or resulting parameters and optimizer state are not finite is never applied:
with `nonfinite="skip"` the parameters, EMA and optimizer state stay as they were, the step counter advances (the
next step sees fresh data and randomness) and `state.nonfinite_steps` counts it; with `nonfinite="halt"` the
state freezes at the failing step and the training loop raises. Either way no NaN or infinity reaches the
parameters, the optimizer's moments or a checkpoint.
"""

from __future__ import annotations

from typing import Callable, Literal

import jax
import jax.numpy as jnp
import optax

from scoreflow.losses import ddpm_loss, dsm_loss, edm_loss, noisy_classifier_loss, smld_loss
from scoreflow.parameterization import AbstractParameterization, make_logits_fn, make_score_fn
from scoreflow.sde import AbstractSDE
from scoreflow.train.state import TrainState, ema_decay, update_ema

LossName = Literal["dsm", "edm", "ddpm", "smld", "classifier"]
NonFinitePolicy = Literal["skip", "halt"]
# apply_fn(variables, x [B, *D], cond [B], train=bool, rngs={"dropout": key}) -> [B, *D]
ApplyFn = Callable[..., jax.Array]
Objective = Callable[..., tuple]  # objective(params, key, x0 [B, *D], labels=None [B]) -> (loss, LossAux)

LOSSES = ("dsm", "edm", "ddpm", "smld", "classifier")
NONFINITE_POLICIES = ("skip", "halt")


def cast_floating(tree, dtype):
  """Casts the floating leaves of `tree` to `dtype` (integer leaves are left alone); `dtype=None` is a no-op."""
  if dtype is None:
    return tree
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def make_network(apply_fn: ApplyFn, *, train: bool, dropout_key=None, compute_dtype=None):
  """`network(params, x, cond, label=None) -> [B, *D]`: a Flax `apply` with fixed train mode and dropout key.

  `label` (int `[B]`, for a class-conditional network) is passed on as `apply_fn(..., label=label)` only when it is
  not None, so networks without a `label` argument work unchanged.

  With a `compute_dtype` (mixed precision, e.g. `jnp.bfloat16`), the parameters and `x` are cast to it for
  the forward pass while the caller keeps `params` in their own (float32) dtype, so gradients and updates stay in
  full precision; the conditioning stays in its own dtype (a time scaled to [0, 999] has only about three
  significant digits in bfloat16) and the output is cast back to the dtype of `x`.
  """
  rngs = {"dropout": dropout_key} if dropout_key is not None else None

  def network(params, x, cond, label=None):
    extra = {} if label is None else {"label": label}
    out = apply_fn({"params": cast_floating(params, compute_dtype)}, cast_floating(x, compute_dtype), cond,
                   train=train, rngs=rngs, **extra)
    return out.astype(x.dtype)

  return network


def drop_labels(key, labels, null_label: int, rate: float):
  r"""Classifier-free guidance's label dropout (Ho & Salimans 2022): each label independently becomes
  `null_label` with probability `rate`, :math:`\tilde y_b = \varnothing` if :math:`u_b < p` else :math:`y_b`,
  :math:`u_b \sim U[0, 1)`. `labels: [B]` int -> `[B]`, same dtype; `rate` 0 returns `labels`."""
  if rate == 0:
    return labels
  drop = jax.random.bernoulli(key, rate, labels.shape)
  return jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)


def make_objective(apply_fn: ApplyFn, process, *, parameterization: AbstractParameterization | None = None,
                   loss: LossName = "dsm", compute_dtype=None, num_classes: int = 0, label_dropout: float = 0.0,
                   **loss_kwargs) -> Objective:
  r"""The training objective `objective(params, key, x0 [B, *D], labels=None) -> (scalar loss, LossAux)`.

  * `loss="dsm"` or `"edm"`: `process` is a continuous SDE; the network enters through
    `make_score_fn(network, params, process, parameterization)` and the loss is :func:`scoreflow.dsm_loss` or
    :func:`scoreflow.edm_loss` (`loss_kwargs` go to it: `weighting`, `importance_sampling`, `reduce_mean`,
    `eps`, `t_sampling`, ...).
  * `loss="ddpm"`: `process` is a :class:`~scoreflow.DDPMChain`; the network predicts the noise from
    `(x_i, i)` with the integer level `i` as a float conditioning (Ho et al. 2020) in :func:`scoreflow.ddpm_loss`.
  * `loss="smld"`: `process` is a :class:`~scoreflow.SMLDChain`; the network predicts the score from
    `(x_i, \sigma_i)` in :func:`scoreflow.smld_loss` (NCSN's noise-conditional score network).
  * `loss="classifier"`: `process` is a continuous SDE and the network a noise-conditional classifier (logits
    `[B, C]`) that sees `parameterization.network_inputs`; the loss is :func:`scoreflow.noisy_classifier_loss`
    of `labels` (required) and reports `aux.correct`.

  With `num_classes = C > 0` the score network is class-conditional: `labels` (int `[B]` in `0 .. C - 1`) are
  required, each is replaced by the null class `C` with probability `label_dropout` (:func:`drop_labels`), and the
  network is called with `label=`. With `num_classes = 0` passing labels is an error for the score losses.

  Dropout (and label dropout, from a key split off first only when `label_dropout > 0`, so unconditional runs draw
  exactly as before) draws its randomness from `key`, so the objective is a deterministic function of its
  arguments.

  Args:
    apply_fn: a Flax Linen `apply`: `apply_fn({"params": p}, x, cond, train=True, rngs={"dropout": k})`.
    process: an SDE or a discrete chain, matching `loss`.
    parameterization: what the network predicts (continuous losses only; required for them).
    loss: one of `"dsm"`, `"edm"`, `"ddpm"`, `"smld"`, `"classifier"`.
    compute_dtype: forward-pass dtype for mixed precision (see :func:`make_network`), or None.
    num_classes: the classes of a class-conditional score network (0: unconditional); unused by the classifier.
    label_dropout: probability in `[0, 1)` of training a label as the null class (needs `num_classes > 0`).
    **loss_kwargs: keyword arguments of the loss.

  Raises:
    ValueError: an unknown loss, a loss that does not fit the process, a bad `num_classes` or `label_dropout`;
      when called, missing labels (conditional network, classifier), labels for an unconditional network, or
      labels that are not int `[B]`.
  """
  if loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}.")
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
    raise ValueError(f"num_classes must be an int >= 0 (0: an unconditional network), got {num_classes!r}.")
  if isinstance(label_dropout, bool) or not isinstance(label_dropout, (int, float)) or not 0 <= label_dropout < 1:
    raise ValueError(f"label_dropout must be a probability in [0, 1), got {label_dropout!r}.")
  if label_dropout > 0 and (num_classes == 0 or loss == "classifier"):
    raise ValueError(f"label_dropout={label_dropout} replaces labels by the null class of a class-conditional score "
                     "network and needs num_classes > 0 (and a score loss, not 'classifier'); set label_dropout=0.")
  if loss in ("dsm", "edm", "classifier"):
    if not isinstance(process, AbstractSDE):
      raise ValueError(f"loss={loss!r} is a continuous-time loss and needs an SDE (VPSDE, SubVPSDE, VESDE, ...), "
                       f"got {type(process).__name__}; use loss='ddpm' for a DDPMChain or 'smld' for an SMLDChain.")
    if parameterization is None:
      raise ValueError(f"loss={loss!r} needs a parameterization (e.g. EpsilonParameterization()), got None.")
  elif getattr(process, "chain_loss", None) != loss:
    chain = {"ddpm": "DDPMChain", "smld": "SMLDChain"}[loss]
    raise ValueError(f"loss={loss!r} needs a {chain}, got {type(process).__name__}.")
  loss_fn = {"dsm": dsm_loss, "edm": edm_loss, "ddpm": ddpm_loss, "smld": smld_loss}.get(loss)
  conditional = num_classes > 0 and loss != "classifier"

  def checked_labels(labels, x0):
    if labels is None:
      if loss == "classifier":
        raise ValueError("objective: loss='classifier' trains on the batch labels; pass labels, int [B].")
      if conditional:
        raise ValueError(f"objective: the network is class-conditional (num_classes={num_classes}) and needs labels, "
                         "int [B]; pass the batch's labels (the train step does with use_labels=True).")
      return None
    if not (conditional or loss == "classifier"):
      raise ValueError("objective: got labels, but the network is unconditional (num_classes=0); pass labels=None, or "
                       "build a class-conditional network (num_classes > 0).")
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer) or labels.shape != x0.shape[:1]:
      raise ValueError(f"objective: labels must be integers of shape [B] = {x0.shape[:1]}, got dtype {labels.dtype} "
                       f"and shape {labels.shape}.")
    return labels

  def objective(params, key, x0, labels=None):
    labels = checked_labels(labels, x0)
    if conditional and label_dropout > 0:
      key, key_labels = jax.random.split(key)
      labels = drop_labels(key_labels, labels, num_classes, label_dropout)
    key_loss, key_dropout = jax.random.split(key)
    network = make_network(apply_fn, train=True, dropout_key=key_dropout, compute_dtype=compute_dtype)
    if loss == "classifier":
      logits_fn = make_logits_fn(network, params, process, parameterization)
      return noisy_classifier_loss(key_loss, x0, labels, logits_fn, process, **loss_kwargs)
    label = labels if conditional else None
    if loss in ("dsm", "edm"):
      model_fn = make_score_fn(network, params, process, parameterization, label=label)
    elif loss == "ddpm":
      model_fn = lambda x, i: network(params, x, i.astype(x.dtype), label=label)  # noqa: E731
    else:
      model_fn = lambda x, i: network(params, x, process.sigmas[i].astype(x.dtype), label=label)  # noqa: E731
    return loss_fn(key_loss, x0, model_fn, process, **loss_kwargs)

  return objective


def global_norm(tree):
  r""":math:`\sqrt{\sum_i \|g_i\|^2}` over the leaves of `tree`."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


def _all_finite(tree):
  leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def make_train_step(objective: Objective, optimizer: optax.GradientTransformation, *, ema_rate: float = 0.9999,
                    ema_warmup: bool = False, nonfinite: NonFinitePolicy = "skip", steps_per_call: int = 1,
                    learning_rate_fn: Callable | None = None, skipped_before: int = 0, use_labels: bool = False):
  r"""`train_step(state, batch) -> (state, metrics)`: `steps_per_call` optimizer steps in one pure function.

  Each step:

  1. draws its key as `fold_in(state.key, state.step)` and evaluates `objective(params, key, batch["x"])` (with
     `labels=batch["label"]` when `use_labels`) and its gradient;
  2. computes the optax update and the updated parameters and optimizer state; if the loss, the gradient's
     global norm (non-finite if any entry is, or if the norm overflows) and every updated parameter and
     optimizer-state entry are finite, keeps them and updates the EMA
     :math:`\bar\theta \leftarrow \beta_n\bar\theta + (1-\beta_n)\theta` (see
     :func:`~scoreflow.train.state.ema_decay`);
  3. otherwise leaves parameters, EMA and optimizer state unchanged and counts the step in
     `state.nonfinite_steps` (`nonfinite="skip"`: the step counter advances; `"halt"`: the whole state freezes
     at the failing step, so `state.step` tells where it happened, and every later call is a no-op).

  With `steps_per_call > 1` the steps run under one `lax.scan` (one dispatch, one compiled program).

  Args:
    objective: `objective(params, key, x0) -> (loss, aux)` (see :func:`make_objective`).
    optimizer: the optax transformation that built `state.opt_state`.
    ema_rate: EMA decay :math:`\beta` in [0, 1).
    ema_warmup: use :math:`\min(\beta, (1+n)/(10+n))`.
    nonfinite: `"skip"` or `"halt"`.
    steps_per_call: `K >= 1` steps per call.
    learning_rate_fn: if given, `metrics["learning_rate"]` reports the rate of the last applied update
      (the schedule evaluated at the optimizer's update count, which skipped steps do not advance).
    skipped_before: `"halt"` only: the non-finite steps the state already counts (skipped while the run used
      `"skip"`); the state halts when `state.nonfinite_steps` exceeds it.
    use_labels: pass `batch["label"]` to the objective (a class-conditional network or a classifier).

  Returns:
    `train_step(state, batch)` where `batch["x"]` is `[B, *D]` (`K = 1`) or `[K, B, *D]`, and with `use_labels`
    `batch["label"]` is int `[B]` or `[K, B]`; other batch entries are ignored. `metrics` is a dict of scalars:
    `loss` and `grad_norm` (means over the applied steps; NaN if none was), `accuracy` for an objective that reports
    `aux.correct` (a classifier's), `nonfinite` (steps not applied in this call) and, when asked, `learning_rate`.

  Raises:
    ValueError: bad `nonfinite`, `steps_per_call`, `ema_rate` or `skipped_before`.
  """
  if nonfinite not in NONFINITE_POLICIES:
    raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}.")
  if not isinstance(steps_per_call, int) or steps_per_call < 1:
    raise ValueError(f"steps_per_call must be an int >= 1, got {steps_per_call!r}.")
  if not 0 <= ema_rate < 1:
    raise ValueError(f"ema_rate must lie in [0, 1), got {ema_rate!r}.")
  if not isinstance(skipped_before, int) or skipped_before < 0:
    raise ValueError(f"skipped_before must be an int >= 0, got {skipped_before!r}.")

  def one_step(state: TrainState, inputs):
    x0, labels = inputs
    extra = {"labels": labels} if use_labels else {}
    (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params, state.step_key(), x0, **extra)
    grad_norm = global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A finite gradient can still overflow its norm (clipping then silently zeroes the update) or Adam's second
    # moment; checking the results keeps every non-finite value out of the state that checkpoints save.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite((params, opt_state))
    if nonfinite == "halt":
      halted = state.nonfinite_steps > skipped_before
      finite = finite & ~halted

    def apply(state):
      ema = update_ema(state.ema_params, params, ema_decay(state.step, ema_rate, ema_warmup))
      return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)

    def skip(state):
      if nonfinite == "skip":
        return state.replace(step=state.step + 1, nonfinite_steps=state.nonfinite_steps + 1)
      return state.replace(nonfinite_steps=jnp.where(halted, state.nonfinite_steps, state.nonfinite_steps + 1))

    state = jax.lax.cond(finite, apply, skip, state)
    zero = jnp.zeros((), jnp.float32)
    metrics = {"loss": jnp.where(finite, loss.astype(jnp.float32), zero),
               "grad_norm": jnp.where(finite, grad_norm.astype(jnp.float32), zero),
               "applied": finite.astype(jnp.float32)}
    if getattr(aux, "correct", None) is not None:
      metrics["accuracy"] = jnp.where(finite, jnp.mean(aux.correct).astype(jnp.float32), zero)
    return state, metrics

  def train_step(state: TrainState, batch):
    x0 = batch["x"]
    labels = None
    if use_labels:
      if "label" not in batch:
        raise ValueError("train_step: use_labels=True needs batch['label'], int [B] (or [K, B]).")
      labels = batch["label"]
      if labels.shape != x0.shape[:labels.ndim] or labels.ndim != (1 if steps_per_call == 1 else 2):
        raise ValueError(f"train_step: batch['label'] must have shape {x0.shape[:1 if steps_per_call == 1 else 2]} to "
                         f"match batch['x'] of shape {x0.shape}, got {labels.shape}.")
    if steps_per_call == 1:
      state, metrics = one_step(state, (x0, labels))
    else:
      if x0.shape[0] != steps_per_call:
        raise ValueError(f"train_step: with steps_per_call={steps_per_call} batch['x'] must have shape "
                         f"[{steps_per_call}, B, *D], got {x0.shape}.")
      state, metrics = jax.lax.scan(one_step, state, (x0, labels))
      metrics = jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)
    applied = metrics.pop("applied")
    out = {name: jnp.where(applied > 0, total / jnp.maximum(applied, 1), jnp.nan) for name, total in metrics.items()}
    out["nonfinite"] = (steps_per_call - applied).astype(jnp.int32)
    if learning_rate_fn is not None:
      # The rate of the last applied update: the optimizer counts applied updates only.
      num_applied = state.step - (state.nonfinite_steps if nonfinite == "skip" else skipped_before)
      out["learning_rate"] = jnp.asarray(learning_rate_fn(jnp.maximum(num_applied - 1, 0)), jnp.float32)
    return state, out

  return train_step
