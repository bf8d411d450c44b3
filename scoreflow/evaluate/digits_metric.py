r"""A domain metric for the 8x8 digits: a small classifier's features (digits FD) and class-confidence scores.

Inception features mean little for 8x8 grey digits, so the tool trains its own judge. :class:`DigitsNet` (a
perceptron 64 -> 256 -> 64 -> 10, about 34k parameters) is trained on the digits train split by
:func:`train_digits_classifier` in a few seconds on a CPU and reaches about 98% accuracy on the test split.
For a set of images it gives

* **digits FD**: :func:`~scoreflow.evaluate.metrics.frechet_distance` between the Gaussian statistics of its
  64-d penultimate-layer features on the images and on the reference split (as FID does with Inception's
  `pool_3`);
* **class-confidence scores** (:class:`ClassifierScores`): the mean maximum softmax probability (do the images
  look like *some* digit?), the entropy of the histogram of predicted classes (are all ten digits produced?
  :math:`\log 10 \approx 2.303` nats when balanced) and the Inception-Score analogue
  :math:`\exp \mathbb{E}_x \mathrm{KL}(p(y|x)\Vert p(y))` in `[1, 10]`.

Input convention. The network reads intensities in `[0, 1]` (level / 16, the `unit_interval` scaler's
values for digits). Model-space samples are decoded to integer levels with the run's training
:class:`~scoreflow.data.AffineScaler` (:meth:`~scoreflow.data.AffineScaler.to_levels`: the floor for a dequantized
scaler, the nearest level otherwise, clipped to `0 .. 16`), as writing them to images would, and then read as
`level / 16` (:func:`to_unit_intensity`): real digits, which are exact levels, and samples go through the same
path.

The trained classifier is saved as a small `.npz` (:func:`save_digits_classifier`, about 140 kB) holding its
parameters, the test accuracy and a format version; :func:`load_digits_classifier` checks every shape.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from scoreflow.data.digits import DIGITS_NUM_LEVELS
from scoreflow.data.scaling import AffineScaler
from scoreflow.io import atomic_savez
from scoreflow.evaluate.metrics import (FeatureMoments, FeatureStatistics, frechet_distance,
                                        inception_score)

DIGITS_SHAPE = (8, 8, 1)
DIGITS_NUM_CLASSES = 10
DIGITS_NUM_FEATURES = 64
_FORMAT_VERSION = 1


class DigitsNet(nn.Module):
  """Dense 64 -> 256 -> ReLU -> 64 -> ReLU = features -> 10 logits (a multilayer perceptron on the pixels).

  `__call__(images [B, 8, 8, 1] in [0, 1]) -> (features [B, 64], logits [B, 10])`. A perceptron rather than a
  convolutional network: on 8x8 images it is as accurate and trains on a CPU in seconds.
  """

  hidden_features: int = 256

  @nn.compact
  def __call__(self, images):
    x = (2 * images - 1).reshape(images.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden_features, name="hidden")(x))
    features = nn.relu(nn.Dense(DIGITS_NUM_FEATURES, name="features")(x))
    logits = nn.Dense(DIGITS_NUM_CLASSES, name="logits")(features)
    return features, logits


class DigitsClassifier(NamedTuple):
  """A trained :class:`DigitsNet`: its parameters and its accuracy on the digits test split."""

  params: Any  # DigitsNet parameters (float32)
  test_accuracy: float  # fraction of the 299 test digits classified correctly (nan if not measured)


class ClassifierScores(NamedTuple):
  """Class-confidence scores of a set of images (see the module docstring)."""

  mean_confidence: float  # mean over images of max_y p(y|x), in [0.1, 1]
  class_entropy: float  # entropy (nats) of the histogram of argmax classes, in [0, log 10]
  classifier_score: float  # exp E_x KL(p(y|x) || p(y)), in [1, 10]


class DigitsSampleQuality(NamedTuple):
  """Digits FD against reference statistics, with the class-confidence scores of the same images."""

  fd: float
  mean_confidence: float
  class_entropy: float
  classifier_score: float
  num_examples: int


def to_unit_intensity(x, scaler: AffineScaler):
  r"""Model-space digits `x: [*S]` -> intensities `v / (L - 1)` in `[0, 1]` of their levels `v` (float32).

  :math:`v` is `scaler.to_levels(x)`: :math:`\lfloor (x - b)/s \rfloor` for a dequantized scaler (the cell
  :math:`[v, v + 1)` that uniform noise filled), the nearest level otherwise, clipped to `0 .. L-1`: the level
  an image file of the sample stores. Use the scaler the model was trained with (`data.scaler` and
  `data.dequantize`). Works on NumPy and JAX arrays (pure, jit-compatible).
  """
  return scaler.to_levels(x).astype(np.float32) / (scaler.num_levels - 1)


def _check_images(where: str, images) -> None:
  if tuple(images.shape[1:]) != DIGITS_SHAPE:
    raise ValueError(f"{where}: images must be [B, 8, 8, 1], got shape {tuple(images.shape)}.")


def digits_features(classifier: DigitsClassifier, images: jax.Array, *,
                    scaler: AffineScaler | None = None) -> tuple[jax.Array, jax.Array]:
  """Penultimate features `[B, 64]` and logits `[B, 10]` of `images: [B, 8, 8, 1]`; pure and jit-compatible.

  Args:
    classifier: from :func:`train_digits_classifier` or :func:`load_digits_classifier`.
    images: intensities in `[0, 1]` when `scaler` is None, else model-space values that `scaler` produced.
    scaler: the run's training data scaler (e.g. `AffineScaler.centred(17, dequantized=True)`); samples are
      rounded to its levels by :func:`to_unit_intensity`.
  """
  images = jnp.asarray(images)
  _check_images("digits_features", images)
  unit = to_unit_intensity(images, scaler) if scaler is not None else jnp.clip(images, 0.0, 1.0)
  return DigitsNet().apply({"params": classifier.params}, unit)


def _cross_entropy(params, images, labels):
  _, logits = DigitsNet().apply({"params": params}, images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def fit_digits_net(key: jax.Array, images: jax.Array, labels: jax.Array, *, num_steps: int = 1000,
                   batch_size: int = 128, learning_rate: float = 3e-3, weight_decay: float = 1e-4):
  """Trains :class:`DigitsNet` parameters by AdamW on `images: [N, 8, 8, 1]` (in `[0, 1]`), `labels: [N]`.

  Each step draws `batch_size` examples uniformly (with replacement across steps) and adds dequantization
  jitter `(u - 1/2) / 16` so that the classifier also reads continuous-valued samples. The learning rate
  decays by a cosine schedule. One `lax.scan`; jit-compatible (`num_steps`, `batch_size` static).

  Returns:
    `(params, losses [num_steps])`.
  """
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  init_key, key = jax.random.split(key)
  params = DigitsNet().init(init_key, images[:1])["params"]
  optimizer = optax.adamw(optax.cosine_decay_schedule(learning_rate, num_steps), weight_decay=weight_decay)

  # Draw every step's batch indices and jitter up front: one vectorized draw compiles faster than a draw per
  # step inside the scan.
  index_key, jitter_key = jax.random.split(key)
  indices = jax.random.randint(index_key, (num_steps, batch_size), 0, images.shape[0])
  jitters = (jax.random.uniform(jitter_key, (num_steps, batch_size, *DIGITS_SHAPE), jnp.float32) - 0.5) * (
      1.0 / (DIGITS_NUM_LEVELS - 1))

  def step(carry, batch):
    params, opt_state = carry
    index, jitter = batch
    loss, grads = jax.value_and_grad(_cross_entropy)(params, jnp.clip(images[index] + jitter, 0.0, 1.0),
                                                     labels[index])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), (indices, jitters))
  return params, losses


def load_digits_split(split: str, *, data_dir: str | os.PathLike | None) -> tuple[np.ndarray, np.ndarray]:
  """All examples of a digits split, in order: `(images [N, 8, 8, 1] float32 in [0, 1], labels [N] int32)`.

  Read through :func:`scoreflow.data.make_dataset` (preparing the tfds dataset into `data_dir` on first use).
  """
  from scoreflow.data import make_dataset, prepare_digits  # pylint: disable=g-import-not-at-top

  num_examples = prepare_digits(data_dir).info.splits[split].num_examples
  with make_dataset("digits", split, data_dir=data_dir, global_batch_size=num_examples, seed=0, shuffle=False,
                    num_epochs=1, scaler="unit_interval", read_threads=0, prefetch_batches=0) as stream:
    batch = next(stream)
  return batch["x"], batch["label"]


def classifier_accuracy(classifier: DigitsClassifier, images, labels) -> float:
  """Fraction of `images` (`[N, 8, 8, 1]` in `[0, 1]`) whose argmax class equals `labels`."""
  _, logits = jax.jit(digits_features)(classifier, jnp.asarray(images, jnp.float32))
  return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == np.asarray(labels)))


def train_digits_classifier(*, data_dir: str | os.PathLike | None, seed: int = 0, num_steps: int = 1000,
                            batch_size: int = 128, learning_rate: float = 3e-3) -> DigitsClassifier:
  """Trains the digits judge on the train split and measures its test accuracy (a few seconds on a CPU).

  Args:
    data_dir: the tfds data directory holding (or to receive) the prepared digits.
    seed: training seed.
    num_steps, batch_size, learning_rate: see :func:`fit_digits_net`.

  Returns:
    :class:`DigitsClassifier`; save it with :func:`save_digits_classifier`.
  """
  train_images, train_labels = load_digits_split("train", data_dir=data_dir)
  fit = jax.jit(fit_digits_net, static_argnames=("num_steps", "batch_size"))
  params, _ = fit(jax.random.key(seed), train_images, train_labels, num_steps=num_steps, batch_size=batch_size,
                  learning_rate=learning_rate)
  test_images, test_labels = load_digits_split("test", data_dir=data_dir)
  classifier = DigitsClassifier(params, float("nan"))
  return classifier._replace(test_accuracy=classifier_accuracy(classifier, test_images, test_labels))


def _param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  shapes = jax.eval_shape(DigitsNet().init, jax.ShapeDtypeStruct((2,), jnp.uint32),
                          jax.ShapeDtypeStruct((1, *DIGITS_SHAPE), jnp.float32))["params"]
  return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(shapes).items()}


def save_digits_classifier(path: str | os.PathLike, classifier: DigitsClassifier) -> None:
  """Writes the classifier to `path` (`.npz`: `params/<module>/<name>`, `test_accuracy`, `format_version`)."""
  arrays = {"params/" + "/".join(name): np.asarray(value)
            for name, value in traverse_util.flatten_dict(classifier.params).items()}
  arrays["test_accuracy"] = np.asarray(classifier.test_accuracy, np.float64)
  arrays["format_version"] = np.asarray(_FORMAT_VERSION)
  atomic_savez(path, arrays)


def load_digits_classifier(path: str | os.PathLike) -> DigitsClassifier:
  """Reads a classifier written by :func:`save_digits_classifier`, checking its format and every shape.

  Raises:
    FileNotFoundError: if there is no file (train one with :func:`train_digits_classifier`).
    ValueError: if the file is not a digits classifier of this version.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"load_digits_classifier: no classifier at {path!r}; train one with "
                            "train_digits_classifier(data_dir=...) and save it with save_digits_classifier.")
  with np.load(path, allow_pickle=False) as archive:
    arrays = {name: archive[name] for name in archive.files}
  version = int(arrays.pop("format_version", -1))
  if version != _FORMAT_VERSION:
    raise ValueError(f"load_digits_classifier: {path!r} has format_version {version}, expected {_FORMAT_VERSION}; "
                     "retrain the classifier with this version of scoreflow.")
  test_accuracy = float(arrays.pop("test_accuracy", np.nan))
  flat = {tuple(name.split("/")[1:]): value for name, value in arrays.items() if name.startswith("params/")}
  expected = _param_shapes()
  got = {name: tuple(value.shape) for name, value in flat.items()}
  if got != expected:
    raise ValueError(f"load_digits_classifier: {path!r} does not hold DigitsNet parameters: expected shapes "
                     f"{expected}, got {got}.")
  params = traverse_util.unflatten_dict({name: jnp.asarray(value) for name, value in flat.items()})
  return DigitsClassifier(params, test_accuracy)


