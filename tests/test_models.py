"""Score networks: parameter counts and architecture flags of the paper's models, shapes, conditioning, dropout,
initialisation, FIR.

Compilation dominates the cost of model tests, so shapes and dtypes are checked with `jax.eval_shape` (tracing
only), only a few tiny networks are compiled, and the networks that run are initialised with RBG keys: with the
default threefry keys, compiling the initialisation of even a tiny U-Net takes about five times longer.
"""

import functools
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import scoreflow as sf
from scoreflow.models import PRESETS, ScoreMLP, UNet, build_model, count_parameters
from scoreflow.models import layers


def _key(seed):
  return jax.random.key(seed, impl="rbg")


# --- Parameter counts of the published configurations. ------------------------------------------

def _reference_count(nf, ch_mult, num_res_blocks, attn_resolutions, image_size, channels=3, *,
                     resblock_type="biggan", embedding_type="positional", progressive="none",
                     progressive_input="none", progressive_combine="sum", conditional=True,
                     resamp_with_conv=True, attn_every_up_block=False):
  """Parameters of the 2021 reference `NCSNpp`/`DDPM` modules, by walking their layer lists in closed form
  (independent of the Flax code under test; the Fourier embedding's frozen frequencies are excluded). With
  `attn_every_up_block`, the DDPM of Ho et al. (2020), whose upsampling path attends after every block."""
  conv = lambda cin, cout, k=3: k * k * cin * cout + cout
  dense = lambda cin, cout: cin * cout + cout
  norm = lambda c: 2 * c
  temb_dim = 4 * nf if conditional else 0

  def resblock(cin, cout=None, resample=False):
    cout = cout or cin
    n = norm(cin) + conv(cin, cout) + norm(cout) + conv(cout, cout) + (dense(temb_dim, cout) if conditional else 0)
    if resblock_type == "biggan" and (cin != cout or resample):
      n += conv(cin, cout, 1)
    if resblock_type == "ddpm" and cin != cout:
      n += dense(cin, cout)  # NIN shortcut.
    return n

  attn = lambda c: norm(c) + 4 * dense(c, c)
  total = 0
  if conditional:
    total += dense(2 * nf if embedding_type == "fourier" else nf, 4 * nf) + dense(4 * nf, 4 * nf)
  total += conv(channels, nf)
  resolutions = [image_size // 2**i for i in range(len(ch_mult))]
  skips, in_ch, pyramid_ch = [nf], nf, channels
  for level, mult in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      total += resblock(in_ch, nf * mult)
      in_ch = nf * mult
      total += attn(in_ch) if resolutions[level] in attn_resolutions else 0
      skips.append(in_ch)
    if level != len(ch_mult) - 1:
      if resblock_type == "ddpm":
        total += conv(in_ch, in_ch) if resamp_with_conv else 0
      else:
        total += resblock(in_ch, resample=True)
      if progressive_input == "input_skip":
        total += conv(pyramid_ch, in_ch, 1)
        in_ch *= 2 if progressive_combine == "cat" else 1
      elif progressive_input == "residual":
        total += conv(pyramid_ch, in_ch)
        pyramid_ch = in_ch
      skips.append(in_ch)
  total += 2 * resblock(in_ch) + attn(in_ch)
  pyramid_ch = 0
  for level in reversed(range(len(ch_mult))):
    for _ in range(num_res_blocks + 1):
      total += resblock(in_ch + skips.pop(), nf * ch_mult[level])
      in_ch = nf * ch_mult[level]
      total += attn(in_ch) if attn_every_up_block and resolutions[level] in attn_resolutions else 0
    total += attn(in_ch) if not attn_every_up_block and resolutions[level] in attn_resolutions else 0
    if progressive == "output_skip":
      total += norm(in_ch) + conv(in_ch, channels)
    elif progressive == "residual":
      total += norm(in_ch) + conv(in_ch, in_ch) if level == len(ch_mult) - 1 else conv(pyramid_ch, in_ch)
      pyramid_ch = in_ch
    if level != 0:
      if resblock_type == "ddpm":
        total += conv(in_ch, in_ch) if resamp_with_conv else 0
      else:
        total += resblock(in_ch, resample=True)
  if progressive != "output_skip":
    total += norm(in_ch) + conv(in_ch, channels)
  return total


_ARCHITECTURE_KEYS = ("resblock_type", "embedding_type", "progressive", "progressive_input", "progressive_combine",
                      "conditional", "resamp_with_conv", "attn_every_up_block")

# Published sizes: Ho et al. (2020, Appendix B): "Our CIFAR10 model has 35.7 million parameters". We found no
# parameter counts for NCSN++/DDPM++ in Song et al. (2021); their architectures are pinned by the closed-form
# count of the reference code above, and the totals are listed in `scoreflow/models/presets.py`.
PAPER_CONFIGS = {  # name: (image size, published millions of parameters or None)
    "ddpm_cifar10": (32, 35.7),
    "ddpmpp_cifar10": (32, None),
    "ddpmpp_deep_cifar10": (32, None),
    "ncsnpp_cifar10": (32, None),
    "ncsnpp_deep_cifar10": (32, None),
    "ncsnpp_celeba64": (64, None),
}
MEASURED = {"ddpm_cifar10": 35_746_307, "ddpmpp_cifar10": 61_804_419, "ddpmpp_deep_cifar10": 106_632_579,
            "ncsnpp_cifar10": 62_758_787, "ncsnpp_deep_cifar10": 107_586_947, "ncsnpp_celeba64": 62_758_787}


@pytest.mark.parametrize("name", list(PAPER_CONFIGS))
def test_parameter_counts_of_the_paper_configurations(name):
  image_size, published_millions = PAPER_CONFIGS[name]
  model = build_model(name)
  cond_dtype = jnp.int32 if model.noise_conditioning == "index" else jnp.float32
  count = count_parameters(model, (1, image_size, image_size, 3), cond_dtype)
  reference = _reference_count(model.nf, model.ch_mult, model.num_res_blocks, model.attn_resolutions, image_size,
                               **{key: getattr(model, key) for key in _ARCHITECTURE_KEYS})
  assert count == reference == MEASURED[name]
  if published_millions is not None:
    # Published to 0.1 M, so the exact count lies within half a unit of the last digit.
    assert abs(count / 1e6 - published_millions) <= 0.05


def test_deep_variants_add_four_blocks_per_level_on_each_path():
  """Deep = 8 instead of 4 residual blocks per level: the difference is 4 down + 4 up blocks per level, plus
  the attention that follows each of the 4 extra down blocks at 16x16 (on the way up attention is per level)."""
  deep_minus_base = MEASURED["ddpmpp_deep_cifar10"] - MEASURED["ddpmpp_cifar10"]
  conv = lambda cin, cout: 9 * cin * cout + cout
  block = lambda cin, cout: 2 * cin + conv(cin, cout) + 2 * cout + conv(cout, cout) + 512 * cout + cout + (
      cin * cout + cout if cin != cout else 0)
  attention = 2 * 256 + 4 * (256 * 256 + 256)
  extra = 4 * attention
  for c in (128, 256, 256, 256):
    extra += 4 * block(c, c) + 4 * block(2 * c, c)  # Up-path blocks see the concatenated skip (same width).
  assert deep_minus_base == extra
  assert MEASURED["ncsnpp_deep_cifar10"] - MEASURED["ncsnpp_cifar10"] == extra


def test_ddpm_with_the_reference_codes_attention_layout():
  """The 2021 reference's `models/ddpm.py` attends once per level on the way up, where Ho et al.'s U-Net attends
  after each of the 3 up blocks at 16x16: 2 attention blocks of 256 channels fewer, 35,218,947 parameters."""
  model = build_model("ddpm_cifar10", attn_every_up_block=False)
  count = count_parameters(model, (1, 32, 32, 3), jnp.int32)
  attention = 2 * 256 + 4 * (256 * 256 + 256)
  reference = _reference_count(128, (1, 2, 2, 2), 2, (16,), 32, resblock_type="ddpm", attn_every_up_block=False)
  assert count == reference == MEASURED["ddpm_cifar10"] - 2 * attention == 35_218_947


# --- Architecture flags of the paper presets, pinned to the 2021 reference configs. ---------------------

# What score_sde's configs give each network, in scoreflow's field names, transcribed from its configs/
# vp/ddpm/cifar10.py, vp/cifar10_ddpmpp_continuous.py, vp/cifar10_ddpmpp_deep_continuous.py (the subvp/ files have
# the same model sections), ve/cifar10_ncsnpp_continuous.py, ve/cifar10_ncsnpp_deep_continuous.py and
# ve/celeba_ncsnpp.py, with what they inherit from default_cifar10_configs.py / default_celeba_configs.py
# (dropout 0.1, fourier embedding, data.centered False). The names are the reference's, except `centered` (its
# data.centered); its attention_type "ddpm" is the only attention scoreflow has (`layers.AttnBlock`), so it has no
# field. Two entries are not config fields: `noise_conditioning` is what the reference feeds the network as
# `labels` (999 t for continuous VP and sub-VP, sigma for continuous VE, the integer level for discrete DDPM and
# SMLD training), and `attn_every_up_block` is False because both its NCSNpp and its DDPM attend once per level on
# the way up. models/ddpm.py reads only nf, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv,
# conditional, scale_by_sigma and data.centered; the other DDPM entries are what that file hard-codes.
PINNED_KEYS = ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv", "conditional",
               "fir", "fir_kernel", "skip_rescale", "resblock_type", "progressive", "progressive_input",
               "progressive_combine", "attention_type", "embedding_type", "fourier_scale", "init_scale",
               "scale_by_sigma", "centered", "noise_conditioning", "attn_every_up_block")
