r"""The Inception-v3 network of FID, ported exactly from pytorch-fid to Flax Linen.

FID (Heusel et al., 2017), the Inception Score (Salimans et al., 2016) and KID (Bińkowski et al., 2018) are
defined through one particular network: the TensorFlow graph `inception-2015-12-05` (`pool_3:0` for the
2048-d features, `softmax/logits` over 1008 classes). pytorch-fid (Seitzer, 2020) reproduces that graph in
PyTorch as torchvision's Inception-v3 with four patches, and ships its weights converted from TensorFlow as
`pt_inception-2015-12-05-6726825d.pth`. :class:`FIDInceptionV3` is the same network in Flax:

* BasicConv2d = convolution without bias, batch norm in inference mode with :math:`\epsilon = 10^{-3}`, ReLU;
* the stem, `Mixed_6a` (Inception-B) and `Mixed_7a` (Inception-D) as in torchvision;
* `Mixed_5b/c/d` (FID Inception-A), `Mixed_6b..e` (FID Inception-C) and `Mixed_7b` (FID Inception-E 1) use a
  3x3 average pool that, like TensorFlow's, does not count the zero padding (`count_include_pad=False`);
* `Mixed_7c` (FID Inception-E 2) uses a 3x3 *max* pool in its pooling branch, as the TensorFlow graph does;
* a global average pool gives the 2048-d `pool` features and the 2048 -> 1008 layer `fc` the `logits`.

Preprocessing is pytorch-fid's: images in `[0, 1]` are resized to 299x299 with bilinear interpolation
(`torch.nn.functional.interpolate(..., mode="bilinear", align_corners=False)`, no antialiasing: see
:func:`bilinear_resize`) and scaled to `[-1, 1]`.

Layouts differ only where the frameworks do: images are `[B, H, W, C]` (PyTorch `[B, C, H, W]`), convolution
kernels `[kh, kw, in, out]` (PyTorch `[out, in, kh, kw]`), dense kernels `[in, out]`. Module and parameter
names follow PyTorch's (`Mixed_6b/branch7x7dbl_3/conv/kernel` is `Mixed_6b.branch7x7dbl_3.conv.weight`), so
:func:`fid_inception_from_torch` is a renaming plus transposes, and it checks every name and shape.

Obtaining the weights (nothing is downloaded at run time). On any machine with internet access and PyTorch::

    # 1. Download pytorch-fid's weights (about 91 MB):
    wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    # 2. Convert them to a NumPy archive that needs no PyTorch to read:
    python -c "from scoreflow.evaluate import convert_pytorch_fid_weights as c; \
               c('pt_inception-2015-12-05-6726825d.pth', 'fid_inception.npz')"

(step 2 only needs `torch` to unpickle the file; equivalently
`np.savez(out, **{k: v.numpy() for k, v in torch.load(pth).items()})`). Then
`variables = load_fid_inception("fid_inception.npz")`. The archive holds the PyTorch state dict under its
PyTorch names; :func:`load_fid_inception` converts it and fails with the list of missing, unexpected or
mis-shaped entries if the file is not this network's.

References:
  Szegedy et al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016.
  Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", 2017.
  M. Seitzer, "pytorch-fid: FID Score for PyTorch", https://github.com/mseitzer/pytorch-fid, 2020.
"""

from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from scoreflow.io import atomic_savez

INCEPTION_INPUT_SIZE = 299
FID_INCEPTION_NUM_FEATURES = 2048
FID_INCEPTION_NUM_CLASSES = 1008
# The smallest square input that the network (without resizing) maps to at least one pixel at Mixed_7a.
INCEPTION_MIN_INPUT_SIZE = 75

_BN_EPSILON = 1e-3
_HIGHEST = jax.lax.Precision.HIGHEST


def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


