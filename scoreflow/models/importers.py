r"""Importers (and exporters) for the published score_sde checkpoints of Song et al. (2021).

Two reference codes published the paper's weights:

* `yang-song/score_sde_pytorch`: `checkpoint_N.pth`, a `torch.save` of
  `{"model": state_dict, "ema": {"decay", "num_updates", "shadow_params"}, "optimizer": ..., "step": N}`, where the
  model is wrapped in `torch.nn.DataParallel` (keys start with `module.`) and `shadow_params` is the list of EMA
  copies of the *trainable* parameters in `model.parameters()` order. Read by :func:`from_score_sde_pytorch`,
  written (state dict only) by :func:`to_score_sde_pytorch`.
* `yang-song/score_sde` (JAX/Flax): `checkpoint_N`, a `flax.training.checkpoints` msgpack of its `State`
  (`step`, `optimizer` = `{"target": params, "state": ...}`, `lr`, `model_state`, `ema_rate`, `params_ema`, `rng`).
  Read by :func:`from_score_sde_flax`, written (params only) by :func:`to_score_sde_flax`.

Both hold the NCSN++/DDPM++ network (`models/ncsnpp.py`, class `NCSNpp`) or the DDPM network (`models/ddpm.py`,
class `DDPM`), which :class:`~scoreflow.models.UNet` implements with the same layers in the same order.

Key scheme
----------
The mapping is not a zip of two flat lists: :func:`_layout` replays the network's construction (the loop of both
`NCSNpp.__init__` and :meth:`UNet.__call__`) and yields one record per layer with its three names. The PyTorch
network keeps its layers in one `nn.ModuleList` `all_modules`, numbered in construction order (every layer takes a
number, also those without parameters such as a `Downsample` without convolution); Flax (ours and the JAX reference)
names a layer by its class and a per-class counter inside its parent. In order, PyTorch `all_modules.i` ->
score_sde (Flax, top level) -> scoreflow:

* `GaussianFourierProjection` (`.W`) -> score_sde `GaussianFourierProjection_0/W` -> ours
  `NoiseEmbedding_0/frequencies` (optional, see below);
* the two `nn.Linear` of the embedding -> `Dense_0`, `Dense_1` -> `NoiseEmbedding_0/Dense_0`, `Dense_1`;
* the input `conv3x3` -> `Conv_0` -> `Conv_0`;
* `ResnetBlockBigGANpp` -> `ResnetBlockBigGANpp_k` -> `ResnetBlockBigGAN_k`;
* `ResnetBlockDDPMpp` (`ResnetBlockDDPM`) -> `ResnetBlockDDPMpp_k` (`ResnetBlockDDPM_k`) -> `ResnetBlockDDPM_k`;
* `AttnBlockpp` (`AttnBlock`) -> `AttnBlockpp_k` (`AttnBlock_k`) -> `AttnBlock_k`;
* `Downsample`, `Upsample`, `Combine` -> `Downsample_k`, `Upsample_k`, `Combine_k` -> the same;
* the output (and progressive output) `nn.GroupNorm`, `conv3x3` -> `GroupNorm_k`, `Conv_k` -> the same

(in parentheses: the DDPM network of `models/ddpm.py`). Inside a block the sub-layers keep their names
(`GroupNorm_0`, `Conv_0`, `Dense_0`, `GroupNorm_1`, `Conv_1`, `Conv_2`) except the 1x1 "NIN" layers of the
references, which are `Dense` layers here: a residual block's `NIN_0` is our `Dense_1` (`Dense_0` is the
embedding projection) and an attention block's `NIN_0..3` are our `Dense_0..3`; the FIR-fused convolution
`Conv2d_0` of a resampler is our `FIRConv_0`. Per leaf:

==============  ===============================  =============================  ==============================
layer           PyTorch                          score_sde (Flax)               scoreflow
==============  ===============================  =============================  ==============================
convolution     `weight` [O, I, kh, kw], `bias`  `kernel` [kh, kw, I, O]        `kernel` [kh, kw, I, O], `bias`
FIR conv.       `weight` [O, I, kh, kw], `bias`  `weight` [kh, kw, I, O]        `kernel` [kh, kw, I, O], `bias`
linear          `weight` [O, I], `bias`          `kernel` [I, O]                `kernel` [I, O], `bias`
NIN             `W` [I, O], `b`                  `W` [I, O], `b`                `kernel` [I, O], `bias`
group norm      `weight`, `bias`                 `scale`, `bias`                `scale`, `bias`
Fourier         `W` [nf] (frozen)                `W` [nf] (stop_gradient)       `frequencies` [nf]
==============  ===============================  =============================  ==============================

so a PyTorch convolution is transposed by `(2, 3, 1, 0)` and a linear weight by `(1, 0)`; everything else is
copied. The FIR filters, the sinusoidal embedding and the PyTorch `sigmas` buffer are not parameters (the buffer,
a function of the config, is accepted and dropped on import and written only when :func:`to_score_sde_pytorch`
is given one).

Fourier features. The references draw the frequencies `W` of NCSN++'s embedding at random at initialisation and
freeze them, so a checkpoint's embedding depends on its own `W`. scoreflow's UNet derives them from a fixed seed
(:func:`~scoreflow.models.layers.fourier_frequencies`) and takes a checkpoint's through the optional parameter
`NoiseEmbedding_0/frequencies` (read under `stop_gradient`; a freshly initialised network has no such leaf). An
importer adds that leaf only when the checkpoint's `W` differs from the seed's; an exporter writes the leaf, or
the seed's frequencies when there is none.

Which layers exist depends on the image size (attention at `attn_resolutions`) and the number of channels: both are
known for the presets (CIFAR-10 32x32x3, CelebA 64x64x3, digits 8x8x1), read from the checkpoint otherwise (the
input convolution's shape; the one candidate size whose layout has exactly the checkpoint's keys), or given.
`centered`, `scale_by_sigma`, dropout and the conditioning kind change no parameter: choose them in `spec` as the
checkpoint was trained (the paper's VE networks: `centered=False`, conditioning on sigma).

Limits: networks with `conditional=False` (the PyTorch blocks keep an unused embedding projection) and
`attn_every_up_block=True` (Ho et al.'s TF layout, which neither reference has) are refused. The DDPM network of
`models/ddpm.py` normalises with 32 groups at every width; :func:`~scoreflow.models.layers.num_groups` agrees for
widths >= 128, i.e. for every published configuration.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from scoreflow.models import layers
from scoreflow.models.presets import PRESETS, build_model
from scoreflow.models.unet import UNet

__all__ = ["from_score_sde_pytorch", "to_score_sde_pytorch", "from_score_sde_flax", "to_score_sde_flax",
           "PRESET_IMAGE_SHAPES"]

PRESET_IMAGE_SHAPES: dict[str, tuple[int, int]] = {
    "ddpm_cifar10": (32, 3), "ddpmpp_cifar10": (32, 3), "ddpmpp_deep_cifar10": (32, 3), "ncsnpp_cifar10": (32, 3),
    "ncsnpp_deep_cifar10": (32, 3), "ncsnpp_celeba64": (64, 3), "ddpmpp_digits": (8, 1), "ncsnpp_digits": (8, 1),
}
"""`(image size, channels)` of each U-Net preset's data, the default layout of the importers."""

