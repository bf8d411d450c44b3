"""What `run_train.py` and `run_eval.py` share: the compilation-cache flag, the multi-process flags, start-up checks
and one-line errors.

Every failure a user can fix is reported as one `error: ...` line naming the thing and the fix, with exit status 1:
scoreflow's own checks (config values, checkpoints, data), a config file or `--config.<field>` that does not
exist, another process of a multi-process evaluation that stopped (its error is in the line), and the environment
(an unwritable or full disk, a missing path), whether the OS error surfaced in Python or inside TensorStore's
checkpoint writes. Errors from inside JAX, Flax or another library keep their traceback.
Asyncio's complaints about Orbax's abandoned coroutines at exit, which follow such errors, are dropped.

Importing this module defines `--compilation_cache_dir` (absl flags are global to the program).
"""

from __future__ import annotations

import errno
import logging as py_logging
import os
import re
import sys
import traceback
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging

COMPILATION_CACHE = flags.DEFINE_string("compilation_cache_dir", None, "A persistent XLA compilation cache "
                                        "directory (speeds up restarts).")
CPU_DEVICES = flags.DEFINE_string(
    "cpu_devices", "auto", "JAX devices to split a CPU host into, the batch sharded over them: 'auto' (with "
    "--cpu_ynnpack=default, 2 on a machine with 2 or more cores when the batch splits evenly; else 1) or a "
    "number. Ignored when XLA_FLAGS sets --xla_force_host_platform_device_count. Accelerators are unaffected.")
CPU_YNNPACK = flags.DEFINE_enum(
    "cpu_ynnpack", "auto", ["auto", "default", "reductions", "none"],
    "Which operations XLA:CPU hands to the YNNPACK library: 'default' (XLA's choice: convolutions, matmuls, "
    "reductions), 'reductions', or 'none' (Eigen's convolutions and matmuls); 'auto' picks by the model, as "
    "measured in bench/RESULTS.md ('none' below 128 base channels, e.g. the digits U-Net; 'reductions' from 128). "
    "Ignored when XLA_FLAGS sets --xla_cpu_experimental_ynn_fusion_type. Accelerators are unaffected.")
CPU_ASYNC_DISPATCH = flags.DEFINE_bool(
    "cpu_async_dispatch", False, "Run XLA:CPU computations on a runtime thread, returning before they finish "
    "(JAX's default), instead of on the calling thread, where the memory of one train step's temporaries is kept "
    "for the next (faster on CPU: bench/RESULTS.md). Accelerators are unaffected.")

# Raised by configuration, checkpoint and data checks with a message that names the problem and the fix, and by
# a run halted on a non-finite step. Only those raised by scoreflow's own code are shortened to one line.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)
_OWN_CODE = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
             os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + "run_")


# OS errors that the environment causes and a user fixes (permissions, space, paths), by errno.
_ENVIRONMENT_ERRNOS = {
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a path component is a file, not a directory", errno.EISDIR: "is a directory",
    errno.ENOENT: "no such file or directory", errno.EEXIST: "already exists", errno.EIO: "input/output error",
    errno.ENAMETOOLONG: "file name too long",
}
_FIXES = {
    errno.ENOSPC: "free space on that disk (or pass a --workdir on another one) and rerun the same command; "
                  "complete checkpoints are kept and the run resumes from the newest",
    errno.EDQUOT: "free space within your quota (or pass a --workdir elsewhere) and rerun the same command",
    errno.EIO: "check the disk, then rerun the same command",
}
_DEFAULT_FIX = "make it writable or pass another --workdir"


