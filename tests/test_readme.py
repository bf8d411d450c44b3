"""README.md's two set-up commands are the ones CI runs and the ones that exist."""

import pathlib
import re

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