NOT_APPLICABLE = {  # Keys the reference network does not read, so a preset may hold anything there.
    "ddpm_cifar10": {"fir_kernel", "progressive_combine", "fourier_scale"},  # No FIR, pyramids or Fourier features.
    "ncsnpp_celeba64": {"fourier_scale"},  # Positional embedding; the CelebA configs do not set it.
}
REFERENCE_DDPMPP = dict(
    nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), dropout=0.1, resamp_with_conv=True,
    conditional=True, fir=False, fir_kernel=(1, 3, 3, 1), skip_rescale=True, resblock_type="biggan",
    progressive="none", progressive_input="none", progressive_combine="sum", attention_type="ddpm",
    embedding_type="positional", fourier_scale=16, init_scale=0.0, scale_by_sigma=False, centered=True,
    noise_conditioning="time", attn_every_up_block=False)
REFERENCE_NCSNPP = dict(
    nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), dropout=0.1, resamp_with_conv=True,
    conditional=True, fir=True, fir_kernel=(1, 3, 3, 1), skip_rescale=True, resblock_type="biggan",
    progressive="none", progressive_input="residual", progressive_combine="sum", attention_type="ddpm",
    embedding_type="fourier", fourier_scale=16, init_scale=0.0, scale_by_sigma=True, centered=False,
    noise_conditioning="sigma", attn_every_up_block=False)