class BasicConv2d(nn.Module):
  """Convolution without bias -> batch norm (inference statistics, eps 1e-3) -> ReLU (torchvision's)."""

  features: int
  kernel_size: int | tuple[int, int]
  strides: int | tuple[int, int] = 1
  padding: int | tuple[int, int] = 0
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    pad_h, pad_w = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.strides),
                padding=((pad_h, pad_h), (pad_w, pad_w)), use_bias=False, precision=self.precision,
                name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x):
  """3x3 average pool, stride 1, padding 1, averaging only over real pixels (TensorFlow's 'SAME').

  Written out because `flax.linen.avg_pool(..., count_include_pad=False)` counts pixels in the default
  float dtype, which promotes float32 inputs to float64 when x64 is enabled.
  """
  window, strides, padding = (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  zero = jnp.zeros((), x.dtype)
  total = jax.lax.reduce_window(x, zero, jax.lax.add, window, strides, padding)
  ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
  count = jax.lax.reduce_window(ones, zero, jax.lax.add, window, strides, padding)
  return total / count


def _max_pool_3x3_valid_stride2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
  """Inception-A (`Mixed_5b/c/d`) with TensorFlow's average pool (padding not counted)."""

  pool_features: int
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = lambda *args, **kwargs: BasicConv2d(*args, precision=self.precision, **kwargs)  # noqa: E731
    branch1x1 = conv(64, 1, name="branch1x1")(x)
    branch5x5 = conv(48, 1, name="branch5x5_1")(x)
    branch5x5 = conv(64, 5, padding=2, name="branch5x5_2")(branch5x5)
    branch3x3dbl = conv(64, 1, name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, 3, padding=1, name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = conv(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
  """Inception-B (`Mixed_6a`, grid reduction 35 -> 17), as in torchvision."""

  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = lambda *args, **kwargs: BasicConv2d(*args, precision=self.precision, **kwargs)  # noqa: E731
    branch3x3 = conv(384, 3, strides=2, name="branch3x3")(x)
    branch3x3dbl = conv(64, 1, name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = conv(96, 3, strides=2, name="branch3x3dbl_3")(branch3x3dbl)
    branch_pool = _max_pool_3x3_valid_stride2(x)
    return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class FIDInceptionC(nn.Module):
  """Inception-C (`Mixed_6b..e`, factorized 7x7) with TensorFlow's average pool (padding not counted)."""

  channels_7x7: int
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = lambda *args, **kwargs: BasicConv2d(*args, precision=self.precision, **kwargs)  # noqa: E731
    c7 = self.channels_7x7
    branch1x1 = conv(192, 1, name="branch1x1")(x)
    branch7x7 = conv(c7, 1, name="branch7x7_1")(x)
    branch7x7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
    branch7x7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
    branch7x7dbl = conv(c7, 1, name="branch7x7dbl_1")(x)
    branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(branch7x7dbl)
    branch7x7dbl = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(branch7x7dbl)
    branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(branch7x7dbl)
    branch7x7dbl = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(branch7x7dbl)
    branch_pool = conv(192, 1, name="branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
  """Inception-D (`Mixed_7a`, grid reduction 17 -> 8), as in torchvision."""

  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = lambda *args, **kwargs: BasicConv2d(*args, precision=self.precision, **kwargs)  # noqa: E731
    branch3x3 = conv(192, 1, name="branch3x3_1")(x)
    branch3x3 = conv(320, 3, strides=2, name="branch3x3_2")(branch3x3)
    branch7x7x3 = conv(192, 1, name="branch7x7x3_1")(x)
    branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
    branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
    branch7x7x3 = conv(192, 3, strides=2, name="branch7x7x3_4")(branch7x7x3)
    branch_pool = _max_pool_3x3_valid_stride2(x)
    return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class FIDInceptionE(nn.Module):
  """Inception-E (`Mixed_7b`, `Mixed_7c`, expanded filter bank) with the FID graph's pooling branch.

  `pool="avg"` (`Mixed_7b`): 3x3 average pool not counting padding. `pool="max"` (`Mixed_7c`): 3x3 max pool,
  the TensorFlow graph's quirk that pytorch-fid reproduces.
  """

  pool: str
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = lambda *args, **kwargs: BasicConv2d(*args, precision=self.precision, **kwargs)  # noqa: E731
    branch1x1 = conv(320, 1, name="branch1x1")(x)
    branch3x3 = conv(384, 1, name="branch3x3_1")(x)
    branch3x3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
                                 conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3)], axis=-1)
    branch3x3dbl = conv(448, 1, name="branch3x3dbl_1")(x)
    branch3x3dbl = conv(384, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
    branch3x3dbl = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(branch3x3dbl),
                                    conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(branch3x3dbl)],
                                   axis=-1)
    if self.pool == "avg":
      pooled = _avg_pool_3x3_same(x)
    elif self.pool == "max":
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"FIDInceptionE: pool must be 'avg' or 'max', got {self.pool!r}.")
    branch_pool = conv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


