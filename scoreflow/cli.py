"""What `run_train.py` and `run_eval.py` share: the compilation-cache flag, start-up checks and one-line errors.

Importing this module defines `--compilation_cache_dir` (absl flags are global to the program).
"""

from __future__ import annotations

import os
import traceback
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging

COMPILATION_CACHE = flags.DEFINE_string("compilation_cache_dir", None, "A persistent XLA compilation cache "
                                        "directory (speeds up restarts).")

# Raised by configuration, checkpoint and data checks with a message that names the problem and the fix, and by
# a run halted on a non-finite step. Only those raised by scoreflow's own code are shortened to one line.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)
_OWN_CODE = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
             os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + "run_")


def start(argv: Sequence[str]) -> None:
  """Rejects stray arguments, quiets INFO logs unless --verbosity is given, enables the compilation cache."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}; fields are set with --config.<section>.<field>=value.")
  if not flags.FLAGS["verbosity"].present:  # Orbax and JAX log every save at INFO; keep progress bars readable.
    logging.set_verbosity(logging.WARNING)
  if COMPILATION_CACHE.value:
    import jax  # pylint: disable=g-import-not-at-top

    jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run(main: Callable[[Sequence[str]], None]) -> None:
  """`absl.app.run(main)`, printing scoreflow's own checks' errors as one `error: ...` line (exit status 1)."""
  try:
    app.run(main)
  except USER_ERRORS as error:
    if not raised_by_own_check(error):
      raise  # A failure inside JAX, Flax or another library: the traceback is the useful part.
    raise SystemExit(f"error: {error}") from None


def raised_by_own_check(error: BaseException) -> bool:
  """Whether `error` was raised by scoreflow itself (its innermost frame is in the package or a run_*.py script)."""
  frames = traceback.extract_tb(error.__traceback__)
  return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_OWN_CODE)
