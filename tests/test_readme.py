"""README.md's two set-up commands are the ones CI runs and the ones that exist."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _shell_lines():
  readme = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", readme, flags=re.S)
  return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_test_command():
  ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
  test_commands = [line for line in _shell_lines() if "pytest" in line and "pip install" in line]
  assert test_commands, "README.md must give a one-line install-and-test command"
  assert test_commands[0] in ci_lines, (test_commands[0], ci_lines)


def test_main_job_command_names_existing_files():
  main_jobs = [line for line in _shell_lines() if "pip install" in line and "run_train.py" in line]
  assert main_jobs, "README.md must give a one-line install-and-train command"
  config = re.search(r"--config[ =](\S+)", main_jobs[0]).group(1)
  assert (ROOT / config).is_file(), config
  assert (ROOT / "run_train.py").is_file()


def _quickstart():
  readme = (ROOT / "README.md").read_text()
  section = readme[readme.index("## Quickstart"):]
  return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_python_quickstart_runs_and_its_bound_is_the_stated_closed_form():
  """The quickstart runs as a user runs it (a fresh process, JAX's default float32), and its last comment holds:
  at the exact score the bound's mean is H(p_eps) + KL(p_T || prior) within 5 standard errors. At the README's
  4096 examples that SE is about 0.3 nats, so this only checks the claim coarsely (test_losses checks it
  tightly); what this test is for is that the README's code keeps running as the API changes."""
  check = textwrap.dedent("""
      import inspect, json, math
      import numpy as np
      eps = inspect.signature(sf.dsm_likelihood_bound).parameters["eps"].default
      expected = float(data.perturbed(sde, eps).entropy()
                       + data.perturbed(sde, sde.T).kl_to_isotropic_gaussian(sde.prior_std))
      b = np.asarray(bound, np.float64)
      print(json.dumps(dict(x64=bool(jax.config.jax_enable_x64), dtype=str(x0.dtype), mean_shape=list(mean.shape),
                            std_shape=list(std.shape), loss=float(loss), bound_shape=list(b.shape),
                            bound_mean=float(b.mean()), bound_se=float(b.std() / math.sqrt(b.size)),
                            expected=expected)))
      """)
  env = dict(os.environ, JAX_ENABLE_X64="0", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _quickstart() + check], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert not out["x64"] and out["dtype"] == "float32"
  assert out["mean_shape"] == [4096, 2] and out["bound_shape"] == [4096] and math.isfinite(out["loss"])
  assert abs(out["bound_mean"] - out["expected"]) < 5 * out["bound_se"], out