REFERENCE_ARCHITECTURES = {
    "ddpm_cifar10": dict(
        nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, resamp_with_conv=True,
        conditional=True, fir=False, skip_rescale=False, resblock_type="ddpm", progressive="none",
        progressive_input="none", attention_type="ddpm", embedding_type="positional", init_scale=0.0,
        scale_by_sigma=False, centered=True, noise_conditioning="index", attn_every_up_block=False),
    "ddpmpp_cifar10": REFERENCE_DDPMPP,
    "ddpmpp_deep_cifar10": dict(REFERENCE_DDPMPP, num_res_blocks=8),  # The deep configs change only that.
    "ncsnpp_cifar10": REFERENCE_NCSNPP,
    "ncsnpp_deep_cifar10": dict(REFERENCE_NCSNPP, num_res_blocks=8),  # The deep configs change only that.
    "ncsnpp_celeba64": dict(  # Trained on the discrete SMLD ladder (training.continuous = False).
        nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), dropout=0.1, resamp_with_conv=True,
        conditional=True, fir=True, fir_kernel=(1, 3, 3, 1), skip_rescale=True, resblock_type="biggan",
        progressive="none", progressive_input="residual", progressive_combine="sum", attention_type="ddpm",
        embedding_type="positional", init_scale=0.0, scale_by_sigma=True, centered=False,
        noise_conditioning="index", attn_every_up_block=False),
}
# Where scoreflow departs on purpose, as documented in scoreflow/models/presets.py and the configs: DDPM has Ho
# et al.'s attention layout; every preset takes [-1, 1] data (the VE configs set centered=False again); CelebA is
# the continuous-time version of the reference's discrete model.
_CONTINUOUS_CELEBA = dict(embedding_type="fourier", fourier_scale=16.0, noise_conditioning="sigma")
PRESET_DEVIATIONS = {"ddpm_cifar10": dict(attn_every_up_block=True), "ncsnpp_cifar10": dict(centered=True),
                     "ncsnpp_deep_cifar10": dict(centered=True),
                     "ncsnpp_celeba64": dict(centered=True, **_CONTINUOUS_CELEBA)}
CONFIG_DEVIATIONS = {"cifar10_ddpm": dict(attn_every_up_block=True), "celeba64_ncsnpp": _CONTINUOUS_CELEBA}
CONFIG_PRESETS = {  # configs/<name>.py: the preset it trains.
    "cifar10_ddpm": "ddpm_cifar10", "cifar10_ddpmpp_continuous": "ddpmpp_cifar10",
    "cifar10_subvp_ddpmpp_continuous": "ddpmpp_cifar10", "cifar10_ddpmpp_deep_continuous": "ddpmpp_deep_cifar10",
    "cifar10_subvp_ddpmpp_deep_continuous": "ddpmpp_deep_cifar10", "cifar10_ncsnpp_continuous": "ncsnpp_cifar10",
    "cifar10_ncsnpp_deep_continuous": "ncsnpp_deep_cifar10", "celeba64_ncsnpp": "ncsnpp_celeba64",
}


def _expected_architecture(preset, deviations):
  reference = REFERENCE_ARCHITECTURES[preset]
  assert set(reference) == set(PINNED_KEYS) - NOT_APPLICABLE.get(preset, set())
  assert reference["attention_type"] == "ddpm"
  for key, value in deviations.items():  # A deviation must deviate, or it hides a mistake in the table.
    assert key not in reference or reference[key] != value, (preset, key)
  return {key: value for key, value in {**reference, **deviations}.items() if key != "attention_type"}


@pytest.mark.parametrize("name", list(PAPER_CONFIGS))
def test_paper_presets_have_the_reference_architecture(name):
  """Every architecture flag, including those that leave the parameter count unchanged (fir, skip_rescale,
  scale_by_sigma, the embedding, centered, init_scale, the progressive modes)."""
  expected = _expected_architecture(name, PRESET_DEVIATIONS.get(name, {}))
  model = build_model(name)
  assert {key: getattr(model, key) for key in expected} == expected


@pytest.mark.parametrize("config_name", list(CONFIG_PRESETS))
def test_paper_configs_build_the_reference_architecture(config_name):
  """What the configs train: the reference network, fed [0, 1] data exactly where the reference's data.centered is
  False."""
  config = importlib.import_module(f"configs.{config_name}").get_config()
  preset = CONFIG_PRESETS[config_name]
  assert config.model.preset == preset
  expected = _expected_architecture(preset, CONFIG_DEVIATIONS.get(config_name, {}))
  model = build_model(config.model.to_dict())
  assert {key: getattr(model, key) for key in expected} == expected
  assert config.data.scaler == ("centred" if model.centered else "unit_interval")


# --- Shapes and dtypes for every architectural option (traced, not compiled). ------------------------

