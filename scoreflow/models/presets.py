r"""Named model configurations, and the one table that turns a config's model section into a module.

`PRESETS[name]` is a plain dict of constructor arguments plus `"architecture"` (a key of
:data:`ARCHITECTURES`); :func:`build_model` builds a module from a preset name, a dict, or a dict naming a
`"preset"` with overrides, so an `ml_collections` config can say::

    config.model = dict(preset="ddpmpp_cifar10", dropout=0.2)

The paper's configurations (Song et al. 2021, `configs/` of the reference code; Ho et al. 2020 for DDPM),
for 32x32x3 CIFAR-10 unless said otherwise, with the parameterization each was trained with:

=======================  ===============================================  ===========  ===============================
name                     model                                            parameters   parameterization
=======================  ===============================================  ===========  ===============================
`ddpm_cifar10`           DDPM U-Net of Ho et al. (2020): 2 DDPM           35,746,307   :math:`\epsilon` at integer step
                         blocks/level, attention after every up block                 (`"index"`, 1000 steps)
                         (initialisation: see below)
`ddpmpp_cifar10`         DDPM++ cont. (VP, sub-VP): 4 BigGAN              61,804,419   :math:`\epsilon`, cond `999 t`
                         blocks/level, sinusoidal embedding                           (`"time"`, scale 999)
`ddpmpp_deep_cifar10`    DDPM++ cont. (deep, VP, sub-VP): 8 blocks/level  106,632,579  as above
`ncsnpp_cifar10`         NCSN++ cont. (VE): FIR, residual input pyramid,  62,758,787   score, cond :math:`\sigma`
                         Fourier embedding of :math:`\log\sigma`, 1/sigma             (`"sigma"`)
`ncsnpp_deep_cifar10`    NCSN++ cont. (deep, VE): 8 blocks/level          107,586,947  as above
`ncsnpp_celeba64`        NCSN++ cont. (VE) at 64x64 (attention at 16x16)  62,758,787   as above
=======================  ===============================================  ===========  ===============================

(Counted by `tests/test_models.py`, which also checks them against a closed-form count of the reference code's
layers, and DDPM against the 35.7 M of Ho et al. (2020, Appendix B). NCSN++'s Fourier frequencies, 128
numbers the reference stored as a frozen parameter, are constants here.) In scoreflow terms the three
parameterizations are `EpsilonParameterization(NoiseConditioning("index", num_steps=1000))` (or `ddpm_loss` on
a `DDPMChain`, which feeds the integer step), `EpsilonParameterization()` (its default conditioning is
`999 t`), and `ScoreParameterization(NoiseConditioning("sigma"))`.

`ddpm_cifar10` is the layout of Ho et al.'s U-Net (`diffusion_tf/models/unet.py`: attention after every block at
16x16 on both paths) with the initialisation of the 2021 reference code: the attention's q/k/v projections and the
1x1 ("NIN") shortcuts of the DDPM blocks that change width use the DDPM initialiser at scale 0.1, the default of the
reference's `NIN` layer (Ho et al.: scale 1). (The layers both codes initialise with variance 1e-10 are exact zeros
here, see :func:`~scoreflow.models.layers.default_init`.) `configs/cifar10_ddpm.py` trains it with Song et al.'s
setup. The reference's own re-implementation (`models/ddpm.py`, used by its `configs/vp/ddpm/` configs) attends
only once per level on the way up: `build_model("ddpm_cifar10", attn_every_up_block=False)`, 35,218,947 parameters.

Small presets for a CPU: `ddpmpp_digits` and `ncsnpp_digits` (8x8x1 scikit-learn digits: nf 32,
ch_mult (1, 2), one block per level, attention at 4x4; about 0.75 M parameters) and `mlp_toy` (2-D densities:
width 256, 3 residual blocks; 0.69 M parameters).

Class conditioning: every score preset is unconditional (`num_classes=0`, no class embedding); pass
`num_classes=C` to add one (see :class:`~scoreflow.models.UNet`), e.g. `build_model("ddpmpp_digits", num_classes=10)`.

Noise-conditional classifiers (`architecture="classifier"`, :class:`~scoreflow.models.NoiseConditionalClassifier`,
the U-Net's downsampling path with global pooling and `num_classes` logits), for classifier guidance:
`classifier_digits` (8x8x1 digits, 10 classes: nf 32, ch_mult (1, 2), one block per level, attention at 4x4, DDPM++
blocks and the `999 t` embedding) and `classifier_cifar10` (32x32x3, 10 classes: nf 128, ch_mult (1, 2, 2, 2), two
blocks per level, attention at 16x16).

Conditioning: each preset's `noise_conditioning` must equal the `kind` of the parameterization's
`NoiseConditioning` (see :class:`~scoreflow.models.UNet`). The 2021 repository's CelebA 64x64 NCSN++ was the
discrete SMLD variant (sinusoidal embedding of the level index); get it with the overrides
`embedding_type="positional", noise_conditioning="index", scale_by_sigma=False` and the 1/sigma in the loss
(`smld_loss` on an `SMLDChain`).

Data range: every preset takes centred inputs in [-1, 1] (`centered=True`). The paper's VE runs fed [0, 1]
data to a network that maps it by :math:`2x - 1` itself (`centered=False`), so their noise scales refer to
[0, 1] data: reproduce them with [0, 1] data and `centered=False`, or with [-1, 1] data and doubled sigmas.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from scoreflow.models.classifier import NoiseConditionalClassifier
from scoreflow.models.mlp import ScoreMLP
from scoreflow.models.unet import UNet

ARCHITECTURES: dict[str, type[nn.Module]] = {"unet": UNet, "mlp": ScoreMLP, "classifier": NoiseConditionalClassifier}

_CIFAR10_UNET = dict(
    architecture="unet", nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
    attn_every_up_block=False, dropout=0.1, resamp_with_conv=True, conditional=True, resblock_type="biggan",
    skip_rescale=True, fir_kernel=(1, 3, 3, 1), progressive="none", progressive_combine="sum", init_scale=0.0,
    centered=True)
_DDPMPP = dict(_CIFAR10_UNET, embedding_type="positional", noise_conditioning="time", scale_by_sigma=False,
               fir=False, progressive_input="none")
_NCSNPP = dict(_CIFAR10_UNET, embedding_type="fourier", fourier_scale=16.0, noise_conditioning="sigma",
               scale_by_sigma=True, fir=True, progressive_input="residual")
_DIGITS = dict(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.1)

PRESETS: dict[str, dict[str, Any]] = {
    "ddpm_cifar10": dict(
        architecture="unet", nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
        attn_every_up_block=True, dropout=0.1, resamp_with_conv=True, conditional=True,
        embedding_type="positional", noise_conditioning="index", scale_by_sigma=False, resblock_type="ddpm",
        skip_rescale=False, fir=False, progressive="none", progressive_input="none", init_scale=0.0,
        centered=True),
    "ddpmpp_cifar10": _DDPMPP,
    "ddpmpp_deep_cifar10": dict(_DDPMPP, num_res_blocks=8),
    "ncsnpp_cifar10": _NCSNPP,
    "ncsnpp_deep_cifar10": dict(_NCSNPP, num_res_blocks=8),
    "ncsnpp_celeba64": dict(_NCSNPP),
    "ddpmpp_digits": dict(_DDPMPP, **_DIGITS),
    "ncsnpp_digits": dict(_NCSNPP, **_DIGITS),
    "mlp_toy": dict(architecture="mlp", width=256, depth=3, embedding_type="positional", embedding_dim=128,
                    noise_conditioning="time", scale_by_sigma=False, dropout=0.0, init_scale=0.0),
    "classifier_digits": dict(architecture="classifier", num_classes=10, nf=32, ch_mult=(1, 2), num_res_blocks=1,
                              attn_resolutions=(4,), dropout=0.1, embedding_type="positional",
                              noise_conditioning="time", resblock_type="biggan", skip_rescale=True, fir=False,
                              centered=True),
    "classifier_cifar10": dict(architecture="classifier", num_classes=10, nf=128, ch_mult=(1, 2, 2, 2),
                               num_res_blocks=2, attn_resolutions=(16,), dropout=0.1, embedding_type="positional",
                               noise_conditioning="time", resblock_type="biggan", skip_rescale=True, fir=False,
                               centered=True),
}


def is_classifier(model: nn.Module) -> bool:
  """Whether `model` is a noise-conditional classifier (logits out) rather than a score network."""
  return isinstance(model, NoiseConditionalClassifier)


def model_num_classes(model: nn.Module) -> int:
  """The classes a model knows: a score network's `num_classes` (0: unconditional), a classifier's logits."""
  return int(getattr(model, "num_classes", 0))


def _as_static(value):
  """Lists (as configs deliver them) become tuples, so module fields stay hashable."""
  if isinstance(value, (list, tuple)):
    return tuple(_as_static(v) for v in value)
  return value


def build_model(spec: str | Mapping[str, Any], **overrides) -> nn.Module:
  """Builds a score network from a preset name or a dict of constructor arguments.

  Args:
    spec: a key of :data:`PRESETS`; or a mapping with `"architecture"` (a key of :data:`ARCHITECTURES`) and
      constructor arguments; or a mapping with `"preset"` (a key of :data:`PRESETS`) whose other entries
      override the preset's.
    **overrides: constructor arguments applied last. A string `dtype` (e.g. `"bfloat16"`) is converted.

  Returns:
    An unbound Flax module (`UNet`, `ScoreMLP` or `NoiseConditionalClassifier`).

  Raises:
    ValueError: for an unknown preset or architecture, or an argument the architecture does not take (an
      `ml_collections.ConfigDict` is not a mapping: pass `config.model.to_dict()`).

  Example:
    >>> from scoreflow.models import build_model
    >>> build_model("ddpmpp_digits", dropout=0.0).nf
    32
    >>> build_model({"preset": "ncsnpp_cifar10", "num_res_blocks": 8}).num_res_blocks
    8
  """
  if isinstance(spec, str):
    spec = {"preset": spec}
  if not isinstance(spec, Mapping):
    raise ValueError(f"build_model: spec must be a preset name or a mapping, got {type(spec).__name__}; "
                     "pass an ml_collections ConfigDict as config.model.to_dict().")
  kwargs = dict(spec)
  if "preset" in kwargs:
    name = kwargs.pop("preset")
    if name not in PRESETS:
      raise ValueError(f"build_model: unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    kwargs = {**PRESETS[name], **kwargs}
  kwargs.update(overrides)
  architecture = kwargs.pop("architecture", None)
  if architecture not in ARCHITECTURES:
    raise ValueError(f"build_model: architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}.")
  cls = ARCHITECTURES[architecture]
  allowed = {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name"}
  unknown = sorted(set(kwargs) - allowed)
  if unknown:
    raise ValueError(f"build_model: {cls.__name__} does not take {unknown}; its arguments are {sorted(allowed)}.")
  kwargs = {key: _as_static(value) for key, value in kwargs.items()}
  if isinstance(kwargs.get("dtype"), str):
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  return cls(**kwargs)


def init_kwargs(model: nn.Module, batch_size: int) -> dict[str, Any]:
  """The extra arguments `model.init` needs besides `(x, cond)`: labels (the null class) for a class-conditional
  score network, nothing otherwise."""
  if not is_classifier(model) and model_num_classes(model) > 0:
    return {"label": jnp.full((batch_size,), model_num_classes(model), jnp.int32)}
  return {}


def count_parameters(model: nn.Module, input_shape: tuple[int, ...], cond_dtype=jnp.float32) -> int:
  """The number of parameters of `model` for inputs of shape `[B, *D]`, from shapes only (`jax.eval_shape`:
  nothing is allocated or compiled)."""
  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  cond = jax.ShapeDtypeStruct(tuple(input_shape[:1]), cond_dtype)
  kwargs = init_kwargs(model, input_shape[0])
  variables = jax.eval_shape(lambda x, cond: model.init(jax.random.key(0), x, cond, **kwargs), x, cond)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))
