"""End-to-end: `python run_train.py` for a few steps, then `python run_eval.py` on the run; resume and errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".cache", "jax")
# A small, quick version of configs/toy_2d.py (as in test_cli_train).
SMALL_TOY = ["--config.model.width=64", "--config.model.embedding_dim=32", "--config.training.batch_size=256",
             "--config.optim.warmup_steps=30", "--config.training.progress_bar=False"]


def config_file(tmp_path, module, body=""):
  """A config file that wraps `configs/<module>.py` (adding the `eval` section if that config lacks one)."""
  path = tmp_path / f"{module}_eval.py"
  path.write_text(
      f"from configs import default, {module}\nfrom scoreflow.config import eval_config\n\n\n"
      f"def get_config():\n  config = {module}.get_config()\n  if 'eval' not in config:\n"
      f"    config.eval = eval_config()\n{body}  return config\n")
  return str(path)


def run_script(script, *args, timeout=300):
  return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def test_train_then_evaluate_then_resume(tmp_path):
  config = config_file(tmp_path, "toy_2d")
  workdir = tmp_path / "toy"
  trained = run_script("run_train.py", "--config", config, "--workdir", str(workdir),
                       f"--compilation_cache_dir={CACHE}", "--config.training.num_train_steps=60",
                       "--config.sampling.num_samples=16", *SMALL_TOY)
  assert trained.returncode == 0, trained.stderr[-3000:]

  args = ["--config", config, "--workdir", str(workdir), f"--compilation_cache_dir={CACHE}", *SMALL_TOY,
          "--config.eval.bpd.num_examples=64", "--config.eval.batch_size=32", "--config.eval.samples.num_samples=96",
          "--config.eval.samples.shard_size=48", "--config.sampling.method=ddim", "--config.sampling.num_steps=20"]
  result = run_script("run_eval.py", *args)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "Step 60 (ema parameters" in out
  assert "bits/dim (continuous data: -log2 p(x) / D) on test (64 examples x 1 repeats)" in out
  assert "samples: 96 x (2,) with ddim (num_steps=20, eta=0.0, eps=0.001), NFE 20.0 per sample" in out
  summary = json.loads((workdir / "eval" / "summary.json").read_text())
  record = summary["checkpoints"][0]
  assert summary["tasks"] == ["bpd", "samples"] and record["step"] == 60
  bpd = record["bpd"]
  # The reported numbers are exactly the per-example ones: bits/dim = -log p / (D ln 2) with D = 2 (a wrong base
  # or D shows here), the mean over the 64 examples and its standard error (ddof 1); float32 rounding, 1e-6.
  per_example = np.load(bpd["per_example_file"])
  assert per_example["bpd"].shape == (64,) and per_example["logp"].shape == (1, 64)
  np.testing.assert_allclose(per_example["bpd"], -per_example["logp"][0] / (2 * np.log(2)), rtol=1e-6)
  np.testing.assert_allclose(bpd["mean"], per_example["bpd"].mean(), rtol=1e-6)
  np.testing.assert_allclose(bpd["stderr"], per_example["bpd"].std(ddof=1) / 8, rtol=1e-5)
  # Any model's cross-entropy is at least the data's entropy (standardised eight Gaussians: 1.68 nats = 1.21
  # bits/dim), so the mean must exceed it less 5 standard errors: a likelihood that comes out too good (a lost
  # log-determinant or prior normaliser) cannot. No useful upper bound exists for this run: its 60-step EMA
  # network is nearly untrained (measured 2.25 +- 0.05 bits/dim, worse than N(0, I)'s 2.05), so 4 bits/dim
  # (log p below -5.5 nats) only rules out a grossly broken likelihood.
  assert 1.21 - 5 * bpd["stderr"] < bpd["mean"] < 4.0
  assert bpd["stderr"] > 0 and bpd["num_failed"] == 0 and bpd["nfe_min"] > 0
  shards = sorted(f for f in os.listdir(record["samples"]["directory"]) if f.startswith("shard_"))
  assert shards == ["shard_00000.npz", "shard_00001.npz"]
  assert sum(np.load(os.path.join(record["samples"]["directory"], f))["samples"].shape[0] for f in shards) == 96
  assert os.path.isfile(record["samples"]["grid"])

  # Rerunning resumes: every bpd batch and sample shard is found on disk; the numbers are the same.
  again = run_script("run_eval.py", *args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "2 batches reused" in again.stdout and "2 of 2 shards reused" in again.stdout
  resumed = json.loads((workdir / "eval" / "summary.json").read_text())["checkpoints"][0]
  assert resumed["bpd"]["mean"] == bpd["mean"] and resumed["bpd"]["computed_batches"] == 0
  assert resumed["samples"]["computed_shards"] == 0

  missing = run_script("run_eval.py", *args, "--config.eval.checkpoints=7")
  assert missing.returncode != 0
  assert "no checkpoint for step(s) [7]; available steps: [60]" in missing.stderr

  # A model-defining field that differs from the run's config.json is refused, naming it and the way out.
  mismatched = run_script("run_eval.py", *args, "--config.sde.beta_max=10.0")
  assert mismatched.returncode != 0
  assert "config.sde.beta_max: 20.0 in the workdir's config.json, 10.0 in --config" in mismatched.stderr
  assert "--config.eval.allow_config_mismatch=True" in mismatched.stderr


def test_help_lists_the_flags():
  result = run_script("run_eval.py", "--help")
  assert result.returncode in (0, 1)  # absl exits with 1 after printing the help.
  assert "Evaluates a trained run" in result.stdout and "configs/default.py" in result.stdout
  for flag in ("--config", "--workdir", "--mode", "--compilation_cache_dir", "--coordinator_address",
               "--num_processes", "--process_id"):
    assert flag in result.stdout


def test_fid_without_weights_fails_fast_with_instructions(tmp_path):
  result = run_script("run_eval.py", "--config", config_file(tmp_path, "digits_vp"), "--workdir", str(tmp_path),
                      "--config.eval.tasks=fid", f"--config.eval.fid.inception_path={tmp_path}/fid_inception.npz")
  assert result.returncode != 0
  assert "fid_inception.npz'): no such file" in result.stderr or "fid_inception.npz': no such file" in result.stderr
  assert "pt_inception-2015-12-05-6726825d.pth" in result.stderr and "convert_pytorch_fid_weights" in result.stderr
  assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_digits_run_evaluates_with_the_domain_metric(tmp_path):
  """The main job's path on a small MLP: train, cache the digits references, evaluate bpd, samples and metric."""
  config = config_file(tmp_path, "digits_vp", body=(
      "  config.model = default.model_config('mlp_toy', width=128, depth=2, embedding_dim=32)\n"
      f"  config.data.data_dir = {str(tmp_path / 'tfds')!r}\n"
      "  config.training.progress_bar = False\n"
      "  config.sampling.method = 'ddim'\n  config.sampling.num_steps = 50\n"))
  workdir = str(tmp_path / "digits")
  trained = run_script("run_train.py", "--config", config, "--workdir", workdir, f"--compilation_cache_dir={CACHE}",
                       "--config.training.num_train_steps=200", "--config.training.checkpoint_every=200",
                       "--config.training.sample_every=0", "--config.training.snapshot_every=0")
  assert trained.returncode == 0, trained.stderr[-3000:]
  args = ["--config", config, "--workdir", workdir, f"--compilation_cache_dir={CACHE}",
          "--config.eval.samples.num_samples=200", "--config.eval.samples.shard_size=100",
          "--config.eval.bpd.num_examples=100", "--config.eval.progress_bar=False"]
  reference = run_script("run_eval.py", *args, "--mode=reference")
  assert reference.returncode == 0, reference.stderr[-3000:]
  assert "digits_classifier:" in reference.stdout and "digits_reference:" in reference.stdout
  result = run_script("run_eval.py", *args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "bits/dim on test (100 examples x 1 repeats)" in result.stdout
  assert "digits metric: FD" in result.stdout and "real test digits (299): FD" in result.stdout
  record = json.loads((tmp_path / "digits" / "eval" / "summary.json").read_text())["checkpoints"][0]
  # Bits/dim of 17-level digits lies between 0 and log2(17) = 4.09 (a uniform guess) for any sensible model.
  assert 0 < record["bpd"]["mean"] < np.log2(17) and record["bpd"]["dequantized"]
  assert record["digits"]["fd"] > record["digits"]["real_data"]["fd"] and record["digits"]["num_examples"] == 200


@pytest.mark.slow
def test_two_devices_give_the_same_results(tmp_path):
  """The batch is split over the devices when they divide it; bits/dim and samples do not change."""
  config = config_file(tmp_path, "toy_2d")
  workdir = str(tmp_path / "toy")
  trained = run_script("run_train.py", "--config", config, "--workdir", workdir, f"--compilation_cache_dir={CACHE}",
                       "--config.training.num_train_steps=40", "--config.sampling.num_samples=16", *SMALL_TOY)
  assert trained.returncode == 0, trained.stderr[-3000:]
  records = []
  for devices in (1, 2):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "run_eval.py"), "--config", config, "--workdir", workdir, *SMALL_TOY,
         f"--compilation_cache_dir={CACHE}", f"--config.eval.output_dir={tmp_path}/eval{devices}",
         "--config.eval.bpd.num_examples=64", "--config.eval.batch_size=32", "--config.eval.samples.num_samples=64",
         "--config.eval.samples.shard_size=32", "--config.sampling.method=ddim", "--config.sampling.num_steps=10"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records.append(json.loads((tmp_path / f"eval{devices}" / "summary.json").read_text())["checkpoints"][0])
  one, two = records
  a, b = np.load(one["bpd"]["per_example_file"]), np.load(two["bpd"]["per_example_file"])
  for name in a.files:  # Per-example solves: the split changes no arithmetic (measured: bit-identical).
    np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=0)
  for index in range(2):
    shard = f"shard_{index:05d}.npz"
    # DDIM is per-example arithmetic too; allow float32 rounding of a different fusion.
    np.testing.assert_allclose(np.load(os.path.join(one["samples"]["directory"], shard))["samples"],
                               np.load(os.path.join(two["samples"]["directory"], shard))["samples"], rtol=1e-5,
                               atol=1e-5)