UNET_VARIANTS = {
    "ddpm_int_cond": dict(resblock_type="ddpm", skip_rescale=False, embedding_type="positional",
                          noise_conditioning="index", attn_every_up_block=True),
    "ddpmpp": dict(),
    "ncsnpp": dict(embedding_type="fourier", noise_conditioning="sigma", scale_by_sigma=True, fir=True,
                   progressive_input="residual"),
    "output_skip_input_skip_cat": dict(fir=True, progressive="output_skip", progressive_input="input_skip",
                                       progressive_combine="cat"),
    "residual_paths_no_fir": dict(progressive="residual", progressive_input="residual"),
    "input_skip_sum_ddpm_fir": dict(resblock_type="ddpm", fir=True, progressive_input="input_skip",
                                    resamp_with_conv=False),
    "unconditional_uncentered": dict(conditional=False, centered=False),
}


def _tiny_unet(**overrides):
  return UNet(**{**dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1), **overrides})


def _abstract_apply(model, x_shape, x_dtype, cond_dtype, train=False):
  x = jax.ShapeDtypeStruct(x_shape, x_dtype)
  cond = jax.ShapeDtypeStruct(x_shape[:1], cond_dtype)

  def run(x, cond):
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, cond)
    out = model.apply(variables, x, cond, train=train, rngs={"dropout": jax.random.key(2)})
    return variables, out

  return jax.eval_shape(run, x, cond)


# Every variant at 8x8 (two levels); those with progressive paths also at 16x16 (three levels, so that the
# pyramids pass through an intermediate level).
SHAPE_CASES = [(variant, 8) for variant in UNET_VARIANTS] + [
    (variant, 16) for variant, options in UNET_VARIANTS.items()
    if any(key.startswith("progressive") for key in options)]


@pytest.mark.parametrize("variant,size", SHAPE_CASES, ids=[f"{v}-{s}x{s}" for v, s in SHAPE_CASES])
def test_unet_output_has_the_input_shape(variant, size):
  overrides = UNET_VARIANTS[variant]
  model = _tiny_unet(ch_mult=(1, 2) if size == 8 else (1, 2, 2), **overrides)
  cond_dtype = jnp.int32 if overrides.get("noise_conditioning") == "index" else jnp.float32
  variables, out = _abstract_apply(model, (3, size, size, 2), jnp.float32, cond_dtype, train=True)
  assert out.shape == (3, size, size, 2) and out.dtype == jnp.float32
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


def test_output_dtype_follows_the_input_and_compute_dtype_is_separate():
  """float64 inputs give float64 outputs (x64 is on in the tests); bfloat16 compute keeps float32 parameters
  and returns the dtype of the input."""
  ncsnpp = dict(fir=True, progressive_input="residual", embedding_type="fourier", noise_conditioning="sigma")
  _, out = _abstract_apply(_tiny_unet(**ncsnpp), (2, 8, 8, 1), jnp.float64, jnp.float64)
  assert out.dtype == jnp.float64
  for model, shape in [(_tiny_unet(dtype=jnp.bfloat16, **ncsnpp), (2, 8, 8, 1)),
                       (ScoreMLP(width=16, depth=2, dtype=jnp.bfloat16), (2, 3))]:
    variables, out = _abstract_apply(model, shape, jnp.float32, jnp.float32)
    assert out.shape == shape and out.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


@pytest.mark.parametrize("data_shape", [(2,), (3, 4)])
def test_mlp_output_has_the_input_shape(data_shape):
  for embedding_type in ("positional", "fourier"):
    model = ScoreMLP(width=16, depth=2, embedding_type=embedding_type, dropout=0.2)
    _, out = _abstract_apply(model, (5,) + data_shape, jnp.float64, jnp.float64, train=True)
    assert out.shape == (5,) + data_shape and out.dtype == jnp.float64


def test_small_presets_fit_their_data():
  for name, shape in [("ddpmpp_digits", (4, 8, 8, 1)), ("ncsnpp_digits", (4, 8, 8, 1)), ("mlp_toy", (4, 2))]:
    variables, out = _abstract_apply(build_model(name), shape, jnp.float32, jnp.float32)
    assert out.shape == shape
    assert sum(leaf.size for leaf in jax.tree.leaves(variables["params"])) < 1_000_000


# --- Numerics of a compiled tiny U-Net (one init and two apply compilations for the whole module). ----

@pytest.fixture(scope="module")
def tiny_ncsnpp():
  """A tiny NCSN++ (FIR, residual input pyramid, output-skip pyramid, Fourier embedding of log sigma, output
  divided by sigma) with zero-initialised output layers, and its jitted init/apply functions."""
  model = _tiny_unet(embedding_type="fourier", noise_conditioning="sigma", scale_by_sigma=True, fir=True,
                     progressive="output_skip", progressive_input="residual", init_scale=0.0, dropout=0.5)
  x = jax.random.normal(_key(0), (2, 8, 8, 1), jnp.float32)
  sigma = jnp.array([0.05, 3.0], jnp.float32)
  variables = jax.jit(model.init)(_key(1), x, sigma)
  evaluate = jax.jit(functools.partial(model.apply, train=False))
  train = jax.jit(lambda v, x, c, key: model.apply(v, x, c, train=True, rngs={"dropout": key}))
  return variables, x, sigma, evaluate, train


