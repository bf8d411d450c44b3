"""Data: offline toy densities and digits, tfds/grain image pipelines, scaling and dequantization.

Modules: :mod:`~scoreflow.data.stream` (`make_dataset`: the resumable, sharded batch stream),
:mod:`~scoreflow.data.tfds_source` (prepared tfds datasets read offline, in-memory arrays),
:mod:`~scoreflow.data.transforms` (image geometry, per-dataset preprocessing), :mod:`~scoreflow.data.scaling`
(`AffineScaler`: levels to model space and back, and the one dequantization rule), :mod:`~scoreflow.data.toy`,
:mod:`~scoreflow.data.digits`.
"""

from scoreflow.data.digits import DIGITS_NUM_EXAMPLES as DIGITS_NUM_EXAMPLES
from scoreflow.data.digits import DIGITS_NUM_LEVELS as DIGITS_NUM_LEVELS
from scoreflow.data.digits import ScoreflowDigits as ScoreflowDigits
from scoreflow.data.digits import prepare_digits as prepare_digits

from scoreflow.data.stream import DataIterator as DataIterator
from scoreflow.data.stream import make_dataset as make_dataset

from scoreflow.data.transforms import centre_crop as centre_crop
from scoreflow.data.transforms import crop_resize as crop_resize
from scoreflow.data.transforms import resize as resize
from scoreflow.data.transforms import resize_small as resize_small

from scoreflow.data.scaling import AffineScaler as AffineScaler
from scoreflow.data.scaling import uniform_dequantize as uniform_dequantize

from scoreflow.data.toy import TOY_DATASETS as TOY_DATASETS
from scoreflow.data.toy import sample_toy as sample_toy
from scoreflow.data.toy import toy_mixture as toy_mixture
