r"""Input pipelines: deterministic, per-process sharded, resumable batch streams built on grain.

:func:`make_dataset` returns a :class:`DataIterator` over dicts `{"x": float32 [B_local, *D],
"label": int32 [B_local]}` with `B_local = global_batch_size // process_count`, for

* the toy densities of :mod:`scoreflow.data.toy` (infinite streams; labels are a mixture's component, zero for
  the other densities, see :func:`~scoreflow.data.toy.sample_toy_labelled`; global batch `k` is drawn
  from `(seed, split, k)` and each process keeps its block of it),
* `"digits"`: scikit-learn's 8x8 digits through the tfds builder of :mod:`scoreflow.data.digits`
  (prepared into `data_dir` on first use),
* any tfds image dataset already prepared in `data_dir` in the `array_record` format (`cifar10`, `mnist`,
  `celeb_a`, `svhn_cropped`, `lsun/bedroom`, ...; pin a version with `"cifar10:3.0.2"`), read with
  `tfds.data_source` semantics through `tfds.builder_from_directory`: no TensorFlow, no catalog code, no
  network. A dataset that is not prepared fails at once with the command that prepares it. `data_dir` may be
  a local path or a URL such as `gs://bucket/tfds` (read through `etils.epath`; `gs://` needs `gcsfs`).

Order and sharding. Stream position `n` holds example `perm_e(n mod N)` of epoch `e = floor(n / N)`, where
`perm_e` is a fresh seeded permutation of the `N` examples of the split for every epoch (the identity with
`shuffle=False`). Global batch `k` holds positions `k B .. k B + B - 1`; process `p` takes the contiguous
block `k B + p B_local + [0, B_local)` and reads (and decodes) only those examples. Random flips and
dequantization noise are keyed by stream position and pixel (counter-based SplitMix64), not drawn from a
sequential generator. Hence

* concatenating the `k`-th batches of processes `0 .. P-1` gives exactly the `k`-th batch of a
  single-process run with the same seed, augmentations included, so results do not depend on the number
  of hosts;
* the state of every process is the index `k` of its next batch, which is the same on all processes, so
  :meth:`DataIterator.set_state` resumes exactly, even with a different `process_count`.

grain runs the stream: a `MapDataset` over batch indices, converted to an iterator with a checkpointable
position that reads `prefetch_batches` batches ahead, each in its own background thread (`worker_count=0`:
no processes are forked). Batches are assembled with vectorized NumPy rather than grain's per-example
transformations, whose per-example overhead (index shuffle and statistics) is a hundred times the cost of a
vectorized batch of in-memory data (bench/RESULTS.md). A batch of a tfds dataset fetches its records with
the data source's batched read (`__getitems__`) and decodes and preprocesses them in `read_threads`
contiguous chunks at once (PIL releases the GIL while decoding and resizing); the examples keep their order,
so batches do not depend on the thread counts.

With a finite `num_epochs` the stream ends after `floor(num_epochs * N / global_batch_size)` global batches:
the last incomplete global batch is dropped so that every process yields the same number of batches.

Preprocessing follows Song et al. (2021)'s `datasets.py`: CelebA is centre-cropped to 140x140 and resized
to `image_size` (default 64); LSUN at `image_size` 128 is resized so that its shorter side is 128
(`resize_small`) and centre-cropped to 128x128, and at any other `image_size` (default 256) centre-cropped to
its largest square and resized to `image_size` with bicubic resampling (`crop_resize`); other datasets are
resized to `image_size` x `image_size` when it is given and differs from their size (datasets whose images
vary in size need it). Resizing is antialiased (PIL; bilinear unless stated) and rounds back to integer
levels, so dequantization stays exact. Then an optional random horizontal flip, optional uniform
dequantization and the affine :class:`~scoreflow.data.scaling.AffineScaler` (centred to `[-1, 1]` by
default).
"""


from __future__ import annotations

import dataclasses
import math
import os
import sys
import threading
import zlib
from collections.abc import Callable
from typing import Any

import grain
import numpy as np

from scoreflow.data import toy
from scoreflow.data.digits import DIGITS_NAMES
from scoreflow.data.scaling import AffineScaler
from scoreflow.data.tfds_source import InMemoryExamples, SourceExamples, num_levels, open_tfds_split
from scoreflow.data.transforms import preprocessing

_SCALER_NAMES = {"centred": AffineScaler.centred, "centered": AffineScaler.centred,
                 "unit_interval": AffineScaler.unit_interval}