def _perturbed(variables, scale=0.1):
  """The variables plus small noise, so that zero-initialised layers pass a signal (in NumPy: nothing to compile)."""
  rng = np.random.default_rng(7)
  return jax.tree.map(
      lambda leaf: jnp.asarray((np.asarray(leaf) + scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype)),
      variables)


def test_zero_init_scale_gives_zero_output_at_initialisation(tiny_ncsnpp):
  variables, x, sigma, evaluate, train = tiny_ncsnpp
  out = evaluate(variables, x, sigma)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)
  np.testing.assert_array_equal(train(variables, x, sigma, _key(3)), 0.0)
  assert np.std(evaluate(_perturbed(variables), x, sigma)) > 0


def test_dropout_is_random_in_training_and_absent_in_evaluation(tiny_ncsnpp):
  variables, x, sigma, evaluate, train = tiny_ncsnpp
  variables = _perturbed(variables)
  out = evaluate(variables, x, sigma)
  np.testing.assert_array_equal(out, evaluate(variables, x, sigma))
  a, b = train(variables, x, sigma, _key(3)), train(variables, x, sigma, _key(4))
  np.testing.assert_array_equal(a, train(variables, x, sigma, _key(3)))
  assert not np.allclose(a, b) and not np.allclose(a, out)
  assert np.all(np.isfinite(out)) and evaluate._cache_size() == 1 and train._cache_size() == 1


def test_mlp_zero_init_and_dropout():
  model = ScoreMLP(width=16, depth=2, dropout=0.5)
  x, cond = jnp.ones((3, 2)), jnp.array([1.0, 10.0, 100.0])
  variables = model.init(_key(0), x, cond)
  np.testing.assert_array_equal(model.apply(variables, x, cond), 0.0)
  variables = _perturbed(variables)
  evaluate = model.apply(variables, x, cond)
  a = model.apply(variables, x, cond, train=True, rngs={"dropout": _key(1)})
  b = model.apply(variables, x, cond, train=True, rngs={"dropout": _key(2)})
  assert not np.allclose(a, b) and not np.allclose(a, evaluate)
  np.testing.assert_array_equal(evaluate, model.apply(variables, x, cond, train=False))
  no_dropout = model.clone(dropout=0.0)
  np.testing.assert_array_equal(no_dropout.apply(variables, x, cond, train=True), evaluate)


# --- Conditioning semantics (shared by both networks; checked on the cheap MLP). ---------------------

def _mlp_and_variables(**kwargs):
  model = ScoreMLP(width=16, depth=2, init_scale=1.0, **kwargs)
  x = jax.random.normal(_key(0), (4, 3), jnp.float64)
  return model, model.init(_key(1), x, jnp.ones((4,))), x


def test_integer_levels_are_embedded_by_value():
  model, variables, x = _mlp_and_variables(noise_conditioning="index")
  levels = jnp.array([0, 7, 500, 999], jnp.int32)
  as_float = model.apply(variables, x, levels.astype(jnp.float64))
  np.testing.assert_array_equal(model.apply(variables, x, levels), as_float)


def test_scale_by_sigma_divides_the_output_by_the_conditioning_sigma():
  sigma = jnp.array([0.01, 0.3, 2.0, 50.0], jnp.float64)
  model, variables, x = _mlp_and_variables(embedding_type="fourier", noise_conditioning="sigma")
  scaled = model.clone(scale_by_sigma=True).apply(variables, x, sigma)
  np.testing.assert_allclose(scaled, model.apply(variables, x, sigma) / sigma[:, None], rtol=1e-12)


def test_sigma_and_log_sigma_conditioning_are_the_same_network():
  sigma = jnp.array([0.01, 0.3, 2.0, 50.0], jnp.float64)
  model, variables, x = _mlp_and_variables(embedding_type="fourier", noise_conditioning="sigma", scale_by_sigma=True)
  log_model = model.clone(noise_conditioning="log_sigma")
  # Both embed the same log(sigma); they differ only by exp(log(sigma)) vs sigma, a few float64 ulps.
  np.testing.assert_allclose(log_model.apply(variables, x, jnp.log(sigma)), model.apply(variables, x, sigma),
                             rtol=1e-12)


def test_scalar_cond_broadcasts_and_a_wrong_shape_is_refused():
  model, variables, x = _mlp_and_variables()
  np.testing.assert_array_equal(model.apply(variables, x, 5.0), model.apply(variables, x, jnp.full((4,), 5.0)))
  with pytest.raises(ValueError, match=r"cond must have shape \[B\] = \(4,\)"):
    model.apply(variables, x, jnp.ones((3,)))


def test_apply_does_not_recompile_on_new_values():
  model, variables, x = _mlp_and_variables(dropout=0.3)
  step = jax.jit(lambda v, x, c, key: model.apply(v, x, c, train=True, rngs={"dropout": key}))
  for i in range(3):
    step(variables, x + i, jnp.full((4,), float(i)), _key(i))
  assert step._cache_size() == 1


