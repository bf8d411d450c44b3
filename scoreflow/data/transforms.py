"""Image geometry of the input pipeline (NumPy / PIL, uint8 `[H, W, C]` in and out), and the per-dataset
preprocessing of Song et al. (2021)'s `datasets.py`: CelebA centre-cropped to 140x140 and resized; LSUN resized
by its shorter side and centre-cropped (at 128) or cropped to its largest square and resized with bicubic
resampling; other datasets resized to `image_size` when it differs. Resizing is antialiased and rounds back to
integer levels, so dequantization stays exact.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image

CELEBA_CROP_SIZE = 140
_DEFAULT_IMAGE_SIZE = {"celeb_a": 64, "lsun": 256}
_RESAMPLING = {"bilinear": PIL.Image.Resampling.BILINEAR, "bicubic": PIL.Image.Resampling.BICUBIC}


def centre_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The central `size` x `size` window of `image: [H, W, C]` (top-left at `((H-size)//2, (W-size)//2)`)."""
  height, width = image.shape[:2]
  if height < size or width < size:
    raise ValueError(f"centre_crop: image of shape {image.shape} is smaller than the crop size {size}.")
  top, left = (height - size) // 2, (width - size) // 2
  return image[top:top + size, left:left + size]


def resize(image: np.ndarray, height: int, width: int, resample: str = "bilinear") -> np.ndarray:
  """Resize of uint8 `image: [H, W, C]` to `[height, width, C]` with PIL (antialiased when shrinking).

  Args:
    image: uint8 `[H, W, C]`.
    height, width: the output size; an image already of that size is returned as is.
    resample: `"bilinear"` or `"bicubic"` (the output is rounded and clipped to uint8 levels).
  """
  if resample not in _RESAMPLING:
    raise ValueError(f"resize: resample must be one of {tuple(_RESAMPLING)}, got {resample!r}.")
  if image.shape[:2] == (height, width):
    return image
  if image.dtype != np.uint8:
    raise ValueError(f"resize: expected uint8 pixel levels, got dtype {image.dtype}.")
  channels = image.shape[-1]
  pil_image = PIL.Image.fromarray(image[..., 0] if channels == 1 else image)
  resized = pil_image.resize((width, height), resample=_RESAMPLING[resample])
  return np.asarray(resized).reshape(height, width, channels)


def resize_small(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of `image: [H, W, C]` so that its shorter side is `size`, keeping the aspect ratio.

  The other side is `round(side * size / min(H, W))`, as in Song et al. (2021)'s `resize_small`.
  """
  height, width = image.shape[:2]
  ratio = size / min(height, width)
  return resize(image, int(round(height * ratio)), int(round(width * ratio)))


def crop_resize(image: np.ndarray, size: int) -> np.ndarray:
  """The central `min(H, W)` square of `image: [H, W, C]`, bicubic-resized to `size` x `size`.

  Song et al. (2021)'s `crop_resize` (their LSUN preprocessing at sizes other than 128).
  """
  return resize(centre_crop(image, min(image.shape[:2])), size, size, resample="bicubic")


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Example dict -> `{"image": uint8 [H, W, C], "label": int32 []}`, applying the image operations in order."""

  geometry: tuple[Callable[[np.ndarray], np.ndarray], ...] = ()

  def __call__(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    image = np.asarray(example["image"])
    if image.ndim == 2:
      image = image[..., None]
    for operation in self.geometry:
      image = operation(image)
    return {"image": image, "label": np.int32(example.get("label", 0))}



def preprocessing(name: str, image_size: int | None, image_shape: tuple[int | None, ...]) -> Preprocess:
  """The geometry of Song et al. (2021)'s input pipeline for `name` (see the module docstring).

  `image_shape` is the dataset's image feature shape, `None` where the size varies between images.
  """
  base = name.partition(":")[0].split("/")[0]
  if base == "celeb_a":
    size = image_size or _DEFAULT_IMAGE_SIZE[base]
    return Preprocess((functools.partial(centre_crop, size=CELEBA_CROP_SIZE),
                        functools.partial(resize, height=size, width=size)))
  if base == "lsun":
    size = image_size or _DEFAULT_IMAGE_SIZE[base]
    if size == 128:
      return Preprocess((functools.partial(resize_small, size=size), functools.partial(centre_crop, size=size)))
    return Preprocess((functools.partial(crop_resize, size=size),))
  if image_size is not None:
    return Preprocess((functools.partial(resize, height=image_size, width=image_size),))
  if None in tuple(image_shape)[:2]:
    raise ValueError(f"make_dataset: the images of dataset {name!r} vary in size (feature shape "
                     f"{tuple(image_shape)}) and image_size is None, so batches cannot be stacked; set "
                     "image_size (config: data.image_size) to resize every image to image_size x image_size.")
  return Preprocess()
