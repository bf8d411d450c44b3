"""Importing a score_sde_pytorch checkout (passed as `--reference PATH`) for the benchmarks that run it beside
scoreflow. Its `op/` package compiles CUDA kernels when imported; they are not built (`cpp_extension.load` is a
no-op during the import), so only its pure-PyTorch paths run."""

import contextlib
import os
import sys


@contextlib.contextmanager
def _no_extension_build():
  """Makes `torch.utils.cpp_extension.load` a no-op while the reference's `op` package is imported."""
  import torch.utils.cpp_extension as extension  # pylint: disable=import-outside-toplevel

  real_load = extension.load
  extension.load = lambda *args, **kwargs: None
  try:
    yield
  finally:
    extension.load = real_load


def add_reference(path: str) -> str:
  """Puts the checkout at `path` first on `sys.path` and imports its `op` package without building it; its
  `models` and `configs` packages then import normally. Returns the absolute path."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(os.path.join(path, "models", "ncsnpp.py")):
    raise SystemExit(f"error: --reference {path} is not a score_sde_pytorch checkout (no models/ncsnpp.py).")
  sys.path.insert(0, path)
  with _no_extension_build():
    import op  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  return path