def test_models_plug_into_make_score_fn_under_jit():
  sde = sf.VESDE(sigma_min=0.01, sigma_max=50.0)
  model, variables, x = _mlp_and_variables(embedding_type="fourier", noise_conditioning="sigma", scale_by_sigma=True)
  parameterization = sf.ScoreParameterization(sf.NoiseConditioning("sigma"))

  @jax.jit
  def score(variables, x, t):
    return sf.make_score_fn(functools.partial(model.apply, train=False), variables, sde, parameterization)(x, t)

  t = jnp.array([0.1, 0.4, 0.7, 1.0])
  expected = model.apply(variables, x, sde.sigma(t))
  np.testing.assert_allclose(score(variables, x, t), expected, rtol=1e-12)


# --- FIR resampling. ----------------------------------------------------------------------------------

EVEN_KERNELS = [(1, 1), (1, 3, 3, 1), (1, 5, 10, 10, 5, 1)]


def _upfirdn2d_reference(x, filter_2d, up, down, pad):
  """NumPy/SciPy definition: zero-stuff, pad (negative crops), full 2-D convolution's valid part, stride."""
  import scipy.signal  # pylint: disable=g-import-not-at-top

  batch, height, width, channels = x.shape
  stuffed = np.zeros((batch, height * up, width * up, channels))
  stuffed[:, ::up, ::up] = x
  before, after = pad
  padded = np.pad(stuffed, ((0, 0), (max(before, 0), max(after, 0)), (max(before, 0), max(after, 0)), (0, 0)))
  crop = lambda n: slice(max(-before, 0), n - max(-after, 0))
  padded = padded[:, crop(padded.shape[1]), crop(padded.shape[2])]
  out = np.stack([np.stack([scipy.signal.convolve2d(padded[b, :, :, c], filter_2d, mode="valid")
                            for c in range(channels)], -1) for b in range(batch)])
  return out[:, ::down, ::down]


@pytest.mark.parametrize("filter_kind", ["separable", "general"])
@pytest.mark.parametrize("up,down,pad", [(1, 1, (0, 0)), (2, 1, (2, 1)), (1, 2, (1, 1)), (2, 2, (3, 0)),
                                         (1, 1, (-1, 2)), (3, 1, (1, 2))])
def test_upfirdn2d_matches_its_definition(filter_kind, up, down, pad):
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 7, 6, 3))
  if filter_kind == "separable":
    filter_2d = np.outer([1.0, 3.0, 3.0, 1.0], [1.0, -2.0, 0.5, 0.0])  # Asymmetric, with a zero tap.
  else:
    filter_2d = rng.standard_normal((3, 3))
  got = layers.upfirdn2d(jnp.asarray(x), filter_2d, up=up, down=down, pad=pad)
  np.testing.assert_allclose(got, _upfirdn2d_reference(x, filter_2d, up, down, pad), rtol=1e-12, atol=1e-12)


def test_upfirdn2d_keeps_the_input_dtype_and_rejects_traced_filters():
  x = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
  assert layers.upsample_2d(x).dtype == jnp.bfloat16 and layers.downsample_2d(x).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="concrete values"):
    jax.jit(lambda f: layers.upfirdn2d(x, f))(jnp.ones((2, 2)))


@pytest.mark.parametrize("kernel", EVEN_KERNELS)
def test_fir_upsampling_is_the_adjoint_of_downsampling(kernel):
  """<up(y), x> = 4 <y, down(x)> for a symmetric even-length kernel: the same filter, zero-inserted vs strided."""
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((2, 8, 8, 3)), rng.standard_normal((2, 4, 4, 3))
  lhs = jnp.vdot(layers.upsample_2d(jnp.asarray(y), kernel), x)
  rhs = 4 * jnp.vdot(y, layers.downsample_2d(jnp.asarray(x), kernel))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-12)


@pytest.mark.parametrize("kernel,up_border,down_border", [((1, 1), 0, 0), ((1, 3, 3, 1), 1, 1),
                                                       ((1, 5, 10, 10, 5, 1), 2, 1)])
def test_fir_resampling_keeps_constant_images_away_from_the_border(kernel, up_border, down_border):
  """Pixels outside the image count as zero (as in StyleGAN2 and NCSN++), so only a border changes: a tap
  length of 2m reaches m - 1 pixels past the edge, which is m - 1 output pixels after zero-insertion (up) and
  ceil((m - 1) / 2) after striding (down)."""
  constant = jnp.full((1, 8, 8, 1), 2.5, jnp.float64)
  up, down = layers.upsample_2d(constant, kernel), layers.downsample_2d(constant, kernel)
  assert up.shape == (1, 16, 16, 1) and down.shape == (1, 4, 4, 1)
  inner_up = up[:, up_border:16 - up_border, up_border:16 - up_border]
  inner_down = down[:, down_border:4 - down_border, down_border:4 - down_border]
  np.testing.assert_allclose(inner_up, 2.5, rtol=1e-14)
  np.testing.assert_allclose(inner_down, 2.5, rtol=1e-14)
  if up_border:
    assert not np.allclose(up[0, 0, 0], 2.5)  # The zero padding is visible at the corner.
  else:
    np.testing.assert_allclose(jnp.sum(up), 4 * jnp.sum(constant), rtol=1e-14)  # Each pixel covers 2x2.


def test_fir_with_a_box_kernel_is_nearest_neighbour_and_average_pooling():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 3)))
  np.testing.assert_allclose(layers.upsample_2d(x, (1, 1)), layers.naive_upsample_2d(x), rtol=1e-14)
  np.testing.assert_allclose(layers.downsample_2d(x, (1, 1)), layers.naive_downsample_2d(x), rtol=1e-14)
  np.testing.assert_allclose(layers.downsample_2d(layers.upsample_2d(x, (1, 1)), (1, 1)), x, rtol=1e-14)