_STATE_IDENTITY = ("name", "version", "split", "num_examples", "seed", "shuffle", "num_epochs",
                   "global_batch_size")
# Identity keys that states saved by earlier scoreflow versions lack: such states resume, unchecked on these.
_LATER_IDENTITY = ("version", "num_examples")

# ----------------------------------------------------------------------------------------------------------
# Random access to the stream: positions, epoch permutations, counter-based randomness.

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(seed: int, counters: np.ndarray) -> np.ndarray:
  """The `counters`-th outputs (uint64) of the SplitMix64 generator seeded with `seed` (Steele et al., 2014).

  SplitMix64's n-th output is a fixed bijective mix of `seed + n * gamma`, so any output can be computed
  directly: randomness keyed by stream position, vectorized, and identical on every process.
  """
  z = np.uint64(seed) + (counters.astype(np.uint64) + np.uint64(1)) * _GOLDEN_GAMMA
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def _uniform_float32(seed: int, counters: np.ndarray) -> np.ndarray:
  """U[0, 1) float32 with 24 random bits (exactly representable, never 1) for each counter."""
  return (_splitmix64(seed, counters) >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


class _EpochPermutations:
  """The permutation of epoch `e`: `default_rng((seed, e)).permutation(N)`, cached for the latest epochs."""

  def __init__(self, num_examples: int, seed: int):
    self._num_examples = num_examples
    self._seed = seed
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __call__(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._cache:
        if len(self._cache) >= 2:
          self._cache.pop(min(self._cache))
        self._cache[epoch] = np.random.default_rng((self._seed, epoch)).permutation(self._num_examples)
      return self._cache[epoch]


class _ImageBatches:
  """Global batch `k` -> this process's block `{"x": float32 [B_local, *D], "label": int32 [B_local]}`.

  Stream position `n` holds example `perm_e(n mod N)` of epoch `e = n // N`; process `p` takes positions
  `k G + p B_local + [0, B_local)`. Flip bits and dequantization noise are SplitMix64 outputs keyed by the
  position (and the pixel), so they do not depend on how the batch is split across processes.
  """

  def __init__(self, read_examples, num_examples: int, element_shape: tuple[int, ...], *,
               shuffle_seed: int | None, flip_seed: int | None, noise_seed: int | None, scaler: AffineScaler,
               global_batch_size: int, process_index: int, local_batch_size: int):
    self._read_examples = read_examples
    self._num_examples = num_examples
    self._element_shape = element_shape
    self._permutation = None if shuffle_seed is None else _EpochPermutations(num_examples, shuffle_seed)
    self._flip_seed = flip_seed
    self._noise_seed = noise_seed
    self._scale = np.float32(scaler.scale)
    self._shift = np.float32(scaler.shift)
    self._scaler = AffineScaler(self._scale, self._shift, num_levels=scaler.num_levels,
                                dequantized=scaler.dequantized)  # Host float32 coefficients.
    self._first_offset = process_index * local_batch_size
    self._global_batch_size = global_batch_size
    self._local_batch_size = local_batch_size

  def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
    start = batch_index * self._global_batch_size + self._first_offset
    positions = np.arange(start, start + self._local_batch_size, dtype=np.int64)
    epochs, indices = np.divmod(positions, self._num_examples)
    if self._permutation is not None:
      for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        indices[in_epoch] = self._permutation(int(epoch))[indices[in_epoch]]
    images, labels = self._read_examples(indices)
    if self._flip_seed is not None:
      flip = (_splitmix64(self._flip_seed, positions) >> np.uint64(63)).astype(bool)
      images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    levels = images.astype(np.float32)
    if self._noise_seed is None:
      return {"x": self._scale * levels + self._shift, "label": labels}
    num_dims = math.prod(self._element_shape)
    counters = positions[:, None].astype(np.uint64) * np.uint64(num_dims) + np.arange(num_dims, dtype=np.uint64)
    u = _uniform_float32(self._noise_seed, counters).reshape(levels.shape)
    return {"x": self._scaler.dequantize(levels, u), "label": labels}


@dataclasses.dataclass(frozen=True)
class _ToyBatch:
  """Global toy batch `k` (drawn from the seed and `k`), of which this process keeps block `p`."""

  name: str
  entropy: tuple[int, ...]
  global_batch_size: int
  process_index: int
  local_batch_size: int

  def __call__(self, batch_index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(self.entropy + (batch_index,))
    points, labels = toy.sample_toy_labelled(self.name, rng, self.global_batch_size)
    start = self.process_index * self.local_batch_size
    return {"x": points[start:start + self.local_batch_size], "label": labels[start:start + self.local_batch_size]}


# ----------------------------------------------------------------------------------------------------------
# The iterator.


class DataIterator:
  """A resumable iterator over this process's batches `{"x": float32 [B_local, *D], "label": int32 [B_local]}`.

  Attributes:
    name, split: the dataset and split.
    element_shape: `D`, the shape of one example in model space.
    global_batch_size, local_batch_size: `B` and `B_local = B // process_count`.
    process_index, process_count: this process's shard.
    scaler: the :class:`AffineScaler` from raw levels (or, with `dequantize=True`, dequantized values) to
      model space (`None` for toy data, which are already in model space); use it to turn samples back into
      images (:meth:`AffineScaler.to_uint8`) and, for dequantized data, for bits/dim.
    version: the tfds version read (`None` for toy data).
    num_examples: examples in the split (`None` for infinite toy streams).
    num_batches: global batches the stream yields (`None` when infinite).
  """

  def __init__(self, batches: grain.MapDataset, read_options: grain.ReadOptions, *, identity: dict,
               element_shape: tuple[int, ...], scaler: AffineScaler | None, num_batches: int | None,
               process_index: int, process_count: int, on_close: Callable[[], None] | None = None):
    self._iterator = batches.to_iter_dataset(read_options).__iter__()
    self._identity = identity
    self._on_close = on_close
    self.name = identity["name"]
    self.version = identity["version"]
    self.split = identity["split"]
    self.global_batch_size = identity["global_batch_size"]
    self.local_batch_size = self.global_batch_size // process_count
    self.process_index = process_index
    self.process_count = process_count
    self.element_shape = tuple(element_shape)
    self.scaler = scaler
    self.num_examples = identity["num_examples"]
    self.num_batches = num_batches

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    """The position as a JSON-serialisable dict: the pipeline's identity and the next global batch index."""
    grain_state = self._iterator.get_state()
    if set(grain_state) != {"next_index"}:
      raise RuntimeError(f"DataIterator.get_state: unexpected grain iterator state {grain_state!r}; this "
                         "grain version is not supported (expected {'next_index': int}).")
    return {**self._identity, "next_batch": int(grain_state["next_index"])}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues from a :meth:`get_state` result: the next batch is the one that followed it.

    The state may come from a run with another `process_count` (same global batch size): position `k`
    means the same global batch on every process.

    Raises:
      ValueError: if `state` was saved by a pipeline with a different dataset, prepared tfds version, split,
        number of examples in the split, seed, shuffling, number of epochs or global batch size: any of
        these would silently change the stream.
    """
    missing = [key for key in (*_STATE_IDENTITY, "next_batch") if key not in state and key not in _LATER_IDENTITY]
    if missing:
      raise ValueError(f"DataIterator.set_state: state lacks {missing}; pass a dict from get_state(), got "
                       f"{state!r}.")
    different = {key: (state[key], self._identity[key]) for key in _STATE_IDENTITY
                 if key in state and state[key] != self._identity[key]}
    if different:
      described = ", ".join(f"{key}={saved!r} in the state but {mine!r} here"
                            for key, (saved, mine) in different.items())
      raise ValueError(f"DataIterator.set_state: the state belongs to another pipeline ({described}); "
                       "rebuild the pipeline with the arguments of the run that saved it.")
    next_batch = state["next_batch"]
    if not isinstance(next_batch, int) or next_batch < 0 or (
        self.num_batches is not None and next_batch > self.num_batches):
      raise ValueError(f"DataIterator.set_state: next_batch must be an int in [0, {self.num_batches}], got "
                       f"{next_batch!r}.")
    self._iterator.set_state({"next_index": next_batch})

  def close(self) -> None:
    """Stops background reading threads."""
    self._iterator.close()
    if self._on_close is not None:
      self._on_close()

  def __enter__(self) -> DataIterator:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


# ----------------------------------------------------------------------------------------------------------
# The public constructor.


def _check_int(argument: str, value, minimum: int, fix: str) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"make_dataset: {argument} must be an int >= {minimum}, got {value!r}; {fix}.")


def _resolve_scaler(scaler, num_levels: int, dequantize: bool) -> AffineScaler:
  if scaler is None:
    scaler = "centred"
  if isinstance(scaler, str):
    if scaler not in _SCALER_NAMES:
      raise ValueError(f"make_dataset: scaler must be an AffineScaler, None or one of {tuple(_SCALER_NAMES)}, "
                       f"got {scaler!r}.")
    return _SCALER_NAMES[scaler](num_levels, dequantized=dequantize)
  if not isinstance(scaler, AffineScaler):
    raise ValueError(f"make_dataset: scaler must be an AffineScaler, None or one of {tuple(_SCALER_NAMES)}, "
                     f"got {type(scaler).__name__}.")
  if scaler.dequantized != dequantize or scaler.num_levels != num_levels:
    raise ValueError(
        f"make_dataset: scaler has num_levels={scaler.num_levels}, dequantized={scaler.dequantized}, but the "
        f"data have {num_levels} levels and dequantize={dequantize}; build it with "
        f"AffineScaler.centred({num_levels}, dequantized={dequantize}) (or unit_interval), or pass a name.")
  return scaler


def _stream_entropy(seed: int, split: str) -> tuple[int, int]:
  return (int(seed), zlib.crc32(split.encode()))


def make_dataset(name: str, split: str, *, data_dir: str | os.PathLike | None, global_batch_size: int,
                 seed: int, shuffle: bool = True, num_epochs: int | None = None, process_index: int = 0,
                 process_count: int = 1, image_size: int | None = None, random_flip: bool = False,
                 dequantize: bool = False, scaler: AffineScaler | str | None = None, read_threads: int = 1,
                 prefetch_batches: int = 2) -> DataIterator:
  """A deterministic, per-process sharded, resumable stream of batches (see the module docstring).

  Args:
    name: a toy density (:data:`scoreflow.data.toy.TOY_DATASETS`), `"digits"`, or a tfds image dataset
      prepared in `data_dir` (`"cifar10"`, `"mnist"`, `"celeb_a"`, `"svhn_cropped"`, `"lsun/bedroom"`, with
      an optional `":<version>"`).
    split: a split name or a tfds split expression (`"train[:90%]"`, `"train+test"`). Toy streams of
      different splits are independent.
    data_dir: the tfds data directory, a local path or a URL such as `"gs://bucket/tfds"` (`None`: tfds'
      default); unused by toy data.
    global_batch_size: examples per step over all processes; divisible by `process_count`.
    seed: non-negative integer; fixes the order, the augmentations and the toy samples.
    shuffle: reshuffle the split every epoch (ignored by toy streams).
    num_epochs: passes over the split, `None` for an infinite stream (toy streams are always infinite).
    process_index, process_count: this process's position among the processes that read the stream (e.g.
      `jax.process_index()`, `jax.process_count()`); it reads and decodes only its block of each batch.
    image_size: output height and width (see the module docstring for each dataset's rule); images only.
      Required by datasets whose images vary in size (other than CelebA and LSUN, which have defaults).
    random_flip: flip each image horizontally with probability 1/2.
    dequantize: add :math:`u \\sim U[0, 1)` to the integer levels `l` before scaling; in float32 the result
      stays below `l + 1`, and the scaler's :meth:`~AffineScaler.to_levels` gives back `l`.
    scaler: `AffineScaler`, `"centred"` (default, `[-1, 1]`) or `"unit_interval"` (`[0, 1]`); names are
      built for the dataset's number of levels (256, or 17 for digits) and the `dequantize` convention.
    read_threads: threads that read, decode and preprocess the examples of one batch of a tfds dataset
      (0 or 1: the thread that assembles the batch; in-memory digits and toy streams ignore it).
    prefetch_batches: batches assembled ahead in background threads, one thread per batch (0: each batch
      is assembled synchronously in `next`; toy streams are always synchronous). The two multiply: up to
      `prefetch_batches * read_threads` examples are decoded at once. Processes are never forked.

  Returns:
    A :class:`DataIterator`.

  Raises:
    ValueError: for invalid arguments, naming the argument and the fix; for images of varying size without
      `image_size`.
    FileNotFoundError: at once (no network access) if a tfds dataset is not prepared in `data_dir`, with
      the command that prepares it.

  Example:
    >>> stream = make_dataset("two_moons", "train", data_dir=None, global_batch_size=4, seed=0)
    >>> next(stream)["x"].shape
    (4, 2)
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"make_dataset: name must be a non-empty string, got {name!r}.")
  if not isinstance(split, str) or not split:
    raise ValueError(f"make_dataset: split must be a non-empty string such as 'train', got {split!r}.")
  _check_int("process_count", process_count, 1, "use jax.process_count()")
  if isinstance(process_index, bool) or not isinstance(process_index, (int, np.integer)) or not (
      0 <= process_index < process_count):
    raise ValueError(f"make_dataset: process_index must be an int in [0, process_count={process_count}), got "
                     f"{process_index!r}; use jax.process_index().")
  _check_int("global_batch_size", global_batch_size, 1, "pass the batch size summed over processes")
  if global_batch_size % process_count:
    raise ValueError(f"make_dataset: global_batch_size={global_batch_size} is not divisible by "
                     f"process_count={process_count}; choose a multiple of the number of processes.")
  _check_int("seed", seed, 0, "pass a non-negative integer seed")
  if num_epochs is not None:
    _check_int("num_epochs", num_epochs, 1, "pass None for an infinite stream")
  if image_size is not None:
    _check_int("image_size", image_size, 1, "pass None to keep the dataset's size")
  _check_int("read_threads", read_threads, 0, "pass 1 to decode each batch in a single thread")
  _check_int("prefetch_batches", prefetch_batches, 0, "0 disables read-ahead")
  local_batch_size = global_batch_size // process_count
  identity = {"name": name, "version": None, "split": split, "num_examples": None, "seed": int(seed),
              "shuffle": bool(shuffle), "num_epochs": num_epochs, "global_batch_size": int(global_batch_size)}
  entropy = _stream_entropy(seed, split)

  if name in toy.TOY_DATASETS:
    for argument, value, default in (("num_epochs", num_epochs, None), ("image_size", image_size, None),
                                     ("random_flip", random_flip, False), ("dequantize", dequantize, False),
                                     ("scaler", scaler, None)):
      if value != default:
        raise ValueError(f"make_dataset: {argument}={value!r} does not apply to the toy dataset {name!r} "
                         f"(an infinite stream already in model space); leave it at {default!r}.")
    batches = grain.MapDataset.range(sys.maxsize).map(
        _ToyBatch(name, entropy, global_batch_size, process_index, local_batch_size))
    return DataIterator(batches, grain.ReadOptions(num_threads=0, prefetch_buffer_size=0),
                        identity=identity, element_shape=(2,), scaler=None, num_batches=None,
                        process_index=process_index, process_count=process_count)

  source, info = open_tfds_split(name, split, data_dir)
  scaler = _resolve_scaler(scaler, num_levels(name, info.features), dequantize)
  num_examples = len(source)
  if num_examples == 0:
    raise ValueError(f"make_dataset: split {split!r} of {name!r} is empty.")
  identity.update(version=str(info.version), num_examples=num_examples)
  preprocess = preprocessing(name, image_size, info.features["image"].shape)
  element_shape = preprocess(source[0])["image"].shape
  if name in DIGITS_NAMES:
    examples = [preprocess(example) for example in source.__getitems__(list(range(num_examples)))]
    read_examples = InMemoryExamples(np.stack([example["image"] for example in examples]),
                                      np.array([example["label"] for example in examples], np.int32))
  else:
    read_examples = SourceExamples(source, preprocess, read_threads)
  shuffle_seed, flip_seed, noise_seed = (int(s) for s in np.random.SeedSequence(entropy).generate_state(3, np.uint64))
  batch_fn = _ImageBatches(
      read_examples, num_examples, element_shape, shuffle_seed=shuffle_seed if shuffle else None,
      flip_seed=flip_seed if random_flip else None, noise_seed=noise_seed if dequantize else None,
      scaler=scaler, global_batch_size=global_batch_size, process_index=process_index,
      local_batch_size=local_batch_size)
  if num_epochs is None:
    num_batches = None
    batch_indices = grain.MapDataset.range(sys.maxsize // global_batch_size // 2)
  else:
    num_batches = num_epochs * num_examples // global_batch_size
    batch_indices = grain.MapDataset.range(num_batches)
  return DataIterator(batch_indices.map(batch_fn),
                      grain.ReadOptions(num_threads=prefetch_batches, prefetch_buffer_size=prefetch_batches),
                      identity=identity, element_shape=element_shape, scaler=scaler, num_batches=num_batches,
                      process_index=process_index, process_count=process_count, on_close=read_examples.close)
