"""What `run_train.py` and `run_eval.py` share: the compilation-cache flag, start-up checks and one-line errors.

Importing this module defines `--compilation_cache_dir` (absl flags are global to the program).
"""

from __future__ import annotations

from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging

COMPILATION_CACHE = flags.DEFINE_string("compilation_cache_dir", None, "A persistent XLA compilation cache "
                                        "directory (speeds up restarts).")

# Raised by configuration, checkpoint and data checks with a message that names the problem and the fix.
USER_ERRORS = (ValueError, FileNotFoundError)


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
  """`absl.app.run(main)`, printing a user error as one `error: ...` line (exit status 1) instead of a traceback."""
  try:
    app.run(main)
  except USER_ERRORS as error:
    raise SystemExit(f"error: {error}") from None
