"""Evaluation of trained runs: bits/dim against closed forms, sample shards, resume after interruption, checkpoint
choice and mismatches, and the digits metric on a trained versus an untrained model."""

import dataclasses
import glob
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from configs import default, digits_vp, toy_2d  # noqa: E402

import scoreflow as sf  # noqa: E402
from scoreflow.data import AffineScaler, make_dataset  # noqa: E402
from scoreflow import io  # noqa: E402
from scoreflow.config import evaluation as eval_config  # noqa: E402
from scoreflow.evaluate import bpd as bpd_lib  # noqa: E402
from scoreflow.evaluate import checkpoints, reference, report, run  # noqa: E402
from scoreflow.evaluate import samples as samples_lib  # noqa: E402
from scoreflow.likelihood import bits_per_dim, dequantize  # noqa: E402
from scoreflow.testing.analytic import GaussianMixture  # noqa: E402
from scoreflow.config import experiment as config_lib
from scoreflow.train import loop  # noqa: E402
from scoreflow.train.checkpoint import CheckpointError, Checkpointer, check_workdir_config  # noqa: E402
from scoreflow.train.state import TrainState  # noqa: E402


def with_eval(config):
  if "eval" not in config:  # Until configs/default.py carries the section.
    config.eval = eval_config.eval_config()
  return config


def toy_config(**eval_fields):
  """The toy config with a tiny MLP (zero output at initialisation) and cheap evaluation settings."""
  config = with_eval(toy_2d.get_config())
  config.model = default.model_config("mlp_toy", width=16, depth=1, embedding_dim=16)
  config.sampling.method = "ddim"
  config.sampling.num_steps = 8
  config.eval.progress_bar = False
  config.eval.tasks = "bpd,samples"
  config.eval.batch_size = 16
  config.eval.bpd.num_examples = 40  # 3 batches of 16, the last one padded.
  config.eval.samples.num_samples = 40  # 3 shards of 16, the last one truncated.
  config.eval.samples.shard_size = 16
  config.eval.samples.grid_size = 16
  for path, value in eval_fields.items():
    node = config.eval
    *sections, field = path.split(".")
    for section in sections:
      node = node[section]
    node[field] = value
  return config


def digits_config(tmp_path, **eval_fields):
  """The digits config with a tiny MLP, a 4-step DDIM sampler and cheap evaluation settings."""
  config = toy_config(**eval_fields)
  digits = with_eval(digits_vp.get_config())
  digits.model, digits.sampling, digits.eval = config.model, config.sampling, config.eval
  digits.data.data_dir = str(tmp_path / "tfds")
  digits.sampling.num_steps = 4
  digits.eval.samples.num_samples = 32  # Two shards of 16.
  digits.eval.digits.classifier_steps = 100
  return digits


def write_run(workdir, config, steps, *, raw_params_scale=0.0, element_shape=(2,)):
  """A workdir whose checkpoints hold the initial state (the EMA network outputs exactly 0: `init_scale=0`); the
  raw parameters are the same plus `raw_params_scale` times a fixed perturbation."""
  experiment = config_lib.build_experiment(config)
  x = jnp.zeros((1, *element_shape), jnp.float32)
  params = experiment.model.init({"params": jax.random.key(0)}, x, jnp.zeros((1,), jnp.float32), train=False)["params"]
  state = TrainState.create(params, experiment.optimizer, jax.random.key(1))
  leaves, tree = jax.tree.flatten(params)
  noise = [raw_params_scale * jax.random.normal(jax.random.key(i), leaf.shape, leaf.dtype)
           for i, leaf in enumerate(leaves)]
  state = state.replace(params=jax.tree.unflatten(tree, [leaf + n for leaf, n in zip(leaves, noise)]))
  checkpointer = Checkpointer(workdir, async_save=False)
  for step in steps:
    checkpointer.save(step, state.replace(step=jnp.asarray(step, jnp.int32)))
  checkpointer.close()
  check_workdir_config(workdir, loop.config_to_dict(config))


# --- Choosing checkpoints. ---------------------------------------------------------------------------------

AVAILABLE = {"checkpoints": [0, 10, 20], "snapshot": [15, 20]}


@pytest.mark.parametrize("spec, expected", [
    ("latest", [("checkpoints", 20)]),
    ("all", [("checkpoints", 0), ("checkpoints", 10), ("snapshot", 15), ("checkpoints", 20)]),
    ("10", [("checkpoints", 10)]),
    ("20,0", [("checkpoints", 0), ("checkpoints", 20)]),
    ("5:15", [("checkpoints", 10), ("snapshot", 15)]),
    ("15:", [("snapshot", 15), ("checkpoints", 20)]),
    (":0", [("checkpoints", 0)]),
])
def test_select_checkpoints(spec, expected):
  assert checkpoints.select_checkpoints(AVAILABLE, spec) == expected


@pytest.mark.parametrize("spec, error, match", [
    ("newest", config_lib.ConfigError, r"config.eval.checkpoints must be 'latest', 'all', a step"),
    ("30", CheckpointError, r"no checkpoint for step\(s\) \[30\]; available steps: \[0, 10, 15, 20\]"),
    ("21:29", CheckpointError, r"no checkpoint in that range; available steps: \[0, 10, 15, 20\]"),
])
def test_select_checkpoints_errors(spec, error, match):
  with pytest.raises(error, match=match):
    checkpoints.select_checkpoints(AVAILABLE, spec)
  with pytest.raises(CheckpointError, match="holds no checkpoint; train first"):
    checkpoints.select_checkpoints({"checkpoints": [], "snapshot": []}, "latest")


@pytest.mark.parametrize("tasks, data, expected", [
    ("bpd,samples,quality", "digits", ("bpd", "samples", "digits")),
    ("quality", "cifar10", ("samples", "fid")),
    ("quality,bpd", "two_moons", ("bpd",)),
    ("digits", "digits", ("samples", "digits")),
])
def test_resolve_tasks(tasks, data, expected):
  assert eval_config.resolve_tasks(tasks, data) == expected


