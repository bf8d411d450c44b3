"""The training loop: exact resume, preemption snapshots, non-finite policies, logs, config and data errors."""

import json
import os
import sys
import time

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from configs import toy_2d  # noqa: E402

from scoreflow.config import experiment as config_lib
from scoreflow.train import checkpoint, loop  # noqa: E402

from _train_fixtures import read_checkpoint  # noqa: E402


def tiny_config(**overrides):
  """The toy config shrunk to seconds: a 2-layer MLP, 10 steps per call, a 10-step sampler."""
  config = toy_2d.get_config()
  config.model = toy_2d.default.model_config("mlp_toy", width=32, depth=2, embedding_dim=16, dropout=0.1)
  config.optim.warmup_steps = 5
  config.training.batch_size = 64
  config.training.num_train_steps = 40
  config.training.steps_per_call = 10
  config.training.log_every = 10
  config.training.checkpoint_every = 20
  config.training.snapshot_every = 10
  config.training.progress_bar = False
  config.sampling.method = "pc"
  config.sampling.predictor = "euler_maruyama"
  config.sampling.corrector = "none"
  config.sampling.num_steps = 10
  config.sampling.num_samples = 32
  for path, value in overrides.items():
    section, field = path.split(".")
    config[section][field] = value
  return config


def saved_state(workdir, step=None):
  return read_checkpoint(workdir, step)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resumed_run_is_bit_identical(tmp_path, monkeypatch):
  config = tiny_config()
  straight = loop.train_and_evaluate(config, tmp_path / "straight")
  assert straight["step"] == 40 and straight["compilations"] == 1

  # Interrupt at step 20 through the preemption path (a snapshot), then rerun the same command.
  reached = loop._Preemption.reached
  monkeypatch.setattr(loop._Preemption, "reached", lambda self, step: step == 20 or reached(self, step))
  first = loop.train_and_evaluate(config, tmp_path / "resumed")
  assert first["preempted"] and first["step"] == 20
  assert first["checkpoints"]["snapshot"] == [20] or 20 in first["checkpoints"]["checkpoints"]
  monkeypatch.setattr(loop._Preemption, "reached", reached)
  second = loop.train_and_evaluate(config, tmp_path / "resumed")
  assert second["start_step"] == 20 and second["step"] == 40 and not second["preempted"]

  state_a, meta_a = saved_state(tmp_path / "straight", 40)
  state_b, meta_b = saved_state(tmp_path / "resumed", 40)
  assert_trees_equal(state_a, state_b)  # params, EMA, optimizer moments, step, rng: exactly equal.
  assert meta_a["data"] == meta_b["data"] and meta_a["data"]["next_batch"] == 40

  # What the run leaves behind.
  workdir = tmp_path / "straight"
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [r for r in records if "loss" in r]
  assert [r["step"] for r in losses] == [10, 20, 30, 40]
  assert all(np.isfinite(r["loss"]) and r["examples_per_sec"] > 0 for r in losses[1:])
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tensorboard"))
  samples = np.load(workdir / "samples" / "step_40.npz")["samples"]
  assert samples.shape == (32, 2) and np.all(np.isfinite(samples))
  assert (workdir / "samples" / "step_40.png").exists() and (workdir / "loss.png").exists()
  assert json.loads((workdir / "summary.json").read_text())["step"] == 40


@pytest.mark.parametrize("policy", ["skip", "halt"])
def test_nonfinite_training_never_writes_nan(tmp_path, policy):
  # Adam moves every parameter by about the learning rate per step: 1e30 overflows float32 activations after
  # the first update, so every later loss is infinite.
  config = tiny_config(**{"optim.learning_rate": 1e30, "optim.warmup_steps": 0, "training.nonfinite": policy,
                          "optim.schedule": "constant", "training.num_train_steps": 20})
  if policy == "halt":
    with pytest.raises(FloatingPointError, match=r"training halted: step 1 had a non-finite loss"):
      loop.train_and_evaluate(config, tmp_path)
  else:
    summary = loop.train_and_evaluate(config, tmp_path)
    assert summary["nonfinite_steps"] == 19
    # metrics.jsonl stays strict JSON: the window whose steps were all skipped has no loss (null, not NaN).
    def reject(constant):
      raise ValueError(f"non-standard JSON constant {constant}")

    records = [json.loads(line, parse_constant=reject) for line in (tmp_path / "metrics.jsonl").read_text().split("\n")
               if line]
    assert [r["loss"] for r in records if "grad_norm" in r][-1] is None
  for kind, steps in checkpoint.Checkpointer(tmp_path).steps().items():
    for step in steps:
      state, _ = saved_state(tmp_path, step)
      assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state["params"]))


