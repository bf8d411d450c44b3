"""Reference statistics that sample quality is measured against, computed once, cached and resumable: Inception
features of a dataset split (FID/IS/KID) and the digits classifier with its statistics; the features of sample
shards, cached per shard; and the streams that feed them (a split's exact levels, the training stream's scaler).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from scoreflow import io
from scoreflow.config.evaluation import FidSettings
from scoreflow.config.experiment import DataSettings
from scoreflow.data import make_dataset
from scoreflow.data.toy import TOY_DATASETS
from scoreflow.evaluate import digits_metric, inception, metrics, units
from scoreflow.evaluate import samples as samples_lib


def eval_stream(data: DataSettings, split: str, batch_size: int, *, seed: int = 0, dequantize: bool = False):
  """An unshuffled, infinite stream of `split` (position n holds example n mod N) in model space, flips off.

  Without `dequantize` (the default) the images are their integer levels and `stream.scaler` is the levels
  scaler, which gives the real data's levels back exactly; with `dequantize=data.dequantize` the stream's scaler
  is the training one.
  """
  kwargs = data.dataset_kwargs()
  if data.name not in TOY_DATASETS:
    kwargs.update(random_flip=False, dequantize=dequantize)
  return make_dataset(data.name, split, global_batch_size=batch_size, seed=seed, shuffle=False, num_epochs=None,
                      **kwargs)


def reference_images(data: DataSettings, split: str, batch_size: int) -> Callable[[int], Iterator]:
  """`images(start)`: uint8 `[b, H, W, C]` batches of `split`'s exact levels from image `start` on (the stream's
  position `n` holds example `n mod N`), read `batch_size` at a time; whole batches before `start` are skipped
  unread. The image source of :func:`reference_statistics`."""

  def images(start: int) -> Iterator[np.ndarray]:
    reader = eval_stream(data, split, batch_size)
    try:
      first, skip = divmod(start, batch_size)
      reader.set_state({**reader.get_state(), "next_batch": first})
      for batch in reader:
        yield np.asarray(reader.scaler.to_uint8(batch["x"][skip:]))
        skip = 0
    finally:
      reader.close()

  return images


def model_space(data: DataSettings) -> tuple[tuple[int, ...], Any]:
  """`(element_shape, scaler)` of the training stream: one example's shape and the
  :class:`~scoreflow.data.AffineScaler` of `data.scaler` and `data.dequantize` (None for toy data), which maps
  levels to the space the model was trained in and decodes samples back to levels (`to_levels`, `to_uint8`)."""
  stream = eval_stream(data, data.split, 1, dequantize=data.dequantize)
  try:
    return tuple(stream.element_shape), stream.scaler
  finally:
    stream.close()


def weights_digest(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as file:
    for block in iter(lambda: file.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()[:8]


def _inception_outputs(variables, images: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Inception pool features and logits of uint8 `images`, padded to whole batches so that every call of the
  network has the shape `[batch_size, ...]` (one compilation)."""
  num_images = images.shape[0]
  padding = -num_images % batch_size
  if padding:
    images = np.concatenate([images, np.repeat(images[-1:], padding, axis=0)])
  pool, logits = inception.fid_inception_outputs(variables, images, batch_size=batch_size)
  return pool[:num_images], logits[:num_images]


def _partial_path(path: str) -> str:
  return (path[:-len(".npz")] if path.endswith(".npz") else path) + ".partial.npz"


def _load_partial(path: str, num_features: int, with_moments: bool, keep: int):
  """`(count, moments or None, kept features [k, d])` of a partial reference pass, or the start of a new one
  when `path` holds none (or one that does not fit: it is then recomputed)."""
  fresh = (0, metrics.FeatureMoments.empty(num_features) if with_moments else None,
           np.zeros((0, num_features), np.float32))
  saved = io.load_npz(path)
  if saved is None or "count" not in saved or "features" not in saved:
    return fresh
  count = int(saved["count"])
  kept = saved["features"][:keep]
  if kept.shape[0] != min(count, keep) or kept.shape[1:] != (num_features,):
    return fresh
  if not with_moments:
    return count, None, kept
  if "mean" not in saved or "scatter" not in saved or saved["mean"].shape != (num_features,):
    return fresh
  return count, metrics.FeatureMoments(count, saved["mean"], saved["scatter"]), kept