def test_fused_fir_convolutions_are_aligned_with_their_unfused_forms():
  """Fused up/down-convolutions equal 'FIR resample, then convolve' (or the reverse) away from the border, and
  exactly with a centred delta kernel (which checks the padding)."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 12, 12, 3)))
  weight = jnp.asarray(rng.standard_normal((3, 3, 3, 4)))
  same_conv = lambda v: jax.lax.conv_general_dilated(v, weight, (1, 1), "SAME",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  up = layers.upsample_conv_2d(x, weight)
  np.testing.assert_allclose(up[:, 3:-3, 3:-3], same_conv(layers.upsample_2d(x))[:, 3:-3, 3:-3], rtol=1e-10)
  down = layers.conv_downsample_2d(x, weight)
  np.testing.assert_allclose(down[:, 2:-2, 2:-2], layers.downsample_2d(same_conv(x))[:, 2:-2, 2:-2], rtol=1e-10)
  delta = jnp.zeros((3, 3, 3, 3)).at[1, 1].set(jnp.eye(3))
  np.testing.assert_allclose(layers.upsample_conv_2d(x, delta), layers.upsample_2d(x), atol=1e-14)
  np.testing.assert_allclose(layers.conv_downsample_2d(x, delta), layers.downsample_2d(x), atol=1e-14)


def test_embeddings():
  cond = jnp.array([0.0, 1.0, 999.0], jnp.float64)
  embedding = layers.sinusoidal_embedding(cond, 7)
  assert embedding.shape == (3, 7) and embedding.dtype == jnp.float64
  np.testing.assert_allclose(embedding[0], [0, 0, 0, 1, 1, 1, 0])  # sin(0) = 0, cos(0) = 1, zero padding.
  np.testing.assert_allclose(embedding[1, 0], np.sin(1.0))  # The first frequency is 1.
  np.testing.assert_allclose(embedding[1, 2], np.sin(1e-4), rtol=1e-12)  # The last is 1/max_positions.
  fourier = layers.fourier_embedding(cond.astype(jnp.float32), 5, scale=16.0)
  assert fourier.shape == (3, 10) and fourier.dtype == jnp.float32
  np.testing.assert_allclose(np.sum(fourier.reshape(3, 2, 5) ** 2, axis=1), 1.0, rtol=1e-5)  # sin^2 + cos^2.


# --- Building from configs, and errors. ----------------------------------------------------------------

def test_build_model_from_names_mappings_and_overrides():
  assert isinstance(build_model("mlp_toy"), ScoreMLP)
  model = build_model({"preset": "ncsnpp_cifar10", "ch_mult": [1, 2], "dtype": "bfloat16"}, num_res_blocks=8)
  assert isinstance(model, UNet) and model.ch_mult == (1, 2) and model.num_res_blocks == 8
  assert model.dtype == jnp.bfloat16 and model.fir and model.scale_by_sigma
  model = build_model({"architecture": "mlp", "width": 8})
  assert isinstance(model, ScoreMLP) and model.width == 8
  for name in PRESETS:
    build_model(name)


@pytest.mark.parametrize("spec,overrides,message", [
    ("ncsnpp_cifar100", {}, "unknown preset 'ncsnpp_cifar100'"),
    ({"architecture": "transformer"}, {}, "architecture must be one of"),
    ("ddpmpp_cifar10", {"channels": 64}, r"UNet does not take \['channels'\]"),
    ("ddpmpp_cifar10", {"embedding_type": "learned"}, "embedding_type must be one of"),
    ("ddpmpp_cifar10", {"progressive_input": "cat"}, "progressive_input must be one of"),
    ("ddpmpp_cifar10", {"scale_by_sigma": True}, "noise_conditioning must be 'sigma' or 'log_sigma'"),
    ("mlp_toy", {"noise_conditioning": "snr"}, "noise_conditioning must be one of"),
    ("ddpmpp_cifar10", {"dropout": 1.0}, r"dropout must lie in \[0, 1\)"),
])
def test_bad_configurations_are_refused_at_construction(spec, overrides, message):
  with pytest.raises(ValueError, match=message):
    build_model(spec, **overrides)


def test_bad_inputs_are_refused_at_trace_time():
  model = _tiny_unet(ch_mult=(1, 2, 2))
  with pytest.raises(ValueError, match=r"image size 6 must be divisible by 2\*\*\(len\(ch_mult\) - 1\) = 4"):
    _abstract_apply(model, (2, 6, 6, 1), jnp.float32, jnp.float32)
  with pytest.raises(ValueError, match=r"square images \[B, H, W, C\]"):
    _abstract_apply(model, (2, 8, 8), jnp.float32, jnp.float32)


# --- GroupNorm and the residual-stream barrier (the CPU speed-ups of the train step). -------------------------

def _group_norm_reference(x, scale, bias, groups, eps=1e-6):
  """GroupNorm from its definition in float64 NumPy: two-pass mean and variance of each example's group."""
  b, *pixels, c = x.shape
  grouped = x.reshape(b, -1, groups, c // groups)
  mean = grouped.mean(axis=(1, 3), keepdims=True)
  var = ((grouped - mean) ** 2).mean(axis=(1, 3), keepdims=True)
  return ((grouped - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_group_norm_and_its_derivatives_match_the_definition():
  """Forward against the float64 definition; the JVP and the gradient (JAX's transpose of the written-out JVP)
  against central differences of the definition along random directions. Dropping the JVP's variance term
  misses the difference by far more than the tolerance, so the test can tell."""
  rng = np.random.default_rng(0)
  groups, shape = 3, (2, 5, 4, 12)
  x = rng.normal(size=shape) * rng.uniform(0.5, 3, size=12) + rng.normal(size=12)  # Unequal group statistics.
  scale, bias = rng.normal(size=12), rng.normal(size=12)
  y = layers.group_norm_apply(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), groups)
  np.testing.assert_allclose(y, _group_norm_reference(x, scale, bias, groups), rtol=0, atol=1e-12)

  directions = (rng.normal(size=shape), rng.normal(size=12), rng.normal(size=12))
  h = 1e-5
  finite_difference = (_group_norm_reference(*(p + h * d for p, d in zip((x, scale, bias), directions)), groups)
                       - _group_norm_reference(*(p - h * d for p, d in zip((x, scale, bias), directions)),
                                               groups)) / (2 * h)
  apply = functools.partial(layers.group_norm_apply, groups=groups)
  _, tangent = jax.jvp(apply, (x, scale, bias), directions)
  np.testing.assert_allclose(tangent, finite_difference, rtol=0, atol=1e-8)

  cotangent = rng.normal(size=shape)
  grads = jax.grad(lambda *p: jnp.sum(apply(*p) * cotangent), argnums=(0, 1, 2))(x, scale, bias)
  directional = sum(float(jnp.sum(g * d)) for g, d in zip(grads, directions))
  assert abs(directional - float(np.sum(finite_difference * cotangent))) < 1e-7

  mean = x.reshape(2, -1, groups, 4).mean(axis=(1, 3), keepdims=True)
  inv_std = 1 / np.sqrt(x.reshape(2, -1, groups, 4).var(axis=(1, 3), keepdims=True) + 1e-6)
  dx = directions[0].reshape(2, -1, groups, 4)
  without_variance_term = (inv_std * (dx - dx.mean(axis=(1, 3), keepdims=True))).reshape(shape) * scale
  without_variance_term += ((x.reshape(dx.shape) - mean) * inv_std).reshape(shape) * directions[1] + directions[2]
  assert np.max(np.abs(without_variance_term - finite_difference)) > 1e3 * 1e-8


def test_group_norm_module_is_flax_group_norm_with_the_same_parameters():
  """The module keeps Flax's parameter names and shapes (so checkpoints and the importers are unchanged) and its
  values; float32 statistics under bfloat16 compute; channels that the groups do not divide are refused."""
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16), jnp.float32) * 3 + 1
  ours, flax_norm = layers.GroupNorm(num_groups=4), nn.GroupNorm(num_groups=4, epsilon=1e-6)
  variables = ours.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, flax_norm.init(jax.random.key(1), x))
  variables = jax.tree.map(lambda v: v + jax.random.normal(jax.random.key(2), v.shape, v.dtype), variables)
  np.testing.assert_allclose(ours.apply(variables, x), flax_norm.apply(variables, x), rtol=0, atol=2e-5)
  half = layers.GroupNorm(num_groups=4, dtype=jnp.bfloat16).apply(variables, x)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(half.astype(jnp.float32), flax_norm.apply(variables, x), rtol=0, atol=0.1)
  with pytest.raises(ValueError, match="C divisible by num_groups=5"):
    layers.GroupNorm(num_groups=5).init(jax.random.key(1), x)


