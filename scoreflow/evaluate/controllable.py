r"""Controllable generation in evaluation: class-conditional samples per guidance scale, and inverse problems
(inpainting, colorization) on a dataset split, with their grids and metrics.

* :func:`class_labels`, :func:`class_grid`: the labels of a conditional sample set (shard `i` holds the samples
  `i * shard_size, ...`, sample `n` of class `n mod K`) and its picture, one row per class.
* :func:`inverse_problem`: completes the examples of a split batch by batch (:func:`scoreflow.inpaint_sample` or
  :func:`scoreflow.colorize_sample` with the model's score), each batch a resumable unit
  (:func:`~scoreflow.evaluate.units.resumable_unit`) keyed by its index, and returns the completions with the truth.
* :func:`masks`: the inpainting masks by name (1 = observed).
* :func:`inverse_grid`: rows of (observed | mask | completed | truth) or (grey | colorized | truth).
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from scoreflow.evaluate import units

MASKS = ("lower_half", "right_half", "centre", "checkerboard")


def class_labels(start: int, count: int, num_classes: int) -> np.ndarray:
  """`[count]` int32 labels of the samples `start, ..., start + count - 1` of a class-conditional set: `n mod K`."""
  return ((np.arange(count) + start) % num_classes).astype(np.int32)


def class_grid(samples: np.ndarray, num_classes: int, columns: int) -> np.ndarray:
  """`[K * columns, *D]`: the first `columns` samples of every class, class by class (the rows of a grid); each
  class needs at least `columns` samples (`eval.conditional.grid_columns <= samples_per_class` is checked)."""
  labels = class_labels(0, samples.shape[0], num_classes)
  return np.concatenate([samples[labels == label][:columns] for label in range(num_classes)])


def masks(name: str, image_shape: tuple[int, ...]) -> np.ndarray:
  """The inpainting mask `[1, H, W, 1]` (1 = observed, 0 = to generate) that generates the region called `name`
  (:data:`MASKS`: the lower half, the right half, the centre square of half the size, or alternate squares of a
  4 x 4 checkerboard) and observes the rest."""
  height, width = image_shape[:2]
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  if name == "lower_half":
    observed = rows < height // 2
  elif name == "right_half":
    observed = cols < width // 2
  elif name == "centre":
    observed = ~((abs(rows - (height - 1) / 2) < height / 4) & (abs(cols - (width - 1) / 2) < width / 4))
  elif name == "checkerboard":
    observed = ((rows // max(height // 4, 1)) + (cols // max(width // 4, 1))) % 2 == 0
  else:
    raise ValueError(f"unknown mask {name!r}; choose one of {MASKS}.")
  return observed.astype(np.float32)[None, :, :, None]


def inverse_problem(complete: Callable, batches: Iterable[tuple[int, np.ndarray, np.ndarray, int]], directory: str,
                    *, key, num_examples: int, progress_bar: bool = False) -> dict[str, np.ndarray]:
  """Completions of a split, batch by batch, resuming from the batches already written in `directory`.

  Args:
    complete: `complete(key, truth [B, *D]) -> (observed [B, *D], completed [B, *D], nfe)` (jit it).
    batches: `(index, truth, labels, num_valid)`; the last batch may be padded.
    directory: where `batch_<i>.npz` go.
    key: the task's key; batch `i` uses `fold_in(key, i)`.
    num_examples: for the progress bar.
    progress_bar: show a tqdm bar.

  Returns:
    `{"observed", "completed", "truth" [N, *D], "label" [N], "nfe" [N]}` of the valid examples.

  In a multi-process evaluation each process completes its batches (:func:`units.is_assigned`), all wait for one
  another, and each reads the others' batches back, so every process returns the whole result.
  """
  parts, sizes = {}, {}
  bar = units.progress(num_examples, 0, "inverse problem", "example", progress_bar)
  try:
    for index, truth, labels, num_valid in batches:
      sizes[index] = num_valid
      if not units.is_assigned(index):
        continue

      def compute(index=index, truth=truth, labels=labels, num_valid=num_valid):
        observed, completed, nfe = complete(jax.random.fold_in(key, index), truth)
        return {"observed": np.asarray(observed)[:num_valid], "completed": np.asarray(completed)[:num_valid],
                "truth": np.asarray(truth)[:num_valid], "label": np.asarray(labels)[:num_valid],
                "nfe": np.full(num_valid, int(nfe), np.int32)}

      parts[index], _ = units.resumable_unit(_batch_path(directory, index), compute,
                                             fits=lambda part, n=num_valid: part["completed"].shape[0] == n)
      bar.update(num_valid)
  finally:
    bar.close()
  units.gather(f"inverse problem {directory}", None)
  for index, num_valid in sizes.items():  # The other processes' batches.
    if index not in parts:
      parts[index] = units.read_unit(_batch_path(directory, index),
                                     lambda part, n=num_valid: part["completed"].shape[0] == n)
  ordered = [parts[index] for index in sorted(parts)]
  return {name: np.concatenate([part[name] for part in ordered]) for name in ordered[0]}


def _batch_path(directory: str, index: int) -> str:
  return os.path.join(directory, f"batch_{index:05d}.npz")


def inverse_grid(result: dict[str, np.ndarray], count: int, mask: np.ndarray | None) -> tuple[np.ndarray, int]:
  """`(images [count * k, *D], k)`: for each of the first `count` examples, its observation (unobserved pixels
  at the range's middle), the mask (1 white, 0 black; inpainting only), the completion and the truth."""
  observed, completed, truth = (result[name][:count] for name in ("observed", "completed", "truth"))
  columns = [observed]
  if mask is not None:
    low, high = float(np.nanmin(truth)), float(np.nanmax(truth))
    middle = 0.5 * (low + high)
    columns = [np.where(mask > 0, observed, middle), np.broadcast_to(np.where(mask > 0, high, low), truth.shape)]
  columns += [completed, truth]
  return np.stack(columns, axis=1).reshape((-1, *truth.shape[1:])), len(columns)


def grey_of(x) -> jax.Array:
  """The grey image (channel mean) `[B, *S, 1]` of RGB images `[B, *S, 3]`: what colorization observes."""
  return jnp.mean(x, axis=-1, keepdims=True)