def reference_statistics(features_fn: Callable[[np.ndarray], np.ndarray], images: Callable[[int], Iterable],
                         moments_path: str, *, num_examples: int, num_features: int, kid_path: str | None = None,
                         kid_reference_size: int = 0, save_every: int = 50, progress_bar: bool = False
                         ) -> metrics.FeatureStatistics:
  """Reference statistics of a stream of images, computed once, cached, and resumable while computed.

  Two files: `moments_path` holds the mean and covariance of the features of the first `num_examples` images
  (what FID needs), `kid_path` the features of the first `K = min(kid_reference_size, num_examples)` (what KID
  needs). One pass over the images computes whichever is missing, so changing only `kid_reference_size`
  reads `K` images and leaves the moments alone.

  The pass accumulates exact float64 moments (:class:`~scoreflow.evaluate.metrics.FeatureMoments`) and, every
  `save_every` batches, writes its state (the count, mean and scatter, and the features kept for KID so far)
  atomically to `<file>.partial.npz`. A pass that finds such a file resumes after the images it counts, asking
  `images(count)` for the rest; the resumed statistics equal those of an uninterrupted pass bit for bit when
  the images come in the same batches (the same moments are merged in the same order). The partial file is
  removed when the statistics are written.

  Args:
    features_fn: `features_fn(images [b, ...]) -> features [b, d]`, e.g. Inception `pool_3` features.
    images: `images(start)`: an iterable of image batches from image `start` on (at least up to the last image
      needed), e.g. uint8 `[b, H, W, C]` batches of a dataset split.
    moments_path, kid_path: the cache files (`kid_path` None: no KID features).
    num_examples: images whose features make the moments.
    num_features: `d`.
    kid_reference_size: images whose features are kept for KID (0: none).
    save_every: batches between two saves of the partial state.
    progress_bar: show a tqdm bar.

  Returns:
    :class:`~scoreflow.evaluate.metrics.FeatureStatistics` with the KID features (None without them).

  Raises:
    ValueError: if `images(start)` ends before the last image needed.
  """
  keep = min(kid_reference_size, num_examples) if kid_path else 0
  with_moments = not os.path.isfile(moments_path)
  keep_missing = keep if keep and not os.path.isfile(kid_path) else 0
  if with_moments or keep_missing:
    end = num_examples if with_moments else keep_missing
    partial = _partial_path(moments_path if with_moments else kid_path)
    count, moments, kept = _load_partial(partial, num_features, with_moments, keep_missing)
    kept = [kept]
    bar = units.progress(end, count, "reference features", "image", progress_bar)
    batches = iter(images(count))
    try:
      since_save = 0
      while count < end:
        batch = next(batches, None)
        if batch is None:
          raise ValueError(f"reference_statistics: the images ended after {count} of {end}.")
        batch = np.asarray(batch)[:end - count]
        features = np.asarray(features_fn(batch))
        if with_moments:
          moments = moments.update(features)
        held = sum(part.shape[0] for part in kept)
        if held < keep_missing:
          kept.append(features[:keep_missing - held].astype(np.float32))
        count += batch.shape[0]
        bar.update(batch.shape[0])
        since_save += 1
        if since_save == save_every and count < end:
          state = {"count": np.asarray(count, np.int64), "features": np.concatenate(kept)}
          if with_moments:
            state.update(mean=moments.mean, scatter=moments.scatter)
          io.atomic_savez(partial, state)
          since_save = 0
    finally:
      bar.close()
      close = getattr(batches, "close", None)
      if close is not None:
        close()
    if with_moments:
      metrics.save_statistics(moments_path, moments.statistics())
    if keep_missing:
      io.atomic_savez(kid_path, {"features": np.concatenate(kept)})
    if os.path.exists(partial):
      os.remove(partial)
  statistics = metrics.load_statistics(moments_path)
  if keep:
    with np.load(kid_path, allow_pickle=False) as archive:
      statistics = statistics._replace(features=archive["features"])
  return statistics


