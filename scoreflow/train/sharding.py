"""Data parallelism through `jax.sharding`: one `Mesh` over every device of every process, batch on `data`.

The same program runs on one CPU, on 8 forced host devices, on a GPU box and over several processes: the
train step is jitted with the state replicated and the batch split along its example axis, so XLA inserts the
gradient all-reduce. Each process feeds only its own examples (:func:`global_batch` assembles them into one
global array with `jax.make_array_from_process_local_data`).

Several processes (hosts) join through :func:`initialize_distributed`, which must run before any other JAX call.

On a CPU host, :func:`configure_cpu_devices` (also before any other JAX call) splits the host into several JAX
devices, so that the batch is sharded over them as over accelerators: YNNPACK's convolutions, XLA:CPU's default,
do not keep all cores busy on their own, and two devices did on 2 cores (measured in bench/RESULTS.md).
:func:`configure_cpu_ynnpack` chooses which operations XLA:CPU hands to the YNNPACK library (by default its
convolutions, matmuls and reductions): on the digits U-Net YNNPACK's convolutions ran the train step 1.2x slower
than Eigen's, while its reductions ran the CIFAR-10 DDPM++ step 2x faster than XLA's own loops
(:func:`cpu_ynnpack_ops` says which models get which).
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Environment variables read by initialize_distributed when no argument is given.
ENV_COORDINATOR = "SCOREFLOW_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "SCOREFLOW_NUM_PROCESSES"
ENV_PROCESS_ID = "SCOREFLOW_PROCESS_ID"


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False) -> bool:
  """Joins a multi-process run with `jax.distributed.initialize`; call before any other JAX call.

  Each argument falls back to an environment variable (`SCOREFLOW_COORDINATOR_ADDRESS`,
  `SCOREFLOW_NUM_PROCESSES`, `SCOREFLOW_PROCESS_ID`). With none of them set, nothing happens unless
  `auto=True`, which lets JAX detect a cluster (SLURM, Cloud TPU, MPI, ...) by itself.

  Args:
    coordinator_address: `host:port` of process 0 (e.g. `"127.0.0.1:12345"` for processes on one machine).
    num_processes: the number of processes.
    process_id: this process's index in `[0, num_processes)`.
    auto: initialize with JAX's cluster auto-detection when no address is given.

  Returns:
    True if `jax.distributed.initialize` was called.

  Raises:
    ValueError: when an address is given without the process count or index, or the index is out of range.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  if coordinator_address is None:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ValueError(f"initialize_distributed: num_processes={num_processes} and process_id={process_id} need a "
                       f"coordinator_address (host:port of process 0; flag --coordinator_address or "
                       f"${ENV_COORDINATOR}).")
    if auto:
      jax.distributed.initialize()
      return True
    return False
  if num_processes is None or process_id is None:
    raise ValueError(f"initialize_distributed: coordinator_address={coordinator_address!r} needs num_processes and "
                     f"process_id too, got num_processes={num_processes}, process_id={process_id}.")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"initialize_distributed: process_id must lie in [0, num_processes={num_processes}), "
                     f"got {process_id}.")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  return True


def cpu_device_count(requested: str | int, *, batch_sizes=(), num_processes: int = 1,
                     cores: int | None = None, ynnpack: str = "default") -> int:
  """How many devices the CPU backend of each process should expose.

  Args:
    requested: a positive int, or `"auto"`: with YNNPACK's convolutions (`ynnpack="default"`), 2 on a machine
      with at least 2 cores when every batch in `batch_sizes` splits evenly over `2 * num_processes` devices,
      else 1 (YNNPACK's convolutions kept only 1-1.5 of 2 cores busy on one device, and more than 2 devices did
      not pay); with Eigen's (`"reductions"`, `"none"`), which keep every core busy, 1: the digits train step
      ran 7 % faster on one device than on two, the README job's loop 15 % (bench/RESULTS.md).
    batch_sizes: global batch sizes the devices must divide (e.g. the training batch).
    num_processes: processes of the run; each exposes the returned number of devices.
    cores: the machine's cores (default: `os.cpu_count()`).
    ynnpack: the run's choice of :func:`cpu_ynnpack_ops` (not "auto").

  Raises:
    ValueError: a `requested` value that is neither "auto" nor a positive integer.
  """
  if isinstance(requested, str) and requested.strip().lower() == "auto":
    cores = os.cpu_count() if cores is None else cores
    fits = all(size % (2 * num_processes) == 0 for size in batch_sizes)
    return 2 if (cores or 1) >= 2 and fits and ynnpack == "default" else 1
  if isinstance(requested, int) and not isinstance(requested, bool):
    count = requested
  elif isinstance(requested, str) and requested.strip().isdigit():
    count = int(requested)
  else:
    count = 0
  if count < 1:
    raise ValueError(f"--cpu_devices must be 'auto' or a positive integer, got {requested!r}.")
  return count


