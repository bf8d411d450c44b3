"""Evaluation split over several processes (`run_eval.py` under `jax.distributed`): which process computes which
unit, the one-line error of a bad multi-process setup, and a real run of 2 processes x 2 CPU devices on 127.0.0.1
that gives the results of 1 process x 2 devices."""

import json
import os
import re
import runpy
import socket
import subprocess
import sys

import numpy as np
import pytest

from scoreflow.evaluate import units

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".cache", "jax")


@pytest.mark.parametrize("process_count", [1, 2, 3, 4])
@pytest.mark.parametrize("num_units", [0, 1, 2, 3, 7, 12])
def test_assigned_units_cover_each_unit_exactly_once(num_units, process_count):
  shares = [list(units.assigned_units(num_units, p, process_count)) for p in range(process_count)]
  assert sorted(i for share in shares for i in share) == list(range(num_units))
  for p, share in enumerate(shares):
    assert all(units.unit_owner(i, process_count) == p for i in share)
    assert all(i % process_count == p for i in share)  # Unit i goes to process i mod P: shares differ by <= 1.
  with pytest.raises(ValueError, match=r"process_index must lie in \[0, process_count=2\), got 2"):
    units.assigned_units(num_units, 2, 2)


def test_one_process_computes_every_unit_and_waits_for_nobody():
  """Outside `jax.distributed` (and within `single_process`), a process is the whole evaluation."""
  assert units.process_group() == (0, 1) and units.is_main_process()
  assert list(units.assigned_units(3)) == [0, 1, 2] and units.is_assigned(2)
  assert units.gather("nothing to wait for", {"a": 1}) == [{"a": 1}]
  assert units.share("nothing to wait for", [1, 2]) == [1, 2]
  with units.single_process():
    assert units.process_group() == (0, 1)


def run_eval(*args, env=None, timeout=300):
  return subprocess.run([sys.executable, os.path.join(REPO, "run_eval.py"), *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("flags, message", [
    (["--num_processes=2", "--process_id=1"], "num_processes=2 and process_id=1 need a coordinator_address"),
    (["--coordinator_address=127.0.0.1:1234", "--num_processes=2"],
     "coordinator_address='127.0.0.1:1234' needs num_processes and process_id too"),
    (["--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=2"],
     r"process_id must lie in \[0, num_processes=2\), got 2"),
])
def test_a_bad_multi_process_setup_fails_fast_with_one_line(tmp_path, flags, message):
  result = run_eval("--config", "configs/toy_2d.py", "--workdir", str(tmp_path / "run"), *flags)
  assert result.returncode == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith("error: initialize_distributed: ") and re.search(message, line)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _digits_config_file(tmp_path):
  """configs/digits_vp.py with a tiny MLP, a 4-step DDIM sampler and cheap evaluation: 40 test examples in 3
  batches of 16 (the last padded) for bits/dim, the bound and inpainting, 40 samples in 3 shards of 16, the digits
  metric."""
  path = tmp_path / "digits_tiny.py"
  path.write_text(
      "from configs import default, digits_vp\n\n\n"
      "def get_config():\n"
      "  config = digits_vp.get_config()\n"
      "  config.model = default.model_config('mlp_toy', width=16, depth=1, embedding_dim=16)\n"
      f"  config.data.data_dir = {str(tmp_path / 'tfds')!r}\n"
      "  config.sampling.method, config.sampling.num_steps = 'ddim', 4\n"
      "  config.eval.progress_bar = False\n"
      "  config.eval.tasks = 'bpd,bound,samples,digits,inpaint'\n"
      "  config.eval.inverse.num_examples = 40\n"
      "  config.eval.inverse.num_steps = 3\n"
      "  config.eval.batch_size = 16\n"
      "  config.eval.bpd.num_examples = 40\n"
      "  config.eval.bound.num_examples = 40\n"
      "  config.eval.bound.num_samples = 2\n"
      "  config.eval.samples.num_samples = 40\n"
      "  config.eval.samples.shard_size = 16\n"
      "  config.eval.samples.grid_size = 16\n"
      "  config.eval.digits.classifier_steps = 100\n"
      f"  config.eval.cache_dir = {str(tmp_path / 'cache')!r}\n"
      "  return config\n")
  return str(path)


def _launch(args, num_processes, env):
  """`run_eval.py args` as `num_processes` processes joined on 127.0.0.1 (one plain process for 1)."""
  port = _free_port()
  extra = [[]] if num_processes == 1 else [[f"--coordinator_address=127.0.0.1:{port}",
                                            f"--num_processes={num_processes}", f"--process_id={i}"]
                                           for i in range(num_processes)]
  procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "run_eval.py"), *args, *flags], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for flags in extra]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=400))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  return [(proc.returncode, out, err) for proc, (out, err) in zip(procs, outputs)]