def inception_reference(variables, images: Callable[[int], Iterable[np.ndarray]], moments_path: str, *,
                        num_examples: int, kid_path: str | None, kid_reference_size: int, batch_size: int,
                        save_every: int = 50, progress_bar: bool = False) -> metrics.FeatureStatistics:
  """:func:`reference_statistics` of uint8 image batches under the FID Inception network (`pool_3` features)."""
  return reference_statistics(lambda batch: _inception_outputs(variables, batch, batch_size)[0], images,
                              moments_path, num_examples=num_examples,
                              num_features=inception.FID_INCEPTION_NUM_FEATURES, kid_path=kid_path,
                              kid_reference_size=kid_reference_size, save_every=save_every,
                              progress_bar=progress_bar)


def shard_outputs(outputs_fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], sample_dir: str,
                  cache_name: str, num_samples: int, shard_size: int, to_images: Callable, *,
                  progress_bar: bool = False, description: str = "features"
                  ) -> tuple[np.ndarray, np.ndarray, int]:
  """Network outputs of the finite samples of the shards in `sample_dir`, cached per shard.

  Each shard file is read once; its finite samples (:func:`finite_rows`) are mapped to images by `to_images`
  (the training scaler's `to_uint8`) and through `outputs_fn`, and the result is written to
  `<cache_name>-<i>.npz` (`pool`, `logits` of the finite samples and the `finite` mask of the shard).

  In a multi-process evaluation every process calls this: each computes the outputs of its shards
  (:func:`units.assigned_units`), all wait for one another (:func:`units.gather`), and each reads the others'
  cached outputs back; every process returns the same arrays.

  Returns:
    `(pool [M, d], logits [M, K], num_nonfinite)`: the outputs of the `M` finite samples among the first
    `num_samples`, and how many were left out.

  Raises:
    ValueError: if no sample is finite.
  """
  num_shards = -(-num_samples // shard_size)

  def needed(index):
    return min(shard_size, num_samples - index * shard_size)

  def cache_path(index):
    return os.path.join(sample_dir, f"{cache_name}-{index:05d}.npz")

  def fits(cached, index):
    return "finite" in cached and cached["finite"].shape[0] >= needed(index)

  outputs = {}
  mine = units.assigned_units(num_shards)
  bar = units.progress(sum(needed(index) for index in mine), 0, description, "sample", progress_bar)
  try:
    for index in mine:

      def compute(index=index):
        samples = samples_lib.load_shard(sample_dir, index)[:needed(index)]
        finite = samples_lib.finite_rows(samples)
        pool, logit = np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
        if finite.any():
          pool, logit = outputs_fn(np.asarray(to_images(samples[finite])))
        return {"pool": np.asarray(pool, np.float32), "logits": np.asarray(logit, np.float32), "finite": finite}

      outputs[index], _ = units.resumable_unit(cache_path(index), compute,
                                               fits=lambda cached, index=index: fits(cached, index))
      bar.update(needed(index))
  finally:
    bar.close()
  units.gather(f"{cache_name} {sample_dir}", None)
  pools, logits, nonfinite = [], [], 0
  for index in range(num_shards):
    cached = (outputs[index] if index in outputs else  # Else another process's shard.
              units.read_unit(cache_path(index), lambda cached, index=index: fits(cached, index)))
    rows = int(np.sum(cached["finite"][:needed(index)]))
    if rows:
      pools.append(cached["pool"][:rows])
      logits.append(cached["logits"][:rows])
    nonfinite += needed(index) - rows
  if not pools:
    raise samples_lib.no_finite_samples(num_samples, sample_dir)
  return np.concatenate(pools), np.concatenate(logits), nonfinite


def inception_reference_paths(cache_dir: str, data: DataSettings, fid: FidSettings, *, num_examples: int,
                              version: str | None, weights_digest: str) -> tuple[str, str | None]:
  """`(moments file, KID features file or None)` of the Inception reference statistics in `cache_dir`.

  Named by what determines their content: the dataset, its prepared tfds `version` and `data_dir`, the split, the
  image size and the weights, and the number of images (`num_examples` for the moments, the KID reference size
  for the features, so that changing one does not recompute the other).
  """
  data_dir = str(data.data_dir or "")
  if data_dir and "://" not in data_dir:
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
  source = units.fingerprint({"dataset": data.name, "version": version, "data_dir": data_dir,
                              "split": fid.reference_split, "image_size": data.image_size or 0,
                              "inception": weights_digest})
  stem = f"{units.safe_name(data.name)}-{units.safe_name(fid.reference_split)}"
  moments = os.path.join(cache_dir, f"inception_moments-{stem}-{num_examples}-{source}.npz")
  kid_size = min(fid.kid_reference_size, num_examples)
  return moments, os.path.join(cache_dir, f"inception_kid-{stem}-{kid_size}-{source}.npz") if kid_size else None


def inception_sample_outputs(variables, sample_dir: str, weights_digest: str, num_samples: int, shard_size: int,
                             to_uint8: Callable, *, batch_size: int, progress_bar: bool = False):
  """:func:`shard_outputs` with the FID Inception network: `(pool [M, 2048], logits [M, 1008], num_nonfinite)`,
  cached as `inception-<weights digest>-<i>.npz` in `sample_dir`."""
  return shard_outputs(lambda images: _inception_outputs(variables, images, batch_size), sample_dir,
                       f"inception-{weights_digest}", num_samples, shard_size, to_uint8,
                       progress_bar=progress_bar, description="Inception features")


def inception_metrics(pool: np.ndarray, logits: np.ndarray, reference: metrics.FeatureStatistics,
                      settings: FidSettings) -> dict[str, Any]:
  """FID, IS (mean, std over splits) and KID (mean, std over subsets) of sample features against `reference`."""
  statistics = metrics.FeatureMoments.from_features(pool).statistics()
  result = {"fid": metrics.frechet_distance(statistics.mu, statistics.sigma, reference.mu, reference.sigma)}
  result["inception_score"], result["inception_score_std"] = metrics.inception_score(
      logits, num_splits=min(settings.is_num_splits, logits.shape[0]))
  if reference.features is not None and reference.features.shape[0] >= 2:
    kid = metrics.kernel_inception_distance(pool, reference.features, num_subsets=settings.kid_num_subsets,
                                            subset_size=settings.kid_subset_size)
    result["kid"], result["kid_std"] = kid.mean, kid.std
  result["num_samples"] = int(pool.shape[0])
  return result


def digits_classifier(cache_dir: str, *, data_dir, seed: int, num_steps: int) -> tuple[Any, str]:
  """The digits judge, trained once and cached as `cache_dir/digits_classifier-seed<s>-steps<n>.npz`."""
  path = os.path.join(cache_dir, f"digits_classifier-seed{seed}-steps{num_steps}.npz")
  if os.path.isfile(path):
    return digits_metric.load_digits_classifier(path), path
  classifier = digits_metric.train_digits_classifier(data_dir=data_dir, seed=seed, num_steps=num_steps)
  digits_metric.save_digits_classifier(path, classifier)
  return classifier, path


def digits_reference(classifier, classifier_path: str, *, data_dir, split: str) -> tuple[Any, str]:
  """Digits-classifier feature statistics of a digits split, cached beside the classifier."""
  path = classifier_path.replace("digits_classifier-", f"digits_reference-{units.safe_name(split)}-")
  if os.path.isfile(path):
    return metrics.load_statistics(path), path
  images, _ = digits_metric.load_digits_split(split, data_dir=data_dir)
  statistics = digits_metric.digits_statistics(classifier, images)
  metrics.save_statistics(path, statistics)
  return statistics, path
