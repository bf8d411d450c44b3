"""The digits judge: trained on the train split, it separates real digits from noise and an untrained model.

One classifier is trained for the module (about 1000 AdamW steps of a 34k-parameter perceptron: seconds).
Separation claims use margins of an order of magnitude over the same-distribution baseline; accuracies use
binomial standard errors on the 299 test digits.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from scoreflow.data import AffineScaler
from scoreflow.evaluate import (ClassifierScores, DigitsClassifier, classifier_accuracy, classifier_scores,
                                digits_features, digits_statistics, evaluate_digits_samples, frechet_distance,
                                load_digits_classifier, load_digits_split, save_digits_classifier,
                                to_unit_intensity, train_digits_classifier)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  """`(classifier, train_images, test_images, test_labels, reference statistics of the train split)`."""
  data_dir = tmp_path_factory.mktemp("tfds_digits")
  classifier = train_digits_classifier(data_dir=data_dir, seed=0)
  train_images, _ = load_digits_split("train", data_dir=data_dir)
  test_images, test_labels = load_digits_split("test", data_dir=data_dir)
  return classifier, train_images, test_images, test_labels, digits_statistics(classifier, train_images)


def test_classifier_is_accurate(digits):
  classifier, _, test_images, test_labels, _ = digits
  # A perceptron reaches ~97% on these digits; the binomial standard error on 299 test digits at p = 0.97
  # is 1%, so 0.93 is four standard errors below.
  assert classifier.test_accuracy >= 0.93
  assert classifier_accuracy(classifier, test_images, test_labels) == classifier.test_accuracy
  assert test_images.shape == (299, 8, 8, 1) and test_images.dtype == np.float32
  assert 0.0 == test_images.min() and test_images.max() == 1.0


def test_separates_real_digits_from_noise_and_an_untrained_model(digits):
  classifier, train_images, test_images, _, reference = digits
  rng = np.random.default_rng(0)
  scaler = AffineScaler.centred(17)
  real = evaluate_digits_samples(classifier, test_images, reference)
  noise = evaluate_digits_samples(classifier, rng.uniform(size=(299, 8, 8, 1)).astype(np.float32), reference)
  # An untrained model's samples: its prior N(0, I) in model space, read back through the data scaler.
  untrained = evaluate_digits_samples(classifier, rng.standard_normal((299, 8, 8, 1)).astype(np.float32),
                                      reference, scaler=scaler)
  # Same-distribution baseline: 299 train digits against the statistics of the other 1199, averaged over 3
  # random partitions (the finite-sample bias of FD at these sizes).
  baseline = np.mean([
      frechet_distance(*digits_statistics(classifier, train_images[perm[:299]])[:2],
                       *digits_statistics(classifier, train_images[perm[299:]])[:2])
      for perm in (rng.permutation(len(train_images)) for _ in range(3))])
  # Measured: FD test 4.2, baseline 5.7, noise 570, untrained 480; confidence 0.99 vs ~0.7; score 9.6 vs ~4.
  assert real.fd < 2 * baseline
  for fake in (noise, untrained):
    assert fake.fd > 20 * max(real.fd, baseline)
    assert fake.mean_confidence < real.mean_confidence - 0.15
    assert fake.classifier_score < real.classifier_score / 1.5
  assert real.num_examples == 299 and real.mean_confidence > 0.95 and real.classifier_score > 8.5
  # The test split holds every digit about equally often: entropy close to log 10.
  assert real.class_entropy > np.log(10) - 0.05


@pytest.mark.parametrize("dequantized", [False, True])
def test_model_space_samples_read_back_exactly(digits, dequantized):
  classifier, _, test_images, _, reference = digits
  scaler = AffineScaler.centred(17, dequantized=dequantized)
  levels = np.rint(test_images * 16)
  model_space = scaler.forward(levels + (0.5 if dequantized else 0.0))
  np.testing.assert_allclose(to_unit_intensity(model_space, scaler), test_images, atol=1e-6)
  direct = evaluate_digits_samples(classifier, test_images, reference)
  via_scaler = evaluate_digits_samples(classifier, model_space, reference, scaler=scaler)
  assert via_scaler.fd == pytest.approx(direct.fd, rel=1e-4)
  assert via_scaler.mean_confidence == pytest.approx(direct.mean_confidence, rel=1e-5)


@pytest.mark.parametrize("dequantized", [False, True])
def test_samples_are_rounded_to_levels_as_real_digits_are(digits, dequantized):
  """A sample anywhere in the cell of level v (its nearest-level cell, or [v, v + 1) of a dequantized scaler) is
  the digit with level v, as its image file would be: the classifier sees exactly the real digit."""
  classifier, _, test_images, _, reference = digits
  scaler = AffineScaler.centred(17, dequantized=dequantized)
  levels = np.rint(test_images * 16)
  u = np.random.default_rng(1).uniform(size=levels.shape)
  # Offsets inside each cell, away from its edges by 1e-3 of a level (float32 keeps ~1e-6 of a level here).
  offsets = 0.001 + 0.998 * u if dequantized else 0.499 * (2 * u - 1)
  samples = scaler.forward((levels + offsets).astype(np.float32))
  np.testing.assert_array_equal(to_unit_intensity(samples, scaler), test_images)
  np.testing.assert_array_equal(digits_features(classifier, samples, scaler=scaler)[0],
                                digits_features(classifier, test_images)[0])
  direct = evaluate_digits_samples(classifier, test_images, reference)
  assert evaluate_digits_samples(classifier, samples, reference, scaler=scaler) == direct
  # Outside the range: clipped to the extreme levels.
  np.testing.assert_array_equal(to_unit_intensity(np.array([-3.0, 3.0], np.float32), scaler), [0.0, 1.0])


def test_features_are_pure_and_compile_once(digits):
  classifier, _, test_images, _, _ = digits
  # A fresh function: jit caches are shared by every jax.jit of the same function object.
  features = jax.jit(lambda classifier, images: digits_features(classifier, images))
  first, logits = features(classifier, jnp.asarray(test_images[:32]))
  assert first.shape == (32, 64) and logits.shape == (32, 10) and first.dtype == jnp.float32
  features(classifier, jnp.asarray(test_images[32:64]))
  assert features._cache_size() == 1
  with pytest.raises(ValueError, match=r"images must be \[B, 8, 8, 1\], got shape \(2, 8, 8\)"):
    digits_features(classifier, jnp.zeros((2, 8, 8), jnp.float32))


def test_checkpoint_round_trip(digits, tmp_path):
  classifier, _, test_images, _, _ = digits
  path = tmp_path / "digits_classifier.npz"
  save_digits_classifier(path, classifier)
  loaded = load_digits_classifier(path)
  assert isinstance(loaded, DigitsClassifier) and loaded.test_accuracy == classifier.test_accuracy
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(classifier.params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(digits_features(loaded, test_images[:8])[1],
                                digits_features(classifier, test_images[:8])[1])
  with np.load(path) as archive:
    arrays = dict(archive)
  np.savez(tmp_path / "old.npz", **{**arrays, "format_version": np.asarray(0)})
  with pytest.raises(ValueError, match=r"format_version 0, expected 1"):
    load_digits_classifier(tmp_path / "old.npz")
  del arrays["params/logits/bias"]
  np.savez(tmp_path / "partial.npz", **arrays)
  with pytest.raises(ValueError, match=r"does not hold DigitsNet parameters"):
    load_digits_classifier(tmp_path / "partial.npz")
  with pytest.raises(FileNotFoundError, match=r"train one with train_digits_classifier"):
    load_digits_classifier(tmp_path / "missing.npz")


def test_classifier_scores_closed_forms():
  # Confident, balanced predictions over 10 classes: confidence 1, histogram entropy log 10, score 10.
  confident = 60.0 * np.tile(np.eye(10), (4, 1))
  assert classifier_scores(confident) == pytest.approx(ClassifierScores(1.0, np.log(10), 10.0), abs=1e-12)
  # Identical uniform predictions: confidence 1/10, all argmaxes equal (entropy 0), score 1.
  assert classifier_scores(np.zeros((5, 10))) == pytest.approx(ClassifierScores(0.1, 0.0, 1.0), abs=1e-12)
  with pytest.raises(ValueError, match=r"logits must be \[N, K\] with N >= 1, got shape \(10,\)"):
    classifier_scores(np.zeros(10))
