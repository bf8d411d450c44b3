"""score_sde checkpoint importers: the key scheme, layouts, EMA selection, file formats and errors.

The reference code is not part of the repository, so the ground truth here is written by hand from reading it
(yang-song/score_sde_pytorch `models/ncsnpp.py`, `layerspp.py`, `layers.py`, `ddpm.py`; yang-song/score_sde's Flax
modules): the full list of PyTorch parameter names, in `model.parameters()` order, with their shapes, of three tiny
networks; a few Flax names; and the layouts checked by applying single layers with `torch.nn.functional` next to
scoreflow's. The forward pass of every preset against the real reference networks is
`bench/check_reference_forward.py` (results in `bench/results/reference_forward.txt`).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization, traverse_util

from scoreflow.models import build_model, layers
from scoreflow.models.importers import (from_score_sde_flax, from_score_sde_pytorch, to_score_sde_flax,
                                        to_score_sde_pytorch)

TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
SPECS = {
    "ddpmpp": {"preset": "ddpmpp_digits", **TINY},
    "ncsnpp": {"preset": "ncsnpp_digits", **TINY},
    "ddpm": {"preset": "ddpm_cifar10", **TINY, "attn_every_up_block": False},
}
IMAGE = (8, 1)  # 8x8x1: attention at 4x4, i.e. on level 1.


# --- The reference's parameter lists, written out by hand. ---------------------------------------
# nf = 16, ch_mult (1, 2), one block per level, attention at 4x4, 1 channel, temb 4 nf = 64.

def _gn(prefix, c):
  return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,))]


def _conv(prefix, o, i, k=3):
  return [(f"{prefix}.weight", (o, i, k, k)), (f"{prefix}.bias", (o,))]


def _linear(prefix, o, i):
  return [(f"{prefix}.weight", (o, i)), (f"{prefix}.bias", (o,))]


def _nin(prefix, i, o):
  return [(f"{prefix}.W", (i, o)), (f"{prefix}.b", (o,))]


def _biggan(i, cin, cout, shortcut):  # layerspp.ResnetBlockBigGANpp: registration order of __init__.
  p = f"all_modules.{i}"
  out = _gn(f"{p}.GroupNorm_0", cin) + _conv(f"{p}.Conv_0", cout, cin) + _linear(f"{p}.Dense_0", cout, 64)
  out += _gn(f"{p}.GroupNorm_1", cout) + _conv(f"{p}.Conv_1", cout, cout)
  return out + (_conv(f"{p}.Conv_2", cout, cin, 1) if shortcut else [])


def _ddpm_block(i, cin, cout):  # layers.ResnetBlockDDPM: NIN_0 shortcut when the width changes.
  p = f"all_modules.{i}"
  out = _gn(f"{p}.GroupNorm_0", cin) + _conv(f"{p}.Conv_0", cout, cin) + _linear(f"{p}.Dense_0", cout, 64)
  out += _gn(f"{p}.GroupNorm_1", cout) + _conv(f"{p}.Conv_1", cout, cout)
  return out + (_nin(f"{p}.NIN_0", cin, cout) if cin != cout else [])


def _attn(i, c):
  return _gn(f"all_modules.{i}.GroupNorm_0", c) + sum((_nin(f"all_modules.{i}.NIN_{j}", c, c) for j in range(4)), [])


REFERENCE_KEYS = {
    # NCSNpp with configs/vp/cifar10_ddpmpp_continuous.py: 0-1 embedding MLP, 2 input conv, 3-4 level 0 (block,
    # down block), 5-6 level 1 (block, attention), 7-9 middle, 10-13 level 1 up (2 blocks on 32+32 and 32+16
    # channels, attention, up block), 14-15 level 0 up (32+16, 16+16), 16-17 output.
    "ddpmpp": (_linear("all_modules.0", 64, 16) + _linear("all_modules.1", 64, 64) + _conv("all_modules.2", 16, 1)
               + _biggan(3, 16, 16, False) + _biggan(4, 16, 16, True) + _biggan(5, 16, 32, True) + _attn(6, 32)
               + _biggan(7, 32, 32, False) + _attn(8, 32) + _biggan(9, 32, 32, False)
               + _biggan(10, 64, 32, True) + _biggan(11, 48, 32, True) + _attn(12, 32) + _biggan(13, 32, 32, True)
               + _biggan(14, 48, 16, True) + _biggan(15, 32, 16, True)
               + _gn("all_modules.16", 16) + _conv("all_modules.17", 1, 16)),
    # NCSNpp with configs/ve/cifar10_ncsnpp_continuous.py: 0 Fourier W (embedding 2 nf), and after the down block
    # of level 0 the residual input pyramid's FIR Downsample (1 -> 16 channels, `Conv2d_0`).
    "ncsnpp": ([("all_modules.0.W", (16,))] + _linear("all_modules.1", 64, 32) + _linear("all_modules.2", 64, 64)
               + _conv("all_modules.3", 16, 1) + _biggan(4, 16, 16, False) + _biggan(5, 16, 16, True)
               + _conv("all_modules.6.Conv2d_0", 16, 1) + _biggan(7, 16, 32, True) + _attn(8, 32)
               + _biggan(9, 32, 32, False) + _attn(10, 32) + _biggan(11, 32, 32, False)
               + _biggan(12, 64, 32, True) + _biggan(13, 48, 32, True) + _attn(14, 32) + _biggan(15, 32, 32, True)
               + _biggan(16, 48, 16, True) + _biggan(17, 32, 16, True)
               + _gn("all_modules.18", 16) + _conv("all_modules.19", 1, 16)),
    # models/ddpm.py: Downsample / Upsample layers with `Conv_0`, NIN shortcuts.
    "ddpm": (_linear("all_modules.0", 64, 16) + _linear("all_modules.1", 64, 64) + _conv("all_modules.2", 16, 1)
             + _ddpm_block(3, 16, 16) + _conv("all_modules.4.Conv_0", 16, 16) + _ddpm_block(5, 16, 32)
             + _attn(6, 32) + _ddpm_block(7, 32, 32) + _attn(8, 32) + _ddpm_block(9, 32, 32)
             + _ddpm_block(10, 64, 32) + _ddpm_block(11, 48, 32) + _attn(12, 32)
             + _conv("all_modules.13.Conv_0", 32, 32) + _ddpm_block(14, 48, 16) + _ddpm_block(15, 32, 16)
             + _gn("all_modules.16", 16) + _conv("all_modules.17", 1, 16)),
}


def _random_state_dict(kind, seed=0):
  """A reference-layout state_dict (NumPy) with random values, `sigmas` buffer first as in the reference."""
  rng = np.random.default_rng(seed)
  state = collections.OrderedDict(sigmas=np.geomspace(50, 0.01, 10).astype(np.float32))
  for key, shape in REFERENCE_KEYS[kind]:
    state[key] = rng.standard_normal(shape).astype(np.float32)
  return state


def _random_params(spec, seed=0):
  model = build_model(spec)
  x, cond = jnp.zeros((1, IMAGE[0], IMAGE[0], IMAGE[1])), jnp.zeros((1,))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, cond))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def _assert_trees_equal(a, b):
  a, b = _flat(a), _flat(b)
  assert set(a) == set(b), set(a) ^ set(b)
  for key in a:
    np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


# --- The key scheme. ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(SPECS))
def test_exported_state_dict_has_the_references_names_order_and_shapes(kind):
  state = to_score_sde_pytorch(_random_params(SPECS[kind]), SPECS[kind], image_size=IMAGE[0])
  assert [(k, v.shape) for k, v in state.items()] == REFERENCE_KEYS[kind]
  assert all(v.dtype == np.float32 for v in state.values())


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_reference_state_dict_round_trips_exactly(kind):
  state = _random_state_dict(kind)
  params = from_score_sde_pytorch(state, SPECS[kind])  # Layout inferred: 1 channel, 8x8 (attention on level 1).
  back = to_score_sde_pytorch(params, SPECS[kind], image_size=IMAGE[0], sigmas=state["sigmas"])
  assert list(back) == list(state)
  for key in state:
    np.testing.assert_array_equal(back[key], state[key], err_msg=key)
  # The DataParallel prefix and a wrong image size: the prefix is stripped, the size is refused.
  prefixed = {"module." + k: v for k, v in state.items()}
  _assert_trees_equal(from_score_sde_pytorch(prefixed, SPECS[kind]), params)
  with pytest.raises(ValueError, match="mismatch"):
    from_score_sde_pytorch(state, SPECS[kind], image_size=16)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_scoreflow_params_round_trip_through_both_formats(kind):
  params = _random_params(SPECS[kind], seed=1)
  _assert_trees_equal(from_score_sde_pytorch(to_score_sde_pytorch(params, SPECS[kind], image_size=8), SPECS[kind]),
                      params)
  _assert_trees_equal(from_score_sde_flax(to_score_sde_flax(params, SPECS[kind], image_size=8), SPECS[kind]), params)


def test_flax_names_are_the_jax_references():
  """Names that score_sde's Flax modules create (linen auto-naming: class name + per-parent counter)."""
  expected = {
      "ncsnpp": {"GaussianFourierProjection_0/W": (16,), "Dense_0/kernel": (32, 64), "Dense_1/bias": (64,),
                 "Conv_0/kernel": (3, 3, 1, 16), "ResnetBlockBigGANpp_1/Conv_2/kernel": (1, 1, 16, 16),
                 "ResnetBlockBigGANpp_2/Dense_0/kernel": (64, 32), "Downsample_0/Conv2d_0/weight": (3, 3, 1, 16),
                 "Downsample_0/Conv2d_0/bias": (16,), "AttnBlockpp_2/NIN_3/W": (32, 32),
                 "AttnBlockpp_0/GroupNorm_0/scale": (32,), "GroupNorm_0/scale": (16,), "Conv_1/kernel": (3, 3, 16, 1)},
      "ddpm": {"Dense_0/kernel": (16, 64), "ResnetBlockDDPM_1/NIN_0/W": (16, 32), "ResnetBlockDDPM_1/NIN_0/b": (32,),
               "AttnBlock_0/NIN_0/W": (32, 32), "Downsample_0/Conv_0/kernel": (3, 3, 16, 16),
               "Upsample_0/Conv_0/kernel": (3, 3, 32, 32), "GroupNorm_0/bias": (16,), "Conv_1/bias": (1,)},
  }
  for kind, names in expected.items():
    flat = _flat(to_score_sde_flax(_random_params(SPECS[kind]), SPECS[kind], image_size=8))
    for name, shape in names.items():
      assert flat[name].shape == shape, name
    assert len(flat) == len(REFERENCE_KEYS[kind])
  # NCSN++ code with DDPM blocks names them ResnetBlockDDPMpp / AttnBlockpp.
  flat = _flat(to_score_sde_flax(_random_params(SPECS["ddpm"]), SPECS["ddpm"], image_size=8, network="ncsnpp"))
  assert "ResnetBlockDDPMpp_1/NIN_0/W" in flat and "AttnBlockpp_0/NIN_0/W" in flat