@pytest.mark.parametrize("path, value, message", [
    ("sde.name", "vpp",
     r"config.sde.name must be one of \['cosine_vp', 'ddpm', 'smld', 'subvp', 've', 'vp'\], got 'vpp'"),
    ("sde.beta_min", -1.0, r"config.sde \(VPSDE\(beta_min=-1.0, beta_max=20.0\)\): VPSDE: expected 0 <= beta_min"),
    ("loss.eps", 2.0, r"config.loss.eps must lie in \(0, T=1.0\), got 2.0"),
    ("loss.name", "ddpm", r"config.loss.name='ddpm' trains the DDPM chain and needs config.sde.name='ddpm'"),
    ("loss.importance_sampling", True, r"config.loss.importance_sampling=True needs config.loss.weighting="),
    ("training.log_every", 15,
     r"config.training.log_every=15 must be a multiple of config.training.steps_per_call=10"),
    ("training.ema_rate", 1.0, r"config.training.ema_rate must lie in \[0.0, 1.0\), got 1.0"),
    ("training.nonfinite", "ignore", r"config.training.nonfinite must be one of \['halt', 'skip'\]"),
    ("optim.weight_decay", 0.1, r"config.optim.weight_decay=0.1 needs config.optim.optimizer='adamw'"),
    ("sampling.predictor", "heun", r"config.sampling.predictor must be one of"),
    ("model.width", -3, r"config.model: "),
    ("parameterization.name", "noise", r"config.parameterization.name must be one of"),
    ("training.compute_dtype", "float16", r"config.training.compute_dtype must be one of \['bfloat16', 'float32'\]"),
])
def test_bad_config_names_the_field(path, value, message):
  section, field = path.split(".")
  config = tiny_config()
  config[section][field] = value
  with pytest.raises(ValueError, match=message):
    config_lib.build_experiment(config)


def test_unknown_model_argument_is_named():
  config = tiny_config()
  config.model.unknown_width = 3
  with pytest.raises(ValueError, match=r"config.model: build_model: ScoreMLP does not take \['unknown_width'\]"):
    config_lib.build_experiment(config)


def test_missing_dataset_fails_fast(tmp_path):
  config = tiny_config(**{"data.name": "cifar10", "data.data_dir": str(tmp_path / "no_data")})
  config.model = toy_2d.default.model_config("ddpmpp_digits")
  with pytest.raises(FileNotFoundError, match="cifar10"):
    loop.train_and_evaluate(config, tmp_path / "run")
  # Before any model is built or step compiled, so before any checkpoint (timing belongs in bench/).
  assert not os.path.exists(os.path.join(tmp_path, "run", "checkpoints"))


def test_workdir_of_another_config_is_not_clobbered(tmp_path):
  config = tiny_config(**{"training.num_train_steps": 20})
  loop.train_and_evaluate(config, tmp_path)
  saved = (tmp_path / "config.json").read_text()
  config.model.width = 64
  with pytest.raises(checkpoint.CheckpointError, match=r"model.width: 32 in the workdir, 64 now"):
    loop.train_and_evaluate(config, tmp_path)
  assert (tmp_path / "config.json").read_text() == saved
  assert checkpoint.Checkpointer(tmp_path).steps()["checkpoints"] == [20]


def test_attempt_without_checkpoint_does_not_lock_the_config(tmp_path):
  # An attempt that failed before its first save (say, out of memory at batch 128) left only config.json: a rerun
  # with another configuration starts afresh instead of being refused.
  config = tiny_config(**{"training.num_train_steps": 20})
  checkpoint.check_workdir_config(tmp_path, loop.config_to_dict(config))
  config.training.batch_size = 32
  assert loop.train_and_evaluate(config, tmp_path)["step"] == 20
  assert json.loads((tmp_path / "config.json").read_text())["training"]["batch_size"] == 32


def test_decaying_schedule_refuses_a_new_length_on_resume(tmp_path):
  config = tiny_config(**{"training.num_train_steps": 20, "optim.schedule": "cosine"})
  loop.train_and_evaluate(config, tmp_path)
  config.training.num_train_steps = 40
  with pytest.raises(checkpoint.CheckpointError, match=r"training.num_train_steps: 20 in the workdir, 40 now "
                     r"\(config.optim.schedule='cosine' decays the learning rate"):
    loop.train_and_evaluate(config, tmp_path)
  config.optim.schedule = "constant"  # With a constant rate (after warm-up) training longer is a resume.
  assert "training.num_train_steps" in config_lib.resumable_changes(config)


