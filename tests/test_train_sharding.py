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
  # Eigen's convolutions keep every core busy from one device: auto splits nothing; an explicit count stands.
  for ynnpack in ("reductions", "none"):
    assert sharding.cpu_device_count(requested, batch_sizes=batch_sizes, num_processes=num_processes, cores=cores,
                                     ynnpack=ynnpack) == (expected if str(requested).strip().isdigit() else 1)


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


# --- Which operations XLA:CPU hands to YNNPACK. -----------------------------------------------------------------

@pytest.mark.parametrize("preset, expected", [("ddpmpp_digits", "none"), ("classifier_digits", "none"),
                                              ("ddpmpp_cifar10", "reductions"), ("ncsnpp_cifar10", "reductions"),
                                              ("mlp_toy", "default")])
def test_cpu_ynnpack_auto_picks_by_the_model(preset, expected):
  from scoreflow.models import build_model
  assert sharding.cpu_ynnpack_ops("auto", build_model(preset)) == expected
  assert sharding.cpu_ynnpack_ops(" AUTO ", build_model(preset)) == expected
  assert sharding.cpu_ynnpack_ops("auto") == "default"  # No model: XLA's own choice.
  for choice in ("default", "reductions", "none"):  # An explicit choice is taken whatever the model.
    assert sharding.cpu_ynnpack_ops(choice, build_model(preset)) == choice


@pytest.mark.parametrize("requested", ["all", "", None, "eigen"])
def test_cpu_ynnpack_rejects_bad_values(requested):
  with pytest.raises(ValueError, match="--cpu_ynnpack must be one of auto, default, reductions, none"):
    sharding.cpu_ynnpack_ops(requested)


def _conv_norm(x, w):
  """A convolution followed by a GroupNorm-like reduction: operations of both kinds YNNPACK may take."""
  y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y - jax.numpy.mean(y, axis=(1, 2, 3), keepdims=True)


def _ynn_fusions(compiled_text: str) -> list[str]:
  entry = compiled_text[compiled_text.index("ENTRY"):]
  return [line for line in entry.splitlines() if '"__ynn_fusion"' in line]


def test_cpu_ynnpack_compiler_options_reach_xla():
  # float32 (YNNPACK takes no float64), and channels wide enough for XLA to hand the convolution over.
  x, w = jax.numpy.ones((4, 8, 8, 32), np.float32), jax.numpy.ones((3, 3, 32, 32), np.float32)
  texts = {ops: jax.jit(_conv_norm).lower(x, w).compile(
      compiler_options=sharding.cpu_ynnpack_compiler_options(ops)).as_text()
           for ops in ("default", "reductions", "none")}
  assert sharding.cpu_ynnpack_compiler_options("default") == {}
  assert _ynn_fusions(texts["default"])  # XLA's default hands these to YNNPACK (else the test shows nothing).
  assert " convolution(" in texts["none"][texts["none"].index("ENTRY"):] and not _ynn_fusions(texts["none"])
  assert _ynn_fusions(texts["reductions"]) and texts["reductions"] != texts["default"]


# XLA reads XLA_FLAGS when the backend starts, so each case runs in a fresh process.
_CONFIGURE_YNNPACK = textwrap.dedent("""
    import json, os, sys
    from absl import flags
    from scoreflow import cli
    from scoreflow.models import build_model
    flags.FLAGS(["prog"] + sys.argv[1:])
    cli.configure_devices(model=build_model("ddpmpp_digits"))
    import jax, jax.numpy as jnp
    from scoreflow.train import sharding
    f = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    text = jax.jit(f).lower(jnp.ones((4, 8, 8, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()
    # The backend has started: too late, nothing changes.
    late = (sharding.configure_cpu_ynnpack("reductions") or sharding.configure_cpu_vector_width(128)
            or sharding.configure_cpu_dispatch(asynchronous=True))
    draw = jax.jit(lambda key: jax.random.bits(key, (64,))).lower(jax.random.key(0)).compile().as_text()
    print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", ""), "ynn": '"__ynn_fusion"' in text,
                      "late": late, "devices": len(jax.devices()), "threefry_unrolled": " while(" not in draw,
                      "async_dispatch": jax.config.read("jax_cpu_enable_async_dispatch")}))
""")


_WIDE = "--xla_cpu_prefer_vector_width=512"