# --- Layouts, checked layer by layer against torch.nn.functional. ---------------------------------

def test_conv_layout_on_a_kernel_with_known_numbers():
  torch = pytest.importorskip("torch")
  weight = np.zeros((2, 1, 3, 3), np.float32)  # OIHW
  weight[0, 0] = np.arange(1, 10).reshape(3, 3)
  weight[1, 0] = -np.arange(1, 10).reshape(3, 3).T
  image = np.zeros((1, 1, 5, 5), np.float32)
  image[0, 0, 2, 2] = 1.0
  expected = torch.nn.functional.conv2d(torch.from_numpy(image), torch.from_numpy(weight), padding=1).numpy()
  # Cross-correlation of a centred impulse: the kernel rotated by 180 degrees.
  np.testing.assert_array_equal(expected[0, 0, 1:4, 1:4], [[9, 8, 7], [6, 5, 4], [3, 2, 1]])
  state = _random_state_dict("ddpmpp")
  state["all_modules.2.weight"] = np.tile(weight, (8, 1, 1, 1))
  state["all_modules.2.bias"] = np.zeros(16, np.float32)
  params = from_score_sde_pytorch(state, SPECS["ddpmpp"])
  ours = layers.conv(16).apply({"params": params["Conv_0"]}, jnp.asarray(image.transpose(0, 2, 3, 1)))
  np.testing.assert_array_equal(np.asarray(ours)[0, :, :, :2], expected[0].transpose(1, 2, 0))
  # Power: reading OIHW as HWIO by a reshape (no transpose) is caught.
  wrong = {"kernel": jnp.asarray(state["all_modules.2.weight"].reshape(3, 3, 1, 16)), "bias": jnp.zeros(16)}
  ours_wrong = layers.conv(16).apply({"params": wrong}, jnp.asarray(image.transpose(0, 2, 3, 1)))
  assert not np.allclose(np.asarray(ours_wrong)[0, :, :, :2], expected[0].transpose(1, 2, 0))