def test_residual_stream_barrier_is_the_identity_in_every_mode_and_a_conditional_on_cpu():
  """Values, gradients, JVPs and vmapped linearisations through a residual block's skip are those of the plain
  formula; a non-finite primal gives a non-finite tangent; on CPU the compiled backward pass keeps the
  conditional that stops XLA fusing the cotangent chain (if a JAX or XLA update dropped it, this says so)."""
  x = jnp.linspace(-2.0, 2.0, 24).reshape(2, 3, 4)

  def block(x):
    return jnp.sin(layers._skip(x, 3 * x ** 2, True))

  def plain(x):
    return jnp.sin((x + 3 * x ** 2) / np.sqrt(2.0))

  loss = lambda f: (lambda x: jnp.sum(f(x) ** 2))
  np.testing.assert_allclose(block(x), plain(x), rtol=1e-14)
  np.testing.assert_allclose(jax.jit(jax.grad(loss(block)))(x), jax.grad(loss(plain))(x), rtol=1e-13)
  probes = jnp.stack([jnp.ones_like(x), x])
  _, linear = jax.linearize(block, x)
  _, linear_plain = jax.linearize(plain, x)
  np.testing.assert_allclose(jax.vmap(linear)(probes), jax.vmap(linear_plain)(probes), rtol=1e-13)
  _, tangent = jax.jvp(block, (x.at[0, 0, 0].set(jnp.nan),), (jnp.ones_like(x),))
  assert not np.isfinite(tangent).any()
  if jax.default_backend() == "cpu":
    compiled = jax.jit(jax.grad(loss(block))).lower(x).compile().as_text()
    assert " conditional(" in compiled