def configure_cpu_devices(count: int) -> bool:
  """Makes the CPU backend expose `count` devices (`jax_num_cpu_devices`); call before any other JAX call.

  An `XLA_FLAGS=--xla_force_host_platform_device_count=N` already in the environment wins (it is the user's
  explicit choice, and tests use it), and so does a CPU backend that already started.

  Returns:
    True if the setting was applied.
  """
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return False
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # JAX refuses the setting once a backend has started.
    return False
  return True


# The XLA:CPU option that lists the operation kinds handed to YNNPACK, and its values per choice of
# `cpu_ynnpack_ops` ("default" leaves XLA's own list, which includes convolutions, matmuls and reductions).
_YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_YNN_KINDS = {"reductions": ("reduce",), "none": ()}
CPU_YNNPACK_CHOICES = ("auto", "default", "reductions", "none")
# `auto`'s line between the two U-Nets measured (bench/RESULTS.md): base width 32 (digits) gains from "none",
# 128 (CIFAR-10 DDPM++) from "reductions".
_YNN_REDUCTIONS_FROM_WIDTH = 128


def cpu_ynnpack_ops(requested: str, model=None) -> str:
  """Which operations XLA:CPU should hand to the YNNPACK library: `"default"`, `"reductions"` or `"none"`.

  * `"default"`: XLA's own choice (convolutions, matmuls and reductions).
  * `"reductions"`: only reductions (GroupNorm's statistics, bias gradients); convolutions and matmuls by Eigen.
  * `"none"`: convolutions and matmuls by Eigen, everything else by XLA's generated loops.
  * `"auto"`: from the model, as measured on 2 CPU cores (bench/RESULTS.md): `"none"` for convolutional networks
    narrower than 128 base channels (`nf`; the digits U-Net: train step 1.2x, forward pass 1.8x faster than
    XLA's default), `"reductions"` from 128 (CIFAR-10 DDPM++: train step 1.2x and its forward 1.2x faster, where
    `"none"` ran its GroupNorms 2x slower), and `"default"` for models without convolutions (not measured).

  Raises:
    ValueError: a `requested` value outside :data:`CPU_YNNPACK_CHOICES`.
  """
  choice = requested.strip().lower() if isinstance(requested, str) else requested
  if choice not in CPU_YNNPACK_CHOICES:
    raise ValueError(f"--cpu_ynnpack must be one of {', '.join(CPU_YNNPACK_CHOICES)}, got {requested!r}.")
  if choice != "auto":
    return choice
  width = getattr(model, "nf", None)
  if not isinstance(width, int):
    return "default"
  return "reductions" if width >= _YNN_REDUCTIONS_FROM_WIDTH else "none"


def cpu_ynnpack_for_devices(ops: str, cpu_devices: int, *, explicit: bool = False) -> str:
  """`ops` for a process with `cpu_devices` CPU devices: Eigen's convolutions (`"reductions"`, `"none"`) only on
  one device.

  XLA:CPU (jax 0.10.2) miscomputes Eigen convolutions inside a while loop on a CPU split into 2 devices (the
  digits U-Net iterated 20 times in a `fori_loop`, batch sharded with 64 or more examples per device: outputs off
  by 0.06-0.6 at scale 4.5, where one device, a Python loop of the same step, or YNNPACK's convolutions agree to
  2e-6), which would corrupt ODE samplers and likelihoods; `tests/test_train_sharding.py` checks the chosen
  combination. So with several devices `auto`'s choice falls back to `"default"`, and an explicit choice is refused.

  Raises:
    ValueError: `explicit` `"reductions"` or `"none"` with more than one CPU device.
  """
  if cpu_devices <= 1 or ops == "default":
    return ops
  if explicit:
    raise ValueError(f"--cpu_ynnpack={ops} needs one CPU device per process, got {cpu_devices}: XLA:CPU miscomputes "
                     "Eigen's convolutions inside loops on a split CPU (bench/RESULTS.md). Pass --cpu_devices=1, or "
                     "--cpu_ynnpack=default to keep the devices.")
  return "default"