def test_linear_nin_group_norm_and_fir_conv_layouts():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  rng = np.random.default_rng(3)
  t = torch.from_numpy

  # Linear (embedding MLP): torch computes x W^T + b.
  state = _random_state_dict("ddpmpp")
  params = from_score_sde_pytorch(state, SPECS["ddpmpp"])
  e = rng.standard_normal((3, 16)).astype(np.float32)
  expected = F.linear(t(e), t(state["all_modules.0.weight"]), t(state["all_modules.0.bias"])).numpy()
  ours = layers.dense(64).apply({"params": params["NoiseEmbedding_0"]["Dense_0"]}, jnp.asarray(e))
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-5)

  # GroupNorm (first norm of the level-1 up block on 48 channels: min(48 // 4, 32) = 12 groups, eps 1e-6).
  x = rng.standard_normal((2, 48, 4, 4)).astype(np.float32)
  gn = "all_modules.11.GroupNorm_0"
  expected = F.group_norm(t(x), 12, t(state[f"{gn}.weight"]), t(state[f"{gn}.bias"]), eps=1e-6).numpy()
  ours = layers.group_norm(48).apply({"params": params["ResnetBlockBigGAN_6"]["GroupNorm_0"]},
                                     jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(ours), expected.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)

  # NIN (the DDPM block's 1x1 shortcut 16 -> 32): W is [in, out], applied as x . W + b over channels.
  state = _random_state_dict("ddpm")
  params = from_score_sde_pytorch(state, SPECS["ddpm"])
  x = rng.standard_normal((2, 16, 4, 4)).astype(np.float32)
  w, b = state["all_modules.5.NIN_0.W"], state["all_modules.5.NIN_0.b"]
  expected = (torch.einsum("bchw,co->bohw", t(x), t(w)) + t(b)[None, :, None, None]).numpy()
  ours = layers.dense(32).apply({"params": params["ResnetBlockDDPM_1"]["Dense_1"]},
                                jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(ours), expected.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)

  # FIR-fused downsampling convolution (the input pyramid, 1 -> 16 channels): StyleGAN2's conv_downsample_2d is
  # the [1, 3, 3, 1] filter (outer product / 64) with padding (p + 1) // 2, p // 2, p = 4 - 2 + 3 - 1 = 4, then a
  # stride-2 valid convolution with the OIHW weight.
  state = _random_state_dict("ncsnpp")
  params = from_score_sde_pytorch(state, SPECS["ncsnpp"])
  x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
  fir = np.outer([1, 3, 3, 1], [1, 3, 3, 1]).astype(np.float32) / 64
  blurred = F.conv2d(F.pad(t(x), (2, 2, 2, 2)), t(fir)[None, None])
  w, b = state["all_modules.6.Conv2d_0.weight"], state["all_modules.6.Conv2d_0.bias"]
  expected = (F.conv2d(blurred, t(w), stride=2) + t(b)[None, :, None, None]).numpy()
  ours = layers.FIRConv(16, up=False).apply({"params": params["Downsample_0"]["FIRConv_0"]},
                                            jnp.asarray(x.transpose(0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(ours), expected.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


# --- Checkpoint files and the EMA weights. --------------------------------------------------------

def _torch_checkpoint(torch, kind, raw, ema):
  """A checkpoint as score_sde_pytorch's utils.save_checkpoint writes it (DataParallel keys, EMA shadow list of the
  trainable parameters in model.parameters() order, which excludes the frozen Fourier W and the sigmas buffer)."""
  model = collections.OrderedDict(("module." + k, torch.from_numpy(v)) for k, v in raw.items())
  shadow = [torch.from_numpy(ema[k]) for k, _ in REFERENCE_KEYS[kind] if not k.endswith(".0.W")]
  return {"optimizer": {"state": {}, "param_groups": [{"lr": 2e-4}]}, "model": model,
          "ema": {"decay": 0.999, "num_updates": 10, "shadow_params": shadow}, "step": 10}


def test_pth_checkpoint_gives_ema_weights_by_default_and_raw_ones_on_request(tmp_path):
  torch = pytest.importorskip("torch")
  kind = "ncsnpp"
  raw, ema = _random_state_dict(kind, seed=1), _random_state_dict(kind, seed=2)
  ema["all_modules.0.W"] = raw["all_modules.0.W"]  # Frozen: not in the shadow list.
  path = tmp_path / "checkpoint_10.pth"
  torch.save(_torch_checkpoint(torch, kind, raw, ema), path)
  from_ema = from_score_sde_pytorch(str(path), SPECS[kind])
  from_raw = from_score_sde_pytorch(path, SPECS[kind], ema=False)
  for params, expected in ((from_ema, ema), (from_raw, raw)):
    back = to_score_sde_pytorch(params, SPECS[kind], image_size=8)
    for key in back:
      np.testing.assert_array_equal(back[key], expected[key], err_msg=key)
  np.testing.assert_array_equal(np.asarray(from_ema["NoiseEmbedding_0"]["frequencies"]), raw["all_modules.0.W"])
  assert not np.array_equal(from_ema["Conv_0"]["kernel"], from_raw["Conv_0"]["kernel"])
  # The checkpoint as loaded, with NumPy values, reads the same.
  loaded = torch.load(path, weights_only=False)
  loaded["model"] = {k: v.numpy() for k, v in loaded["model"].items()}
  _assert_trees_equal(from_score_sde_pytorch(loaded, SPECS[kind]), from_ema)


def test_imported_fourier_frequencies_are_used_frozen_and_only_when_they_differ():
  kind = "ncsnpp"
  state = _random_state_dict(kind)
  model = build_model(SPECS[kind])
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 8, 1)), jnp.float32)
  sigma = jnp.asarray([0.5, 3.0], jnp.float32)
  imported = from_score_sde_pytorch(state, SPECS[kind])
  assert imported["NoiseEmbedding_0"]["frequencies"].shape == (16,)
  without = dict(imported, NoiseEmbedding_0={k: v for k, v in imported["NoiseEmbedding_0"].items()
                                              if k != "frequencies"})
  apply = jax.jit(lambda params: model.apply({"params": params}, x, sigma))
  assert not np.allclose(apply(imported), apply(without), rtol=1e-3)  # The leaf, where the UNet reads it, counts.
  # The seed's own frequencies are not stored: a fresh network's params round-trip without the leaf.
  state["all_modules.0.W"] = layers.fourier_frequencies(16, 16.0).astype(np.float32)
  assert "frequencies" not in from_score_sde_pytorch(state, SPECS[kind])["NoiseEmbedding_0"]


