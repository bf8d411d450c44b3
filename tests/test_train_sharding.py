"""Data parallelism: the same train step on 1 and on 8 (forced host) devices, batch assembly, distributed setup."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from scoreflow.train import sharding

TESTS = os.path.dirname(os.path.abspath(__file__))

# XLA_FLAGS must be set before JAX starts, so the 8-device run lives in a subprocess; both meshes (1 device and
# all 8) are built in that one process so that they share the compiler and differ only in the partitioning.
_ONE_VS_EIGHT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path.insert(0, sys.argv[1])
    import jax
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_compilation_cache_dir", sys.argv[2])
    import jax.numpy as jnp, numpy as np
    from scoreflow.train import sharding
    from _train_fixtures import tiny_setup

    K, B = 2, 16
    out = {}
    for dtype in (jnp.float32, jnp.float64):
      finals = []
      for n in (1, 8):
        mesh = sharding.make_mesh(jax.devices()[:n])
        state, step, _, _ = tiny_setup(shape=(B, 2), dtype=dtype, dropout=0.1, steps_per_call=K)
        jitted = sharding.jit_train_step(step, mesh, steps_per_call=K)
        state = jax.device_put(state, sharding.replicated(mesh))
        rng = np.random.default_rng(0)
        for _ in range(5):
          x = rng.normal(size=(K, B, 2)).astype(dtype)
          state, metrics = jitted(state, sharding.global_batch({"x": x}, mesh, steps_axis=True))
        assert state.params["Dense_0"]["kernel"].sharding.mesh.devices.size == n
        finals.append(jax.tree.map(np.asarray, state))
      leaves = list(zip(jax.tree.leaves(finals[0]), jax.tree.leaves(finals[1])))
      scale = max(float(np.max(np.abs(a))) for a, _ in leaves if a.dtype.kind == "f")
      out[jnp.dtype(dtype).name] = {
          "max_diff": max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in leaves),
          "scale": scale, "num_devices": len(jax.devices()),
          "ints_equal": all(np.array_equal(a, b) for a, b in leaves if a.dtype.kind in "iu")}
    print(json.dumps(out))
""")


def test_one_device_and_eight_devices_agree(tmp_path):
  cache = os.path.join(os.path.dirname(TESTS), ".cache", "jax")
  result = subprocess.run([sys.executable, "-c", _ONE_VS_EIGHT, TESTS, cache], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  for dtype, eps in (("float32", np.finfo(np.float32).eps), ("float64", np.finfo(np.float64).eps)):
    r = out[dtype]
    assert r["num_devices"] == 8 and r["ints_equal"]
    # Same random numbers (threefry is partitionable) and the same maths; only the order of the cross-device
    # gradient sum differs, a few ulps per step. Bound: 1000 ulps of the largest parameter after 10 steps. Any
    # real difference (other noise, other dropout masks, a wrongly scaled gradient) moves parameters by about one
    # Adam step, lr = 1e-2, which is 1e5 (float32) to 1e13 (float64) times larger than the bound.
    assert r["max_diff"] <= 1e3 * eps * max(r["scale"], 1.0), (dtype, r)


def test_global_batch_and_batch_size_checks():
  mesh = sharding.make_mesh()
  x = np.arange(12, dtype=np.float32).reshape(6, 2)
  batch = sharding.global_batch({"x": x, "label": np.arange(6, dtype=np.int32)}, mesh)
  assert batch["x"].shape == (6, 2) and batch["x"].sharding.spec == sharding.batch_sharding(mesh).spec
  np.testing.assert_array_equal(batch["x"], x)
  stacked = sharding.global_batch({"x": np.stack([x, x])}, mesh, steps_axis=True)
  assert stacked["x"].shape == (2, 6, 2)
  sharding.check_batch_size(len(jax.devices()) * 4, mesh)
  with pytest.raises(ValueError, match="batch_size=0 must be a positive multiple of the number of devices"):
    sharding.check_batch_size(0, mesh)


def test_initialize_distributed_arguments(monkeypatch):
  for name in (sharding.ENV_COORDINATOR, sharding.ENV_NUM_PROCESSES, sharding.ENV_PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  assert sharding.initialize_distributed() is False
  with pytest.raises(ValueError, match="need a coordinator_address"):
    sharding.initialize_distributed(num_processes=2, process_id=1)
  with pytest.raises(ValueError, match="needs num_processes and process_id too"):
    sharding.initialize_distributed("127.0.0.1:1234", num_processes=2)
  with pytest.raises(ValueError, match=r"process_id must lie in \[0, num_processes=2\), got 2"):
    sharding.initialize_distributed("127.0.0.1:1234", num_processes=2, process_id=2)
  monkeypatch.setenv(sharding.ENV_NUM_PROCESSES, "4")
  with pytest.raises(ValueError, match="num_processes=4 and process_id=None need a coordinator_address"):
    sharding.initialize_distributed()


@pytest.mark.parametrize("requested, batch_sizes, num_processes, cores, expected", [
    ("auto", [128], 1, 2, 2),       # The measured case: 2 devices on 2 cores.
    ("auto", [128], 1, 16, 2),
    ("auto", [127], 1, 2, 1),       # An odd batch cannot be split: one device.
    ("auto", [128, 6], 2, 2, 1),    # 2 processes x 2 devices = 4 do not divide 6.
    ("auto", [8], 2, 2, 2),
    ("auto", [], 1, 1, 1),          # One core: nothing to split.
    (" AUTO ", [64], 1, 4, 2),
    ("3", [127], 1, 2, 3),          # An explicit count is taken as given (the batch check names it later).
    (4, [], 1, 2, 4),
])
def test_cpu_device_count(requested, batch_sizes, num_processes, cores, expected):
  assert sharding.cpu_device_count(requested, batch_sizes=batch_sizes, num_processes=num_processes,
                                   cores=cores) == expected


@pytest.mark.parametrize("requested", ["0", "-2", "two", None, 1.5])
def test_cpu_device_count_rejects_bad_values(requested):
  with pytest.raises(ValueError, match="--cpu_devices must be 'auto' or a positive integer"):
    sharding.cpu_device_count(requested, cores=2)


_CONFIGURE = textwrap.dedent("""
    import json, os, sys
    from scoreflow.train import sharding
    applied = sharding.configure_cpu_devices(int(sys.argv[1]))
    import jax
    devices = len(jax.devices())
    again = sharding.configure_cpu_devices(5)  # The backend has started: too late, nothing changes.
    assert len(jax.devices()) == devices
    print(json.dumps({"applied": applied, "again": again, "devices": devices}))
""")


@pytest.mark.parametrize("xla_flags, expected", [(None, {"applied": True, "again": False, "devices": 2}),
                                                 ("--xla_force_host_platform_device_count=3",
                                                  {"applied": False, "again": False, "devices": 3})])
def test_configure_cpu_devices_in_a_fresh_process(xla_flags, expected):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  out = subprocess.run([sys.executable, "-c", _CONFIGURE, "2"], env=env, capture_output=True, text=True,
                       check=True, timeout=120)
  assert json.loads(out.stdout.strip().splitlines()[-1]) == expected