def define_run_flags(config_help: str, workdir_help: str):
  """Defines the flags every entry point takes, `--config` (a config file, whose fields are overridden with
  `--config.<section>.<field>=<value>`) and `--workdir`, both required; returns their holders."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config = config_flags.DEFINE_config_file(
      "config", None, f"{config_help} (configs/<name>.py); override fields with --config.<section>.<field>=<value>, "
      "e.g. --config.training.batch_size=64.", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, workdir_help)
  flags.mark_flags_as_required(["config", "workdir"])
  return config, workdir


def define_process_flags(what: str):
  """Defines `--coordinator_address`, `--num_processes` and `--process_id`, the flags of a multi-process run
  (:func:`scoreflow.train.sharding.initialize_distributed` reads them); `what` says what the processes share.
  Returns their holders."""
  coordinator = flags.DEFINE_string("coordinator_address", None, f"Multi-process runs ({what}): host:port of "
                                    "process 0, e.g. 127.0.0.1:12345 for processes on one machine.")
  num_processes = flags.DEFINE_integer("num_processes", None, "Multi-process runs: the number of processes.")
  process_id = flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index, 0 .. "
                                    "num_processes - 1.")
  return coordinator, num_processes, process_id


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


def configure_devices(batch_sizes: Sequence[int] = (), num_processes: int | None = None, model=None) -> None:
  """Applies --cpu_devices and --cpu_ynnpack (see :func:`scoreflow.train.sharding.cpu_device_count` and
  :func:`~scoreflow.train.sharding.cpu_ynnpack_ops`; `model` is the Flax module `auto` decides by), 512-bit vectors
  in XLA:CPU's generated loops (:func:`~scoreflow.train.sharding.configure_cpu_vector_width`), --cpu_async_dispatch
  (:func:`~scoreflow.train.sharding.configure_cpu_dispatch`) and, on one CPU
  device, the unrolled threefry (:func:`~scoreflow.train.sharding.unroll_cpu_threefry`); call before JAX starts."""
  from scoreflow.train import sharding  # pylint: disable=g-import-not-at-top

  ynnpack = sharding.cpu_ynnpack_ops(CPU_YNNPACK.value, model)
  count = sharding.cpu_device_count(CPU_DEVICES.value, batch_sizes=batch_sizes, num_processes=num_processes or 1,
                                    ynnpack=ynnpack)
  sharding.configure_cpu_devices(count)
  devices = sharding.forced_cpu_device_count() or count
  sharding.configure_cpu_ynnpack(sharding.cpu_ynnpack_for_devices(ynnpack, devices,
                                                                  explicit=CPU_YNNPACK.value != "auto"))
  sharding.configure_cpu_vector_width()
  sharding.configure_cpu_dispatch(asynchronous=CPU_ASYNC_DISPATCH.value)
  if devices == 1:
    # Measured on one device only; a split CPU keeps JAX's lowering. (A 2-device abort once blamed on it was XLA's
    # run-ahead deadlock, which happens with either lowering: see `loop.MAX_CALLS_IN_FLIGHT`.)
    sharding.unroll_cpu_threefry()


# XLA:CPU allocates a train step's temporaries as one block per call (88 MB for the digits step, about 2 GB for
# CIFAR-10 DDPM++) and frees it when the call returns. By default glibc's malloc serves such a block with a fresh
# mmap and unmaps it on free, so every step page-faults it in again: 530,000 faults per CIFAR-10 step at 4 KiB,
# and on a virtual machine that hands free memory back to its host (virtio-balloon free page reporting) each
# fault after a pause costs the host's too (1 GiB touched: 25 ms if kept, 370 ms afresh in 4 KiB pages, 70 ms
# afresh in huge pages, 0.5-1.1 s in huge pages after most pauses of 0.5-5 s). The settings, for this process:
#   glibc.malloc.hugetlb=1        transparent huge pages for large blocks (glibc >= 2.35, THP not `never`);
#   glibc.malloc.mmap_max=0       large blocks of the main thread come from its heap instead of fresh mappings
#                                 (`sharding.configure_cpu_dispatch` runs XLA:CPU's calls on the main thread);
#   glibc.malloc.trim_threshold   the heap's free top is kept, not given back, so the next call reuses it.
# Measured on 2 CPU cores (bench/RESULTS.md): the CIFAR-10 DDPM++ step took 3.25 s, 2.84-2.99 s with huge pages
# (3.8 s after a 6 s pause), 2.72-2.89 s with all three on the main thread, pause or not. glibc reads its tunables
# only when a process starts, hence the restart.
_HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb"
_HEAP_TUNABLES = {"glibc.malloc.mmap_max": "0", "glibc.malloc.trim_threshold": str(1 << 40)}


def glibc_huge_pages_available() -> bool:
  """Linux with glibc >= 2.35 (which has `glibc.malloc.hugetlb`) and transparent huge pages not `never`."""
  version = _glibc_version()
  if version is None or version < (2, 35):
    return False
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as policy:
      return "[never]" not in policy.read()
  except OSError:
    return False


def _glibc_version() -> tuple[int, ...] | None:
  """(major, minor) of the running glibc; None off Linux or with another C library."""
  if sys.platform != "linux":
    return None
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    return tuple(map(int, version.split(".")[:2])) if name == "glibc" else None
  except (ValueError, OSError, AttributeError):
    return None


def glibc_malloc_tunables() -> dict[str, str]:
  """The `GLIBC_TUNABLES` settings :func:`tune_glibc_malloc` adds on this machine ({} without glibc >= 2.26)."""
  version = _glibc_version()
  if version is None or version < (2, 26):  # glibc's tunables arrived in 2.26.
    return {}
  return {**({_HUGE_PAGE_TUNABLE: "1"} if glibc_huge_pages_available() else {}), **_HEAP_TUNABLES}


def tune_glibc_malloc() -> bool:
  """Restarts this process (same pid and arguments, `os.execv`) with `GLIBC_TUNABLES` that keep XLA:CPU's large
  per-call temporaries in memory between calls, in transparent huge pages (:func:`glibc_malloc_tunables`; the
  comment above says what each one does and what it measured). A setting the user's `GLIBC_TUNABLES` makes already
  wins (e.g. `glibc.malloc.hugetlb=0`, or `glibc.malloc.trim_threshold=134217728` to give memory back).

  Returns:
    False when nothing is to be done (the restarted process returns False here too); otherwise it does not return.
  """
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  users = {setting.partition("=")[0] for setting in tunables.split(":")}
  missing = [f"{name}={value}" for name, value in glibc_malloc_tunables().items() if name not in users]
  if not missing:
    return False
  os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, *missing]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, sys.orig_argv)
  return True  # Not reached.


def run(main: Callable[[Sequence[str]], None]) -> None:
  """`absl.app.run(main)`, printing user-fixable failures as one `error: ...` line (exit status 1), in a process
  whose malloc keeps large blocks in transparent huge pages (:func:`tune_glibc_malloc`)."""
  tune_glibc_malloc()
  _quiet_abandoned_coroutines()
  try:
    app.run(main, flags_parser=parse_flags)
  except Exception as error:  # pylint: disable=broad-except
    message = user_error_message(error)
    if message is None:
      raise  # A failure inside JAX, Flax or another library: the traceback is the useful part.
    if environment_error_message(error) is not None:
      # A full or unwritable disk also fails other writers that flush at exit (TensorBoard's background thread and
      # its atexit handler), each with a traceback of its own. Everything scoreflow writes is closed by now.
      print(f"error: {message}", file=sys.stderr)
      exit_now(1)
    raise SystemExit(f"error: {message}") from None


def exit_now(status: int = 0) -> None:
  """Ends the process at once (after flushing its output), without waiting for a device computation that was
  abandoned (e.g. sampling interrupted by SIGTERM): the runtime's teardown would wait for it to finish."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)  # pylint: disable=protected-access