def _interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
  """`[out_size, in_size]` weights of PyTorch's 1-D linear interpolation with `align_corners=False`.

  Output pixel `o` samples the input at :math:`s = \\max(0, (o + 1/2)\\,\\text{in}/\\text{out} - 1/2)` between
  pixels :math:`\\lfloor s \\rfloor` and :math:`\\min(\\lfloor s \\rfloor + 1, \\text{in} - 1)` (PyTorch's
  `area_pixel_compute_source_index`), so weights are never spread beyond two neighbours (no antialiasing).
  """
  out_index = np.arange(out_size)
  source = np.maximum((out_index + 0.5) * (in_size / out_size) - 0.5, 0.0)
  lower = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  upper_weight = source - lower
  matrix = np.zeros((out_size, in_size))
  np.add.at(matrix, (out_index, lower), 1.0 - upper_weight)
  np.add.at(matrix, (out_index, upper), upper_weight)
  return matrix


def bilinear_resize(images: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize of `images: [B, H, W, C]` to `[B, height, width, C]`, exactly as pytorch-fid does it.

  This is `torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)`
  (half-pixel centres, edge clamping, no antialiasing when shrinking), written as two small interpolation
  matrices applied with full float precision. `jax.image.resize` differs: it antialiases when shrinking.

  Args:
    images: `[B, H, W, C]` floating images.
    height, width: the output size.

  Returns:
    `[B, height, width, C]`, of the input's dtype.
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"bilinear_resize: images must be [B, H, W, C], got shape {images.shape}.")
  rows = jnp.asarray(_interpolation_matrix(images.shape[1], height), images.dtype)
  cols = jnp.asarray(_interpolation_matrix(images.shape[2], width), images.dtype)
  images = jnp.einsum("oh,bhwc->bowc", rows, images, precision=_HIGHEST)
  return jnp.einsum("pw,bowc->bopc", cols, images, precision=_HIGHEST)


