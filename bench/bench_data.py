"""Input-pipeline throughput: examples/s of `make_dataset` streams over real tfds data, against a per-example read.

Two datasets are generated once into a temporary tfds data directory (real `GeneratorBasedBuilder`s, array_record
files, read back with tfds' data source and grain like any prepared dataset):

* `celeb_a`-like: 218x178 RGB JPEGs (CelebA's size and encoding) that the pipeline centre-crops to 140 and
  resizes to 64x64, as for the paper's CelebA runs;
* `cifar10`-like: 32x32 RGB PNGs used as they are.

The images are smooth random fields plus noise, so that JPEG and PNG compress them about as much as photographs.
For each, the baseline (measured in the same run, interleaved with the rows) is the same stream with the read the
pipeline used before: one `source[i]` and one decode per example, on the thread that asks for the batch. The rows
are `make_dataset` streams doing the same work (no augmentation) with `read_threads` decoding threads per batch and
`prefetch_batches` batches read ahead, and a last row with the defaults plus random flips and uniform
dequantization, as in likelihood training; examples/s is over `--batches` batches after two warm-up batches.

    python bench/bench_data.py                      # about a minute on 2 CPU cores
    python bench/bench_data.py --examples 4096 --batches 40 --threads 1,2,4,8
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from scoreflow.data import make_dataset
from scoreflow.data import stream as stream_lib
from scoreflow.data import tfds_source


def _smooth_images(count: int, height: int, width: int, seed: int):
  """`count` uint8 `[height, width, 3]` images: bilinear-upsampled coarse noise plus fine noise (photo-like entropy)."""
  rng = np.random.default_rng(seed)
  for _ in range(count):
    coarse = rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
    image = np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.Resampling.BILINEAR), np.int16)
    yield np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)


def _builder(name: str, shape: tuple[int, int, int], encoding: str, count: int):
  """A tfds builder class named `name` with `count` generated images of `shape` in `encoding`."""

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=shape, encoding_format=encoding),
        "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for index, image in enumerate(_smooth_images(count, shape[0], shape[1], seed=len(name))):
      yield index, {"image": PIL.Image.fromarray(image), "label": index % 10}  # Encoded by PIL, no TensorFlow.

  return type(name, (tfds.core.GeneratorBasedBuilder,), {
      "VERSION": tfds.core.Version("1.0.0"), "_info": _info, "_split_generators": _split_generators,
      "_generate_examples": _generate_examples, "__module__": __name__})


# name the pipeline sees -> (builder name, image shape, encoding).
DATASETS = {
    "celeb_a": ("bench_celeba_like", (218, 178, 3), "jpeg"),
    "cifar10": ("bench_cifar_like", (32, 32, 3), "png"),
}


def prepare(data_dir: str, count: int) -> None:
  """Generates each dataset and places it where the pipeline looks for `<name>/<version>`."""
  for name, (builder_name, shape, encoding) in DATASETS.items():
    builder = _builder(builder_name, shape, encoding, count)(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    shutil.move(os.path.join(data_dir, builder_name, "1.0.0"), os.path.join(data_dir, name, "1.0.0"))


class _PerExampleReads(tfds_source.SourceExamples):
  """The former read: one `source[i]` (one record lookup and decode) per example, on the calling thread."""

  def __call__(self, indices):
    examples = [self._preprocess(self._source[int(index)]) for index in indices]
    return (np.stack([example["image"] for example in examples]),
            np.array([example["label"] for example in examples], np.int32))


def stream_rate(name: str, data_dir: str, batch: int, batches: int, read_threads: int, prefetch: int, *,
                augment: bool = False, per_example: bool = False) -> float:
  """Examples/s of a `make_dataset` stream over `batches` batches (after two warm-up batches)."""
  image_size = 64 if name == "celeb_a" else None
  reads = stream_lib.SourceExamples
  stream_lib.SourceExamples = _PerExampleReads if per_example else reads  # The stream's reader of tfds examples.
  try:
    stream = make_dataset(name, "train", data_dir=data_dir, global_batch_size=batch, seed=0, image_size=image_size,
                          random_flip=augment, dequantize=augment, read_threads=read_threads,
                          prefetch_batches=prefetch)
  finally:
    stream_lib.SourceExamples = reads
  with stream:
    for _ in range(2):
      next(stream)
    started = time.perf_counter()
    for _ in range(batches):
      next(stream)
    return batches * batch / (time.perf_counter() - started)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--examples", type=int, default=2048, help="images generated per dataset")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--batches", type=int, default=12, help="timed batches per row")
  parser.add_argument("--repeats", type=int, default=2, help="timed runs per row (the median is reported)")
  parser.add_argument("--threads", default="1,2", help="comma-separated read_threads values")
  parser.add_argument("--prefetch", default="0,2", help="comma-separated prefetch_batches values")
  args = parser.parse_args()
  threads = [int(t) for t in args.threads.split(",")]
  prefetches = [int(p) for p in args.prefetch.split(",")]

  tfds.disable_progress_bar()
  with tempfile.TemporaryDirectory() as data_dir:
    started = time.perf_counter()
    prepare(data_dir, args.examples)
    print(f"{os.cpu_count()} CPUs; prepared {len(DATASETS)} x {args.examples} images in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    for name in DATASETS:
      # (label, read_threads, prefetch_batches, augment, per_example); the first row is the baseline.
      rows = [("per-example source[i] (baseline)", 1, 0, False, True)]
      rows += [(f"read_threads={t} prefetch={p}", t, p, False, False) for t in threads for p in prefetches]
      rows += [("read_threads=1 prefetch=2 +flip+deq", 1, 2, True, False)]
      rates = {row[0]: [] for row in rows}
      for _ in range(args.repeats):  # Interleaved, so that a slow spell of the machine hits every row alike.
        for label, read_threads, prefetch, augment, per_example in rows:
          rates[label].append(stream_rate(name, data_dir, args.batch, args.batches, read_threads, prefetch,
                                          augment=augment, per_example=per_example))
      baseline = statistics.median(rates[rows[0][0]])
      print(f"\n{name}-like ({DATASETS[name][1]} {DATASETS[name][2]}), batch {args.batch}, median of "
            f"{args.repeats}")
      print(f"{'read':<36}{'examples/s':>12}{'vs baseline':>13}")
      for label, *_ in rows:
        rate = statistics.median(rates[label])
        print(f"{label:<36}{rate:>12.0f}{rate / baseline:>12.2f}x", flush=True)

if __name__ == "__main__":
  main()