def classifier_scores(logits) -> ClassifierScores:
  """Mean max-softmax, entropy of the predicted-class histogram and the IS analogue of `logits: [N, 10]`."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or logits.shape[0] < 1:
    raise ValueError(f"classifier_scores: logits must be [N, K] with N >= 1, got shape {logits.shape}.")
  shifted = logits - logits.max(axis=-1, keepdims=True)
  probabilities = np.exp(shifted) / np.sum(np.exp(shifted), axis=-1, keepdims=True)
  histogram = np.bincount(np.argmax(logits, axis=-1), minlength=logits.shape[1]) / logits.shape[0]
  nonzero = histogram[histogram > 0]
  return ClassifierScores(mean_confidence=float(np.mean(np.max(probabilities, axis=-1))),
                          class_entropy=float(-np.sum(nonzero * np.log(nonzero))),
                          classifier_score=inception_score(logits, num_splits=1)[0])


_jit_digits_features = jax.jit(digits_features)


def _features_and_logits(classifier, images, scaler, batch_size) -> tuple[np.ndarray, np.ndarray]:
  images = np.asarray(images) if not isinstance(images, jax.Array) else images
  _check_images("digits metric", images)
  features, logits = [], []
  for start in range(0, images.shape[0], batch_size):
    batch_features, batch_logits = _jit_digits_features(classifier, images[start:start + batch_size], scaler=scaler)
    features.append(np.asarray(batch_features))
    logits.append(np.asarray(batch_logits))
  return np.concatenate(features), np.concatenate(logits)


def digits_statistics(classifier: DigitsClassifier, images, *, scaler: AffineScaler | None = None,
                      batch_size: int = 4096, keep_features: bool = False) -> FeatureStatistics:
  """Gaussian statistics (float64) of the classifier's features on `images: [N, 8, 8, 1]` (a reference set)."""
  features, _ = _features_and_logits(classifier, images, scaler, batch_size)
  statistics = FeatureMoments.from_features(features).statistics()
  return statistics._replace(features=features) if keep_features else statistics


def evaluate_digits_samples(classifier: DigitsClassifier, images, reference: FeatureStatistics, *,
                            scaler: AffineScaler | None = None, batch_size: int = 4096) -> DigitsSampleQuality:
  """Digits FD of `images: [N, 8, 8, 1]` against `reference` (e.g. :func:`digits_statistics` of the train
  split) and their :class:`ClassifierScores`.

  Args:
    classifier: the trained judge.
    images: samples, in `[0, 1]` or, with `scaler`, in model space (finite: leave out samples with NaN or inf).
    reference: statistics of the real data's features under the same classifier.
    scaler: the run's training data scaler, if `images` are in model space (they are rounded to its levels).
    batch_size: images per classifier call.
  """
  features, logits = _features_and_logits(classifier, images, scaler, batch_size)
  statistics = FeatureMoments.from_features(features).statistics()
  scores = classifier_scores(logits)
  return DigitsSampleQuality(fd=frechet_distance(statistics.mu, statistics.sigma, reference.mu, reference.sigma),
                             mean_confidence=scores.mean_confidence, class_entropy=scores.class_entropy,
                             classifier_score=scores.classifier_score, num_examples=int(features.shape[0]))
