"""The key scheme of the 2021 reference networks: which layer of scoreflow's :class:`~scoreflow.models.UNet`
each parameter of score_sde_pytorch's (and score_sde's Flax) NCSN++/DDPM++/DDPM networks is, derived by replaying
the network's construction (see :mod:`scoreflow.models.importers`, whose public functions use it).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from scoreflow.models import layers
from scoreflow.models.presets import build_model
from scoreflow.models.unet import UNet

PRESET_IMAGE_SHAPES: dict[str, tuple[int, int]] = {
    "ddpm_cifar10": (32, 3), "ddpmpp_cifar10": (32, 3), "ddpmpp_deep_cifar10": (32, 3), "ncsnpp_cifar10": (32, 3),
    "ncsnpp_deep_cifar10": (32, 3), "ncsnpp_celeba64": (64, 3), "ddpmpp_digits": (8, 1), "ncsnpp_digits": (8, 1),
}
"""`(image size, channels)` of each U-Net preset's data, the default layout of the importers."""

FREQUENCIES = "frequencies"  # The frozen Fourier frequencies of NCSN++ (the reference's `W`).


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
    "fourier": (("W", "W", FREQUENCIES, _identity, _identity),),
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


def layer_layout(model: UNet, image_size: int, network: str) -> Iterator[_Layer]:
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
  for layer in layer_layout(model, image_size, network):
    for torch_leaf, jax_leaf, flax_leaf, to_flax, to_torch in _LEAVES[layer.kind]:
      out.append(_Leaf(f"{layer.torch}.{torch_leaf}", "/".join(layer.jax + (jax_leaf,)),
                       "/".join(layer.flax + (flax_leaf,)), to_flax, to_torch, layer.kind != "fourier"))
  return out


# --- Specs, shapes and validation. ----------------------------------------------------------------

def unet_of(spec) -> UNet:
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
    shapes[f"NoiseEmbedding_0/{FREQUENCIES}"] = (model.nf,)
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


def resolve(spec, image_size, channels, network, found, side: str, what: str) -> _Plan:
  """The plan whose `side` ("torch", "jax" or "flax") keys and shapes are those found (image size inferred when
  not given: the preset's, else the one candidate that fits)."""
  model = unet_of(spec)
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
  return {f"NoiseEmbedding_0/{FREQUENCIES}"} if side == "flax" and plan.model.embedding_type == "fourier" else set()


def to_numpy(value, key: str) -> np.ndarray:
  if hasattr(value, "detach"):  # A torch tensor (possibly bfloat16, which NumPy lacks).
    value = value.detach().cpu()
    if not value.is_floating_point() or value.dtype.itemsize < 4:
      value = value.float()
    value = value.numpy()
  try:
    return np.asarray(value)
  except Exception as error:  # pylint: disable=broad-except
    raise ValueError(f"score_sde importers: the value of {key!r} is not an array ({type(value).__name__}).") from error


def finish(plan: _Plan, flat: dict[str, np.ndarray]) -> dict:
  """A scoreflow params tree (float32 JAX arrays) from `{flax_key: array}`; the Fourier leaf is kept only when it
  differs from the seed's frequencies."""
  key = f"NoiseEmbedding_0/{FREQUENCIES}"
  if key in flat:
    seed = layers.fourier_frequencies(plan.model.nf, plan.model.fourier_scale).astype(np.float32)
    if np.array_equal(flat[key].astype(np.float32), seed):
      del flat[key]
  tree = traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v, jnp.float32) for k, v in flat.items()})
  return tree


def flat_params(params, what: str) -> dict[str, np.ndarray]:
  if isinstance(params, Mapping) and set(params) == {"params"}:
    params = params["params"]
  if not isinstance(params, Mapping):
    raise ValueError(f"{what}: params must be a nested mapping of arrays (a Flax params tree), got "
                     f"{type(params).__name__}.")
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(params), sep="/").items()}
