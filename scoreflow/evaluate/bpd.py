r"""Bits per dimension of a dataset split under the probability-flow ODE, batch by batch and resumable.

:func:`make_bpd_fn` compiles one batch's dequantization, likelihood and bits/dim; :func:`evaluate_bpd` runs it
over a stream of batches, writing each batch's results as a resumable unit (:mod:`scoreflow.evaluate.units`)
and reducing them with :func:`scoreflow.likelihood.summarize_bits_per_dim`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from scoreflow import io
from scoreflow.evaluate import units
from scoreflow.likelihood import bits_per_dim, dequantize, log_likelihood, summarize_bits_per_dim
from scoreflow.parameterization import make_score_fn
from scoreflow.train.step import make_network


@dataclasses.dataclass(frozen=True)
class BpdResult:
  """Bits/dim of a dataset split (see :func:`evaluate_bpd`)."""

  mean: float  # mean over examples and repeats; examples with a failed solve are left out (and counted)
  stderr: float  # standard error of `mean` over examples: std of the per-example means / sqrt(N)
  dequantization_stderr: float  # std of the R repeat means / sqrt(R) (NaN for R = 1)
  num_examples: int
  num_repeats: int
  nfe_mean: float
  nfe_min: int
  nfe_max: int
  num_failed: int  # solves whose status was not success
  computed_batches: int  # batches computed by this call
  reused_batches: int  # batches found finished on disk
  directory: str
  per_example_file: str

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def bpd_batches(batches: Iterable[np.ndarray], num_examples: int) -> Iterator[tuple[int, np.ndarray, int]]:
  """`(batch_index, values [B, *D], num_valid)` for a stream of equal-size batches covering `num_examples`.

  The stream must hold at least `ceil(num_examples / B)` batches; the last one's examples past `num_examples`
  are padding (computed with the rest, so that every batch has one shape and compiles once, then dropped).
  """
  covered = 0
  for index, values in enumerate(batches):
    if covered >= num_examples:
      return
    values = np.asarray(values)
    num_valid = min(values.shape[0], num_examples - covered)
    covered += num_valid
    yield index, values, num_valid
  if covered < num_examples:
    raise ValueError(f"bpd_batches: the stream ended after {covered} of {num_examples} examples.")


def evaluate_bpd(bpd_fn: Callable, batches: Iterable[tuple[int, np.ndarray, int]], directory: str, *, key,
                 num_examples: int, num_repeats: int = 1, progress_bar: bool = False) -> BpdResult:
  r"""Bits/dim of a dataset, batch by batch, resuming from the batches already written in `directory`.

  For batch `i` and repeat `r` it calls `bpd_fn(fold_in(fold_in(key, i), r), values)` (the key scheme of
  :func:`scoreflow.likelihood.evaluate_bits_per_dim`, so both give the same numbers on the same batches) and
  writes `batch_<i>.npz` atomically; batches whose file exists are not recomputed. At the end it writes
  `per_example.npz`: `index [N]`, `bpd [N]` (each example's mean over repeats), `bpd_draws [R, N]`,
  `logp [R, N]` (nats, model space), `nfe [R, N]` and `status [R, N]`.

  In a multi-process evaluation every process calls this with the same batches: each computes the batches
  :func:`units.is_assigned` gives it, all wait for one another (:func:`units.gather`), each reads the others'
  batch files back from the shared `directory`, and process 0 writes `per_example.npz`; every process returns
  the same result, the batch counts summed over the processes.

  Args:
    bpd_fn: `bpd_fn(key, values [B, *D]) -> (bpd [B], logp [B], nfe [B], status [B])`, e.g. from
      :func:`make_bpd_fn` (jit it: every batch has the same shape).
    batches: `(batch_index, values, num_valid)` triples, e.g. from :func:`bpd_batches`.
    directory: where the batch files and results go (created if needed).
    key: PRNG key.
    num_examples: `N`, for the progress bar and the check that the batches cover it.
    num_repeats: `R`, dequantization (and probe) draws per example.
    progress_bar: show a tqdm bar (of this process's batches).

  Returns:
    A :class:`BpdResult`.
  """
  os.makedirs(directory, exist_ok=True)

  def batch_path(index):
    return os.path.join(directory, f"batch_{index:05d}.npz")

  def fits(part, num_valid):
    return part["bpd"].shape == (num_repeats, num_valid)

  parts, seen, computed = {}, [], 0
  bar = units.progress(None, 0, "bits/dim", "example", progress_bar)
  try:
    for index, values, num_valid in batches:
      seen.append((index, num_valid))
      if not units.is_assigned(index):
        continue
      if bar.total is None:  # This process's share of the examples, now that the batch size is known.
        size = values.shape[0]
        bar.total = sum(min(size, num_examples - i * size) for i in range(-(-num_examples // size))
                        if units.is_assigned(i))

      def compute(index=index, values=values, num_valid=num_valid):
        draws = []
        for repeat in range(num_repeats):
          draw_key = jax.random.fold_in(jax.random.fold_in(key, index), repeat)
          draws.append([np.asarray(a) for a in bpd_fn(draw_key, values)])
        part = {name: np.stack([d[k][:num_valid] for d in draws])
                for k, name in enumerate(("bpd", "logp", "nfe", "status"))}
        part["index"] = np.arange(num_valid, dtype=np.int64) + index * values.shape[0]
        return part

      parts[index], was_computed = units.resumable_unit(batch_path(index), compute,
                                                        fits=lambda part, n=num_valid: fits(part, n))
      computed += was_computed
      bar.update(num_valid)
  finally:
    bar.close()
  computed = sum(units.gather(f"bits/dim {directory}", computed))
  if not seen:
    raise ValueError("evaluate_bpd: batches yielded no data.")
  for index, num_valid in seen:  # The other processes' batches.
    if index not in parts:
      parts[index] = units.read_unit(batch_path(index), lambda part, n=num_valid: fits(part, n))
  parts = [parts[index] for index, _ in seen]
  table = {name: np.concatenate([p[name] for p in parts], axis=-1) for name in ("bpd", "logp", "nfe", "status")}
  index = np.concatenate([p["index"] for p in parts])
  if index.size != num_examples:
    raise ValueError(f"evaluate_bpd: the batches held {index.size} examples, expected num_examples={num_examples}.")
  estimate = summarize_bits_per_dim(table["bpd"])
  per_example_file = os.path.join(directory, "per_example.npz")
  if units.is_main_process():
    io.atomic_savez(per_example_file, {"index": index, "bpd": estimate.example_means, "bpd_draws": table["bpd"],
                                       "logp": table["logp"], "nfe": table["nfe"], "status": table["status"]})
  nfe = table["nfe"]
  return BpdResult(mean=estimate.mean, stderr=estimate.stderr, dequantization_stderr=estimate.dequantization_stderr,
                   num_examples=int(index.size), num_repeats=num_repeats, nfe_mean=float(nfe.mean()),
                   nfe_min=int(nfe.min()), nfe_max=int(nfe.max()), num_failed=int(np.sum(table["status"] != 0)),
                   computed_batches=computed, reused_batches=len(parts) - computed, directory=directory,
                   per_example_file=per_example_file)


def make_bpd_fn(sde, score_fn_of_params: Callable, *, num_levels: int | None, scale=2.0, shift=-1.0,
                dtype=jnp.float32, likelihood_kwargs: dict[str, Any]):
  r"""`bpd_fn(params, key, values) -> (bpd [B], logp [B], nfe [B], status [B])`, jitted.

  With `num_levels` (discrete data: integer levels `values [B, *D]` in `0 .. L-1`), the levels are dequantized
  to :math:`x = a(v + u)/L + b` (`a = scale`, `b = shift`) and :math:`\mathrm{bpd} = -(\log p(x) + D\log a
  - D\log L)/(D\ln 2)` (:func:`~scoreflow.likelihood.bits_per_dim`). With `num_levels=None` (continuous data
  already in model space) :math:`\mathrm{bpd} = -\log p(x)/(D \ln 2)`.

  Args:
    sde: the process whose probability-flow ODE defines the likelihood.
    score_fn_of_params: `params -> score_fn(x [B, *D], t [B])`.
    num_levels, scale, shift: the dequantization (see above).
    dtype: floating dtype of the model's inputs.
    likelihood_kwargs: :func:`scoreflow.likelihood.log_likelihood` options.
  """
  kwargs = dict(likelihood_kwargs)

  @jax.jit
  def bpd_fn(params, key, values):
    key_dequantize, key_likelihood = jax.random.split(key)
    if num_levels is None:
      x = jnp.asarray(values, dtype)
    else:
      x = dequantize(key_dequantize, values, num_levels=num_levels, scale=scale, shift=shift, dtype=dtype)
    logp, _, info = log_likelihood(key_likelihood, sde, score_fn_of_params(params), x, **kwargs)
    if num_levels is None:
      bpd = -logp / (math.prod(x.shape[1:]) * math.log(2.0))
    else:
      bpd = bits_per_dim(logp, x.shape[1:], num_levels=num_levels, scale=scale)
    return bpd, logp, info.nfe, info.status

  return bpd_fn


@functools.lru_cache(maxsize=8)
def model_bpd_fn(model, sde, parameterization, levels: tuple, likelihood_items: tuple):
  """:func:`make_bpd_fn` for a Flax model, memoised: later evaluations in the process skip tracing the solver."""
  network = make_network(model.apply, train=False)

  def score_fn_of(params):
    return make_score_fn(network, params, sde, parameterization)

  return make_bpd_fn(sde, score_fn_of, **dict(levels), likelihood_kwargs=dict(likelihood_items))


@functools.lru_cache(maxsize=8)
def model_bound_fn(model, process, sde, parameterization, levels: tuple, bound_items: tuple):
  r"""`bound_fn(params, key, values) -> (bpd [B], logp [B], nfe [B], status [B])`, jitted and memoised: the
  variational bound of :mod:`scoreflow.bounds` in the format of :func:`make_bpd_fn` (`logp` NaN, `status` 0).

  * A continuous SDE: :func:`~scoreflow.continuous_bound_bpd` (score-flow bound, uniform dequantization by the
    dequantized scaler onto the data's range, Gaussian decoder for `[0, eps]`); `nfe` counts the network calls.
    Continuous (toy) data: :func:`~scoreflow.continuous_nll_bound` over :math:`D\ln 2`.
  * The DDPM chain: :func:`~scoreflow.ddpm_vlb_bpd` (Ho et al. 2020, Eq. 5 with the discretized decoder on the
    levels scaler's bins).

  Args:
    model, process, sde, parameterization: the experiment's network, training process, sampling SDE and
      parameterization.
    levels: `(("num_levels", L), ("scale", s), ("shift", b), ("dequantized_scale", s'))` of discrete data (the
      levels scaler and its dequantized counterpart), or `(("num_levels", None),)` for continuous data.
    bound_items: the sorted items of the `eval.bound` settings.
  """
  from scoreflow import bounds  # pylint: disable=g-import-not-at-top

  levels, settings = dict(levels), dict(bound_items)
  network = make_network(model.apply, train=False)
  num_samples, decoder = settings["num_samples"], settings["decoder"]
  if process.chain_loss == "ddpm":
    if levels["num_levels"] is None:
      raise ValueError("the DDPM bound needs discrete data (integer levels); the toy densities are continuous.")
    estimator = settings["ddpm_estimator"]
    calls = process.num_steps if estimator == "exact" else 3

    def bound(params, key, values):
      eps_fn = lambda x, i: network(params, x, i.astype(x.dtype))  # noqa: E731 (the level as conditioning)
      return bounds.ddpm_vlb_bpd(key, values, eps_fn, process, estimator=estimator,
                                 variance=settings["ddpm_variance"], clip_x0=settings["ddpm_clip_x0"],
                                 scale=levels["scale"], shift=levels["shift"], num_levels=levels["num_levels"])
  elif process.chain_loss is not None:
    raise ValueError(f"no variational bound for the {process.chain_loss.upper()} chain; evaluate it with 'bpd' "
                     "(the probability-flow ODE of the VE SDE it discretizes).")
  else:
    calls = num_samples * (2 if decoder else 1)
    options = dict(eps=settings["eps"], importance_sampling=settings["importance_sampling"], decoder=decoder)

    def bound(params, key, values):
      score_fn = make_score_fn(network, params, sde, parameterization)
      if levels["num_levels"] is None:
        nats = jnp.mean(jnp.stack([bounds.continuous_nll_bound(k, values, score_fn, sde, **options)
                                   for k in jax.random.split(key, num_samples)]), axis=0)
        return nats / (math.prod(values.shape[1:]) * math.log(2.0))
      return bounds.continuous_bound_bpd(key, values, score_fn, sde, scale=levels["dequantized_scale"],
                                         shift=levels["shift"], num_levels=levels["num_levels"],
                                         num_samples=num_samples, **options)

  @jax.jit
  def bound_fn(params, key, values):
    bpd = bound(params, key, values)
    batch = bpd.shape[:1]
    return (bpd, jnp.full(batch, jnp.nan, bpd.dtype), jnp.full(batch, calls, jnp.int32),
            jnp.where(jnp.isfinite(bpd), 0, 1).astype(jnp.int32))

  return bound_fn