_FREQUENCIES = "frequencies"


# --- The key scheme. ------------------------------------------------------------------------------

def _oihw_to_hwio(w):
  return np.transpose(w, (2, 3, 1, 0))


def _hwio_to_oihw(w):
  return np.transpose(w, (3, 2, 0, 1))


def _identity(w):
  return w


def _transpose(w):
  return np.transpose(w)


# Per layer kind: (PyTorch leaf, score_sde Flax leaf, scoreflow leaf, PyTorch -> scoreflow, scoreflow -> PyTorch),
# the PyTorch leaves in their registration order (that of `model.parameters()`).
_LEAVES: dict[str, tuple[tuple[str, str, str, Callable, Callable], ...]] = {
    "conv": (("weight", "kernel", "kernel", _oihw_to_hwio, _hwio_to_oihw),
             ("bias", "bias", "bias", _identity, _identity)),
    "fir_conv": (("weight", "weight", "kernel", _oihw_to_hwio, _hwio_to_oihw),
                 ("bias", "bias", "bias", _identity, _identity)),
    "linear": (("weight", "kernel", "kernel", _transpose, _transpose),
               ("bias", "bias", "bias", _identity, _identity)),
    "nin": (("W", "W", "kernel", _identity, _identity),
            ("b", "b", "bias", _identity, _identity)),
    "group_norm": (("weight", "scale", "scale", _identity, _identity),
                   ("bias", "bias", "bias", _identity, _identity)),
    "fourier": (("W", "W", _FREQUENCIES, _identity, _identity),),
}


@dataclasses.dataclass(frozen=True)
class _Layer:
  """One parameterised layer: its kind (a key of `_LEAVES`) and its module path in the three codes."""
  kind: str
  torch: str              # e.g. "all_modules.5.Conv_0"
  flax: tuple[str, ...]   # scoreflow, e.g. ("ResnetBlockBigGAN_1", "Conv_0")
  jax: tuple[str, ...]    # score_sde, e.g. ("ResnetBlockBigGANpp_1", "Conv_0")