class FIDInceptionV3(nn.Module):
  """pytorch-fid's `InceptionV3` (FID variant, TensorFlow graph `inception-2015-12-05`) in Flax.

  `__call__(images)` takes `images: [B, H, W, 3]` with values in `[0, 1]` and returns `(pool, logits)`:
  `pool: [B, 2048]`, the global average pool of `Mixed_7c` (TensorFlow's `pool_3`, the FID/KID features),
  and `logits: [B, 1008]` (`softmax/logits`, the Inception Score's classifier). Variables are
  `{"params", "batch_stats"}` (batch norm is always in inference mode).

  Attributes:
    resize_input: resize to 299x299 first (:func:`bilinear_resize`), as pytorch-fid does by default. Without
      it the network accepts any size of at least 75x75.
    normalize_input: scale `[0, 1]` to the network's `[-1, 1]` (`2 x - 1`).
    precision: matmul/convolution precision; `HIGHEST` keeps float32 exact on accelerators that would use
      reduced-precision (TF32/bf16) passes by default.
  """

  resize_input: bool = True
  normalize_input: bool = True
  precision: Any = _HIGHEST

  @nn.compact
  def __call__(self, images):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"FIDInceptionV3: images must be [B, H, W, 3] with values in [0, 1], got shape "
                       f"{images.shape}; repeat grey images along the last axis (fid_inception_features "
                       "does this).")
    x = images
    if self.resize_input:
      x = bilinear_resize(x, INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE)
    elif min(x.shape[1:3]) < INCEPTION_MIN_INPUT_SIZE:
      raise ValueError(f"FIDInceptionV3: without resize_input, images must be at least "
                       f"{INCEPTION_MIN_INPUT_SIZE}x{INCEPTION_MIN_INPUT_SIZE}, got {x.shape[1:3]}.")
    if self.normalize_input:
      x = 2 * x - 1
    conv = lambda *args, **kwargs: BasicConv2d(*args, precision=self.precision, **kwargs)  # noqa: E731
    # Block 0: stem up to the first max pool (299 -> 73).
    x = conv(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)
    x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_valid_stride2(x)
    # Block 1: up to the second max pool (73 -> 35).
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)
    x = conv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_valid_stride2(x)
    # Block 2: 35x35 and 17x17 Inception modules.
    x = FIDInceptionA(32, precision=self.precision, name="Mixed_5b")(x)
    x = FIDInceptionA(64, precision=self.precision, name="Mixed_5c")(x)
    x = FIDInceptionA(64, precision=self.precision, name="Mixed_5d")(x)
    x = InceptionB(precision=self.precision, name="Mixed_6a")(x)
    x = FIDInceptionC(128, precision=self.precision, name="Mixed_6b")(x)
    x = FIDInceptionC(160, precision=self.precision, name="Mixed_6c")(x)
    x = FIDInceptionC(160, precision=self.precision, name="Mixed_6d")(x)
    x = FIDInceptionC(192, precision=self.precision, name="Mixed_6e")(x)
    # Block 3: 8x8 modules and the global average pool.
    x = InceptionD(precision=self.precision, name="Mixed_7a")(x)
    x = FIDInceptionE("avg", precision=self.precision, name="Mixed_7b")(x)
    x = FIDInceptionE("max", precision=self.precision, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(FID_INCEPTION_NUM_CLASSES, precision=self.precision, name="fc")(pool)
    return pool, logits


def init_fid_inception(seed: int = 0, dtype=np.float32) -> dict:
  """Random variables of :class:`FIDInceptionV3` (for tests and pipelines without the real weights).

  Convolution kernels are He-normal (`N(0, 2 / fan_in)`), the `fc` kernel `N(0, 1 / 2048)`, biases zero and
  batch norm the identity (scale 1, mean 0, variance 1), drawn with NumPy from `seed` in `dtype` (fast: no
  compilation). FID and IS need the real weights (:func:`load_fid_inception`).
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in variable_shapes().items():
    kind = path[-1]
    if kind == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      gain = 2.0 if path[-2] == "conv" else 1.0
      value = rng.standard_normal(shape) * np.sqrt(gain / fan_in)
    elif kind in ("scale", "var"):
      value = np.ones(shape)
    else:
      value = np.zeros(shape)
    flat[path] = jnp.asarray(value, dtype)
  return traverse_util.unflatten_dict(flat)


@functools.lru_cache(maxsize=1)
def variable_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flattened `{(collection, *path): shape}` of :class:`FIDInceptionV3`'s variables (traced, not run)."""
  module = FIDInceptionV3(resize_input=False)
  dummy = jax.ShapeDtypeStruct((1, INCEPTION_MIN_INPUT_SIZE, INCEPTION_MIN_INPUT_SIZE, 3), jnp.float32)
  shapes = jax.eval_shape(module.init, jax.ShapeDtypeStruct((2,), jnp.uint32), dummy)
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(shapes).items()}