def _comparable(value, output_dir):
  """`value` without what legitimately differs between two evaluations: wall-clock seconds, the output directory
  in paths, and how many programs a process compiled."""
  if isinstance(value, dict):
    return {k: _comparable(v, output_dir) for k, v in value.items() if k not in ("seconds", "compilations")}
  if isinstance(value, list):
    return [_comparable(v, output_dir) for v in value]
  if isinstance(value, str):
    return value.replace(output_dir, "<output_dir>")
  return value


@pytest.mark.slow
def test_two_processes_give_the_results_of_one(tmp_path):
  """2 processes x 2 CPU devices over 127.0.0.1 evaluate bits/dim, the bound, samples and the digits metric, and
  record exactly the numbers of 1 process x 2 devices; a rerun reuses every unit; only process 0 prints and
  writes the results. A process that fails stops the other one.

  Both evaluations split each batch and shard over 2 devices of one process, so every unit runs the same compiled
  program on the same inputs (no collective spans processes): the results must be equal bit for bit, not merely
  close. (With 1 process x 4 devices a shard would be split 4 ways, a different program.)"""
  from _train_fixtures import save_fresh_run

  config_path = _digits_config_file(tmp_path)
  workdir = tmp_path / "run"
  if REPO not in sys.path:
    sys.path.insert(0, REPO)  # The config file imports `configs`.
  save_fresh_run(workdir, runpy.run_path(config_path)["get_config"](), (8, 8, 1), step=3)
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  args = ["--config", config_path, "--workdir", str(workdir), f"--compilation_cache_dir={CACHE}"]
  summaries = {}
  for num_processes in (2, 1):  # Two first: process 0 trains the digits classifier while process 1 waits.
    output_dir = str(tmp_path / f"eval{num_processes}")
    results = _launch([*args, f"--config.eval.output_dir={output_dir}"], num_processes, env)
    for code, out, err in results:
      assert code == 0, err[-3000:]
    assert "Step 3 (ema parameters" in results[0][1] and "digits metric: FD" in results[0][1]
    # Only process 0 reports (gloo's C++ "connected to 1 peer ranks" lines go to every process's stdout).
    assert all("Step " not in out and "Results:" not in out for _, out, _ in results[1:])
    summaries[num_processes] = json.loads((tmp_path / f"eval{num_processes}" / "summary.json").read_text())
  two, one = summaries[2], summaries[1]
  assert (two["num_processes"], one["num_processes"]) == (2, 1)
  record = two["checkpoints"][0]
  assert record["bpd"]["computed_batches"] == 3 and record["samples"]["computed_shards"] == 3  # Summed.
  assert _comparable(two["checkpoints"], str(tmp_path / "eval2")) == \
      _comparable(one["checkpoints"], str(tmp_path / "eval1"))
  for task, names in (("bpd", "batch_*.npz"), ("bound", "batch_*.npz"), ("samples", "shard_*.npz")):
    directories = [summary["checkpoints"][0][task]["directory"] for summary in (two, one)]
    files = [sorted(f for f in os.listdir(d) if f.startswith(names.split("*")[0])) for d in directories]
    assert files[0] == files[1] and len(files[0]) == 3
    for name in files[0]:
      a, b = (np.load(os.path.join(d, name)) for d in directories)
      for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{task} {name} {key}")
  assert os.path.isfile(record["samples"]["grid"]) and os.path.isfile(record["bpd"]["per_example_file"])

  # A rerun of the two processes finds every unit written (by either process) and gives the same numbers.
  again = _launch([*args, f"--config.eval.output_dir={tmp_path / 'eval2'}"], 2, env)
  for code, _, err in again:
    assert code == 0, err[-3000:]
  assert "3 batches reused" in again[0][1] and "3 of 3 shards reused" in again[0][1]
  resumed = json.loads((tmp_path / "eval2" / "summary.json").read_text())["checkpoints"][0]
  assert resumed["samples"]["computed_shards"] == 0 and resumed["bpd"]["computed_batches"] == 0
  assert resumed["bpd"]["mean"] == record["bpd"]["mean"] and resumed["digits"]["fd"] == record["digits"]["fd"]

  # Process 1 fails (here: a reference split that does not exist, which only it is told); process 0, which
  # would wait for its units, stops with process 1's error instead of hanging.
  port = _free_port()
  failing = [[], ["--config.eval.digits.reference_split=nonexistent"]]
  procs = [subprocess.Popen([sys.executable, os.path.join(REPO, "run_eval.py"), *args,
                             f"--config.eval.output_dir={tmp_path / 'eval_failing'}",
                             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
                             *failing[i]], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  try:
    outputs = [proc.communicate(timeout=300) for proc in procs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  assert procs[1].returncode == 1 and "reference_split='nonexistent'" in outputs[1][1]
  assert procs[0].returncode == 1, outputs[0][1][-3000:]
  assert "error: process 1 of 2 stopped with" in outputs[0][1] and "(This process stops too.)" in outputs[0][1]