def forced_cpu_device_count() -> int | None:
  """The CPU device count that `XLA_FLAGS=--xla_force_host_platform_device_count=N` imposes, if it does."""
  found = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
  return int(found.group(1)) if found else None


def cpu_ynnpack_compiler_options(ops: str) -> dict[str, str]:
  """`ops` (a choice of :func:`cpu_ynnpack_ops` other than auto) as `compiler_options` of one compilation, e.g.
  `jitted.lower(*args).compile(compiler_options=...)` ({} for `"default"`)."""
  if ops == "default":
    return {}
  return {_YNN_OPTION: ",".join(f"LIBRARY_FUSION_TYPE_{kind.upper()}" for kind in _YNN_KINDS[ops])}


def configure_cpu_ynnpack(ops: str) -> bool:
  """Applies `ops` (see :func:`cpu_ynnpack_ops`) to every CPU compilation of this process through `XLA_FLAGS`;
  call before any other JAX call. An `XLA_FLAGS` that already sets `--xla_cpu_experimental_ynn_fusion_type` wins,
  and so does a backend that already started (XLA read its flags then); accelerators ignore the option.

  Returns:
    True if the setting was applied.
  """
  return ops != "default" and _append_xla_flag(_YNN_OPTION, ",".join(_YNN_KINDS[ops]))


# LLVM's preferred vector width for the loops XLA:CPU generates (its own default: 256 bits). Where the CPU has
# AVX-512 the wider vectors sped up the digits train step 2.3-5.8 % (6 interleaved runs; the GroupNorm/SiLU
# fusions) and left the CIFAR-10 DDPM++ step unchanged (bench/RESULTS.md). It is a preference: LLVM uses no wider
# vectors than the CPU has.
_VECTOR_WIDTH_OPTION = "xla_cpu_prefer_vector_width"
CPU_VECTOR_WIDTH_BITS = 512


def configure_cpu_vector_width(bits: int = CPU_VECTOR_WIDTH_BITS) -> bool:
  """Asks XLA:CPU for `bits`-wide vectors in the loops it generates, through `XLA_FLAGS`; call before any other
  JAX call. An `XLA_FLAGS` that already sets `--xla_cpu_prefer_vector_width` wins, and so does a backend that
  already started; accelerators ignore the option.

  Returns:
    True if the setting was applied.
  """
  return _append_xla_flag(_VECTOR_WIDTH_OPTION, str(bits))


def configure_cpu_dispatch(asynchronous: bool = False) -> bool:
  """Whether XLA:CPU runs a computation on a runtime thread, returning at once (JAX's default), or on the thread
  that calls it (`asynchronous=False`); call before any other JAX call (a started backend keeps its setting).

  Synchronous calls are what the command line uses: an XLA:CPU call frees its temporaries (about 2 GB for the
  CIFAR-10 DDPM++ train step) when it returns, and only on the calling thread does glibc's malloc keep that memory
  for the next call (with `cli.tune_glibc_malloc`'s settings; a runtime thread's arena maps large blocks afresh
  each time and unmaps them when they are freed). Fresh memory costs a page fault per page and, on a virtual
  machine that hands free memory back to its host, far more after a pause: the CIFAR-10 DDPM++ step took
  2.91-2.99 s back to back and 3.8 s after a 6 s pause, against 2.72-2.89 s either way on the calling thread
  (bench/RESULTS.md). The host no longer prepares the next call while the device runs: bare back-to-back calls of
  the digits step took 83 instead of 76 ms, but the README's training loop ran faster (13.0-13.6 against
  11.9-12.9 steps/s).

  Returns:
    True if the setting was applied.
  """
  if _backend_started():
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", asynchronous)
  return True