def test_resume_logs_every_step_once(tmp_path):
  # An attempt that logged steps 30 and 40 but died before they were saved: the rerun from step 20 logs them anew.
  config = tiny_config(**{"training.snapshot_every": 0})
  loop.train_and_evaluate(config, tmp_path)
  import shutil

  shutil.rmtree(tmp_path / "checkpoints" / "40")
  summary = loop.train_and_evaluate(config, tmp_path)
  assert summary["start_step"] == 20 and summary["step"] == 40
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [10, 20, 30, 40]


def test_url_workdir_is_refused_before_any_work():
  with pytest.raises(checkpoint.CheckpointError, match=r"workdir 'gs://bucket/run' is a URL.*mounted bucket"):
    loop.train_and_evaluate(tiny_config(), "gs://bucket/run")


CONFIGS = sorted(name[:-3] for name in os.listdir(os.path.join(REPO, "configs"))
                 if name.endswith(".py") and name != "__init__.py")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds(name):
  import importlib

  config = importlib.import_module(f"configs.{name}").get_config()
  experiment = config_lib.build_experiment(config)
  assert experiment.training.num_train_steps > 0
  if name.startswith("cifar10") or name.startswith("celeba"):
    # The paper's optimisation settings (Song et al. 2021, Appendix; the reference configs).
    assert (config.optim.learning_rate, config.optim.warmup_steps, config.optim.grad_clip) == (2e-4, 5000, 1.0)
    assert config.training.batch_size == 128
    ve = config.sde.name == "ve"
    assert config.training.ema_rate == (0.999 if ve else 0.9999)
    assert config.loss.reduce_mean == (not ve)
    assert config.training.num_train_steps == (950_000 if "deep" in name else 1_300_000)


def test_paper_configs_pair_model_and_process():
  import importlib

  expected = {"cifar10_ddpmpp_continuous": ("VPSDE", "EpsilonParameterization", "time", 999.0),
              "cifar10_subvp_ddpmpp_continuous": ("SubVPSDE", "EpsilonParameterization", "time", 999.0),
              "cifar10_ncsnpp_continuous": ("VESDE", "ScoreParameterization", "sigma", None),
              "cifar10_ddpm": ("DDPMChain", "EpsilonParameterization", "index", None),
              "celeba64_ncsnpp": ("VESDE", "ScoreParameterization", "sigma", None)}
  for name, (process, parameterization, kind, scale) in expected.items():
    experiment = config_lib.build_experiment(importlib.import_module(f"configs.{name}").get_config())
    assert type(experiment.process).__name__ == process
    assert type(experiment.parameterization).__name__ == parameterization
    assert experiment.parameterization.conditioning.kind == kind == experiment.model.noise_conditioning
    if scale is not None:
      assert experiment.parameterization.conditioning.scale == scale
  ve = config_lib.build_experiment(importlib.import_module("configs.cifar10_ncsnpp_continuous").get_config())
  assert (ve.process.sigma_min, ve.process.sigma_max) == (0.01, 50.0) and ve.model.scale_by_sigma
  assert not ve.model.centered and ve.data.scaler == "unit_interval"  # The paper's VE runs use [0, 1] data.


def test_mixed_precision_is_set_on_the_model():
  config = tiny_config(**{"training.compute_dtype": "bfloat16"})
  experiment = config_lib.build_experiment(config)
  # The model computes in bfloat16 and keeps float32 parameters (Flax's param_dtype); the step casts nothing.
  assert experiment.model.dtype == jax.numpy.bfloat16 and experiment.compute_dtype is None
  params = experiment.model.init(jax.random.key(0), jax.numpy.zeros((2, 2), jax.numpy.float32),
                                 jax.numpy.zeros((2,), jax.numpy.float32))["params"]
  assert all(leaf.dtype == jax.numpy.float32 for leaf in jax.tree.leaves(params))
  apply = lambda x: experiment.model.apply({"params": params}, x, jax.numpy.ones((2,), jax.numpy.float32))  # noqa: E731
  jaxpr = str(jax.make_jaxpr(apply)(jax.numpy.ones((2, 2), jax.numpy.float32)))
  matmuls = [line for line in jaxpr.splitlines() if "dot_general" in line]
  assert matmuls and all("bf16[" in line for line in matmuls)  # Every matmul runs in bfloat16.
