"""The evaluation tasks added for controllable generation and the published weights, through
`evaluate(config, workdir)`: `bound`, `eval.init_from`, `inpaint`, `colorize` and `conditional`."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from configs import default, digits_classifier, digits_vp, digits_vp_conditional  # noqa: E402

import scoreflow as sf  # noqa: E402
from scoreflow.config import build_experiment  # noqa: E402
from scoreflow.data import make_dataset  # noqa: E402
from scoreflow.evaluate import run  # noqa: E402
from scoreflow.models import build_model, from_score_sde_pytorch, to_score_sde_pytorch  # noqa: E402
from scoreflow.train.checkpoint import CheckpointError  # noqa: E402
from scoreflow.train.step import make_network  # noqa: E402

NUM_EXAMPLES, BATCH = 20, 16


def digits_config(tmp_path, **model):
  """Digits with the DDPM++ digits network (a reference architecture) at a small width and cheap evaluation."""
  config = digits_vp.get_config()
  config.model = default.model_config("ddpmpp_digits", **{"nf": 16, **model})
  config.data.data_dir = str(tmp_path / "tfds")
  config.sampling.method = "ddim"
  config.sampling.num_steps = 4
  config.eval.progress_bar = False
  config.eval.tasks = "bound"
  config.eval.batch_size = BATCH
  config.eval.bound.num_examples = NUM_EXAMPLES  # Two batches, the second padded.
  config.eval.bound.num_samples = 2  # Draws of (u, t, noise) averaged per example.
  return config


def random_params(config, seed):
  model = build_model(config.model.to_dict())
  params = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)))["params"]
  # Perturb every parameter (zero-initialised output layers included) so that no path is hidden.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  return jax.tree.unflatten(tree, [leaf + 0.05 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])


def write_reference_checkpoint(path, config, ema_params, raw_params, step):
  """A `checkpoint_<step>.pth` in score_sde_pytorch's layout: DataParallel `module.` keys, EMA shadow parameters in
  `model.parameters()` order, the optimizer and the step."""
  spec = config.model.to_dict()
  raw = to_score_sde_pytorch(raw_params, spec, prefix="module.")
  shadow = list(to_score_sde_pytorch(ema_params, spec).values())
  torch.save({"model": {k: torch.from_numpy(v) for k, v in raw.items()},
              "ema": {"decay": 0.9999, "num_updates": step, "shadow_params": [torch.from_numpy(v) for v in shadow]},
              "optimizer": {}, "step": step}, path)


def expected_bounds(config, params, seed):
  """The bound of the first NUM_EXAMPLES test digits, computed here with the documented key scheme: batch `i`
  uses `fold_in(fold_in(fold_in(key(seed), 0), i), 0)` (the bpd tasks' keys), the levels of the test split and
  the dequantized centred scaler onto [-1, 1)."""
  experiment = build_experiment(config)
  network = make_network(experiment.model.apply, train=False)
  score_fn = sf.make_score_fn(network, params, experiment.sampling_sde, experiment.parameterization)
  stream = make_dataset("digits", "test", data_dir=config.data.data_dir, global_batch_size=BATCH, shuffle=False,
                        num_epochs=None, seed=seed, random_flip=False)
  unit = stream.scaler.as_dequantized()
  key = jax.random.fold_in(jax.random.key(seed), 0)
  bounds = []
  for index, batch in zip(range(2), stream):
    values = stream.scaler.to_levels(batch["x"])
    bounds.append(sf.continuous_bound_bpd(jax.random.fold_in(jax.random.fold_in(key, index), 0), values, score_fn,
                                          experiment.sampling_sde, scale=float(unit.scale), shift=float(unit.shift),
                                          num_levels=unit.num_levels, eps=1e-5, num_samples=2))
  stream.close()
  return np.concatenate(bounds)[:NUM_EXAMPLES]


@pytest.fixture(scope="module")
def published(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp("published")
  config = digits_config(tmp_path)
  ema, raw = random_params(config, 0), random_params(config, 1)
  path = str(tmp_path / "checkpoint_7.pth")
  write_reference_checkpoint(path, config, ema, raw, step=7)
  return tmp_path, config, path, ema, raw


def test_published_weights_are_evaluated_by_the_bound_task(published):
  """`--config.eval.init_from=checkpoint_7.pth` evaluates the imported EMA weights in a fresh workdir: the bound of
  each test digit equals the bound of the same weights computed directly, and the raw weights give other
  numbers."""
  tmp_path, config, path, ema, raw = published
  config.eval.init_from = path
  workdir = tmp_path / "fresh"  # Need not exist: only the results go there.
  record = run.evaluate(config, workdir)["checkpoints"][0]
  assert record["step"] == 7 and record["checkpoint"] == os.path.abspath(path)
  assert os.path.basename(record["directory"]).startswith("imported_step_7-ema-")
  bound = record["bound"]
  per_example = np.load(bound["per_example_file"])["bpd"]
  assert bound["num_examples"] == NUM_EXAMPLES and bound["kind"] == "continuous" and bound["dequantized"]
  np.testing.assert_allclose(per_example, expected_bounds(config, ema, seed=0), rtol=1e-5)
  assert bound["mean"] == pytest.approx(per_example.mean(), rel=1e-12)
  assert bound["stderr"] == pytest.approx(per_example.std(ddof=1) / np.sqrt(NUM_EXAMPLES), rel=1e-9)
  # The weights a checkpoint holds are the ones evaluated: the importer's own reading, and not the raw ones.
  imported = from_score_sde_pytorch(path, config.model.to_dict())
  for a, b in zip(jax.tree.leaves(imported), jax.tree.leaves(ema)):
    np.testing.assert_allclose(a, np.asarray(b, np.float32), rtol=0, atol=0)  # float32 on disk: exact.
  config.eval.use_ema = False
  raw_record = run.evaluate(config, workdir)["checkpoints"][0]
  assert os.path.basename(raw_record["directory"]).startswith("imported_step_7-raw-")
  raw_bounds = np.load(raw_record["bound"]["per_example_file"])["bpd"]
  np.testing.assert_allclose(raw_bounds, expected_bounds(config, raw, seed=0), rtol=1e-5)
  assert not np.allclose(raw_bounds, per_example, rtol=1e-3)
  assert "variational bound (score flow, dequantized)" in run.report.format_results(raw_record)


def test_published_weights_of_another_network_are_refused_before_any_work(published):
  tmp_path, config, path, _, _ = published
  wider = digits_config(tmp_path, nf=32)
  wider.eval.init_from = path
  with pytest.raises(CheckpointError, match=r"(?s)init_from=.*checkpoint_7\.pth.*cannot be evaluated.*shape"):
    run.evaluate(wider, tmp_path / "other")
  missing = digits_config(tmp_path)
  missing.eval.init_from = str(tmp_path / "no_such.pth")
  with pytest.raises(ValueError, match=r"config.eval.init_from=.*no_such\.pth.*no such file"):
    run.evaluate(missing, tmp_path / "other")


def test_ddpm_bound_task_is_the_ddpm_vlb(tmp_path):
  """On the DDPM chain the task reports Ho et al.'s VLB with the discretized decoder on the levels' bins (one exact
  sum over the chain's steps), the same numbers as `ddpm_vlb_bpd` of the network; the SMLD chain has none."""
  config = digits_config(tmp_path)
  config.sde.name, config.loss.name, config.sde.num_scales, config.sde.beta_max = "ddpm", "ddpm", 8, 5.0
  config.model = default.model_config("ddpmpp_digits", nf=16, noise_conditioning="index")
  params = random_params(config, 2)
  path = str(tmp_path / "checkpoint_3.pth")
  write_reference_checkpoint(path, config, params, params, step=3)
  config.eval.init_from = path
  record = run.evaluate(config, tmp_path / "ddpm")["checkpoints"][0]
  bound = record["bound"]
  assert bound["kind"] == "ddpm_vlb" and bound["nfe_mean"] == 8  # One network call per step of the chain.
  experiment = build_experiment(config)
  network = make_network(experiment.model.apply, train=False)
  stream = make_dataset("digits", "test", data_dir=config.data.data_dir, global_batch_size=BATCH, shuffle=False,
                        num_epochs=None, seed=0, random_flip=False)
  values = stream.scaler.to_levels(next(iter(stream))["x"])
  stream.close()
  key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0), 0), 0)
  expected = sf.ddpm_vlb_bpd(key, values, lambda x, i: network(params, x, i.astype(x.dtype)), experiment.process,
                             scale=float(stream.scaler.scale), shift=-1.0, num_levels=17)
  np.testing.assert_allclose(np.load(bound["per_example_file"])["bpd"][:BATCH], expected, rtol=1e-5)