@dataclasses.dataclass(frozen=True)
class _Leaf:
  torch_key: str
  jax_key: str
  flax_key: str
  to_flax: Callable
  to_torch: Callable
  trainable: bool


def _layout(model: UNet, image_size: int, network: str) -> Iterator[_Layer]:
  """The layers of `model` for `image_size` in construction order, with their names in the three codes.

  `network` is `"ncsnpp"` (score_sde's `NCSNpp`, any block type) or `"ddpm"` (its `DDPM`); they differ only in the
  Flax class names of the DDPM blocks. Follows `NCSNpp.__init__` (PyTorch) and :meth:`UNet.__call__` step by step.
  """
  counters: collections.Counter = collections.Counter()
  index = iter(range(1 << 30))
  block_class = "ResnetBlockBigGAN" if model.resblock_type == "biggan" else "ResnetBlockDDPM"
  jax_class = {"ResnetBlockBigGAN": "ResnetBlockBigGANpp", "ResnetBlockDDPM": "ResnetBlockDDPMpp",
               "AttnBlock": "AttnBlockpp"}
  if network == "ddpm":
    jax_class = {}

  def module(cls):
    """A new top-level module: (its PyTorch list index, our name, score_sde's name)."""
    k = counters[cls]
    counters[cls] += 1
    return next(index), f"{cls}_{k}", f"{jax_class.get(cls, cls)}_{k}"

  def leaf_layer(kind, cls):
    i, ours, theirs = module(cls)
    return _Layer(kind, f"all_modules.{i}", (ours,), (theirs,))

  def sub(kind, i, ours, theirs, torch_name, flax_name, jax_name=None):
    return _Layer(kind, f"all_modules.{i}.{torch_name}", (ours, flax_name), (theirs, jax_name or torch_name))

  def resblock(in_ch, out_ch, resample=False):
    i, ours, theirs = module(block_class)
    yield sub("group_norm", i, ours, theirs, "GroupNorm_0", "GroupNorm_0")
    yield sub("conv", i, ours, theirs, "Conv_0", "Conv_0")
    yield sub("linear", i, ours, theirs, "Dense_0", "Dense_0")
    yield sub("group_norm", i, ours, theirs, "GroupNorm_1", "GroupNorm_1")
    yield sub("conv", i, ours, theirs, "Conv_1", "Conv_1")
    if block_class == "ResnetBlockBigGAN":
      if in_ch != out_ch or resample:
        yield sub("conv", i, ours, theirs, "Conv_2", "Conv_2")
    elif in_ch != out_ch:
      yield sub("nin", i, ours, theirs, "NIN_0", "Dense_1")

  def attention():
    i, ours, theirs = module("AttnBlock")
    yield sub("group_norm", i, ours, theirs, "GroupNorm_0", "GroupNorm_0")
    for j in range(4):
      yield sub("nin", i, ours, theirs, f"NIN_{j}", f"Dense_{j}")

  def resampler(cls, with_conv):
    i, ours, theirs = module(cls)
    if with_conv:
      if model.fir:
        yield sub("fir_conv", i, ours, theirs, "Conv2d_0", "FIRConv_0")
      else:
        yield sub("conv", i, ours, theirs, "Conv_0", "Conv_0")

  def output():
    yield leaf_layer("group_norm", "GroupNorm")
    yield leaf_layer("conv", "Conv")

  nf, num_levels = model.nf, len(model.ch_mult)
  resolutions = [image_size // 2**level for level in range(num_levels)]
  if model.embedding_type == "fourier":
    i = next(index)
    yield _Layer("fourier", f"all_modules.{i}", ("NoiseEmbedding_0",), ("GaussianFourierProjection_0",))
  for j in range(2):
    i = next(index)
    yield _Layer("linear", f"all_modules.{i}", ("NoiseEmbedding_0", f"Dense_{j}"), (f"Dense_{j}",))
  yield leaf_layer("conv", "Conv")

  # 1. Downsampling path.
  channels = [nf]
  in_ch = nf
  for level in range(num_levels):
    for _ in range(model.num_res_blocks):
      out_ch = nf * model.ch_mult[level]
      yield from resblock(in_ch, out_ch)
      in_ch = out_ch
      if resolutions[level] in model.attn_resolutions:
        yield from attention()
      channels.append(in_ch)
    if level != num_levels - 1:
      if model.resblock_type == "ddpm":
        yield from resampler("Downsample", model.resamp_with_conv)
      else:
        yield from resblock(in_ch, in_ch, resample=True)
      if model.progressive_input == "input_skip":
        i, ours, theirs = module("Combine")
        yield sub("conv", i, ours, theirs, "Conv_0", "Conv_0")
        if model.progressive_combine == "cat":
          in_ch *= 2
      elif model.progressive_input == "residual":
        yield from resampler("Downsample", True)
      channels.append(in_ch)

  # 2. Middle.
  in_ch = channels[-1]
  yield from resblock(in_ch, in_ch)
  yield from attention()
  yield from resblock(in_ch, in_ch)

  # 3. Upsampling path.
  for level in reversed(range(num_levels)):
    for _ in range(model.num_res_blocks + 1):
      out_ch = nf * model.ch_mult[level]
      yield from resblock(in_ch + channels.pop(), out_ch)
      in_ch = out_ch
    if resolutions[level] in model.attn_resolutions:
      yield from attention()
    if model.progressive == "output_skip" or (model.progressive == "residual" and level == num_levels - 1):
      yield from output()
    elif model.progressive == "residual":
      yield from resampler("Upsample", True)
    if level != 0:
      if model.resblock_type == "ddpm":
        yield from resampler("Upsample", model.resamp_with_conv)
      else:
        yield from resblock(in_ch, in_ch, resample=True)

  # 4. Output.
  if model.progressive != "output_skip":
    yield from output()


def _leaves(model: UNet, image_size: int, network: str) -> list[_Leaf]:
  """Every parameter of the layout, in PyTorch's `model.parameters()` order."""
  out = []
  for layer in _layout(model, image_size, network):
    for torch_leaf, jax_leaf, flax_leaf, to_flax, to_torch in _LEAVES[layer.kind]:
      out.append(_Leaf(f"{layer.torch}.{torch_leaf}", "/".join(layer.jax + (jax_leaf,)),
                       "/".join(layer.flax + (flax_leaf,)), to_flax, to_torch, layer.kind != "fourier"))
  return out


# --- Specs, shapes and validation. ----------------------------------------------------------------

def _unet(spec) -> UNet:
  model = build_model(spec)
  if not isinstance(model, UNet):
    raise ValueError(f"score_sde importers: spec must describe a UNet (the score_sde networks), got "
                     f"{type(model).__name__}.")
  if not model.conditional:
    raise ValueError("score_sde importers: conditional=False is not supported (score_sde_pytorch's blocks keep an "
                     "unused embedding projection that scoreflow's do not have); use a conditional network.")
  if model.attn_every_up_block:
    raise ValueError("score_sde importers: attn_every_up_block=True (Ho et al.'s TF layout) has no score_sde "
                     "counterpart; score_sde's DDPM is build_model('ddpm_cifar10', attn_every_up_block=False).")
  return model


def _preset_name(spec) -> str | None:
  if isinstance(spec, str):
    return spec
  if isinstance(spec, Mapping):
    return spec.get("preset")
  return None


def _candidate_sizes(model: UNet, preferred: int | None) -> list[int]:
  """One image size per distinct attention layout (the preferred size first)."""
  num_levels = len(model.ch_mult)
  base = 2 ** (num_levels - 1)
  attn = set(model.attn_resolutions)
  sizes = [r * 2**level for r in sorted(attn) for level in range(num_levels) if (r * 2**level) % base == 0]
  size = base
  while any(size // 2**level in attn for level in range(num_levels)):
    size += base
  sizes.append(size)
  if preferred is not None:
    sizes.insert(0, preferred)
  patterns, out = set(), []
  for size in sizes:
    pattern = tuple(size // 2**level in attn for level in range(num_levels))
    if pattern not in patterns:
      patterns.add(pattern)
      out.append(size)
  return out


def _flax_shapes(model: UNet, image_size: int, channels: int) -> dict[str, tuple[int, ...]]:
  """`{"a/b/kernel": shape}` of `model`'s parameters for `[1, image_size, image_size, channels]` inputs."""
  x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  cond = jax.ShapeDtypeStruct((1,), jnp.float32)
  variables = jax.eval_shape(lambda x, c: model.init(jax.random.key(0), x, c), x, cond)
  flat = traverse_util.flatten_dict(variables["params"], sep="/")
  return {key: tuple(value.shape) for key, value in flat.items()}


@dataclasses.dataclass
class _Plan:
  """The leaves of one layout with the scoreflow shape of each."""
  model: UNet
  image_size: int
  channels: int
  leaves: list[_Leaf]
  shapes: dict[str, tuple[int, ...]]   # scoreflow key -> shape (the Fourier frequencies included)

  def torch_shape(self, leaf: _Leaf) -> tuple[int, ...]:
    return tuple(leaf.to_torch(np.empty(self.shapes[leaf.flax_key], np.bool_)).shape)


def _plan(model: UNet, image_size: int, channels: int, network: str) -> _Plan:
  shapes = _flax_shapes(model, image_size, channels)
  leaves = _leaves(model, image_size, network)
  scheme = {leaf.flax_key for leaf in leaves if leaf.trainable}
  if scheme != set(shapes):
    missing, extra = sorted(set(shapes) - scheme), sorted(scheme - set(shapes))
    raise ValueError(f"score_sde importers: this UNet configuration is outside the score_sde key scheme (scoreflow "
                     f"parameters without a counterpart: {missing[:5]}; scheme entries the UNet lacks: {extra[:5]}).")
  if model.embedding_type == "fourier":
    shapes[f"NoiseEmbedding_0/{_FREQUENCIES}"] = (model.nf,)
  return _Plan(model, image_size, channels, leaves, shapes)


def _check(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str,
           optional: tuple[str, ...] = ()) -> None:
  """One ValueError listing every missing, unexpected and wrongly shaped key (with both shapes)."""
  problems = []
  for key in expected:
    if key not in found and key not in optional:
      problems.append(f"missing key {key!r} (expected shape {expected[key]})")
  for key in found:
    if key not in expected:
      problems.append(f"unexpected key {key!r} (shape {found[key]})")
    elif tuple(found[key]) != tuple(expected[key]):
      problems.append(f"key {key!r} has shape {tuple(found[key])}, expected {tuple(expected[key])}")
  if problems:
    shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
    raise ValueError(f"{what}: {len(problems)} mismatch(es) with the spec's layout: {shown}. Check that the spec "
                     "(preset and overrides: nf, ch_mult, num_res_blocks, attn_resolutions, resblock_type, fir, "
                     "progressive paths, embedding_type) and image_size match the checkpoint's config.")


def _resolve(spec, image_size, channels, network, found, side: str, what: str) -> _Plan:
  """The plan whose `side` ("torch", "jax" or "flax") keys and shapes are those found (image size inferred when
  not given: the preset's, else the one candidate that fits)."""
  model = _unet(spec)
  preset = _preset_name(spec)
  default_size, default_channels = PRESET_IMAGE_SHAPES.get(preset, (None, None))
  channels = channels or default_channels
  if channels is None:
    raise ValueError(f"{what}: cannot tell the number of image channels; pass channels=...")
  sizes = [image_size] if image_size is not None else _candidate_sizes(model, default_size)
  plans, matches = [], []
  for size in sizes:
    plan = _plan(model, size, channels, network)
    expected = _expected(plan, side)
    plans.append((plan, expected))
    if (set(found) <= set(expected) and set(expected) - set(found) <= _optional(plan, side)
        and all(tuple(found[k]) == tuple(expected[k]) for k in found)):
      if image_size is not None or default_size == size or side != "flax":
        return plan  # A given or preset size, or reference keys (which place every layer): no ambiguity.
      matches.append(plan)
  if matches:
    # Our parameter names do not say on which level an attention block sits; the references' order does.
    layouts = {tuple(leaf.torch_key for leaf in plan.leaves) for plan in matches}
    if len(layouts) > 1:
      raise ValueError(f"{what}: the parameters fit several image sizes ({[p.image_size for p in matches]}) that "
                       "place the attention blocks differently in the reference's layout; pass image_size=...")
    return matches[0]
  plan, expected = plans[0]
  _check(found, expected, what, tuple(_optional(plan, side)))
  return plan  # Unreachable: _check raised.


def _expected(plan: _Plan, side: str) -> dict[str, tuple[int, ...]]:
  if side == "flax":
    return dict(plan.shapes)
  if side == "torch":
    return {leaf.torch_key: plan.torch_shape(leaf) for leaf in plan.leaves}
  return {leaf.jax_key: plan.shapes[leaf.flax_key] for leaf in plan.leaves}


def _optional(plan: _Plan, side: str) -> set[str]:
  """Keys that may be absent: our Fourier frequencies leaf."""
  return {f"NoiseEmbedding_0/{_FREQUENCIES}"} if side == "flax" and plan.model.embedding_type == "fourier" else set()


def _to_numpy(value, key: str) -> np.ndarray:
  if hasattr(value, "detach"):  # A torch tensor (possibly bfloat16, which NumPy lacks).
    value = value.detach().cpu()
    if not value.is_floating_point() or value.dtype.itemsize < 4:
      value = value.float()
    value = value.numpy()
  try:
    return np.asarray(value)
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(f"score_sde importers: the value of {key!r} is not an array ({type(value).__name__}).") from error


def _finish(plan: _Plan, flat: dict[str, np.ndarray]) -> dict:
  """A scoreflow params tree (float32 JAX arrays) from `{flax_key: array}`; the Fourier leaf is kept only when it
  differs from the seed's frequencies."""
  key = f"NoiseEmbedding_0/{_FREQUENCIES}"
  if key in flat:
    seed = layers.fourier_frequencies(plan.model.nf, plan.model.fourier_scale).astype(np.float32)
    if np.array_equal(flat[key].astype(np.float32), seed):
      del flat[key]
  tree = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v, jnp.float32) for k, v in flat.items()})
  return tree