def test_bad_eval_settings_name_the_field(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="unknown task 'bdp'"):
    eval_config.resolve_tasks("bdp", "digits")
  with pytest.raises(config_lib.ConfigError, match="'fid' needs images"):
    eval_config.resolve_tasks("fid", "two_moons")
  with pytest.raises(config_lib.ConfigError, match="config.eval.bpd.num_examples must be > 0 for the toy density"):
    eval_config.build_eval_settings(toy_config(**{"bpd.num_examples": 0}))
  config = with_eval(default.get_config())
  config.eval.tasks = "inpaint"
  config.eval.inverse.guidance = "dps"
  with pytest.raises(config_lib.ConfigError, match=r"guidance='dps' needs config.eval.inverse.noise_std > 0"):
    eval_config.build_eval_settings(config)
  config.eval.inverse.guidance = "tweedie"
  with pytest.raises(config_lib.ConfigError, match=r"config.eval.inverse.guidance"):
    eval_config.build_eval_settings(config)
  config.eval.inverse.guidance, config.eval.inverse.guidance_t_max = "pigdm", 0.0
  with pytest.raises(config_lib.ConfigError, match=r"config.eval.inverse.guidance_t_max"):
    eval_config.build_eval_settings(config)
  config = with_eval(default.get_config())
  config.eval.tasks = "fid"
  with pytest.raises(config_lib.ConfigError, match=r"inception_path is empty.*pt_inception-2015-12-05-6726825d\.pth"):
    eval_config.build_eval_settings(config)
  config.eval.fid.inception_path = str(tmp_path / "missing.npz")
  with pytest.raises(config_lib.ConfigError, match=r"missing\.npz'?: no such file.*convert_pytorch_fid_weights"):
    eval_config.build_eval_settings(config)


# --- Bits/dim of a dataset against the closed form. ---------------------------------------------------------

SDE = sf.VPSDE()
LEVELS, SCALE, SHIFT, EPS = 17, 2.0, -1.0, 1e-5
DATA = GaussianMixture.gaussian(jnp.array([0.2, -0.3, 0.0], jnp.float64), jnp.array([0.6, 0.4, 0.8], jnp.float64))


@pytest.fixture(scope="module")
def gaussian_bpd():
  """`(bpd_fn(key, values), batches, key)`: exact score and terminal density of Gaussian data under VP, so the
  ODE log-density of a dequantized point is exactly log N(x; alpha mu, alpha^2 s^2 + sigma^2) at t = eps."""
  kwargs = dict(eps=EPS, rtol=1e-7, atol=1e-7, divergence="exact",
                prior_logp_fn=lambda z: DATA.log_prob_t(SDE, z, SDE.T))
  bpd_fn = bpd_lib.make_bpd_fn(SDE, lambda data: data.score(SDE), num_levels=LEVELS, scale=SCALE, shift=SHIFT,
                           dtype=jnp.float64, likelihood_kwargs=kwargs)
  values = np.asarray(jax.random.randint(jax.random.key(3), (24, 3), 0, LEVELS))
  batches = [values[:8], values[8:16], values[16:]]  # 20 examples asked: the last batch has 4 of padding.
  return (lambda key, v: bpd_fn(DATA, key, v)), batches, jax.random.key(7)


def test_bpd_equals_the_closed_form_per_example(tmp_path, gaussian_bpd):
  bpd_fn, batches, key = gaussian_bpd
  result = bpd_lib.evaluate_bpd(bpd_fn, bpd_lib.bpd_batches(batches, 20), str(tmp_path), key=key, num_examples=20,
                            num_repeats=2)
  saved = dict(np.load(result.per_example_file))
  assert saved["bpd_draws"].shape == (2, 20) and saved["nfe"].shape == (2, 20)
  np.testing.assert_array_equal(saved["index"], np.arange(20))
  # The same dequantized points, from the documented key scheme: repeat r of batch i uses fold_in(fold_in(key, i),
  # r), split into (dequantization, probe) keys.
  expected = np.zeros((2, 24))
  for i, values in enumerate(batches):
    for r in range(2):
      key_dequantize, _ = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, i), r))
      x = dequantize(key_dequantize, values, num_levels=LEVELS, scale=SCALE, shift=SHIFT, dtype=jnp.float64)
      logp = DATA.log_prob_t(SDE, x, EPS)
      expected[r, 8 * i:8 * i + 8] = bits_per_dim(logp, (3,), num_levels=LEVELS, scale=SCALE)
  # Solver tolerances 1e-7 on each coordinate and on the log-density per dimension: the global error of a few
  # hundred steps stays below 1e-5 nats per dimension, i.e. 1.5e-5 bits/dim.
  np.testing.assert_allclose(saved["bpd_draws"], expected[:, :20], rtol=0, atol=2e-5)
  np.testing.assert_allclose(saved["bpd"], expected[:, :20].mean(axis=0), rtol=0, atol=2e-5)
  assert result.mean == pytest.approx(expected[:, :20].mean(), abs=2e-5)
  example_means = expected[:, :20].mean(axis=0)
  assert result.stderr == pytest.approx(np.std(example_means, ddof=1) / np.sqrt(20), rel=1e-3)
  assert result.num_examples == 20 and result.num_failed == 0 and result.computed_batches == 3
  assert result.nfe_min > 0 and result.nfe_min <= result.nfe_mean <= result.nfe_max