# Flax variable path suffix -> (PyTorch name suffix, PyTorch -> Flax array layout).
_TORCH_NAMES = {
    ("conv", "kernel"): ("conv.weight", (2, 3, 1, 0)),
    ("bn", "scale"): ("bn.weight", None),
    ("bn", "bias"): ("bn.bias", None),
    ("bn", "mean"): ("bn.running_mean", None),
    ("bn", "var"): ("bn.running_var", None),
    ("fc", "kernel"): ("fc.weight", (1, 0)),
    ("fc", "bias"): ("fc.bias", None),
}


def torch_name(path: tuple[str, ...]) -> tuple[str, tuple[int, ...] | None]:
  """`("params", "Mixed_5b", "branch1x1", "conv", "kernel")` -> `("Mixed_5b.branch1x1.conv.weight", perm)`."""
  suffix, permutation = _TORCH_NAMES[path[-2:]]
  return ".".join(path[1:-2] + (suffix,)), permutation


def _inverse_permutation(permutation):
  return tuple(int(i) for i in np.argsort(permutation))


def fid_inception_from_torch(state_dict: Mapping[str, Any]) -> dict:
  """Flax variables of :class:`FIDInceptionV3` from pytorch-fid's (or a matching) PyTorch state dict.

  Conv weights `[out, in, kh, kw]` become kernels `[kh, kw, in, out]`, `fc.weight` `[1008, 2048]` becomes
  `[2048, 1008]`, batch-norm `weight/bias/running_mean/running_var` become `scale/bias/mean/var`; arrays keep
  their dtype. `num_batches_tracked` entries are ignored.

  Args:
    state_dict: `{name: array}` with PyTorch's names, e.g. `torch.load(pth)` with values turned into NumPy
      arrays (`.numpy()`), or the contents of an `.npz` written by :func:`convert_pytorch_fid_weights`.

  Returns:
    `{"params": ..., "batch_stats": ...}` for `FIDInceptionV3().apply`.

  Raises:
    ValueError: listing every missing, unexpected or mis-shaped entry.
  """
  entries = {name: value for name, value in state_dict.items() if not name.endswith("num_batches_tracked")}
  flat, problems = {}, []
  for path, shape in variable_shapes().items():
    name, permutation = torch_name(path)
    if name not in entries:
      problems.append(f"missing {name} (shape {shape})")
      continue
    value = np.asarray(entries.pop(name))
    if permutation is not None:
      value = np.transpose(value, permutation)
    if value.shape != shape:
      expected = shape if permutation is None else tuple(shape[i] for i in _inverse_permutation(permutation))
      problems.append(f"{name}: expected shape {expected}, got {np.asarray(state_dict[name]).shape}")
      continue
    flat[path] = jnp.asarray(value)
  problems.extend(f"unexpected {name}" for name in sorted(entries))
  if problems:
    shown = "; ".join(problems[:12]) + (f"; ... ({len(problems)} problems)" if len(problems) > 12 else "")
    raise ValueError("fid_inception_from_torch: state_dict is not pytorch-fid's FID Inception "
                     f"(pt_inception-2015-12-05): {shown}. Convert pt_inception-2015-12-05-6726825d.pth with "
                     "convert_pytorch_fid_weights.")
  return traverse_util.unflatten_dict(flat)