def _flat_params(params, what: str) -> dict[str, np.ndarray]:
  if isinstance(params, Mapping) and set(params) == {"params"}:
    params = params["params"]
  if not isinstance(params, Mapping):
    raise ValueError(f"{what}: params must be a nested mapping of arrays (a Flax params tree), got "
                     f"{type(params).__name__}.")
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(params), sep="/").items()}


# --- score_sde_pytorch. ---------------------------------------------------------------------------

def load_torch_checkpoint(path) -> Any:
  """The object in a `.pth` file (`torch.load` on the CPU; needs PyTorch)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError("from_score_sde_pytorch: reading a .pth file needs PyTorch (pip install torch); or pass the "
                      "loaded checkpoint dict / state_dict (tensors or NumPy arrays).") from error
  if not os.path.isfile(path):
    raise ValueError(f"from_score_sde_pytorch: no checkpoint file at {os.fspath(path)!r}.")
  return torch.load(path, map_location="cpu", weights_only=False)


def _strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
  """Removes `torch.nn.DataParallel`'s `module.` prefix when every key carries it."""
  keys = list(state)
  if keys and all(k.startswith("module.") for k in keys):
    return {k[len("module."):]: v for k, v in state.items()}
  return dict(state)


def from_score_sde_pytorch(checkpoint_or_state_dict, spec, *, ema: bool = True, image_size: int | None = None,
                           channels: int | None = None) -> dict:
  """Imports a score_sde_pytorch network as scoreflow UNet parameters.

  With `model = build_model(spec)` and `params` the result,
  `model.apply({"params": params}, x, cond)` equals the reference's `model(x.transpose(0, 3, 1, 2), cond)`
  transposed back to NHWC, where `cond` is what the reference feeds (`999 t` for DDPM++ cont., sigma for NCSN++
  cont., the integer step for DDPM), to float32 round-off.

  Args:
    checkpoint_or_state_dict: a path to `checkpoint_N.pth` (read with `torch.load`, which needs PyTorch); or the
      loaded checkpoint dict (`model`, `ema`, `optimizer`, `step`); or a bare `state_dict` (keys with or without
      `module.`). Values may be tensors or NumPy arrays.
    spec: the network, as :func:`~scoreflow.models.build_model` takes it (a preset name or a mapping).
    ema: take the EMA weights (`ema.shadow_params`, the ones the paper evaluates) rather than the raw `model`
      weights. Ignored for a bare `state_dict`, which holds one set of weights.
    image_size, channels: the data's shape (default: the preset's; else read from the checkpoint).

  Returns:
    The params tree (float32). For NCSN++ it holds `NoiseEmbedding_0/frequencies`, the checkpoint's frozen Fourier
    frequencies, unless they equal scoreflow's own.

  Raises:
    ValueError: an unknown spec, a layout the spec does not have (one message naming every missing, unexpected
      or wrongly shaped key with both shapes), EMA weights requested from a checkpoint without them, or
      `shadow_params` that do not line up with the trainable parameters.
    ImportError: a path given without PyTorch installed.
  """
  what = "from_score_sde_pytorch"
  source = checkpoint_or_state_dict
  if isinstance(source, (str, os.PathLike)):
    source = load_torch_checkpoint(source)
  if not isinstance(source, Mapping):
    raise ValueError(f"{what}: expected a checkpoint path, a checkpoint dict or a state_dict, got "
                     f"{type(source).__name__}.")
  shadow = None
  if "model" in source and isinstance(source["model"], Mapping):
    state = _strip_prefix(source["model"])
    if ema:
      if not isinstance(source.get("ema"), Mapping) or "shadow_params" not in source["ema"]:
        raise ValueError(f"{what}: the checkpoint has no ema.shadow_params; pass ema=False for the raw weights.")
      shadow = list(source["ema"]["shadow_params"])
  else:
    state = _strip_prefix(source)
  state = {k: _to_numpy(v, k) for k, v in state.items()}
  buffers = {"sigmas"}
  found = {k: v.shape for k, v in state.items() if k not in buffers}
  if channels is None:
    first = next((k for k in state if k.endswith(".weight") and state[k].ndim == 4), None)
    channels = int(state[first].shape[1]) if first else None
  plan = _resolve(spec, image_size, channels, "ncsnpp", found, "torch", what)
  if shadow is not None:
    trainable = [leaf for leaf in plan.leaves if leaf.trainable]
    expected_order = [leaf.torch_key for leaf in trainable]
    order = [k for k in state if k in set(expected_order)]  # The state_dict's own (registration) order.
    if order != expected_order:
      first = next(i for i, (a, b) in enumerate(zip(order, expected_order)) if a != b)
      raise ValueError(f"{what}: the checkpoint's model state_dict lists its trainable parameters in another order "
                       f"than the reference's model.parameters() (position {first}: {order[first]!r}), so "
                       "ema.shadow_params cannot be assigned; pass ema=False.")
    if len(shadow) != len(trainable):
      raise ValueError(f"{what}: ema.shadow_params has {len(shadow)} tensors, the spec's network has "
                       f"{len(trainable)} trainable parameters; check the spec, or pass ema=False.")
    for leaf, value in zip(trainable, shadow):
      value = _to_numpy(value, f"ema.shadow_params ({leaf.torch_key})")
      if value.shape != state[leaf.torch_key].shape:
        raise ValueError(f"{what}: ema.shadow_params entry for {leaf.torch_key!r} has shape {value.shape}, "
                         f"expected {state[leaf.torch_key].shape}; check the spec, or pass ema=False.")
      state[leaf.torch_key] = value
  flat = {leaf.flax_key: leaf.to_flax(state[leaf.torch_key]) for leaf in plan.leaves}
  return _finish(plan, flat)