def test_bpd_resumes_after_an_interruption(tmp_path, gaussian_bpd):
  bpd_fn, batches, key = gaussian_bpd
  straight = bpd_lib.evaluate_bpd(bpd_fn, bpd_lib.bpd_batches(batches, 20), str(tmp_path / "a"), key=key,
                              num_examples=20, num_repeats=2)
  calls, interrupt_at = [], [3]

  def interrupted(k, v):
    calls.append(1)
    if len(calls) == interrupt_at[0]:  # Batch 0 (two repeats) is written; die inside batch 1.
      raise KeyboardInterrupt
    return bpd_fn(k, v)

  with pytest.raises(KeyboardInterrupt):
    bpd_lib.evaluate_bpd(interrupted, bpd_lib.bpd_batches(batches, 20), str(tmp_path / "b"), key=key, num_examples=20,
                     num_repeats=2)
  assert sorted(os.listdir(tmp_path / "b")) == ["batch_00000.npz"]  # Nothing half-written.
  calls.clear()
  interrupt_at[0] = None
  resumed = bpd_lib.evaluate_bpd(interrupted, bpd_lib.bpd_batches(batches, 20), str(tmp_path / "b"), key=key,
                             num_examples=20, num_repeats=2)
  assert len(calls) == 4 and resumed.reused_batches == 1 and resumed.computed_batches == 2
  a, b = np.load(straight.per_example_file), np.load(resumed.per_example_file)
  for name in a.files:
    np.testing.assert_array_equal(a[name], b[name])
  assert resumed.mean == straight.mean and resumed.stderr == straight.stderr


# --- Sample shards. --------------------------------------------------------------------------------------


def test_sample_shards_count_shapes_resume_and_extension(tmp_path):
  calls = []

  def sample_shard(index):  # Deterministic in the shard index, as the real one (fold_in(key, index)) is.
    calls.append(index)
    x = np.random.default_rng(index).standard_normal((16, 4, 4, 1)).astype(np.float32)
    return x, {"nfe": np.int32(10), "status": np.int32(0)}

  directory = str(tmp_path / "samples")
  result = samples_lib.generate_samples(sample_shard, directory, num_samples=40, shard_size=16)
  assert calls == [0, 1, 2] and result.num_shards == 3 and result.shape == (4, 4, 1) and result.nfe_mean == 10
  sizes = [np.load(os.path.join(directory, f"shard_{i:05d}.npz"))["samples"].shape for i in range(3)]
  assert sizes == [(16, 4, 4, 1), (16, 4, 4, 1), (8, 4, 4, 1)]  # 40 samples in all, the last shard truncated.
  samples = samples_lib.load_samples(directory, 40, 16)
  assert samples.shape == (40, 4, 4, 1) and samples.dtype == np.float32

  os.remove(os.path.join(directory, "shard_00001.npz"))  # As if interrupted before this shard was written.
  calls.clear()
  resumed = samples_lib.generate_samples(sample_shard, directory, num_samples=40, shard_size=16)
  assert calls == [1] and resumed.reused_shards == 2 and resumed.computed_shards == 1
  np.testing.assert_array_equal(samples_lib.load_samples(directory, 40, 16), samples)

  calls.clear()  # Asking for more: the short last shard is drawn again (same first samples), one more is added.
  samples_lib.generate_samples(sample_shard, directory, num_samples=60, shard_size=16)
  assert calls == [2, 3]
  np.testing.assert_array_equal(samples_lib.load_samples(directory, 60, 16)[:40], samples)


def _shards_with_nonfinite_samples(directory, all_bad=False):
  """40 samples `[4, 4, 1]` in shards of 16; shard 1 holds two NaN samples (1 and 2 in it) and one with an inf
  pixel (7), i.e. samples 17, 18 and 23."""
  def sample_shard(index):
    x = np.random.default_rng(index).uniform(-1.2, 1.2, (16, 4, 4, 1)).astype(np.float32)
    if all_bad:
      x[:] = np.nan
    elif index == 1:
      x[[1, 2]] = np.nan
      x[7, 2, 3, 0] = np.inf
    return x, {"nfe": np.int32(10), "status": np.int32(0)}

  return samples_lib.generate_samples(sample_shard, str(directory), num_samples=40, shard_size=16)


def test_shard_outputs_read_each_shard_once_and_leave_out_nonfinite_samples(tmp_path, monkeypatch):
  result = _shards_with_nonfinite_samples(tmp_path / "samples")
  assert result.num_nonfinite == 3
  assert "warning: 3 of 40 samples hold NaN or infinite values" in report.format_results(
      {"step": 1, "params": "ema", "checkpoint": "c", "samples": {**result.to_dict(), "sampler": {
          "method": "ddim", "options": {}}}})
  scaler = AffineScaler.centred(256)
  rng = np.random.default_rng(0)
  to_pool, to_logits = rng.standard_normal((16, 5)), rng.standard_normal((16, 3))

  def outputs(images):  # A fixed network of the images' pixels.
    pixels = images.reshape(images.shape[0], -1).astype(np.float64) / 255
    return np.tanh(pixels @ to_pool), pixels @ to_logits

  loaded, load = [], io.load_npz
  monkeypatch.setattr(io, "load_npz", lambda path: loaded.append(os.path.basename(path)) or load(path))
  directory = str(tmp_path / "samples")
  pool, logits, nonfinite = reference.shard_outputs(outputs, directory, "net", 40, 16, scaler.to_uint8)
  assert [name for name in loaded if name.startswith("shard_")] == [f"shard_{i:05d}.npz" for i in range(3)]
  samples = samples_lib.load_samples(directory, 40, 16)
  finite = np.ones(40, bool)
  finite[[17, 18, 23]] = False
  np.testing.assert_array_equal(samples_lib.finite_rows(samples), finite)
  expected_pool, expected_logits = outputs(scaler.to_uint8(samples[finite]))
  assert nonfinite == 3 and pool.shape == (37, 5) and logits.shape == (37, 3)
  np.testing.assert_allclose(pool, expected_pool, rtol=1e-6, atol=1e-6)  # Cached in float32.
  np.testing.assert_allclose(logits, expected_logits, rtol=1e-6, atol=1e-6)

  loaded.clear()  # Cached per shard: no shard is read again; fewer samples cut the cached outputs.
  again = reference.shard_outputs(outputs, directory, "net", 40, 16, scaler.to_uint8)
  first_20 = reference.shard_outputs(outputs, directory, "net", 20, 16, scaler.to_uint8)
  assert not [name for name in loaded if name.startswith("shard_")]
  np.testing.assert_array_equal(again[0], pool)
  assert first_20[2] == 2 and first_20[0].shape == (18, 5)
  np.testing.assert_array_equal(first_20[0], pool[:18])

  _shards_with_nonfinite_samples(tmp_path / "broken", all_bad=True)
  with pytest.raises(ValueError, match=r"all 40 samples in .*broken hold NaN or infinite values"):
    reference.shard_outputs(outputs, str(tmp_path / "broken"), "net", 40, 16, scaler.to_uint8)