def parse_flags(argv: Sequence[str]):
  """absl's flag parsing, with a missing config file and an unknown `--config.<field>` as one-line errors."""
  for index, arg in enumerate(argv[1:], 1):  # --config PATH or --config=PATH (an optional ":args" suffix).
    name, _, value = arg.partition("=")
    if name in ("--config", "-config") and not value and index + 1 < len(argv):
      value = argv[index + 1]
    if name in ("--config", "-config") and value:
      path = value.split(":")[0]
      if not os.path.isfile(path):
        raise SystemExit(f"error: --config {value}: no such file ({os.path.abspath(path)}); pass a configuration "
                         "file such as configs/toy_2d.py.")
  try:
    return app.parse_flags_with_usage(list(argv))
  except (AttributeError, KeyError) as error:  # ml_collections on an override of a field that does not exist.
    if not any("ml_collections" in frame.filename for frame in traceback.extract_tb(error.__traceback__)):
      raise
    raise SystemExit(f"error: {_unknown_field_message(error, argv)}") from None


def _unknown_field_message(error: BaseException, argv: Sequence[str]) -> str:
  text = str(error).encode().decode("unicode_escape") if "\\" in str(error) else str(error)
  suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  field = suggestion.group(2) if suggestion else (re.findall(r"'([^'\\]+)'", text) or ["?"])[0]
  override = next((arg.split("=")[0] for arg in argv if arg.startswith("--config.") and
                   re.search(rf"[.]{re.escape(field)}(=|[.]|$)", arg.split("=")[0] + "=")), None)
  where = f"{override}: " if override else ""
  hint = f" (did you mean {suggestion.group(1)!r}?)" if suggestion else ""
  return (f"{where}the configuration has no field {field!r}{hint}; every field is listed, with its meaning, in "
          "configs/default.py.")


