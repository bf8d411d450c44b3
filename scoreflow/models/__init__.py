"""Score networks in Flax Linen: a residual MLP for low-dimensional data and the NCSN++/DDPM++/DDPM U-Nets.

Every model is called as::

    output = model.apply(variables, x, cond, train=False)                         # [B, *D] -> [B, *D]
    output = model.apply(variables, x, cond, train=True, rngs={"dropout": key})   # with dropout

with `cond: [B]` the output of the parameterization's `NoiseConditioning` (float: scaled time, sigma,
log-sigma, log-SNR; or an integer level), and plugs into the core as
`scoreflow.make_score_fn(functools.partial(model.apply, train=False), variables, sde, parameterization)`.

Why Linen rather than NNX: the library is functional. Its core takes `apply_fn(params, x, cond)` and
`params` as a plain pytree, and the training step is one pure jitted function of a state pytree with
shardings and donated buffers. A Linen module is exactly that: a stateless description whose `init` returns
a plain dict of arrays and whose `apply` is a pure function of `(variables, inputs)`, so parameters,
EMA copies and optimizer states are ordinary pytrees that `jax.jit`, `jax.grad`, `jax.eval_shape`,
`NamedSharding` and Orbax handle directly, and nothing has to be split and merged around every jit boundary
as NNX's mutable objects would need. Flax 0.12 supports Linen without deprecation warnings.

Names:
  :class:`UNet`, :class:`ScoreMLP`: the score networks (class-conditional with `num_classes > 0`: then called
  with `label=` int `[B]`, `num_classes` being the null class).
  :class:`NoiseConditionalClassifier`: logits of p_t(y | x_t) for classifier guidance.
  :data:`PRESETS`, :func:`build_model`, :data:`ARCHITECTURES`: named configurations (the paper's CIFAR-10,
  CelebA-64 and small CPU models) and the one table from config to module.
  :func:`count_parameters`: parameter count from shapes alone; :func:`init_kwargs`: what `init` needs besides
  `(x, cond)` (a label for a class-conditional network); :func:`is_classifier`.
  :mod:`scoreflow.models.layers`: embeddings, FIR resampling, residual and attention blocks.
  :func:`from_score_sde_pytorch`, :func:`from_score_sde_flax` (and their inverses :func:`to_score_sde_pytorch`,
  :func:`to_score_sde_flax`): the published score_sde checkpoints (PyTorch `.pth`, Flax msgpack) as UNet params
  (:mod:`scoreflow.models.importers` documents the key scheme).
"""

from scoreflow.models.importers import from_score_sde_flax as from_score_sde_flax
from scoreflow.models.importers import from_score_sde_pytorch as from_score_sde_pytorch
from scoreflow.models.importers import to_score_sde_flax as to_score_sde_flax
from scoreflow.models.importers import to_score_sde_pytorch as to_score_sde_pytorch
from scoreflow.models.classifier import NoiseConditionalClassifier as NoiseConditionalClassifier
from scoreflow.models.mlp import ScoreMLP as ScoreMLP
from scoreflow.models.presets import ARCHITECTURES as ARCHITECTURES
from scoreflow.models.presets import PRESETS as PRESETS
from scoreflow.models.presets import build_model as build_model
from scoreflow.models.presets import count_parameters as count_parameters
from scoreflow.models.presets import init_kwargs as init_kwargs
from scoreflow.models.presets import is_classifier as is_classifier
from scoreflow.models.unet import UNet as UNet