# --- Reference statistics: resumable, cached, keyed. -------------------------------------------------------


def test_reference_statistics_resume_after_an_interruption(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (70, 4, 4, 3), dtype=np.uint8)
  projection = rng.standard_normal((48, 6))

  def features(batch):  # A fixed feature map of the pixels.
    return np.tanh(batch.reshape(batch.shape[0], -1) / 255.0 @ projection)

  starts, computed = [], []

  def batches(start):  # The images in batches of 8 from `start` on, as a dataset stream yields them.
    starts.append(start)
    for begin in range(start, len(images), 8):
      yield images[begin:begin + 8]

  def counted(batch):
    computed.append(batch.shape[0])
    return features(batch)

  kwargs = dict(num_examples=60, num_features=6, kid_reference_size=20, save_every=2)
  straight = reference.reference_statistics(features, batches, str(tmp_path / "a" / "moments.npz"),
                                      kid_path=str(tmp_path / "a" / "kid.npz"), **kwargs)
  direct = features(images[:60])
  assert straight.num_examples == 60 and straight.features.shape == (20, 6)
  np.testing.assert_allclose(straight.mu, direct.mean(axis=0), rtol=1e-12, atol=1e-14)
  np.testing.assert_allclose(straight.sigma, np.cov(direct.T), rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(straight.features, direct[:20], rtol=1e-6)  # Kept in float32.

  def dies_in_batch_6(batch):
    if len(computed) == 5:  # The state after batch 4 was saved (every 2 batches); batch 5 is lost.
      raise KeyboardInterrupt
    return counted(batch)

  directory = tmp_path / "b"
  with pytest.raises(KeyboardInterrupt):
    reference.reference_statistics(dies_in_batch_6, batches, str(directory / "moments.npz"),
                             kid_path=str(directory / "kid.npz"), **kwargs)
  assert sorted(os.listdir(directory)) == ["moments.partial.npz"]
  starts.clear()
  computed.clear()
  resumed = reference.reference_statistics(counted, batches, str(directory / "moments.npz"),
                                     kid_path=str(directory / "kid.npz"), **kwargs)
  assert starts == [32] and computed == [8, 8, 8, 4]  # Images 32 .. 59 only.
  assert sorted(os.listdir(directory)) == ["kid.npz", "moments.npz"]
  for name in ("mu", "sigma", "features"):  # The same moments merged in the same order: bit for bit.
    np.testing.assert_array_equal(getattr(resumed, name), getattr(straight, name))
  assert resumed.num_examples == 60

  # Another KID size reads only the images it keeps and leaves the moments alone; cached files read no image.
  stamp = os.stat(directory / "moments.npz").st_mtime_ns
  starts.clear()
  computed.clear()
  smaller = reference.reference_statistics(counted, batches, str(directory / "moments.npz"),
                                     kid_path=str(directory / "kid12.npz"), **{**kwargs, "kid_reference_size": 12})
  assert starts == [0] and computed == [8, 4] and os.stat(directory / "moments.npz").st_mtime_ns == stamp
  np.testing.assert_array_equal(smaller.features, straight.features[:12])
  np.testing.assert_array_equal(smaller.sigma, straight.sigma)
  starts.clear()
  reference.reference_statistics(counted, batches, str(directory / "moments.npz"), kid_path=str(directory / "kid.npz"),
                           **kwargs)
  assert starts == []
  with pytest.raises(ValueError, match=r"the images ended after 70 of 80"):
    reference.reference_statistics(features, batches, str(tmp_path / "c.npz"), num_examples=80, num_features=6)


def test_reference_images_start_anywhere(tmp_path):
  from scoreflow.evaluate import load_digits_split

  config = with_eval(digits_vp.get_config())
  config.data.data_dir = str(tmp_path / "tfds")
  images = reference.reference_images(config_lib.build_experiment(config).data, "train", 8)
  levels = np.rint(load_digits_split("train", data_dir=config.data.data_dir)[0][:40] * 16)
  expected = np.rint(levels * (255 / 16)).astype(np.uint8)  # The 17 levels stretched to 8 bits, exactly.
  stream = images(0)
  np.testing.assert_array_equal(np.concatenate([next(stream) for _ in range(5)]), expected)
  stream.close()
  stream = images(20)  # Batches 0 and 1 are skipped unread; batch 2 starts 4 images in.
  parts = [next(stream) for _ in range(3)]
  stream.close()
  assert [part.shape[0] for part in parts] == [4, 8, 8] and parts[0].dtype == np.uint8
  np.testing.assert_array_equal(np.concatenate(parts), expected[20:40])


def test_inception_reference_files_are_named_by_their_data(tmp_path):
  config = with_eval(digits_vp.get_config())
  config.data.data_dir = str(tmp_path / "tfds")
  data, fid = config_lib.build_experiment(config).data, eval_config.build_eval_settings(config).fid
  fid = dataclasses.replace(fid, kid_reference_size=100)

  def paths(data=data, fid=fid, num_examples=1000, version="1.0.0", weights_digest="0123abcd"):
    return reference.inception_reference_paths(str(tmp_path), data, fid, num_examples=num_examples, version=version,
                                         weights_digest=weights_digest)

  moments, kid = paths()
  assert os.path.basename(moments).startswith("inception_moments-digits-train-1000-")
  assert os.path.basename(kid).startswith("inception_kid-digits-train-100-")
  for changed in (paths(version="1.0.1"), paths(data=dataclasses.replace(data, data_dir=str(tmp_path / "other"))),
                  paths(data=dataclasses.replace(data, image_size=16)), paths(weights_digest="ffff0000"),
                  paths(fid=dataclasses.replace(fid, reference_split="test"))):
    assert changed[0] != moments and changed[1] != kid
  assert paths(fid=dataclasses.replace(fid, kid_reference_size=50)) == (moments, kid.replace("-100-", "-50-"))
  assert paths(num_examples=500)[1] == kid  # The KID features are those of the first 100 images either way.
  assert paths(fid=dataclasses.replace(fid, kid_reference_size=0)) == (moments, None)


# --- evaluate(config, workdir) on a run. --------------------------------------------------------------------


def _toy_closed_form_bpd(config, num_examples):
  """Bits/dim of the toy test split under the zero network: its probability-flow drift is f(t) x, so the ODE
  maps x to a x with a = alpha(T) / alpha(eps), and log p(x) = log N(a x; 0, I) + D log a."""
  stream = make_dataset("eight_gaussians", "test", data_dir=None, global_batch_size=config.eval.batch_size,
                        seed=config.eval.seed, shuffle=False)
  x = np.concatenate([next(stream)["x"] for _ in range(-(-num_examples // config.eval.batch_size))])[:num_examples]
  x = x.astype(np.float64)
  a = float(SDE.alpha(1.0) / SDE.alpha(config.eval.bpd.eps))
  logp = np.sum(-0.5 * np.log(2 * np.pi) - 0.5 * (a * x) ** 2, axis=1) + 2 * np.log(a)
  return -logp / (2 * np.log(2))


def test_evaluate_bpd_and_samples_then_resume(tmp_path, monkeypatch):
  config = toy_config()
  write_run(tmp_path / "run", config, steps=[5, 10])
  straight = run.evaluate(config, tmp_path / "run")
  record = straight["checkpoints"][0]
  assert len(straight["checkpoints"]) == 1 and record["step"] == 10 and record["params"] == "ema"

  bpd = record["bpd"]
  per_example = np.load(bpd["per_example_file"])
  expected = _toy_closed_form_bpd(config, 40)
  # float32 network and data; solver rtol = atol = 1e-5 on the state and on the divergence integral per dimension
  # (about 5 nats/dim here): the global error stays below 1e-4 nats/dim, i.e. 1.5e-4 bits/dim. The Hutchinson
  # estimate is exact for the linear drift f(t) x (its Jacobian is f(t) I and Rademacher probes have |v|^2 = D).
  np.testing.assert_allclose(per_example["bpd"], expected, rtol=0, atol=3e-4)
  assert bpd["num_examples"] == 40 and bpd["num_failed"] == 0 and bpd["compilations"] == 1
  assert bpd["mean"] == pytest.approx(expected.mean(), abs=3e-4)
  assert bpd["stderr"] == pytest.approx(np.std(per_example["bpd"], ddof=1) / np.sqrt(40), rel=1e-6)

  samples = record["samples"]
  assert samples["num_samples"] == 40 and samples["num_shards"] == 3 and tuple(samples["shape"]) == (2,)
  assert samples["nfe_mean"] == 8 and samples["compilations"] == 1 and os.path.isfile(samples["grid"])
  assert samples["sampler"] == {"method": "ddim", "options": {"num_steps": 8, "eta": 0.0, "eps": 1e-3}}
  x = samples_lib.load_samples(samples["directory"], 40, 16)
  assert x.shape == (40, 2) and np.all(np.isfinite(x))
  summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
  assert summary["checkpoints"][0]["bpd"]["mean"] == bpd["mean"]

  # Interrupt a fresh evaluation twice (a crash while writing the 2nd, then the 5th result file), then finish it.
  config.eval.output_dir = str(tmp_path / "resumed")
  real_savez = io.atomic_savez

  def crash_on(call):
    count = []

    def savez(path, arrays):
      count.append(path)
      if len(count) == call:
        raise KeyboardInterrupt
      real_savez(path, arrays)

    return savez

  monkeypatch.setattr(io, "atomic_savez", crash_on(2))
  with pytest.raises(KeyboardInterrupt):
    run.evaluate(config, tmp_path / "run")  # Dies on bpd batch 1.
  monkeypatch.setattr(io, "atomic_savez", crash_on(5))
  with pytest.raises(KeyboardInterrupt):
    run.evaluate(config, tmp_path / "run")  # Batches 1, 2, the per-example file and shard 0; dies on shard 1.
  monkeypatch.setattr(io, "atomic_savez", real_savez)
  resumed = run.evaluate(config, tmp_path / "run")["checkpoints"][0]
  assert resumed["bpd"]["reused_batches"] == 3 and resumed["bpd"]["computed_batches"] == 0
  assert resumed["samples"]["reused_shards"] == 1 and resumed["samples"]["computed_shards"] == 2
  a, b = np.load(bpd["per_example_file"]), np.load(resumed["bpd"]["per_example_file"])
  for name in a.files:
    np.testing.assert_array_equal(a[name], b[name])
  np.testing.assert_array_equal(samples_lib.load_samples(resumed["samples"]["directory"], 40, 16), x)
  assert resumed["bpd"]["mean"] == bpd["mean"]


def test_evaluate_chosen_checkpoints_and_raw_parameters(tmp_path):
  config = toy_config(tasks="bpd", checkpoints="0:5", use_ema=False, **{"bpd.num_examples": 16})
  write_run(tmp_path / "run", config, steps=[0, 5, 10], raw_params_scale=0.3)
  summary = run.evaluate(config, tmp_path / "run")
  assert [r["step"] for r in summary["checkpoints"]] == [0, 5]
  assert all(r["params"] == "raw" and "samples" not in r for r in summary["checkpoints"])
  assert summary["checkpoints"][1]["directory"] in glob.glob(str(tmp_path / "run" / "eval" / "step_5-raw-*"))
  # The raw parameters are not the zero network: their bits/dim is not the closed form of the EMA ones.
  expected = _toy_closed_form_bpd(config, 16).mean()
  assert abs(summary["checkpoints"][0]["bpd"]["mean"] - expected) > 1e-2
  assert summary["checkpoints"][0]["bpd"]["mean"] == summary["checkpoints"][1]["bpd"]["mean"]


def test_mismatched_checkpoint_names_the_fields(tmp_path):
  trained = toy_config()
  write_run(tmp_path / "run", trained, steps=[3])
  config = toy_config()
  config.model.width = 24
  with pytest.raises(CheckpointError, match="allow_config_mismatch=True") as error:
    run.evaluate(config, tmp_path / "run")  # Refused from config.json alone, before any checkpoint is read.
  assert "config.model.width: 16 in the workdir's config.json, 24 in --config" in str(error.value)
  config.eval.allow_config_mismatch = True
  with pytest.raises(CheckpointError) as error:
    run.evaluate(config, tmp_path / "run")
  message = str(error.value)
  assert "config.model.width: 16 in the workdir's config.json, 24 in --config" in message
  assert "checkpoint has shape/dtype ((16,), 'float32'), the model expects ((24,), 'float32')" in message
  assert not os.path.exists(tmp_path / "run" / "eval" / "summary.json")


def test_a_model_mismatch_is_an_error_and_never_shares_caches(tmp_path, capsys):
  """A mistaken --config.sde.beta_max (the shapes fit) is refused; allowed, its samples and bits/dim are kept
  apart, so the evaluation with the run's own configuration computes its own."""
  config = toy_config(tasks="bpd,samples", **{"bpd.num_examples": 16})
  workdir = tmp_path / "run"
  write_run(workdir, config, steps=[4])
  wrong = toy_config(tasks="bpd,samples", **{"bpd.num_examples": 16})
  wrong.sde.beta_max = 10.0
  with pytest.raises(CheckpointError, match=r"(?s)config.sde.beta_max: 20.0 in the workdir's config.json, 10.0 in "
                                            r"--config.*--config.eval.allow_config_mismatch=True"):
    run.evaluate(wrong, workdir)
  assert not os.path.exists(workdir / "eval")  # Nothing was computed.

  wrong.eval.allow_config_mismatch = True
  mistaken = run.evaluate(wrong, workdir)["checkpoints"][0]
  assert "warning: config.sde.beta_max is 10.0 here but 20.0" in capsys.readouterr().out
  right = run.evaluate(config, workdir)["checkpoints"][0]
  assert right["samples"]["computed_shards"] == 3 and right["samples"]["reused_shards"] == 0
  assert right["bpd"]["computed_batches"] == 1 and right["bpd"]["reused_batches"] == 0
  assert right["directory"] != mistaken["directory"]
  assert right["bpd"]["mean"] != mistaken["bpd"]["mean"]
  x_right = samples_lib.load_samples(right["samples"]["directory"], 40, 16)
  x_wrong = samples_lib.load_samples(mistaken["samples"]["directory"], 40, 16)
  assert np.max(np.abs(x_right - x_wrong)) > 0.1
  # Each setup finds its own results again.
  again = run.evaluate(wrong, workdir)["checkpoints"][0]
  assert again["directory"] == mistaken["directory"] and again["samples"]["reused_shards"] == 3
  np.testing.assert_array_equal(samples_lib.load_samples(again["samples"]["directory"], 40, 16), x_wrong)
  settings = json.loads(open(os.path.join(right["directory"], "settings.json")).read())
  assert settings["model"]["sde.beta_max"] == 20.0 and settings["checkpoint"] == str(workdir / "checkpoints" / "4")


def test_a_checkpoint_written_again_gets_its_own_caches(tmp_path):
  """Another training run in the same workdir writes a new checkpoint at the same step: nothing of the first one's
  evaluation is reused. A copy of the workdir keeps its checkpoints' identity."""
  config = toy_config(tasks="samples")
  workdir = tmp_path / "run"
  write_run(workdir, config, steps=[4])
  first = run.evaluate(config, workdir)["checkpoints"][0]
  shutil.copytree(workdir / "checkpoints", tmp_path / "copy" / "checkpoints")
  shutil.copy(workdir / "config.json", tmp_path / "copy" / "config.json")
  shutil.rmtree(workdir / "checkpoints")
  write_run(workdir, config, steps=[4])
  second = run.evaluate(config, workdir)["checkpoints"][0]
  assert second["samples"]["computed_shards"] == 3 and second["directory"] != first["directory"]
  config.eval.output_dir = str(workdir / "eval")
  copied = run.evaluate(config, tmp_path / "copy")["checkpoints"][0]
  assert copied["directory"] == first["directory"] and copied["samples"]["reused_shards"] == 3


def test_fid_inputs_are_checked_before_any_checkpoint_is_read(tmp_path):
  from scoreflow.evaluate import init_fid_inception, save_fid_inception

  config = digits_config(tmp_path, tasks="fid")
  bad = tmp_path / "not_inception.npz"
  np.savez(bad, **{"fc.weight": np.zeros((10, 2048), np.float32), "head.bias": np.zeros(3, np.float32)})
  config.eval.fid.inception_path = str(bad)
  with pytest.raises(config_lib.ConfigError, match=r"(?s)not_inception\.npz'?: .*fc\.weight: expected shape "
                                                 r"\(1008, 2048\), got \(10, 2048\); missing Conv2d_1a_3x3.*"
                                                 r"convert_pytorch_fid_weights"):
    eval_config.build_eval_settings(config)
  weights = tmp_path / "fid_inception.npz"
  save_fid_inception(weights, init_fid_inception(0))
  config.eval.fid.inception_path = str(weights)
  eval_config.build_eval_settings(config)  # The real network's arrays pass.

  workdir = tmp_path / "run"
  write_run(workdir, config, steps=[1], element_shape=(8, 8, 1))
  config.eval.fid.reference_split = "validation"
  with pytest.raises(ValueError, match=r"config.eval.fid.reference_split='validation': make_dataset: split "
                                       r"'validation' does not exist"):
    run.evaluate(config, workdir)
  config.eval.tasks = "digits"
  config.eval.digits.reference_split = "tain"
  with pytest.raises(ValueError, match=r"config.eval.digits.reference_split='tain'"):
    run.evaluate(config, workdir)
  assert not os.path.exists(workdir / "eval")  # No sample was drawn.


def test_a_dequantized_run_decodes_samples_with_its_training_scaler(tmp_path):
  """Trained on dequantized levels (v + u) / 17, samples decode by the floor of 17 steps: the grid and the digits
  metric use that scaler, not the levels one (2 / 16 steps, rounded). Non-finite samples are left out."""
  import PIL.Image
  from scoreflow.evaluate import evaluate_digits_samples, load_digits_classifier, load_statistics
  from scoreflow.train import visualize

  config = digits_config(tmp_path, tasks="digits")
  config.data.dequantize = True
  config.sde.beta_max = 0.5  # alpha(1) = 0.86: the zero network's samples x_T alpha(eps)/alpha(1) mostly in range.
  workdir = tmp_path / "run"
  write_run(workdir, config, steps=[2], element_shape=(8, 8, 1))
  record = run.evaluate(config, workdir)["checkpoints"][0]
  directory = record["samples"]["directory"]
  samples = samples_lib.load_samples(directory, 32, 16)
  trained = AffineScaler.centred(17, dequantized=True)
  levels = AffineScaler.centred(17)
  # The two decodings disagree on many pixels of these samples (by a level, up to 8 of 255 intensity steps).
  assert np.mean(trained.to_levels(samples) != levels.to_levels(samples)) > 0.1
  grid = np.asarray(PIL.Image.open(record["samples"]["grid"]))
  np.testing.assert_array_equal(grid, visualize.sample_picture(samples[:16], trained))

  classifier = load_digits_classifier(record["digits"]["classifier"])
  reference = load_statistics(record["digits"]["reference"])
  expected = evaluate_digits_samples(classifier, samples, reference, scaler=trained)
  assert record["digits"]["fd"] == expected.fd and record["digits"]["num_nonfinite_samples"] == 0
  assert record["digits"]["fd"] != evaluate_digits_samples(classifier, samples, reference, scaler=levels).fd

  shard = dict(np.load(os.path.join(directory, "shard_00001.npz")))
  shard["samples"][:5] = np.nan  # As a diverged sampler leaves them: samples 16 .. 20.
  io.atomic_savez(os.path.join(directory, "shard_00001.npz"), shard)
  again = run.evaluate(config, workdir)["checkpoints"][0]
  assert again["samples"]["reused_shards"] == 2 and again["samples"]["num_nonfinite"] == 5
  assert again["digits"]["num_nonfinite_samples"] == 5 and again["digits"]["num_examples"] == 27
  kept = np.concatenate([samples[:16], samples[21:]])
  assert again["digits"]["fd"] == evaluate_digits_samples(classifier, kept, reference, scaler=trained).fd
  assert "(5 non-finite samples left out)" in report.format_results(again)


# --- The digits metric on a trained and an untrained model. ---------------------------------------------------


@pytest.mark.slow
def test_digits_metric_of_a_trained_run_beats_the_untrained_one(tmp_path):
  config = with_eval(digits_vp.get_config())
  config.model = default.model_config("mlp_toy", width=128, depth=2, embedding_dim=32)
  config.data.data_dir = str(tmp_path / "tfds")
  config.training.num_train_steps = 400
  config.training.checkpoint_every = 400
  config.training.snapshot_every = 0
  config.training.sample_every = 0
  config.training.progress_bar = False
  config.sampling.method = "ddim"
  config.sampling.num_steps = 50
  config.eval.progress_bar = False
  config.eval.tasks = "quality"
  config.eval.checkpoints = "all"
  config.eval.samples.num_samples = 300
  config.eval.samples.shard_size = 150
  workdir = tmp_path / "run"
  write_run(workdir, config, steps=[0], element_shape=(8, 8, 1))  # The untrained network (zero output).
  loop.train_and_evaluate(config, workdir)  # Resumes from step 0 and trains 400 steps (about 15 s).
  untrained, trained = run.evaluate(config, workdir)["checkpoints"]
  assert (untrained["step"], trained["step"]) == (0, 400)
  real = trained["digits"]["real_data"]
  # Measured (300 samples each): FD 4.3 for real test digits, 47 after 400 steps, 319 untrained (its samples are
  # prior noise scaled by alpha(eps)/alpha(T) ~ 150, i.e. binary images); mean confidence 0.99, 0.88, 0.79;
  # classifier score 9.6, 7.0, 5.2. The per-sample max-probability has a spread of about 0.2, so each mean
  # confidence has a standard error near 0.012 and their difference near 0.017: 0.03 is 3.5 of those below the
  # measured 0.09.
  assert trained["digits"]["fd"] < untrained["digits"]["fd"] / 4
  assert trained["digits"]["fd"] > real["fd"]
  assert trained["digits"]["mean_confidence"] > untrained["digits"]["mean_confidence"] + 0.03
  assert trained["digits"]["classifier_score"] > untrained["digits"]["classifier_score"] + 0.8
  assert trained["digits"]["classifier_test_accuracy"] > 0.93
  # The classifier and reference statistics were trained and computed once, then reused from the cache.
  classifier = trained["digits"]["classifier"]
  stamp = os.stat(classifier).st_mtime_ns
  paths = run.compute_reference_statistics(config, workdir)
  assert paths["digits_classifier"] == classifier and os.stat(classifier).st_mtime_ns == stamp


# --- FID / IS / KID with (random) Inception weights from a file. ---------------------------------------------


@pytest.mark.slow
def test_inception_metrics_of_a_run_are_cached_and_consistent(tmp_path):
  from scoreflow.evaluate import fid_inception_outputs, init_fid_inception, load_statistics, save_fid_inception

  weights, variables = tmp_path / "fid_inception.npz", init_fid_inception(0)
  save_fid_inception(weights, variables)  # Any weights exercise the plumbing; the port is proven elsewhere.
  config = with_eval(digits_vp.get_config())
  config.model = default.model_config("mlp_toy", width=16, depth=1, embedding_dim=16)
  config.data.data_dir = str(tmp_path / "tfds")
  config.sampling.method = "ddim"
  config.sampling.num_steps = 4
  config.eval.progress_bar = False
  config.eval.tasks = "fid"
  config.eval.batch_size = 8
  config.eval.samples.num_samples = 12  # Two shards, the last one truncated.
  config.eval.samples.shard_size = 8
  config.eval.fid.inception_path = str(weights)
  config.eval.fid.reference_num_examples = 20
  config.eval.fid.kid_reference_size = 16
  config.eval.fid.kid_subset_size = 6
  config.eval.fid.kid_num_subsets = 4
  config.eval.fid.is_num_splits = 2
  workdir = tmp_path / "run"
  write_run(workdir, config, steps=[1], element_shape=(8, 8, 1))
  record = run.evaluate(config, workdir)["checkpoints"][0]
  fid, directory = record["fid"], record["samples"]["directory"]
  assert fid["num_samples"] == 12 and fid["reference_num_examples"] == 20
  assert np.isfinite(fid["fid"]) and fid["fid"] > 0 and 1 <= fid["inception_score"] <= 1008
  assert np.isfinite(fid["kid"]) and fid["kid_std"] >= 0
  reference = load_statistics(fid["reference"])
  assert reference.num_examples == 20 and reference.features is None and fid["num_nonfinite_samples"] == 0
  assert np.load(fid["kid_reference"])["features"].shape == (16, 2048)
  assert not [name for name in os.listdir(os.path.dirname(fid["reference"])) if "partial" in name]

  # Independently: the samples as 8-bit images through the network give the cached features.
  images = AffineScaler.centred(17).to_uint8(samples_lib.load_samples(directory, 12, 8))
  padded = np.concatenate([images, images[-4:]])  # Whole batches of 8: the compiled shape; the copies are dropped.
  pool = fid_inception_outputs(variables, padded, batch_size=8)[0][:12]
  cached = sorted(f for f in os.listdir(directory) if f.startswith("inception-"))
  assert len(cached) == 2
  np.testing.assert_allclose(np.concatenate([np.load(os.path.join(directory, f))["pool"] for f in cached]), pool,
                             rtol=1e-5, atol=1e-6)

  # The metrics, recomputed by hand from the cached features and the cached reference (issue 15, item 6).
  cached_pool = np.concatenate([np.load(os.path.join(directory, f))["pool"] for f in cached]).astype(np.float64)
  cached_logits = np.concatenate([np.load(os.path.join(directory, f))["logits"] for f in cached]).astype(np.float64)
  assert cached_pool.shape == (12, 2048) and cached_logits.shape == (12, 1008)
  # FID = |mu - mu_r|^2 + tr S + tr S_r - 2 tr (S S_r)^(1/2). With S = A A^T (A = centred features / sqrt(n - 1),
  # [d, 12]) the non-zero eigenvalues of S S_r are those of the 12 x 12 PSD matrix A^T S_r A, so the trace of the
  # square root is the sum of their square roots: exact, without a 2048-d matrix square root.
  centred = (cached_pool - cached_pool.mean(0)).T / np.sqrt(11)
  eigenvalues = np.linalg.eigvalsh(centred.T @ reference.sigma @ centred)
  fid_by_hand = (np.sum((cached_pool.mean(0) - reference.mu) ** 2) + np.sum(centred**2) + np.trace(reference.sigma)
                 - 2 * np.sum(np.sqrt(np.clip(eigenvalues, 0, None))))
  # The library's 2048-d PSD square root of rank-deficient matrices (rank 11 and 19) loses accuracy on its ~2000
  # zero eigenvalues, each of which may contribute sqrt(float64 eps * |S|) ~ 1e-8 |S|^(1/2): 1e-6 relative covers it.
  np.testing.assert_allclose(fid["fid"], fid_by_hand, rtol=1e-6)
  # IS over is_num_splits = 2 contiguous halves: exp E_x KL(p(y|x) || p(y)).
  log_p = cached_logits - np.log(np.sum(np.exp(cached_logits - cached_logits.max(1, keepdims=True)), 1,
                                        keepdims=True)) - cached_logits.max(1, keepdims=True)
  scores = [np.exp(np.mean(np.sum(np.exp(part) * (part - np.log(np.exp(part).mean(0))), 1)))
            for part in (log_p[:6], log_p[6:])]
  np.testing.assert_allclose([fid["inception_score"], fid["inception_score_std"]], [np.mean(scores), np.std(scores)],
                             rtol=1e-9)
  # KID: 4 subsets of 6 samples and 6 of the 16 reference features (seed 0: x's subset, then y's, per round), the
  # unbiased MMD^2 with the cubic kernel (x.y / d + 1)^3.
  kid_features = np.load(fid["kid_reference"])["features"].astype(np.float64)
  rng, values = np.random.default_rng(0), []
  for _ in range(4):
    x = cached_pool[rng.choice(12, 6, replace=False)]
    y = kid_features[rng.choice(16, 6, replace=False)]
    k = lambda a, b: (a @ b.T / 2048 + 1) ** 3  # noqa: E731
    off_diagonal = lambda m: (m.sum() - np.trace(m)) / 30  # noqa: E731
    values.append(off_diagonal(k(x, x)) + off_diagonal(k(y, y)) - 2 * k(x, y).mean())
  np.testing.assert_allclose([fid["kid"], fid["kid_std"]], [np.mean(values), np.std(values)], rtol=1e-9, atol=1e-12)

  # A second evaluation reuses the reference statistics and the metrics (the 2048-d Fréchet distance is slow).
  files = [fid["reference"], fid["kid_reference"]] + [os.path.join(directory, f) for f in os.listdir(directory)
                                                      if f.startswith("fid-")]
  stamps = [os.stat(path).st_mtime_ns for path in files]
  again = run.evaluate(config, workdir)["checkpoints"][0]["fid"]
  assert [os.stat(path).st_mtime_ns for path in files] == stamps and again["fid"] == fid["fid"] and again["reused"]
