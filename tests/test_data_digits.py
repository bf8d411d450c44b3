"""The tfds digits builder prepares offline into a data_dir and reads back scikit-learn's digits exactly."""

import multiprocessing

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
  prepare_digits(digits_dir)  # Its speed is bench/'s business; here: nothing is rewritten or added.
  assert {path.name: path.stat().st_mtime_ns for path in version_dir.iterdir()} == before


def _prepare_and_read(data_dir, barrier, results):
  """In a child process: prepare the digits once every racer is ready, then read both splits back."""
  barrier.wait()
  try:
    builder = prepare_digits(data_dir)
    read = {}
    for split in ("train", "test"):
      examples = builder.as_data_source(split).__getitems__(list(range(builder.info.splits[split].num_examples)))
      read[split] = (np.stack([example["image"] for example in examples]),
                     np.array([example["label"] for example in examples]))
    results.put(("ok", read))
  except Exception as error:  # pylint: disable=broad-except  # reported to the test
    results.put(("error", repr(error)))


def test_concurrent_preparation_from_several_processes(tmp_path):
  # Every host of a multi-host run prepares the digits into a shared data_dir. Three processes start at once;
  # tfds' rename of the first finished copy makes the others' renames fail, which must not fail them. A fork
  # server with the module preloaded starts them quickly without forking this (multithreaded) process.
  context = multiprocessing.get_context("forkserver")
  context.set_forkserver_preload(["scoreflow.data.digits", __name__])
  num_processes = 3
  barrier, results = context.Barrier(num_processes), context.Queue()
  processes = [context.Process(target=_prepare_and_read, args=(str(tmp_path), barrier, results))
               for _ in range(num_processes)]
  for process in processes:
    process.start()
  outcomes = [results.get(timeout=120) for _ in processes]
  for process in processes:
    process.join(timeout=60)
  assert [status for status, _ in outcomes] == ["ok"] * num_processes, outcomes
  reference = load_digits()
  in_test = np.arange(len(reference.images)) % 6 == 5
  for _, read in outcomes:
    for split, in_split in (("train", ~in_test), ("test", in_test)):
      images, labels = read[split]
      np.testing.assert_array_equal(images[..., 0], reference.images[in_split].astype(np.uint8))
      np.testing.assert_array_equal(labels, reference.target[in_split])
  version_dir = tmp_path / "scoreflow_digits" / "1.0.0"
  assert prepare_digits(tmp_path).is_prepared() and (version_dir / "dataset_info.json").is_file()
  assert [path.name for path in (tmp_path / "scoreflow_digits").iterdir()] == ["1.0.0"]  # no incomplete.* left