def test_noise_embedding_with_given_frequencies_is_the_closed_form():
  w = np.array([0.3, -1.7, 2.5, 7.0], np.float32)
  log_sigma = np.array([-1.0, 0.25, 2.0])
  rng = np.random.default_rng(0)
  params = {"frequencies": jnp.asarray(w),
            "Dense_0": {"kernel": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32), "bias": jnp.zeros(6)},
            "Dense_1": {"kernel": jnp.asarray(rng.standard_normal((6, 6)), jnp.float32), "bias": jnp.ones(6)}}
  module = layers.NoiseEmbedding(6, "fourier", 4, noise_conditioning="log_sigma")
  ours = module.apply({"params": params}, jnp.asarray(log_sigma, jnp.float32))
  angles = 2 * np.pi * log_sigma[:, None] * w[None, :].astype(np.float64)
  e = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
  h = e @ np.asarray(params["Dense_0"]["kernel"], np.float64)
  h = h / (1 + np.exp(-h))  # SiLU
  expected = h @ np.asarray(params["Dense_1"]["kernel"], np.float64) + 1.0
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-4)
  # Power: the seed's frequencies (no leaf) give another embedding; and the leaf is frozen (zero gradient).
  without = {k: v for k, v in params.items() if k != "frequencies"}
  assert not np.allclose(module.apply({"params": without}, jnp.asarray(log_sigma, jnp.float32)), expected, rtol=1e-2)
  grads = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, jnp.asarray(log_sigma, jnp.float32)) ** 2))(params)
  assert not np.any(grads["frequencies"]) and np.any(grads["Dense_0"]["kernel"])
  with pytest.raises(ValueError, match=r"frequencies must have shape \(4,\)"):
    module.apply({"params": dict(params, frequencies=jnp.zeros(5))}, jnp.asarray(log_sigma, jnp.float32))


