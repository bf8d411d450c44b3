"""make_dataset: shapes, per-process shards, deterministic order, exact resumption, augmentation, scaling,
the paper's preprocessing, and fast failure for datasets that are not prepared."""

import importlib.util
import json
import math
import shutil
import threading

from etils import epath
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import scipy.stats
import tensorflow_datasets as tfds

from scoreflow.data import AffineScaler, centre_crop, crop_resize, make_dataset, prepare_digits, resize, resize_small
from scoreflow.data import tfds_source

from _data_fixtures import ScoreflowTestImages

DIGITS_TRAIN = 1498  # = 2 * 7 * 107


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A tfds data_dir with the digits, the test images, and copies of them posing as celeb_a and lsun."""
  data_dir = tmp_path_factory.mktemp("tfds")
  prepare_digits(data_dir)
  ScoreflowTestImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  prepared = data_dir / "scoreflow_test_images" / "1.0.0"
  shutil.copytree(prepared, data_dir / "celeb_a" / "2.1.0")
  shutil.copytree(prepared, data_dir / "lsun" / "bedroom" / "3.1.0")
  return data_dir


def take(stream, num_batches):
  return [next(stream) for _ in range(num_batches)]


def digits(data_dir, **kwargs):
  arguments = dict(data_dir=data_dir, global_batch_size=14, seed=1) | kwargs
  return make_dataset("digits", "train", **arguments)


def example_keys(batches, scaler):
  """Each example as (raw levels bytes, label), sorted: a multiset to compare epochs and shards."""
  return sorted((scaler.to_levels(x).astype(np.uint8).tobytes(), int(label))
                for batch in batches for x, label in zip(batch["x"], batch["label"]))


def source_keys(data_dir, split="train"):
  source = prepare_digits(data_dir).as_data_source(split)
  return sorted((source[i]["image"].tobytes(), int(source[i]["label"])) for i in range(len(source)))


def assert_batches_equal(actual, expected):
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected):
    np.testing.assert_array_equal(a["x"], e["x"])
    np.testing.assert_array_equal(a["label"], e["label"])


# ----------------------------------------------------------------------------------------------------------
# Toy streams.


@pytest.mark.parametrize("name", ["two_moons", "checkerboard"])
def test_toy_stream_shapes_determinism_and_shards(name):
  stream = make_dataset(name, "train", data_dir=None, global_batch_size=12, seed=5)
  batches = take(stream, 3)
  assert batches[0]["x"].shape == (12, 2) and batches[0]["x"].dtype == np.float32
  assert batches[0]["label"].dtype == np.int32 and not batches[0]["label"].any()
  assert stream.element_shape == (2,) and stream.scaler is None and stream.num_batches is None
  assert_batches_equal(take(make_dataset(name, "train", data_dir=None, global_batch_size=12, seed=5), 3), batches)
  assert not np.array_equal(next(make_dataset(name, "train", data_dir=None, global_batch_size=12, seed=6))["x"],
                            batches[0]["x"])
  assert not np.array_equal(next(make_dataset(name, "test", data_dir=None, global_batch_size=12, seed=5))["x"],
                            batches[0]["x"])
  # Three processes each read a block of four; in order they form the single-process batch.
  shards = [take(make_dataset(name, "train", data_dir=None, global_batch_size=12, seed=5, process_index=p,
                              process_count=3), 3) for p in range(3)]
  for k, batch in enumerate(batches):
    assert shards[0][k]["x"].shape == (4, 2)
    np.testing.assert_array_equal(np.concatenate([shard[k]["x"] for shard in shards]), batch["x"])


def test_toy_resume():
  stream = make_dataset("swiss_roll", "train", data_dir=None, global_batch_size=8, seed=0)
  take(stream, 4)
  state = json.loads(json.dumps(stream.get_state()))
  expected = take(stream, 3)
  resumed = make_dataset("swiss_roll", "train", data_dir=None, global_batch_size=8, seed=0)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), expected)


# ----------------------------------------------------------------------------------------------------------
# Digits through tfds.data_source + grain.


def test_digits_batches_levels_and_default_centring(data_dir):
  stream = digits(data_dir, global_batch_size=32)
  batch = next(stream)
  assert batch["x"].shape == (32, 8, 8, 1) and batch["x"].dtype == np.float32
  assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
  assert stream.element_shape == (8, 8, 1) and stream.num_examples == DIGITS_TRAIN
  assert stream.scaler == AffineScaler.centred(17)
  levels = (batch["x"] + 1) * 8  # x = 2 l / 16 - 1
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-5)
  np.testing.assert_array_equal(batch["x"], AffineScaler.centred(17).forward(np.round(levels).astype(np.uint8)))
  x = np.concatenate([b["x"] for b in take(stream, 10)])
  assert x.min() == -1.0 and x.max() == 1.0
  unit = next(digits(data_dir, global_batch_size=32, scaler="unit_interval"))["x"]
  np.testing.assert_allclose(unit, (batch["x"] + 1) / 2, atol=1e-6)


def test_one_epoch_covers_the_split_and_shards_are_disjoint_and_covering(data_dir):
  scaler = AffineScaler.centred(17)
  single = list(digits(data_dir, num_epochs=1))
  assert len(single) == DIGITS_TRAIN // 14 == digits(data_dir, num_epochs=1).num_batches
  assert example_keys(single, scaler) == source_keys(data_dir)
  shards = [list(digits(data_dir, num_epochs=1, process_index=p, process_count=2)) for p in range(2)]
  assert [len(shard) for shard in shards] == [len(single)] * 2
  for k, batch in enumerate(single):
    assert shards[0][k]["x"].shape == (7, 8, 8, 1)
    np.testing.assert_array_equal(np.concatenate([shards[0][k]["x"], shards[1][k]["x"]]), batch["x"])
    np.testing.assert_array_equal(np.concatenate([shards[0][k]["label"], shards[1][k]["label"]]), batch["label"])
  # As multisets: the two shards' sizes add up to the split and their union is the split.
  assert example_keys(shards[0] + shards[1], scaler) == source_keys(data_dir)


def test_epochs_are_reshuffled_permutations_and_remainders_dropped(data_dir):
  scaler = AffineScaler.centred(17)
  two_epochs = list(digits(data_dir, num_epochs=2))
  per_epoch = DIGITS_TRAIN // 14
  assert len(two_epochs) == 2 * per_epoch
  first, second = two_epochs[:per_epoch], two_epochs[per_epoch:]
  assert example_keys(first, scaler) == example_keys(second, scaler) == source_keys(data_dir)
  assert not np.array_equal(first[0]["x"], second[0]["x"])
  # 1498 = 93 * 16 + 10: the incomplete last global batch is dropped on every process alike.
  for process_count in (1, 2):
    shard = list(digits(data_dir, num_epochs=1, global_batch_size=16, process_count=process_count))
    assert len(shard) == 93
  # Batch 93 of a two-epoch stream straddles the epoch boundary: positions 0 .. 1497 are still exactly
  # the split and the stream ends after floor(2 * 1498 / 16) = 187 batches.
  straddling = list(digits(data_dir, num_epochs=2, global_batch_size=16))
  assert len(straddling) == 187
  first_epoch = straddling[:93] + [{"x": straddling[93]["x"][:10], "label": straddling[93]["label"][:10]}]
  assert example_keys(first_epoch, scaler) == source_keys(data_dir)
  # Without shuffling the order is the split's.
  source = prepare_digits(data_dir).as_data_source("train")
  batch = next(digits(data_dir, shuffle=False))
  np.testing.assert_array_equal(scaler.to_levels(batch["x"]), np.stack([source[i]["image"] for i in range(14)]))


def test_order_is_deterministic_from_the_seed(data_dir):
  kwargs = dict(random_flip=True, dequantize=True)
  assert_batches_equal(take(digits(data_dir, **kwargs), 3), take(digits(data_dir, **kwargs), 3))
  assert not np.array_equal(next(digits(data_dir, **kwargs))["x"], next(digits(data_dir, seed=2, **kwargs))["x"])


def test_resume_gives_identical_batches_even_with_another_process_count(data_dir):
  kwargs = dict(global_batch_size=8, random_flip=True, dequantize=True)
  stream = digits(data_dir, **kwargs)
  take(stream, 190)  # crosses the first epoch boundary (187 batches)
  state = json.loads(json.dumps(stream.get_state()))
  assert state["next_batch"] == 190
  expected = take(stream, 3)
  resumed = digits(data_dir, **kwargs)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 3), expected)
  shards = [digits(data_dir, process_index=p, process_count=2, **kwargs) for p in range(2)]
  for shard in shards:
    shard.set_state(state)
  np.testing.assert_array_equal(np.concatenate([next(shard)["x"] for shard in shards]), expected[0]["x"])
  with pytest.raises(ValueError, match=r"another pipeline \(seed=1 in the state but 2 here\)"):
    digits(data_dir, seed=2, **kwargs).set_state(state)
  with pytest.raises(ValueError, match="state lacks"):
    resumed.set_state({"next_index": 3})


def test_resume_refuses_another_prepared_version_or_split_size(data_dir, tmp_path):
  shutil.copytree(data_dir / "scoreflow_test_images" / "1.0.0", tmp_path / "scoreflow_test_images" / "1.0.0")
  kwargs = dict(data_dir=tmp_path, global_batch_size=4, seed=0, image_size=8)
  stream = make_dataset("scoreflow_test_images", "train", **kwargs)
  next(stream)
  state = json.loads(json.dumps(stream.get_state()))
  assert (state["version"], state["split"], state["num_examples"]) == ("1.0.0", "train", 12)
  assert (stream.version, stream.num_examples) == ("1.0.0", 12)
  # A newer prepared version appears in data_dir: the same name now resolves to it.
  newer = tmp_path / "scoreflow_test_images" / "1.1.0"
  shutil.copytree(tmp_path / "scoreflow_test_images" / "1.0.0", newer)
  info = json.loads((newer / "dataset_info.json").read_text())
  (newer / "dataset_info.json").write_text(json.dumps(info | {"version": "1.1.0"}))
  with pytest.raises(ValueError, match=r"another pipeline \(version='1\.0\.0' in the state but '1\.1\.0' here\)"):
    make_dataset("scoreflow_test_images", "train", **kwargs).set_state(state)
  pinned = make_dataset("scoreflow_test_images:1.0.0", "train", **kwargs)
  with pytest.raises(ValueError, match=r"name='scoreflow_test_images' in the state but 'scoreflow_test_images:1\.0"):
    pinned.set_state(state)
  with pytest.raises(ValueError, match=r"another pipeline \(num_examples=11 in the state but 12 here\)"):
    pinned.set_state(state | {"name": "scoreflow_test_images:1.0.0", "num_examples": 11})
  with pytest.raises(ValueError, match=r"split='train\[:10\]' in the state but 'train' here, num_examples=10"):
    pinned.set_state(state | {"name": "scoreflow_test_images:1.0.0", "split": "train[:10]", "num_examples": 10})
  pinned.set_state(state | {"name": "scoreflow_test_images:1.0.0"})
  # States saved before version and num_examples were recorded still resume (checked on the rest).
  older = {key: value for key, value in state.items() if key not in ("version", "num_examples")}
  pinned.set_state(older | {"name": "scoreflow_test_images:1.0.0"})
  with pytest.raises(ValueError, match=r"state lacks \['seed'\]"):
    pinned.set_state({key: value for key, value in older.items() if key != "seed"})


def test_random_flip_flips_half_of_the_images(data_dir):
  plain = np.concatenate([b["x"] for b in take(digits(data_dir, global_batch_size=32), 20)])
  flipped = np.concatenate([b["x"] for b in take(digits(data_dir, global_batch_size=32, random_flip=True), 20)])
  same = np.all(flipped == plain, axis=(1, 2, 3))
  mirrored = np.all(flipped == plain[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same | mirrored)
  asymmetric = ~np.all(plain == plain[:, :, ::-1], axis=(1, 2, 3))
  fraction = mirrored[asymmetric].mean()
  # Each image is flipped with probability 1/2: 5 binomial standard errors.
  assert abs(fraction - 0.5) < 5 * 0.5 / math.sqrt(asymmetric.sum())


def test_uniform_dequantization_adds_uniform_noise_within_each_level(data_dir):
  levels = np.concatenate([b["x"] for b in take(digits(data_dir, scaler="unit_interval"), 30)]) * 16
  stream = digits(data_dir, scaler="unit_interval", dequantize=True)
  assert stream.scaler == AffineScaler.unit_interval(17, dequantized=True)
  x = np.concatenate([b["x"] for b in take(stream, 30)])
  assert x.min() >= 0 and x.max() < 1
  np.testing.assert_array_equal(stream.scaler.to_levels(x), np.round(levels))
  noise = stream.scaler.inverse(x.astype(np.float64)) - np.round(levels)
  assert noise.min() >= -1e-5 and noise.max() <= 1 + 1e-5
  assert scipy.stats.kstest(noise.ravel()[::7], "uniform").pvalue > 1e-4
  # Neighbouring pixels and examples get independent noise: correlations within 5 standard errors.
  centred = (noise - 0.5).reshape(len(noise), -1)
  for a, b in ((centred[:, :-1], centred[:, 1:]), (centred[:-1], centred[1:])):
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 5 / math.sqrt(a.size)


@pytest.mark.parametrize("num_levels", [17, 256])
@pytest.mark.parametrize("scaler", [AffineScaler.centred, AffineScaler.unit_interval,
                                    lambda num_levels, dequantized: AffineScaler(-2.0 / num_levels, 1.0, num_levels,
                                                                                 dequantized)])
def test_dequantized_values_stay_in_their_cell_for_adversarial_noise(scaler, num_levels):
  # u is a multiple of 2^-24 in [0, 1) (_uniform_float32); the largest ones make l + u round up to l + 1 in
  # float32, and s (l + u) + b rounds once more, across the cell edge for u near 0 or 1.
  scaler = scaler(num_levels, dequantized=True)
  k = np.concatenate([np.arange(64), 2**24 - np.arange(1, 4097), np.arange(2**10, 2**24, 2**14)])
  u = (k * 2.0**-24).astype(np.float32)
  levels = np.broadcast_to(np.arange(num_levels, dtype=np.float32)[:, None], (num_levels, len(u))).copy()
  offsets = np.broadcast_to(u, levels.shape)
  x = scaler.dequantize(levels, offsets)  # The host rule of the input pipeline (NumPy in, NumPy out).
  assert isinstance(x, np.ndarray) and x.dtype == np.float32
  # The device rule (scoreflow.dequantize, uniform_dequantize) is the same rule: the same values, bit for bit.
  np.testing.assert_array_equal(np.asarray(scaler.dequantize(jnp.asarray(levels), jnp.asarray(offsets))), x)
  np.testing.assert_array_equal(scaler.to_levels(x), levels)
  # The range [b, b + s L), which is (b + s L, b] for s < 0.
  if scaler.scale > 0:
    assert x.min() >= scaler.shift and x.max() < scaler.shift + scaler.scale * num_levels
  else:
    assert x.min() > scaler.shift + scaler.scale * num_levels and x.max() <= scaler.shift
  # Away from the cell edges the values are s (l + u) + b in float32, as before.
  inner = (u > 2**-6) & (u < 1 - 2**-6)
  assert inner.sum() > 900
  np.testing.assert_array_equal(x[:, inner], np.float32(scaler.scale) * (levels[:, inner] + u[inner])
                                + np.float32(scaler.shift))


# ----------------------------------------------------------------------------------------------------------
# Any prepared tfds image dataset, with the paper's preprocessing.


def test_image_operations():
  image = np.arange(6 * 8 * 1, dtype=np.uint8).reshape(6, 8, 1)
  np.testing.assert_array_equal(centre_crop(image, 4), image[1:5, 2:6])
  assert resize(image, 6, 8) is image
  constant = np.full((20, 30, 3), 77, np.uint8)
  assert np.all(resize(constant, 7, 9) == 77) and resize(constant, 7, 9).shape == (7, 9, 3)
  assert resize_small(constant, 10).shape == (10, 15, 3)
  assert resize_small(np.zeros((150, 141, 1), np.uint8), 128).shape == (136, 128, 1)  # round(150 * 128 / 141)
  with pytest.raises(ValueError, match="smaller than the crop size 9"):
    centre_crop(image, 9)
  with pytest.raises(ValueError, match=r"resample must be one of \('bilinear', 'bicubic'\), got 'lanczos'"):
    resize(constant, 7, 9, resample="lanczos")


def test_resampling_matches_pil():
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (21, 30, 3), dtype=np.uint8)
  for resample, pil_filter in (("bilinear", PIL.Image.Resampling.BILINEAR), ("bicubic", PIL.Image.Resampling.BICUBIC)):
    expected = np.asarray(PIL.Image.fromarray(image).resize((11, 8), resample=pil_filter))
    np.testing.assert_array_equal(resize(image, 8, 11, resample=resample), expected)
  assert not np.array_equal(resize(image, 8, 11, resample="bicubic"), resize(image, 8, 11))
  # crop_resize: the central 21 x 21 square (columns 4 .. 24), then bicubic to 8 x 8.
  expected = np.asarray(PIL.Image.fromarray(image[:, 4:25]).resize((8, 8), resample=PIL.Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(crop_resize(image, 8), expected)
  grey = image[..., :1]
  assert crop_resize(grey, 8).shape == (8, 8, 1)


@pytest.mark.parametrize("name, image_size, reference", [
    ("scoreflow_test_images", 16, lambda image: resize(image, 16, 16)),
    ("celeb_a", None, lambda image: resize(centre_crop(image, 140), 64, 64)),
    # Song et al.'s LSUN: crop_resize (central square, bicubic) except at 128, where resize_small + central crop.
    ("lsun/bedroom", 32, lambda image: crop_resize(image, 32)),
    ("lsun/bedroom", 128, lambda image: centre_crop(resize_small(image, 128), 128)),
])
def test_prepared_tfds_dataset_with_the_papers_preprocessing(data_dir, name, image_size, reference):
  stream = make_dataset(name, "train", data_dir=data_dir, global_batch_size=4, seed=0, shuffle=False,
                        num_epochs=1, image_size=image_size, scaler="unit_interval")
  batches = list(stream)
  size = image_size or 64
  assert len(batches) == 3 and stream.element_shape == (size, size, 3)
  assert stream.scaler == AffineScaler.unit_interval(256)
  source = tfds.builder_from_directory(data_dir / "scoreflow_test_images" / "1.0.0").as_data_source("train")
  for k, batch in enumerate(batches):
    assert batch["x"].shape == (4, size, size, 3) and batch["x"].dtype == np.float32
    for i in range(4):
      np.testing.assert_array_equal(stream.scaler.to_levels(batch["x"][i]), reference(source[4 * k + i]["image"]))
      assert batch["label"][i] == source[4 * k + i]["label"]


def test_variable_size_images_need_image_size(data_dir):
  # The test images' feature shape is (None, None, 3) and their sizes differ.
  with pytest.raises(ValueError, match=r"'scoreflow_test_images' vary in size \(feature shape \(None, None, 3\)\) "
                                       r"and image_size is None.*set image_size \(config: data\.image_size\)"):
    make_dataset("scoreflow_test_images", "train", data_dir=data_dir, global_batch_size=4, seed=0)


def test_threaded_reads_give_the_same_batches(data_dir):
  # Batches of 5 from 12 examples straddle epochs (an example can appear twice in a batch); 3 threads split a
  # batch into chunks of 2, 2 and 1.
  kwargs = dict(data_dir=data_dir, global_batch_size=5, seed=4, num_epochs=3, image_size=12, random_flip=True,
                dequantize=True)
  synchronous = list(make_dataset("scoreflow_test_images", "train", read_threads=0, prefetch_batches=0, **kwargs))
  assert len(synchronous) == 7
  with make_dataset("scoreflow_test_images", "train", read_threads=3, prefetch_batches=3, **kwargs) as stream:
    assert_batches_equal(list(stream), synchronous)
    assert any(thread.name.startswith("scoreflow-read") for thread in threading.enumerate())
  assert not any(thread.name.startswith("scoreflow-read") for thread in threading.enumerate())
  shards = []
  for p in range(5):
    with make_dataset("scoreflow_test_images", "train", read_threads=2, process_index=p, process_count=5,
                      **kwargs) as shard:
      shards.append(list(shard))
  for k, batch in enumerate(synchronous):
    np.testing.assert_array_equal(np.concatenate([shard[k]["x"] for shard in shards]), batch["x"])


def test_split_expressions(data_dir):
  def stream(split, **kwargs):
    return make_dataset("digits", split, data_dir=data_dir, global_batch_size=1797, seed=0, shuffle=False,
                        num_epochs=1, **kwargs)

  source = prepare_digits(data_dir).as_data_source("test")
  both = stream("train+test")
  assert both.num_examples == 1797
  np.testing.assert_array_equal(both.scaler.to_levels(next(both)["x"][DIGITS_TRAIN:]),
                                np.stack([example["image"] for example in source]))
  assert stream("train[:90%]").num_examples == 1348 and stream("train[10:20]+test[-5:]").num_examples == 15
  with pytest.raises(ValueError, match=r"split 'train\+valid\[:5\]' does not exist .*\(unknown: \['valid'\]\)"):
    stream("train+valid[:5]")
  with pytest.raises(ValueError, match=r"cannot read split 'train\[:200%\]' of 'digits'"):
    stream("train[:200%]")


def test_local_data_dir_as_epath_and_urls_kept_intact(data_dir):
  stream = make_dataset("scoreflow_test_images", "train", data_dir=epath.Path(data_dir), global_batch_size=4,
                        seed=0, image_size=8)
  assert next(stream)["x"].shape == (4, 8, 8, 3)
  assert next(digits(epath.Path(data_dir)))["x"].shape == (14, 8, 8, 1)
  # pathlib.Path would collapse "gs://" to "gs:/"; the path, and the preparation command, keep the URL.
  root = tfds_source.data_dir_path("gs://bucket/tfds")
  assert str(root / "cifar10" / "3.0.2") == "gs://bucket/tfds/cifar10/3.0.2"
  message = str(tfds_source.not_prepared_error("cifar10", root, "detail"))
  assert "data_dir 'gs://bucket/tfds'" in message and "--data_dir=gs://bucket/tfds " in message
  if importlib.util.find_spec("gcsfs") is None:  # offline: reaching GCS needs gcsfs, and epath says so
    with pytest.raises(ImportError, match="gcsfs"):
      make_dataset("cifar10", "train", data_dir="gs://bucket/tfds", global_batch_size=4, seed=0)


def test_missing_dataset_fails_fast_with_instructions(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    make_dataset("cifar10", "train", data_dir=tmp_path, global_batch_size=8, seed=0)
  # "Fast" means no download attempt: nothing is written under data_dir (timing belongs in bench/).
  assert not list(tmp_path.iterdir())
  message = str(error.value)
  assert "'cifar10'" in message and str(tmp_path) in message
  assert f"tfds build cifar10 --data_dir={tmp_path} --file_format=array_record" in message


def test_unprepared_version_or_format_fails_fast(data_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match=r"no prepared version 9\.9\.9"):
    make_dataset("celeb_a:9.9.9", "train", data_dir=data_dir, global_batch_size=4, seed=0)
  tfrecord_only = tmp_path / "mnist" / "3.0.1"
  tfrecord_only.mkdir(parents=True)
  (tfrecord_only / "dataset_info.json").write_text("{}")
  (tfrecord_only / "mnist-train.tfrecord-00000-of-00001").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="holds no array_record files"):
    make_dataset("mnist", "train", data_dir=tmp_path, global_batch_size=4, seed=0)


def test_argument_errors(data_dir):
  toy = dict(data_dir=None, seed=0)
  with pytest.raises(ValueError, match="global_batch_size=10 is not divisible by process_count=4"):
    make_dataset("two_moons", "train", global_batch_size=10, process_count=4, **toy)
  with pytest.raises(ValueError, match=r"process_index must be an int in \[0, process_count=2\), got 2"):
    make_dataset("two_moons", "train", global_batch_size=8, process_index=2, process_count=2, **toy)
  with pytest.raises(ValueError, match="dequantize=True does not apply to the toy dataset 'two_moons'"):
    make_dataset("two_moons", "train", global_batch_size=8, dequantize=True, **toy)
  with pytest.raises(ValueError, match="seed must be an int >= 0, got -1"):
    make_dataset("two_moons", "train", global_batch_size=8, data_dir=None, seed=-1)
  with pytest.raises(ValueError, match=r"split 'validation' does not exist .* \('train', 'test'\)"):
    make_dataset("digits", "validation", data_dir=data_dir, global_batch_size=8, seed=0)
  with pytest.raises(ValueError, match=r"AffineScaler.centred\(17, dequantized=True\)"):
    make_dataset("digits", "train", data_dir=data_dir, global_batch_size=8, seed=0, dequantize=True,
                 scaler=AffineScaler.centred(17))