def to_score_sde_pytorch(params, spec, *, image_size: int | None = None, sigmas=None,
                         prefix: str = "") -> dict[str, np.ndarray]:
  """Exports scoreflow UNet parameters as a score_sde_pytorch `state_dict` (the inverse of
  :func:`from_score_sde_pytorch`).

  Args:
    params: the params tree of `build_model(spec)` (or `{"params": tree}`).
    spec: the network, as :func:`~scoreflow.models.build_model` takes it.
    image_size: the data's image size (default: the preset's, else the one that fits `params`).
    sigmas: the reference's `sigmas` buffer (its `utils.get_sigmas(config)`) to include; without it, load with
      `load_state_dict(..., strict=False)` as the reference's own `restore_checkpoint` does.
    prefix: prepended to every key (`"module."` for the `torch.nn.DataParallel` layout of its checkpoints).

  Returns:
    `{key: float32 NumPy array}` in the reference's `model.parameters()` order (NCSN++: with the Fourier `W`).
  """
  what = "to_score_sde_pytorch"
  flat = _flat_params(params, what)
  conv = flat.get("Conv_0/kernel")
  channels = int(conv.shape[2]) if conv is not None and conv.ndim == 4 else None
  plan = _resolve(spec, image_size, channels, "ncsnpp", {k: v.shape for k, v in flat.items()}, "flax", what)
  key = f"NoiseEmbedding_0/{_FREQUENCIES}"
  if plan.model.embedding_type == "fourier" and key not in flat:
    flat[key] = layers.fourier_frequencies(plan.model.nf, plan.model.fourier_scale)
  out = {}
  if sigmas is not None:
    out[prefix + "sigmas"] = np.asarray(sigmas, np.float32)
  for leaf in plan.leaves:
    out[prefix + leaf.torch_key] = np.ascontiguousarray(leaf.to_torch(flat[leaf.flax_key]), dtype=np.float32)
  return out


