"""The 8x8 handwritten digits that scikit-learn ships, as a real tfds dataset prepared offline.

scikit-learn's `load_digits` holds the 1797 test images of the UCI "Optical Recognition of Handwritten
Digits" set: 8x8 grey images whose pixels count set bits in 4x4 blocks of a 32x32 bitmap, so they take the
17 values `0 .. 16` (:data:`DIGITS_NUM_LEVELS`). :class:`ScoreflowDigits` (tfds name `scoreflow_digits`,
version 1.0.0) writes them in the `array_record` format, which `tfds.data_source` and grain read with random
access and without TensorFlow.

Features: `image` uint8 `[8, 8, 1]` with values `0 .. 16` (a `tfds.features.Tensor`: no image codec), `label`
int64 `0 .. 9`.

Splits (deterministic, by position in scikit-learn's order, which is stable across releases): `test` holds
the examples whose index `i` satisfies `i % 6 == 5` (299 images), `train` the others (1498 images). Records
are stored in that order (tfds' write-time shuffling is disabled), so `source[j]` is the `j`-th example of
its split in scikit-learn's order.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

DIGITS_NAMES = ("digits", "scoreflow_digits")  # The names `make_dataset` accepts for this dataset.
DIGITS_NUM_LEVELS = 17
DIGITS_NUM_EXAMPLES = 1797
_TEST_EVERY = 6


def _is_test_index(index: int) -> bool:
  return index % _TEST_EVERY == _TEST_EVERY - 1


class ScoreflowDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits (1797 images, 17 grey levels) as a tfds builder; no download.

  Prepare with :func:`prepare_digits`, or directly::

    builder = ScoreflowDigits(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    source = builder.as_data_source("train")   # len 1498; source[i] = {"image": ..., "label": ...}
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "scikit-learn's load_digits; test = indices i with i % 6 == 5."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("The 1797 8x8 handwritten digits shipped with scikit-learn (UCI optical recognition "
                     "of handwritten digits, test part); pixel values 0..16."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # store examples in scikit-learn's order (the pipeline shuffles)
        homepage="https://archive.ics.uci.edu/dataset/80/optical+recognition+of+handwritten+digits",
        citation=("@misc{alpaydin1998optical, author={Alpaydin, E. and Kaynak, C.}, title={Optical "
                  "Recognition of Handwritten Digits}, year={1998}, publisher={UCI Machine Learning "
                  "Repository}}"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ship with scikit-learn.
    return {"train": self._generate_examples(test=False), "test": self._generate_examples(test=True)}

  def _generate_examples(self, test: bool):
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    images = np.rint(digits.images).astype(np.uint8)[..., None]
    for index, (image, label) in enumerate(zip(images, digits.target)):
      if _is_test_index(index) == test:
        yield index, {"image": image, "label": int(label)}


def prepare_digits(data_dir: str | os.PathLike | None = None) -> ScoreflowDigits:
  """Returns the digits builder, preparing it into `data_dir` on first use (a no-op afterwards).

  Preparation takes about a second, needs no network and writes
  `<data_dir>/scoreflow_digits/1.0.0/` (array_record shards, `dataset_info.json`, `features.json`).

  Safe to call from several processes sharing `data_dir` (every host of a multi-host run does): tfds writes
  into a private `incomplete.*` directory and renames it onto the version directory, so when processes race,
  the first rename wins and the others' fail with an `OSError`; a loser then checks that the winner's copy is
  complete and reads it. (Each racer still spends the second of preparation.)

  Args:
    data_dir: the tfds data directory; `None` means tfds' default (`$TFDS_DATA_DIR` or
      `~/tensorflow_datasets`).

  Returns:
    The prepared :class:`ScoreflowDigits` builder; read a split with `builder.as_data_source("train")`.
  """

  def open_builder() -> ScoreflowDigits:
    return ScoreflowDigits(data_dir=None if data_dir is None else os.fspath(data_dir), file_format="array_record")

  builder = open_builder()
  if builder.is_prepared():
    return builder
  try:
    builder.download_and_prepare()
  except OSError:
    if not open_builder().is_prepared():
      raise
  # A fresh builder reads the split sizes from the prepared directory: one built before another process
  # finished preparing holds only the code's DatasetInfo.
  return open_builder()