def test_flax_msgpack_checkpoint_of_the_jax_reference(tmp_path):
  kind = "ncsnpp"
  raw, ema = _random_params(SPECS[kind], seed=3), _random_params(SPECS[kind], seed=4)
  state = {"step": 7, "optimizer": {"target": to_score_sde_flax(raw, SPECS[kind], image_size=8),
                                    "state": {"step": 7, "param_states": {}}},
           "lr": 2e-4, "model_state": {}, "ema_rate": 0.999,
           "params_ema": to_score_sde_flax(ema, SPECS[kind], image_size=8), "rng": np.array([0, 42], np.uint32)}
  (tmp_path / "checkpoint_7").write_bytes(serialization.msgpack_serialize(state))
  (tmp_path / "checkpoint_3").write_bytes(b"not read: an older step")
  _assert_trees_equal(from_score_sde_flax(tmp_path, SPECS[kind]), ema)
  _assert_trees_equal(from_score_sde_flax(tmp_path / "checkpoint_7", SPECS[kind], ema=False), raw)


# --- Errors. --------------------------------------------------------------------------------------

def test_missing_unexpected_and_misshaped_keys_name_the_key_and_both_shapes():
  spec = SPECS["ddpmpp"]
  state = _random_state_dict("ddpmpp")
  missing = {k: v for k, v in state.items() if k != "all_modules.5.Conv_2.weight"}
  message = r"missing key 'all_modules\.5\.Conv_2\.weight' \(expected shape \(32, 16, 1, 1\)\)"
  with pytest.raises(ValueError, match=message):
    from_score_sde_pytorch(missing, spec, image_size=8)
  extra = dict(state, **{"all_modules.18.weight": np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"unexpected key 'all_modules\.18\.weight' \(shape \(3, 3\)\)"):
    from_score_sde_pytorch(extra, spec, image_size=8)
  wrong = dict(state, **{"all_modules.1.weight": np.zeros((64, 32), np.float32)})
  with pytest.raises(ValueError, match=r"'all_modules\.1\.weight' has shape \(64, 32\), expected \(64, 64\)"):
    from_score_sde_pytorch(wrong, spec, image_size=8)
  flax_params = to_score_sde_flax(_random_params(spec), spec, image_size=8)
  flax_params["AttnBlockpp_0"]["NIN_1"]["W"] = np.zeros((32, 16), np.float32)
  with pytest.raises(ValueError, match=r"'AttnBlockpp_0/NIN_1/W' has shape \(32, 16\), expected \(32, 32\)"):
    from_score_sde_flax(flax_params, spec)


def test_bad_specs_and_checkpoints_are_refused():
  state = _random_state_dict("ddpmpp")
  with pytest.raises(ValueError, match="unknown preset 'ddpmpp_mnist'"):
    from_score_sde_pytorch(state, "ddpmpp_mnist")
  with pytest.raises(ValueError, match="must describe a UNet"):
    from_score_sde_pytorch(state, "mlp_toy")
  with pytest.raises(ValueError, match="attn_every_up_block=True"):
    from_score_sde_pytorch(state, "ddpm_cifar10")
  with pytest.raises(ValueError, match="conditional=False"):
    from_score_sde_pytorch(state, dict(SPECS["ddpmpp"], conditional=False))
  with pytest.raises(ValueError, match="no ema.shadow_params; pass ema=False"):
    from_score_sde_pytorch({"model": state, "step": 1}, SPECS["ddpmpp"])
  short = {"model": state, "ema": {"shadow_params": [np.zeros(1)] * 3}}
  with pytest.raises(ValueError, match="has 3 tensors, the spec's network has 154 trainable parameters"):
    from_score_sde_pytorch(short, SPECS["ddpmpp"])
  with pytest.raises(ValueError, match="no checkpoint file"):
    from_score_sde_pytorch("/nonexistent/checkpoint_1.pth", SPECS["ddpmpp"])
  with pytest.raises(ValueError, match="has no params_ema; pass ema=False"):
    from_score_sde_flax({"optimizer": {"target": {}}}, SPECS["ddpmpp"])


def test_export_asks_for_the_image_size_when_the_attention_level_is_ambiguous():
  # Levels 1 and 2 both have 32 channels: attention at 4x4 on 8x8 or on 16x16 images gives the same scoreflow
  # parameters but a different reference order.
  spec = {"architecture": "unet", "nf": 16, "ch_mult": (1, 2, 2), "num_res_blocks": 1, "attn_resolutions": (4,)}
  model = build_model(spec)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,))))
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes["params"])
  with pytest.raises(ValueError, match=r"fit several image sizes \(\[8, 16\]\).*pass image_size"):
    to_score_sde_pytorch(params, spec)
  at_8, at_16 = (list(to_score_sde_pytorch(params, spec, image_size=size)) for size in (8, 16))
  assert at_8 != at_16 and sorted(at_8) != sorted(at_16)
  # Reference keys place every layer: the import needs no size.
  _assert_trees_equal(from_score_sde_pytorch(to_score_sde_pytorch(params, spec, image_size=16), spec), params)

