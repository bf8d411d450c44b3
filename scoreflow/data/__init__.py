"""Data: offline toy densities and digits, tfds/grain image pipelines, scaling and dequantization.

Modules: :mod:`~scoreflow.data.stream` (`make_dataset`: the resumable, sharded batch stream),
:mod:`~scoreflow.data.tfds_source` (prepared tfds datasets read offline, in-memory arrays),
:mod:`~scoreflow.data.transforms` (image geometry, per-dataset preprocessing), :mod:`~scoreflow.data.scaling`
(`AffineScaler`: levels to model space and back, and the one dequantization rule), :mod:`~scoreflow.data.toy`,
:mod:`~scoreflow.data.digits`.
"""

from scoreflow.data.scaling import AffineScaler as AffineScaler
from scoreflow.data.scaling import uniform_dequantize as uniform_dequantize

from scoreflow.data.toy import TOY_DATASETS as TOY_DATASETS
from scoreflow.data.toy import sample_toy as sample_toy
from scoreflow.data.toy import toy_mixture as toy_mixture

# Loaded on first use: the digits builder and the stream import tensorflow-datasets and grain, which the core (the
# likelihood's dequantization, the bounds) does not need when it imports the scaler.
_LAZY = {"DIGITS_NUM_EXAMPLES": "digits", "DIGITS_NUM_LEVELS": "digits", "ScoreflowDigits": "digits",
         "prepare_digits": "digits", "DataIterator": "stream", "make_dataset": "stream", "centre_crop": "transforms",
         "crop_resize": "transforms", "resize": "transforms", "resize_small": "transforms"}


def __getattr__(name):
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top

    return getattr(importlib.import_module(f"scoreflow.data.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'scoreflow.data' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