def user_error_message(error: BaseException) -> str | None:
  """The one-line message for a failure a user can fix, or None for one whose traceback is the useful part."""
  if isinstance(error, USER_ERRORS + _peer_process_errors()) and raised_by_own_check(error):
    return str(error)
  return environment_error_message(error)


def _peer_process_errors() -> tuple[type, ...]:
  # Only an evaluation raises it, after importing its module; the command line does not import it for nothing.
  units = sys.modules.get("scoreflow.evaluate.units")
  return (units.PeerProcessError,) if units is not None else ()


def environment_error_message(error: BaseException) -> str | None:
  """One line for an OS error the environment caused (permissions, space, paths), found anywhere in the chain of
  `error`'s causes, also inside TensorStore's messages (`[os_error_code='28']`); None if there is none."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    code, path = None, None
    if isinstance(error, OSError) and error.errno in _ENVIRONMENT_ERRNOS:
      code, path = error.errno, error.filename
    else:
      found = re.search(r"os_error_code='(\d+)'", str(error))
      if found and int(found.group(1)) in _ENVIRONMENT_ERRNOS:
        code = int(found.group(1))
        paths = re.findall(r'(?:local file|Failed writing:|Failed to open:|Error writing|file) "([^"]+)"', str(error))
        path = paths[-1] if paths else None
    if code is not None:
      if path and ".orbax-checkpoint-tmp" in path:
        path = path.split(".orbax-checkpoint-tmp")[0] + ", a checkpoint being written"
      if not path:  # E.g. a log writer's flush: the error names no file, so name the run's directory.
        workdir = flags.FLAGS["workdir"].value if "workdir" in flags.FLAGS else None
        path = f"writing under {os.path.abspath(workdir)}" if workdir else None
      where = f" ({path})" if path else ""
      return f"{_ENVIRONMENT_ERRNOS[code]}{where}: {_FIXES.get(code, _DEFAULT_FIX)}."
    error = error.__cause__ or error.__context__
  return None


class _DropAbandonedCoroutineNoise(py_logging.Filter):
  """Asyncio's and Orbax's reports of background work that failed or was abandoned when the run stopped on an
  error that is reported anyway ("Task exception was never retrieved", "Future exception was never retrieved",
  "_SignalingThread.run() raised")."""

  def filter(self, record):
    message = record.getMessage()
    if "exception was never retrieved" in message:  # Asyncio's report for an abandoned Task or Future.
      return False
    if "orbax" not in record.pathname or record.levelno < py_logging.ERROR:
      return True
    # Orbax logs a failed background save (with its traceback) before raising it in the main thread: an
    # environment error is reported there in one line.
    error = record.exc_info[1] if record.exc_info else None
    return not ("raised an exception" in message or (error is not None and environment_error_message(error)))


def _quiet_abandoned_coroutines() -> None:
  noise = _DropAbandonedCoroutineNoise()
  py_logging.getLogger("asyncio").addFilter(noise)
  logging.get_absl_logger().addFilter(noise)
  from scoreflow.train.checkpoint import quiet_abandoned_coroutines  # pylint: disable=g-import-not-at-top

  sys.unraisablehook = quiet_abandoned_coroutines(sys.unraisablehook)


def raised_by_own_check(error: BaseException) -> bool:
  """Whether `error` was raised by scoreflow itself (its innermost frame is in the package or a run_*.py script)."""
  frames = traceback.extract_tb(error.__traceback__)
  return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_OWN_CODE)