def test_inpainting_task_completes_test_digits_keeping_what_is_observed(published):
  """`eval.tasks=inpaint`: the lower half of each test digit is generated by the PC sampler with replacement, the
  upper half is returned exactly as observed, the results are judged by the digits classifier against the true
  labels (and the truth itself), and a rerun reuses every finished batch."""
  tmp_path, config, path, _, _ = published
  config.eval.init_from = path
  config.eval.tasks = "inpaint"
  config.eval.inverse.num_examples = NUM_EXAMPLES
  config.eval.inverse.num_steps = 3
  config.eval.inverse.grid_size = 4
  config.eval.digits.classifier_steps = 50
  workdir = tmp_path / "inpaint"
  summary = run.evaluate(config, workdir)
  result = summary["checkpoints"][0]["inpaint"]
  assert result["num_examples"] == NUM_EXAMPLES and result["mask"] == "lower_half"
  assert result["observed_preserved"] and result["nfe"] == 3 * 2 + 1
  assert 0 <= result["completed"]["accuracy"] <= 1 and result["truth"]["accuracy"] > 0.5
  assert os.path.isfile(result["grid"]) and result["mse"] > 0
  batches = sorted(name for name in os.listdir(result["directory"]) if name.startswith("batch_"))
  saved = np.load(os.path.join(result["directory"], batches[0]))
  upper = saved["completed"][:, :4], saved["truth"][:, :4]
  np.testing.assert_array_equal(*upper)  # Bitwise: the observed half is the test image itself.
  assert not np.allclose(saved["completed"][:, 4:], saved["truth"][:, 4:])
  mtimes = {name: os.stat(os.path.join(result["directory"], name)).st_mtime_ns for name in batches}
  again = run.evaluate(config, workdir)["checkpoints"][0]["inpaint"]
  assert again["mse"] == result["mse"]
  assert mtimes == {name: os.stat(os.path.join(result["directory"], name)).st_mtime_ns for name in batches}
  assert "inpainting (lower_half generated)" in run.report.format_results(summary["checkpoints"][0])
  # Reconstruction guidance: another directory, the same observed half, other completions.
  config.eval.inverse.guidance, config.eval.inverse.guidance_t_max = "pigdm", 0.9
  guided = run.evaluate(config, workdir)["checkpoints"][0]["inpaint"]
  assert guided["directory"] != result["directory"] and guided["observed_preserved"]
  assert guided["sampler"]["guidance"] == "pigdm" and guided["sampler"]["guidance_t_max"] == 0.9
  guided_batch = np.load(os.path.join(guided["directory"], batches[0]))
  np.testing.assert_array_equal(guided_batch["completed"][:, :4], saved["truth"][:, :4])
  assert not np.allclose(guided_batch["completed"][:, 4:], saved["completed"][:, 4:])


