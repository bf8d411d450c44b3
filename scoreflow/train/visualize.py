"""Pictures of a training run: sample grids and 2-D scatter plots drawn with Pillow, and the loss curve plotted with
matplotlib (labelled axes and ticks)."""

from __future__ import annotations

import math
import os

import numpy as np
import PIL.Image
import PIL.ImageDraw

from scoreflow import io


def image_grid(images: np.ndarray, *, columns: int | None = None, padding: int | None = None,
               min_size: int = 64) -> np.ndarray:
  """Tiles uint8 images `[N, H, W, C]` (C = 1 or 3) into one `[rows * H', columns * W', 3]` image.

  Small images are enlarged by an integer factor (nearest neighbour) to at least `min_size` pixels, so 8x8
  digits stay visible; tiles are separated by `padding` pixels of mid grey (default: an eighth of a tile).
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
    raise ValueError(f"image_grid: expected uint8 images [N, H, W, 1 or 3], got {images.dtype} {images.shape}.")
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  zoom = max(1, math.ceil(min_size / max(images.shape[1:3])))
  images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
  n, h, w, _ = images.shape
  padding = max(1, max(h, w) // 8) if padding is None else padding
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, 3), 128, np.uint8)
  for i, image in enumerate(images):
    r, c = divmod(i, columns)
    top, left = padding + r * (h + padding), padding + c * (w + padding)
    grid[top:top + h, left:left + w] = image
  return grid


def scatter_image(points: np.ndarray, *, size: int = 512, bound: float | None = None) -> np.ndarray:
  """A `[size, size, 3]` uint8 scatter plot of 2-D points `[N, 2]` over `[-bound, bound]^2`."""
  points = np.asarray(points, np.float64)
  if points.ndim != 2 or points.shape[1] != 2:
    raise ValueError(f"scatter_image: expected points [N, 2], got shape {points.shape}.")
  finite = points[np.all(np.isfinite(points), axis=1)]
  if bound is None:
    bound = float(np.quantile(np.abs(finite), 0.995)) * 1.1 if finite.size else 1.0
    bound = max(bound, 1e-6)
  image = PIL.Image.new("RGB", (size, size), "white")
  draw = PIL.ImageDraw.Draw(image)
  centre = size / 2
  draw.line([(0, centre), (size, centre)], fill=(220, 220, 220))
  draw.line([(centre, 0), (centre, size)], fill=(220, 220, 220))
  pixels = (finite / bound * 0.5 + 0.5) * (size - 1)
  for x, y in pixels:
    if 0 <= x < size and 0 <= y < size:
      draw.point((x, size - 1 - y), fill=(31, 119, 180))
  return np.asarray(image)


def sample_picture(samples: np.ndarray, scaler=None) -> np.ndarray:
  """The picture of a batch of samples: an image grid for `[N, H, W, C]`, a scatter plot for `[N, 2]`."""
  samples = np.asarray(samples)
  if samples.ndim == 4:
    if scaler is not None:
      images = np.asarray(scaler.to_uint8(samples))
    else:  # Assume the centred [-1, 1] range.
      images = np.clip(np.round((samples + 1) * 127.5), 0, 255).astype(np.uint8)
    return image_grid(images)
  if samples.ndim == 2 and samples.shape[1] == 2:
    return scatter_image(samples)
  raise ValueError(f"sample_picture: cannot draw samples of shape {samples.shape}; expected images [N, H, W, C] or "
                   "2-D points [N, 2].")


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
  """Writes a uint8 image (a grid or scatter plot) as PNG, atomically."""
  io.write_png(path, array)


def loss_curve_figure(steps, losses, *, log_scale: bool = True):
  """A matplotlib figure (Agg, no display needed) of the training loss against the step: labelled axes with
  ticks, a log-scaled loss axis by default, the step axis from 0. Non-finite losses (and non-positive ones on a
  log axis) are left out."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top (Figure needs no pyplot or display)

  steps, losses = np.asarray(steps, np.float64), np.asarray(losses, np.float64)
  keep = np.isfinite(losses) & (losses > 0 if log_scale else True)
  figure = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
  axes = figure.add_subplot()
  axes.plot(steps[keep], losses[keep], color="tab:blue", linewidth=1.2)
  if log_scale:
    axes.set_yscale("log")
  axes.set_xlim(left=0)
  axes.set_xlabel("training step")
  axes.set_ylabel("loss" + (" (log scale)" if log_scale else ""))
  axes.set_title("Training loss")
  axes.grid(True, which="both", alpha=0.3)
  return figure


def save_loss_curve(path: str | os.PathLike, steps, losses, *, log_scale: bool = True) -> None:
  """Writes :func:`loss_curve_figure` as a PNG, atomically."""
  figure = loss_curve_figure(steps, losses, log_scale=log_scale)
  io.atomic_write(path, lambda file: figure.savefig(file, format="png"))
