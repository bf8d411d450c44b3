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