def test_colorization_task_keeps_the_grey_levels_of_rgb_images(tmp_path):
  """`eval.tasks=colorize` on a real (small) prepared tfds RGB dataset: every output's channel mean is the observed
  grey image (to float32 round-off of the orthogonal colour transform), the colours are generated, and a grey
  dataset is refused before any work."""
  from _data_fixtures import ScoreflowTestImages

  data_dir = tmp_path / "tfds"
  ScoreflowTestImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  config = digits_config(tmp_path)
  config.data.name, config.data.data_dir, config.data.image_size = "scoreflow_test_images", str(data_dir), 8
  model = build_model(config.model.to_dict())
  params = model.init(jax.random.key(3), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,)))["params"]
  leaves, tree = jax.tree.flatten(params)
  params = jax.tree.unflatten(tree, [leaf + 0.05 * jax.random.normal(jax.random.key(i), leaf.shape)
                                     for i, leaf in enumerate(leaves)])
  path = str(tmp_path / "checkpoint_1.pth")
  write_reference_checkpoint(path, config, params, params, step=1)
  config.eval.init_from = path
  config.eval.tasks = "colorize"
  config.eval.inverse.split = "train"
  config.eval.inverse.num_examples = 12
  config.eval.inverse.num_steps = 3
  config.eval.inverse.grid_size = 4
  result = run.evaluate(config, tmp_path / "run")["checkpoints"][0]["colorize"]
  assert result["num_examples"] == 12 and result["mask"] is None and "completed" not in result  # No digits judge.
  saved = np.load(os.path.join(result["directory"], "batch_00000.npz"))
  grey = saved["truth"].mean(axis=-1, keepdims=True)
  np.testing.assert_allclose(saved["completed"].mean(axis=-1, keepdims=True), grey, rtol=0, atol=1e-5)
  np.testing.assert_allclose(saved["observed"], np.broadcast_to(grey, saved["truth"].shape), rtol=0, atol=1e-6)
  assert np.abs(saved["completed"] - saved["truth"]).max() > 0.05 and os.path.isfile(result["grid"])
  digits = digits_config(tmp_path)
  digits.eval.tasks = "colorize"
  with pytest.raises(ValueError, match="'colorize' needs RGB images, but the digits are grey"):
    run.evaluate(digits, tmp_path / "run")