# --- score_sde (JAX/Flax). ------------------------------------------------------------------------

def _network_of_jax_keys(keys) -> str:
  tops = {k.split("/")[0].rsplit("_", 1)[0] for k in keys}
  return "ddpm" if tops & {"ResnetBlockDDPM", "AttnBlock"} else "ncsnpp"


def read_flax_checkpoint(path) -> Any:
  """The raw state of a `flax.training.checkpoints` file (or the highest `checkpoint_N` of a directory)."""
  from flax import serialization  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  if os.path.isdir(path):
    steps = [(int(name.rsplit("_", 1)[1]), name) for name in os.listdir(path)
             if name.startswith("checkpoint_") and name.rsplit("_", 1)[1].isdigit()]
    if not steps:
      raise ValueError(f"from_score_sde_flax: no checkpoint_N file in the directory {path!r}.")
    path = os.path.join(path, max(steps)[1])
  if not os.path.isfile(path):
    raise ValueError(f"from_score_sde_flax: no checkpoint file at {path!r}.")
  with open(path, "rb") as file:
    return serialization.msgpack_restore(file.read())


def from_score_sde_flax(path_or_state, spec, *, ema: bool = True, image_size: int | None = None,
                        channels: int | None = None) -> dict:
  """Imports a network of the JAX reference (yang-song/score_sde) as scoreflow UNet parameters.

  Args:
    path_or_state: a `checkpoint_N` file written by `flax.training.checkpoints.save_checkpoint` (or its
      directory: the highest N is read), read as raw msgpack (no `State` class needed); or the restored state
      dict (`params_ema`, `optimizer.target`, ...); or a bare params tree.
    spec: the network, as :func:`~scoreflow.models.build_model` takes it.
    ema: take `params_ema` (default) rather than `optimizer.target`. Ignored for a bare params tree.
    image_size, channels: the data's shape (default: the preset's; else read from the checkpoint).

  Returns:
    The params tree (float32), as :func:`from_score_sde_pytorch`.

  Raises:
    ValueError: as :func:`from_score_sde_pytorch`.
  """
  what = "from_score_sde_flax"
  state = path_or_state
  if isinstance(state, (str, os.PathLike)):
    state = read_flax_checkpoint(state)
  if not isinstance(state, Mapping):
    raise ValueError(f"{what}: expected a checkpoint path, a state dict or a params tree, got {type(state).__name__}.")
  if "params_ema" in state or "optimizer" in state:
    if ema:
      if "params_ema" not in state:
        raise ValueError(f"{what}: the state has no params_ema; pass ema=False for optimizer.target.")
      state = state["params_ema"]
    else:
      target = state.get("optimizer")
      if not isinstance(target, Mapping) or "target" not in target:
        raise ValueError(f"{what}: the state has no optimizer.target; pass ema=True for params_ema.")
      state = target["target"]
  if isinstance(state, Mapping) and set(state) == {"params"}:
    state = state["params"]
  flat = {k: _to_numpy(v, k) for k, v in traverse_util.flatten_dict(dict(state), sep="/").items()}
  network = _network_of_jax_keys(flat)
  if channels is None and "Conv_0/kernel" in flat and flat["Conv_0/kernel"].ndim == 4:
    channels = int(flat["Conv_0/kernel"].shape[2])
  plan = _resolve(spec, image_size, channels, network, {k: v.shape for k, v in flat.items()}, "jax", what)
  return _finish(plan, {leaf.flax_key: flat[leaf.jax_key] for leaf in plan.leaves})


