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

import os
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from scoreflow.models import layers
from scoreflow.models import reference_layout as layout

__all__ = ["from_score_sde_pytorch", "to_score_sde_pytorch", "from_score_sde_flax", "to_score_sde_flax",
           "PRESET_IMAGE_SHAPES"]

PRESET_IMAGE_SHAPES = layout.PRESET_IMAGE_SHAPES


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
  state = {k: layout.to_numpy(v, k) for k, v in state.items()}
  buffers = {"sigmas"}
  found = {k: v.shape for k, v in state.items() if k not in buffers}
  if channels is None:
    first = next((k for k in state if k.endswith(".weight") and state[k].ndim == 4), None)
    channels = int(state[first].shape[1]) if first else None
  plan = layout.resolve(spec, image_size, channels, "ncsnpp", found, "torch", what)
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
      value = layout.to_numpy(value, f"ema.shadow_params ({leaf.torch_key})")
      if value.shape != state[leaf.torch_key].shape:
        raise ValueError(f"{what}: ema.shadow_params entry for {leaf.torch_key!r} has shape {value.shape}, "
                         f"expected {state[leaf.torch_key].shape}; check the spec, or pass ema=False.")
      state[leaf.torch_key] = value
  flat = {leaf.flax_key: leaf.to_flax(state[leaf.torch_key]) for leaf in plan.leaves}
  return layout.finish(plan, flat)


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
  flat = layout.flat_params(params, what)
  conv = flat.get("Conv_0/kernel")
  channels = int(conv.shape[2]) if conv is not None and conv.ndim == 4 else None
  plan = layout.resolve(spec, image_size, channels, "ncsnpp", {k: v.shape for k, v in flat.items()}, "flax", what)
  key = f"NoiseEmbedding_0/{layout.FREQUENCIES}"
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
  flat = {k: layout.to_numpy(v, k) for k, v in traverse_util.flatten_dict(dict(state), sep="/").items()}
  network = _network_of_jax_keys(flat)
  if channels is None and "Conv_0/kernel" in flat and flat["Conv_0/kernel"].ndim == 4:
    channels = int(flat["Conv_0/kernel"].shape[2])
  plan = layout.resolve(spec, image_size, channels, network, {k: v.shape for k, v in flat.items()}, "jax", what)
  return layout.finish(plan, {leaf.flax_key: flat[leaf.jax_key] for leaf in plan.leaves})


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
  model = layout.unet_of(spec)
  if network is None:
    network = "ddpm" if model.resblock_type == "ddpm" and not model.skip_rescale else "ncsnpp"
  if network not in ("ncsnpp", "ddpm"):
    raise ValueError(f"{what}: network must be 'ncsnpp' or 'ddpm', got {network!r}.")
  flat = layout.flat_params(params, what)
  conv = flat.get("Conv_0/kernel")
  channels = int(conv.shape[2]) if conv is not None and conv.ndim == 4 else None
  plan = layout.resolve(spec, image_size, channels, network, {k: v.shape for k, v in flat.items()}, "flax", what)
  key = f"NoiseEmbedding_0/{layout.FREQUENCIES}"
  if plan.model.embedding_type == "fourier" and key not in flat:
    flat[key] = layers.fourier_frequencies(plan.model.nf, plan.model.fourier_scale)
  out = {tuple(leaf.jax_key.split("/")): np.asarray(flat[leaf.flax_key], np.float32) for leaf in plan.leaves}
  return traverse_util.unflatten_dict(out)