def conditional_config(tmp_path, **model):
  config = digits_vp_conditional.get_config()
  config.model = default.model_config("ddpmpp_digits", **{"nf": 16, "num_classes": 10, **model})
  config.data.data_dir = str(tmp_path / "tfds")
  config.sampling.method, config.sampling.num_steps = "ddim", 3
  config.eval.progress_bar = False
  config.eval.tasks = "conditional"
  config.eval.conditional.guidance_scales = "0,2"
  config.eval.conditional.samples_per_class = 3
  config.eval.conditional.shard_size = 20  # Two shards for 30 samples, the second truncated.
  config.eval.conditional.grid_columns = 2
  config.eval.digits.classifier_steps = 50
  if not config.model.num_classes:
    config.training.label_dropout = 0.0
  return config


def test_conditional_task_samples_every_class_at_every_guidance_scale(tmp_path):
  """A class-conditional digits model: 3 samples of each digit at w = 0 and w = 2, sample n of class n mod 10 (the
  shards store the labels), a 10 x 2 grid per scale, the digits classifier's accuracy on the requested classes,
  w changing the samples; a rerun reuses every shard."""
  from _train_fixtures import save_fresh_run

  config = conditional_config(tmp_path)
  save_fresh_run(tmp_path / "run", config, (8, 8, 1), step=4)
  record = run.evaluate(config, tmp_path / "run")["checkpoints"][0]
  result = record["conditional"]
  assert result["guided_by"] == "classifier-free" and result["num_classes"] == 10
  assert [entry["guidance_scale"] for entry in result["scales"]] == [0.0, 2.0]
  shards = {}
  for entry in result["scales"]:
    assert entry["num_samples"] == 30 and entry["num_shards"] == 2 and entry["computed_shards"] == 2
    assert 0 <= entry["accuracy"] <= 1 and len(entry["accuracy_per_class"]) == 10
    with PIL.Image.open(entry["grid"]) as grid:
      assert grid.size[1] > 4 * grid.size[0]  # Ten rows of two: a tall grid.
    first = np.load(os.path.join(entry["directory"], "shard_00000.npz"))
    np.testing.assert_array_equal(first["label"], np.arange(20) % 10)
    shards[entry["guidance_scale"]] = first["samples"]
  assert not np.allclose(shards[0.0], shards[2.0])  # Guidance changes the samples (same noise).
  again = run.evaluate(config, tmp_path / "run")["checkpoints"][0]["conditional"]
  assert all(entry["reused_shards"] == 2 for entry in again["scales"])
  assert "class-conditional samples, guidance scale 2" in run.report.format_results(record)


def test_conditional_task_guides_an_unconditional_model_with_a_noise_conditional_classifier(tmp_path):
  """An unconditional model guided by a classifier run (`eval.conditional.classifier_workdir`): classifier guidance
  s(x) + (1 + w) grad log p_t(y | x); w = 0 differs from the unguided sampler's samples on the same noise."""
  from _train_fixtures import save_fresh_run

  classifier_config = digits_classifier.get_config()
  classifier_config.data.data_dir = str(tmp_path / "tfds")
  save_fresh_run(tmp_path / "classifier", classifier_config, (8, 8, 1), step=2, perturb=0.5)
  config = conditional_config(tmp_path, num_classes=0)
  config.eval.conditional.classifier_workdir = str(tmp_path / "classifier")
  save_fresh_run(tmp_path / "run", config, (8, 8, 1), step=4)
  result = run.evaluate(config, tmp_path / "run")["checkpoints"][0]["conditional"]
  assert result["guided_by"] == "classifier" and result["num_classes"] == 10
  scales = {entry["guidance_scale"]: np.load(os.path.join(entry["directory"], "shard_00000.npz"))["samples"]
            for entry in result["scales"]}
  assert not np.allclose(scales[0.0], scales[2.0])
  unguided = conditional_config(tmp_path, num_classes=0)
  unguided.eval.conditional.classifier_workdir = ""
  with pytest.raises(ValueError, match="classifier_workdir=RUN"):
    run.evaluate(unguided, tmp_path / "run")
  wrong = conditional_config(tmp_path, num_classes=0)
  wrong.eval.conditional.classifier_workdir = str(tmp_path / "run")  # A score model, not a classifier.
  with pytest.raises(ValueError, match="not 'classifier'"):
    run.evaluate(wrong, tmp_path / "run")
