"""Sample sets on disk: `num_samples` draws in resumable shards (`shard_00000.npz`, ...), and reading them back."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import numpy as np

from scoreflow import io
from scoreflow.evaluate import units


@dataclasses.dataclass(frozen=True)
class SampleResult:
  """A sample set on disk (see :func:`generate_samples`)."""

  num_samples: int
  num_shards: int
  shape: tuple[int, ...]  # one sample's shape
  nfe_mean: float  # score evaluations per sample, averaged over shards
  num_failed_shards: int  # shards whose sampler status was not success (e.g. an ODE solve hit max_steps)
  num_nonfinite: int  # samples holding a NaN or infinite value (left out of the quality metrics)
  computed_shards: int
  reused_shards: int
  directory: str

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def shard_path(directory: str, index: int) -> str:
  return os.path.join(directory, f"shard_{index:05d}.npz")


def finite_rows(samples: np.ndarray) -> np.ndarray:
  """`[N]` bool: which of `samples: [N, *D]` hold only finite values."""
  samples = np.asarray(samples)
  return np.all(np.isfinite(samples.reshape(samples.shape[0], -1)), axis=1)


def no_finite_samples(num_samples: int, directory: str) -> ValueError:
  return ValueError(f"all {num_samples} samples in {directory} hold NaN or infinite values; there is nothing to "
                    "score. Check the sampler's settings (see each shard's `status`) and the checkpoint.")


def generate_samples(sample_shard: Callable[[int], tuple[np.ndarray, dict]], directory: str, *, num_samples: int,
                     shard_size: int, progress_bar: bool = False) -> SampleResult:
  """Draws `num_samples` samples in shards of `shard_size`, skipping shards already written in `directory`.

  Shard `i` holds samples `i * shard_size ...` (the last one truncated to `num_samples`) as
  `shard_<i>.npz` with `samples [n, *D]` and the sampler's `nfe`, `num_steps`, `num_rejected_steps`, `status`.
  A shard file that holds fewer samples than now needed (an evaluation asking for more samples than an earlier
  one) is drawn again; the draw is keyed by the shard index, so its first samples are the same. Samples with a
  NaN or infinite value are kept in the shards and counted (`num_nonfinite`).

  In a multi-process evaluation every process calls this: each draws its shards (:func:`units.assigned_units`),
  all wait for one another (:func:`units.gather`), and each reads the others' shards back from the shared
  `directory`; every process returns the same result, the counts summed over the processes.

  Args:
    sample_shard: `sample_shard(i) -> (x [shard_size, *D], info)` with `info` a dict of scalars; it must be
      deterministic in `i` (e.g. keyed by `fold_in(key, i)`).
    directory: the shards' directory (created if needed).
    num_samples, shard_size: how many samples, and how many per call.
    progress_bar: show a tqdm bar (of this process's shards).
  """
  os.makedirs(directory, exist_ok=True)
  num_shards = -(-num_samples // shard_size)

  def needed(index):
    return min(shard_size, num_samples - index * shard_size)

  def fits(shard, index):
    return shard["samples"].shape[0] >= needed(index)

  def summary(shard, index):  # What the result needs of a shard; the samples themselves are not kept.
    return (tuple(shard["samples"].shape[1:]), float(np.mean(shard["nfe"])) if "nfe" in shard else float("nan"),
            int(np.any(shard.get("status", 0) != 0)),
            int(needed(index) - np.sum(finite_rows(shard["samples"][:needed(index)]))))

  mine = units.assigned_units(num_shards)
  summaries, computed = {}, 0
  bar = units.progress(sum(needed(index) for index in mine), 0, "samples", "sample", progress_bar)
  try:
    for index in mine:

      def draw(index=index):
        x, info = sample_shard(index)
        x = np.asarray(x)
        if x.shape[0] != shard_size:
          raise ValueError(f"generate_samples: sample_shard({index}) returned {x.shape[0]} samples, expected "
                           f"shard_size={shard_size}.")
        return {"samples": x[:needed(index)], **{name: np.asarray(value) for name, value in info.items()}}

      shard, was_computed = units.resumable_unit(shard_path(directory, index), draw,
                                                 fits=lambda shard, index=index: fits(shard, index))
      computed += was_computed
      summaries[index] = summary(shard, index)
      bar.update(needed(index))
  finally:
    bar.close()
  computed = sum(units.gather(f"samples {directory}", computed))
  for index in range(num_shards):  # The other processes' shards.
    if index not in summaries:
      summaries[index] = summary(units.read_unit(shard_path(directory, index),
                                                 lambda shard, index=index: fits(shard, index)), index)
  shapes, nfe, failed, nonfinite = zip(*(summaries[index] for index in range(num_shards)))
  return SampleResult(num_samples=num_samples, num_shards=num_shards, shape=shapes[-1], nfe_mean=float(np.mean(nfe)),
                      num_failed_shards=sum(failed), num_nonfinite=sum(nonfinite), computed_shards=computed,
                      reused_shards=num_shards - computed, directory=directory)


def load_shard(directory: str, index: int) -> np.ndarray:
  """The `samples` of shard `index` in `directory`."""
  shard = io.load_npz(shard_path(directory, index))
  if shard is None:
    raise FileNotFoundError(f"{shard_path(directory, index)} is missing or unreadable; run the sampling again.")
  return shard["samples"]


def load_samples(directory: str, num_samples: int, shard_size: int) -> np.ndarray:
  """The first `num_samples` samples of the shards in `directory`, `[num_samples, *D]`."""
  parts = [load_shard(directory, index)[:num_samples - index * shard_size]
           for index in range(-(-num_samples // shard_size))]
  return np.concatenate(parts)