def _append_xla_flag(option: str, value: str) -> bool:
  """Adds `--option=value` to `XLA_FLAGS` unless it already sets `option` (the user's choice) or the backend has
  started (XLA read its flags then); True if it was added."""
  flags = os.environ.get("XLA_FLAGS", "")
  if option in flags or _backend_started():
    return False
  os.environ["XLA_FLAGS"] = f"{flags} --{option}={value}".strip()
  return True


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # A JAX without the check: trust the caller ("before any JAX call").
    return False


def unroll_cpu_threefry() -> bool:
  """Lowers JAX's threefry random bits on CPU as on accelerators, its 20 rounds unrolled, instead of JAX's CPU
  default, a rolled `while` loop (smaller programs, but each of the 5 iterations materialises its arrays).

  The bits are the same (the same uint32 arithmetic; `tests/test_train_sharding.py` compares them); dropout's
  masks in the digits train step cost 1.8 ms instead of 8 ms (the step: 99.7 against 103.8 ms, bench/RESULTS.md).
  It replaces a lowering rule of a private JAX module, for this process and only on CPU; without that module (a
  JAX that moved it) nothing changes.

  Returns:
    True if the unrolled lowering was registered.
  """
  try:
    from jax._src.random import threefry2x32  # pylint: disable=g-import-not-at-top
    from jax.interpreters import mlir  # pylint: disable=g-import-not-at-top
    rule = threefry2x32._threefry2x32_lowering_rule  # pylint: disable=protected-access
    primitive = threefry2x32.threefry2x32_p
  except (ImportError, AttributeError):
    return False
  mlir.register_lowering(primitive, rule, platform="cpu")
  return True


def make_mesh(devices=None) -> Mesh:
  """A one-axis mesh named `data` over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer state, metrics)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, *, steps_axis: bool = False) -> NamedSharding:
  """Examples split over the `data` axis: `[B, *D]`, or `[K, B, *D]` with a leading steps axis."""
  return NamedSharding(mesh, P(None, DATA_AXIS) if steps_axis else P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, *, name: str = "batch_size") -> None:
  """Raises a ValueError unless the global batch splits evenly over devices and processes."""
  num_devices = mesh.devices.size
  if global_batch_size < 1 or global_batch_size % num_devices:
    raise ValueError(f"{name}={global_batch_size} must be a positive multiple of the number of devices "
                     f"({num_devices}) so that every device gets the same number of examples.")
  if global_batch_size % jax.process_count():
    raise ValueError(f"{name}={global_batch_size} must be a multiple of the number of processes "
                     f"({jax.process_count()}).")


def global_batch(local_batch, mesh: Mesh, *, steps_axis: bool = False):
  """Assembles each process's examples into global arrays sharded over `data`.

  Args:
    local_batch: a pytree of NumPy arrays `[B_local, ...]` (or `[K, B_local, ...]`) read by this process;
      every process passes the same structure and `B_local = B / process_count`.
    mesh: the mesh from :func:`make_mesh`.
    steps_axis: whether the arrays carry a leading steps axis `K`.

  Returns:
    The same pytree of `jax.Array` with global shape `[B, ...]` (or `[K, B, ...]`).
  """
  sharding = batch_sharding(mesh, steps_axis=steps_axis)
  axis = 1 if steps_axis else 0

  def assemble(local):
    local = np.asarray(local)
    global_shape = list(local.shape)
    global_shape[axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))

  return jax.tree.map(assemble, local_batch)


def replicate(tree, mesh: Mesh):
  """Places a pytree of arrays, identical on every process, replicated over the mesh."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda idx: np.asarray(a)[idx]),
                      tree)


def jit_train_step(train_step, mesh: Mesh, *, steps_per_call: int = 1):
  """Compiles `train_step(state, batch) -> (state, metrics)` over `mesh`: state and metrics replicated, batch
  sharded on `data`, and the incoming state donated (its buffers are reused for the new state).

  A state passed to the compiled step must not alias buffers between its leaves (e.g. EMA = params without a
  copy): donating one buffer twice crashes multi-device CPU programs. :meth:`TrainState.create` copies.
  """
  return jax.jit(train_step, in_shardings=(replicated(mesh), batch_sharding(mesh, steps_axis=steps_per_call > 1)),
                 out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=(0,))