@pytest.mark.parametrize("args, xla_flags, expected", [
    ([], None, {"xla_flags": f"--xla_cpu_experimental_ynn_fusion_type= {_WIDE}", "ynn": False}),  # auto: digits U-Net
    (["--cpu_async_dispatch"], None, {"xla_flags": f"--xla_cpu_experimental_ynn_fusion_type= {_WIDE}", "ynn": False}),
    (["--cpu_ynnpack=default"], None, {"xla_flags": _WIDE, "ynn": True}),
    (["--cpu_ynnpack=none"], "--xla_cpu_experimental_ynn_fusion_type=individual_convolution",   # The user's wins.
     {"xla_flags": f"--xla_cpu_experimental_ynn_fusion_type=individual_convolution {_WIDE}", "ynn": True}),
    (["--cpu_ynnpack=default"], "--xla_cpu_prefer_vector_width=256",   # So does the user's vector width.
     {"xla_flags": "--xla_cpu_prefer_vector_width=256", "ynn": True}),
    # Two devices: Eigen's convolutions are miscomputed in loops there, so auto keeps XLA's default.
    (["--cpu_devices=2"], None, {"xla_flags": _WIDE, "ynn": True}),
    ([], "--xla_force_host_platform_device_count=2",
     {"xla_flags": f"--xla_force_host_platform_device_count=2 {_WIDE}", "ynn": True}),
])
def test_cli_applies_cpu_ynnpack_in_a_fresh_process(args, xla_flags, expected):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags:
    env["XLA_FLAGS"] = xla_flags
  out = subprocess.run([sys.executable, "-c", _CONFIGURE_YNNPACK, *args], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result.pop("threefry_unrolled") == (result.pop("devices") == 1)  # A split CPU keeps JAX's lowering.
  assert result.pop("async_dispatch") == ("--cpu_async_dispatch" in args)  # Calls on the calling thread by default.
  assert result == {**expected, "late": False}


def test_cli_refuses_eigen_convolutions_on_a_split_cpu():
  out = subprocess.run([sys.executable, "-c", _CONFIGURE_YNNPACK, "--cpu_devices=2", "--cpu_ynnpack=reductions"],
                       env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode != 0
  assert "--cpu_ynnpack=reductions needs one CPU device per process, got 2" in out.stderr
  assert "Pass --cpu_devices=1, or --cpu_ynnpack=default" in out.stderr


_LOOPED_UNET = textwrap.dedent("""
    import json, os, sys
    from scoreflow.train import sharding
    sharding.configure_cpu_ynnpack("none")
    import jax, jax.numpy as jnp, numpy as np
    from scoreflow.models import build_model
    model = build_model("ddpmpp_digits")
    x = jnp.asarray(np.random.default_rng(0).normal(size=(128, 8, 8, 1)), jnp.float32)
    t = jnp.asarray(np.random.default_rng(1).uniform(0, 999, size=(128,)), jnp.float32)
    params = model.init(jax.random.key(0), x[:1], t[:1])["params"]
    leaves, tree = jax.tree.flatten(params)  # Away from the zero-initialised output layer.
    params = jax.tree.unflatten(tree, [l + 0.05 * jax.random.normal(jax.random.key(i), l.shape, l.dtype)
                                       for i, l in enumerate(leaves)])
    step = lambda x: x - 0.05 * model.apply({"params": params}, x, t)
    looped = jax.jit(lambda x: jax.lax.fori_loop(0, 20, lambda i, x: step(x), x))(x)
    stepped, one_step = x, jax.jit(step)
    for _ in range(20):
      stepped = one_step(stepped)
    text = jax.jit(step).lower(x).compile().as_text()
    print(json.dumps({"error": float(jnp.max(jnp.abs(looped - stepped))), "scale": float(jnp.max(jnp.abs(stepped))),
                      "ynn": '"__ynn_fusion"' in text}))
""")


def test_eigen_convolutions_in_a_loop_on_one_device():
  """The combination `--cpu_ynnpack=auto` picks for the digits U-Net (Eigen's convolutions, one device) computes
  a loop of network steps as the same steps one by one. (On 2 CPU devices, jax 0.10.2, this check fails by 0.5.)"""
  out = subprocess.run([sys.executable, "-c", _LOOPED_UNET], env={k: v for k, v in os.environ.items()
                                                                    if k != "XLA_FLAGS"},
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert not result["ynn"] and result["scale"] > 1.0
  assert result["error"] < 1e-4 * result["scale"], result


_THREEFRY_BITS = textwrap.dedent("""
    import hashlib, json, sys
    from scoreflow.train import sharding
    registered = sharding.unroll_cpu_threefry() if sys.argv[1] == "unrolled" else False
    import jax, jax.numpy as jnp, numpy as np
    import flax.linen as nn
    key = jax.random.key(7)
    def draws(key):
      k1, k2, k3 = jax.random.split(jax.random.fold_in(key, 3), 3)
      keep = nn.Dropout(0.1).apply({}, jnp.ones((4, 8, 8, 32)), deterministic=False, rngs={"dropout": k1})
      return keep, jax.random.normal(k2, (1001,)), jax.random.bits(k3, (3, 5), jnp.uint32)
    compiled = jax.jit(draws).lower(key).compile()
    digest = hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in compiled(key))).hexdigest()
    print(json.dumps({"registered": registered, "digest": digest, "while": " while(" in compiled.as_text()}))
""")


def test_unrolled_cpu_threefry_draws_the_same_bits():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  results = {}
  for lowering in ("rolled", "unrolled"):
    out = subprocess.run([sys.executable, "-c", _THREEFRY_BITS, lowering], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    results[lowering] = json.loads(out.stdout.strip().splitlines()[-1])
  assert results["unrolled"]["registered"]
  assert results["rolled"]["while"] and not results["unrolled"]["while"]  # The lowering did change ...
  assert results["rolled"]["digest"] == results["unrolled"]["digest"]   # ... and the bits did not.