def to_score_sde_flax(params, spec, *, image_size: int | None = None, network: str | None = None) -> dict:
  """Exports scoreflow UNet parameters as a params tree of the JAX reference (the inverse of
  :func:`from_score_sde_flax`): nested dicts of NumPy arrays with score_sde's module names.

  Args:
    params: the params tree of `build_model(spec)`.
    spec: the network, as :func:`~scoreflow.models.build_model` takes it.
    image_size: the data's image size (default: the preset's, else the one that fits `params`).
    network: `"ncsnpp"` (score_sde's `NCSNpp`) or `"ddpm"` (its `DDPM`); default: `"ddpm"` for DDPM blocks without
      skip rescaling (the DDPM network), else `"ncsnpp"`.
  """
  what = "to_score_sde_flax"
  model = _unet(spec)
  if network is None:
    network = "ddpm" if model.resblock_type == "ddpm" and not model.skip_rescale else "ncsnpp"
  if network not in ("ncsnpp", "ddpm"):
    raise ValueError(f"{what}: network must be 'ncsnpp' or 'ddpm', got {network!r}.")
  flat = _flat_params(params, what)
  conv = flat.get("Conv_0/kernel")
  channels = int(conv.shape[2]) if conv is not None and conv.ndim == 4 else None
  plan = _resolve(spec, image_size, channels, network, {k: v.shape for k, v in flat.items()}, "flax", what)
  key = f"NoiseEmbedding_0/{_FREQUENCIES}"
  if plan.model.embedding_type == "fourier" and key not in flat:
    flat[key] = layers.fourier_frequencies(plan.model.nf, plan.model.fourier_scale)
  out = {tuple(leaf.jax_key.split("/")): np.asarray(flat[leaf.flax_key], np.float32) for leaf in plan.leaves}
  return traverse_util.unflatten_dict(out)