def fid_inception_to_torch(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse of :func:`fid_inception_from_torch`: `{PyTorch name: NumPy array}` (no `num_batches_tracked`)."""
  state_dict = {}
  for path, value in traverse_util.flatten_dict(dict(variables)).items():
    name, permutation = torch_name(path)
    value = np.asarray(value)
    state_dict[name] = value if permutation is None else np.transpose(value, _inverse_permutation(permutation))
  return state_dict


def save_fid_inception(path: str | os.PathLike, variables: Mapping[str, Any]) -> None:
  """Writes `variables` as an `.npz` of the PyTorch state dict (the format :func:`load_fid_inception` reads)."""
  atomic_savez(path, fid_inception_to_torch(variables))


def _torch_shapes() -> dict[str, tuple[int, ...]]:
  """`{PyTorch name: PyTorch shape}` of every array of pytorch-fid's state dict (no `num_batches_tracked`)."""
  shapes = {}
  for path, shape in variable_shapes().items():
    name, permutation = torch_name(path)
    shapes[name] = shape if permutation is None else tuple(shape[i] for i in _inverse_permutation(permutation))
  return shapes


def _npz_shapes(path: str) -> dict[str, tuple[int, ...]]:
  """`{name: shape}` of the arrays of an `.npz`, read from each member's `.npy` header (no array data)."""
  shapes = {}
  with zipfile.ZipFile(path) as archive:
    for member in archive.infolist():
      if not member.filename.endswith(".npy"):
        continue
      with archive.open(member) as file:
        version = np.lib.format.read_magic(file)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shapes[member.filename[:-len(".npy")]] = tuple(read_header(file)[0])
  return shapes


def check_fid_inception_file(path: str | os.PathLike) -> None:
  """Checks that `path` is an `.npz` holding exactly pytorch-fid's FID Inception arrays, with their shapes.

  Reads the archive's directory and each array's header only (no weights are loaded and the network is only
  traced for its shapes), so it takes about a second: run it before work that needs the weights much later.

  Raises:
    FileNotFoundError: if there is no file.
    ValueError: if the file is not an `.npz` archive, or listing its missing, unexpected and mis-shaped entries.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"check_fid_inception_file: no weights file at {path!r}.")
  try:
    shapes = _npz_shapes(path)
  except (zipfile.BadZipFile, ValueError, OSError) as error:
    raise ValueError(f"check_fid_inception_file: {path!r} is not a readable .npz archive ({error}).") from None
  shapes = {name: shape for name, shape in shapes.items() if not name.endswith("num_batches_tracked")}
  expected = _torch_shapes()
  problems = [f"{name}: expected shape {expected[name]}, got {shape}" for name, shape in shapes.items()
              if name in expected and shape != expected[name]]
  problems.extend(f"missing {name} (shape {shape})" for name, shape in expected.items() if name not in shapes)
  problems.extend(f"unexpected {name}" for name in sorted(shapes) if name not in expected)
  if problems:
    shown = "; ".join(problems[:12]) + (f"; ... ({len(problems)} problems)" if len(problems) > 12 else "")
    raise ValueError(f"check_fid_inception_file: {path!r} does not hold pytorch-fid's FID Inception weights "
                     f"(pt_inception-2015-12-05): {shown}.")


def load_fid_inception(path: str | os.PathLike) -> dict:
  """Reads FID Inception variables from an `.npz` of pytorch-fid's state dict (see the module docstring).

  Raises:
    FileNotFoundError: naming the file and how to produce it.
    ValueError: if the archive does not hold exactly this network's arrays.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"load_fid_inception: no weights file at {path!r}. Nothing is downloaded at run time: download "
        "pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release 'fid_weights') on a machine with internet "
        "access and convert it with scoreflow.evaluate.convert_pytorch_fid_weights(pth, npz).")
  with np.load(path, allow_pickle=False) as archive:
    state_dict = {name: archive[name] for name in archive.files}
  return fid_inception_from_torch(state_dict)


def convert_pytorch_fid_weights(pth_path: str | os.PathLike, npz_path: str | os.PathLike) -> dict:
  """Converts pytorch-fid's `pt_inception-2015-12-05-*.pth` to the `.npz` that :func:`load_fid_inception` reads.

  Needs PyTorch (imported here only) to unpickle the file. The state dict is validated against
  :class:`FIDInceptionV3` before anything is written.

  Returns:
    The converted Flax variables.
  """
  import torch  # pylint: disable=g-import-not-at-top

  loaded = torch.load(os.fspath(pth_path), map_location="cpu", weights_only=True)
  state_dict = {name: value.detach().cpu().numpy() for name, value in loaded.items()}
  variables = fid_inception_from_torch(state_dict)
  atomic_savez(npz_path, {name: value for name, value in state_dict.items()
                           if not name.endswith("num_batches_tracked")})
  return variables


