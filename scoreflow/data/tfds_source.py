"""Reading examples: prepared tfds datasets opened without network access (`tfds.builder_from_directory` on the
newest prepared version in `data_dir`, local or a URL; a dataset that is not prepared fails at once with the
command that prepares it), and in-memory arrays. Readers take example indices and return
`(images uint8 [n, H, W, C], labels int32 [n])`.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
from typing import Any

from etils import epath
import numpy as np

from scoreflow.data import toy
from scoreflow.data.digits import DIGITS_NAMES, DIGITS_NUM_LEVELS, prepare_digits
from scoreflow.data.transforms import Preprocess


class InMemoryExamples:
  """All preprocessed examples of a small split held as arrays (the digits: at most 1797 x 64 bytes).

  Every process holds all of them.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self._images, self._labels = images, labels

  def __call__(self, indices):
    return self._images[indices], self._labels[indices]

  def close(self) -> None:
    """Nothing to release: no threads of its own."""


class SourceExamples:
  """Reads and preprocesses the examples at `indices` from a tfds data source, this process's only.

  The records come from the source's batched read (`__getitems__`); with `num_threads > 1` the indices are
  split into that many contiguous chunks, read, decoded and preprocessed at once on a thread pool, and
  concatenated in order, so the result does not depend on `num_threads`.
  """

  def __init__(self, source, preprocess: Preprocess, num_threads: int):
    self._source, self._preprocess = source, preprocess
    self._num_threads = num_threads
    self._pool = (concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="scoreflow-read")
                  if num_threads > 1 else None)

  def _read(self, indices: list[int]) -> list[dict[str, np.ndarray]]:
    return [self._preprocess(example) for example in self._source.__getitems__(indices)]

  def __call__(self, indices):
    if self._pool is None:
      examples = self._read(indices.tolist())
    else:
      chunks = np.array_split(indices, min(self._num_threads, len(indices)))
      examples = [example for chunk in self._pool.map(self._read, [chunk.tolist() for chunk in chunks])
                  for example in chunk]
    return (np.stack([example["image"] for example in examples]),
            np.array([example["label"] for example in examples], np.int32))

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown(cancel_futures=True)


def not_prepared_error(name: str, data_dir: epath.Path, detail: str) -> FileNotFoundError:
  return FileNotFoundError(
      f"Dataset {name!r} is not prepared in data_dir {str(data_dir)!r}: {detail}. scoreflow reads tfds "
      "datasets offline and never downloads. Prepare it once on a machine with network access and "
      "TensorFlow, then copy the data_dir here:\n"
      "  pip install tensorflow tensorflow-datasets\n"
      f"  tfds build {name} --data_dir={data_dir} --file_format=array_record\n"
      f"Built-in datasets that need no preparation: {DIGITS_NAMES[0]!r} and the toy densities "
      f"{toy.TOY_DATASETS}.")


def _version_key(path: epath.Path):
  parts = path.name.split(".")
  return tuple(int(part) for part in parts) if all(part.isdigit() for part in parts) else ()


def _prepared_builder_dir(name: str, data_dir: epath.Path) -> epath.Path:
  """`<data_dir>/<name>/<version>` of a prepared dataset (latest version unless `name` pins one)."""
  dataset, _, version = name.partition(":")
  root = data_dir / dataset
  if not root.is_dir():
    raise not_prepared_error(name, data_dir, f"directory {str(root)!r} does not exist")
  candidates = sorted((path for path in root.iterdir() if (path / "dataset_info.json").is_file()),
                      key=_version_key)
  if version:
    candidates = [path for path in candidates if path.name == version]
  if not candidates:
    found = sorted(path.name for path in root.iterdir() if path.is_dir())
    detail = (f"no prepared version{' ' + version if version else ''} under {str(root)!r} (a "
              f"<version>/dataset_info.json; found entries {found}; a dataset with configs is named "
              "'<dataset>/<config>')")
    raise not_prepared_error(name, data_dir, detail)
  builder_dir = candidates[-1]
  if not any(".array_record" in path.name for path in builder_dir.iterdir()):
    raise not_prepared_error(name, data_dir, f"{str(builder_dir)!r} holds no array_record files (prepared in "
                              "another format; random access needs array_record)")
  return builder_dir


def data_dir_path(data_dir: str | os.PathLike | None) -> epath.Path:
  """`data_dir` (or tfds' default) as an `epath.Path`, which keeps URLs such as `gs://bucket/tfds` intact."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return epath.Path(tfds.core.constants.DATA_DIR if data_dir is None else data_dir).expanduser()


def open_tfds_split(name: str, split: str, data_dir) -> tuple[Any, Any]:
  """(data source, DatasetInfo) of a split; digits are prepared on first use, other datasets must exist."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  if name in DIGITS_NAMES:
    builder = prepare_digits(data_dir)
  else:
    builder = tfds.builder_from_directory(_prepared_builder_dir(name, data_dir_path(data_dir)))
  available = tuple(builder.info.splits)
  # A tfds split expression: splits joined by "+", each optionally sliced ("train[:90%]+test").
  unknown = [part for part in (re.sub(r"\[.*\]$", "", term.strip()) for term in split.split("+"))
             if part not in available]
  if unknown:
    raise ValueError(f"make_dataset: split {split!r} does not exist for dataset {name!r} (unknown: {unknown}); "
                     f"available splits: {available}, which tfds expressions such as 'train[:90%]' or "
                     "'train+test' slice and combine.")
  try:
    source = builder.as_data_source(split=split)
  except ValueError as error:
    raise ValueError(f"make_dataset: cannot read split {split!r} of {name!r}: {error}") from error
  return source, builder.info


def num_levels(name: str, features) -> int:
  if name in DIGITS_NAMES:
    return DIGITS_NUM_LEVELS
  if "image" not in features:
    raise ValueError(f"make_dataset: dataset {name!r} has no 'image' feature (features: {list(features)}); "
                     "only image datasets are supported.")
  dtype = np.dtype(features["image"].np_dtype)
  if dtype != np.uint8:
    raise ValueError(f"make_dataset: dataset {name!r} stores images as {dtype}; only uint8 images are supported.")
  return 256
