"""Evaluation: sample quality (FID/IS/KID with pytorch-fid's Inception-v3 in Flax, a digits domain metric) and the
engine of `run_eval.py` (:mod:`~scoreflow.evaluate.run`, which orchestrates :mod:`~scoreflow.evaluate.bpd`,
:mod:`~scoreflow.evaluate.samples`, :mod:`~scoreflow.evaluate.reference`, :mod:`~scoreflow.evaluate.checkpoints`,
:mod:`~scoreflow.evaluate.report` over resumable :mod:`~scoreflow.evaluate.units`)."""

from scoreflow.evaluate.metrics import FeatureMoments as FeatureMoments
from scoreflow.evaluate.metrics import FeatureStatistics as FeatureStatistics
from scoreflow.evaluate.metrics import KernelDistance as KernelDistance
from scoreflow.io import atomic_savez as atomic_savez
from scoreflow.evaluate.metrics import feature_statistics as feature_statistics
from scoreflow.evaluate.metrics import frechet_distance as frechet_distance
from scoreflow.evaluate.metrics import inception_score as inception_score
from scoreflow.evaluate.metrics import kernel_inception_distance as kernel_inception_distance
from scoreflow.evaluate.metrics import load_statistics as load_statistics
from scoreflow.evaluate.metrics import mmd2_unbiased as mmd2_unbiased
from scoreflow.evaluate.metrics import polynomial_kernel as polynomial_kernel
from scoreflow.evaluate.metrics import save_statistics as save_statistics
from scoreflow.evaluate.metrics import trace_sqrt_product as trace_sqrt_product

from scoreflow.evaluate.inception import FID_INCEPTION_NUM_CLASSES as FID_INCEPTION_NUM_CLASSES
from scoreflow.evaluate.inception import FID_INCEPTION_NUM_FEATURES as FID_INCEPTION_NUM_FEATURES
from scoreflow.evaluate.inception import FIDInceptionV3 as FIDInceptionV3
from scoreflow.evaluate.inception import INCEPTION_INPUT_SIZE as INCEPTION_INPUT_SIZE
from scoreflow.evaluate.inception import bilinear_resize as bilinear_resize
from scoreflow.evaluate.inception import check_fid_inception_file as check_fid_inception_file
from scoreflow.evaluate.inception import convert_pytorch_fid_weights as convert_pytorch_fid_weights
from scoreflow.evaluate.inception import fid_inception_features as fid_inception_features
from scoreflow.evaluate.inception import fid_inception_from_torch as fid_inception_from_torch
from scoreflow.evaluate.inception import fid_inception_outputs as fid_inception_outputs
from scoreflow.evaluate.inception import fid_inception_to_torch as fid_inception_to_torch
from scoreflow.evaluate.inception import init_fid_inception as init_fid_inception
from scoreflow.evaluate.inception import load_fid_inception as load_fid_inception
from scoreflow.evaluate.inception import save_fid_inception as save_fid_inception

from scoreflow.evaluate.digits_metric import ClassifierScores as ClassifierScores
from scoreflow.evaluate.digits_metric import DigitsClassifier as DigitsClassifier
from scoreflow.evaluate.digits_metric import DigitsNet as DigitsNet
from scoreflow.evaluate.digits_metric import DigitsSampleQuality as DigitsSampleQuality
from scoreflow.evaluate.digits_metric import classifier_accuracy as classifier_accuracy
from scoreflow.evaluate.digits_metric import classifier_scores as classifier_scores
from scoreflow.evaluate.digits_metric import digits_features as digits_features
from scoreflow.evaluate.digits_metric import digits_statistics as digits_statistics
from scoreflow.evaluate.digits_metric import evaluate_digits_samples as evaluate_digits_samples
from scoreflow.evaluate.digits_metric import fit_digits_net as fit_digits_net
from scoreflow.evaluate.digits_metric import load_digits_classifier as load_digits_classifier
from scoreflow.evaluate.digits_metric import load_digits_split as load_digits_split
from scoreflow.evaluate.digits_metric import save_digits_classifier as save_digits_classifier
from scoreflow.evaluate.digits_metric import to_unit_intensity as to_unit_intensity
from scoreflow.evaluate.digits_metric import train_digits_classifier as train_digits_classifier