def fid_inception_features(variables: Mapping[str, Any], images: jax.Array, *,
                           image_range: tuple[float, float] = (-1.0, 1.0),
                           resize_input: bool = True) -> tuple[jax.Array, jax.Array]:
  """FID/KID features and Inception-Score logits of images in the model's range; pure and jit-compatible.

  Images are mapped to `[0, 1]` (integer images are read as 8-bit, `x / 255`; floating ones as
  `(x - lo) / (hi - lo)` with `image_range = (lo, hi)`), clipped to `[0, 1]` as writing them to image files
  would, grey images (`C = 1`) repeated to three channels, then passed through :class:`FIDInceptionV3`.

  Args:
    variables: from :func:`load_fid_inception` (or :func:`init_fid_inception` in tests).
    images: `[B, H, W, C]`, `C` in {1, 3}.
    image_range: the `(lo, hi)` range of floating images; `(-1, 1)` for the default centred scaler. Static
      under `jit` (a tuple of Python floats).
    resize_input: resize to 299x299 (pytorch-fid's default; keep it for comparable FIDs). Static under `jit`.

  Returns:
    `(pool [B, 2048], logits [B, 1008])`, in the wider of float32 (or the images' float dtype) and the
    variables' dtype.
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"fid_inception_features: images must be [B, H, W, C] with C in (1, 3), got shape "
                     f"{images.shape}.")
  if jnp.issubdtype(images.dtype, jnp.integer):
    unit = images.astype(jnp.float32) / 255.0
  else:
    lo, hi = image_range
    if not hi > lo:
      raise ValueError(f"fid_inception_features: image_range must be (lo, hi) with hi > lo, got {image_range}.")
    unit = (images - lo) / (hi - lo)
  unit = jnp.clip(unit, 0.0, 1.0)
  if unit.shape[-1] == 1:
    unit = jnp.repeat(unit, 3, axis=-1)
  return FIDInceptionV3(resize_input=resize_input).apply(variables, unit)


_jit_fid_inception_features = jax.jit(fid_inception_features, static_argnames=("image_range", "resize_input"))


def fid_inception_outputs(variables: Mapping[str, Any], images, *, batch_size: int = 100,
                          image_range: tuple[float, float] = (-1.0, 1.0),
                          resize_input: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Pool features and logits of many images, batch by batch on the host, with one compiled program.

  Runs :func:`fid_inception_features` (jitted) over `images` in batches of `batch_size`; a short last batch
  is padded (and the padding dropped) so that every batch reuses the same compilation.

  Args:
    variables: FID Inception variables.
    images: `[N, H, W, C]` NumPy or JAX array (see :func:`fid_inception_features` for ranges and dtypes).
    batch_size: images per call.
    image_range, resize_input: as in :func:`fid_inception_features`.

  Returns:
    `(pool [N, 2048], logits [N, 1008])` as NumPy arrays; feed `pool` to
    :class:`~scoreflow.evaluate.metrics.FeatureMoments` (FID) or
    :func:`~scoreflow.evaluate.metrics.kernel_inception_distance`, `logits` to
    :func:`~scoreflow.evaluate.metrics.inception_score`.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"fid_inception_outputs: batch_size must be a positive int, got {batch_size!r}.")
  image_range = (float(image_range[0]), float(image_range[1]))
  num_images = images.shape[0]
  pools, logits = [], []
  for start in range(0, num_images, batch_size):
    batch = images[start:start + batch_size]
    valid = batch.shape[0]
    if valid < batch_size < num_images:
      batch = np.concatenate([np.asarray(batch), np.repeat(np.asarray(batch[-1:]), batch_size - valid, axis=0)])
    pool, logit = _jit_fid_inception_features(variables, batch, image_range=image_range, resize_input=resize_input)
    pools.append(np.asarray(pool)[:valid])
    logits.append(np.asarray(logit)[:valid])
  return np.concatenate(pools), np.concatenate(logits)
