"""The tfds digits builder prepares offline into a data_dir and reads back scikit-learn's digits exactly."""

import time

import numpy as np
import pytest
from sklearn.datasets import load_digits

from scoreflow.data import DIGITS_NUM_EXAMPLES, DIGITS_NUM_LEVELS, prepare_digits


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds_digits")
  prepare_digits(data_dir)
  return data_dir


def test_builder_identity_and_format(digits_dir):
  builder = prepare_digits(digits_dir)
  assert builder.name == "scoreflow_digits" and str(builder.info.version) == "1.0.0"
  version_dir = digits_dir / "scoreflow_digits" / "1.0.0"
  assert (version_dir / "dataset_info.json").is_file()
  assert any(".array_record" in path.name for path in version_dir.iterdir())
  assert {split: info.num_examples for split, info in builder.info.splits.items()} == {"train": 1498, "test": 299}


def test_reads_back_all_1797_examples_exactly(digits_dir):
  builder = prepare_digits(digits_dir)
  reference = load_digits()
  indices = np.arange(len(reference.images))
  examples = 0
  for split, in_split in (("train", indices % 6 != 5), ("test", indices % 6 == 5)):
    source = builder.as_data_source(split)
    images = np.stack([source[i]["image"] for i in range(len(source))])
    labels = np.array([source[i]["label"] for i in range(len(source))])
    assert images.dtype == np.uint8 and images.shape == (len(source), 8, 8, 1)
    assert images.min() == 0 and images.max() == DIGITS_NUM_LEVELS - 1
    np.testing.assert_array_equal(images[..., 0], reference.images[in_split].astype(np.uint8))
    np.testing.assert_array_equal(labels, reference.target[in_split])
    assert set(labels.tolist()) == set(range(10))
    examples += len(source)
  assert examples == DIGITS_NUM_EXAMPLES == 1797


def test_second_prepare_is_a_no_op(digits_dir):
  version_dir = digits_dir / "scoreflow_digits" / "1.0.0"
  before = {path.name: path.stat().st_mtime_ns for path in version_dir.iterdir()}
  start = time.perf_counter()
  prepare_digits(digits_dir)
  assert time.perf_counter() - start < 2.0
  assert {path.name: path.stat().st_mtime_ns for path in version_dir.iterdir()} == before
