"""A pip-installable peer for `bench_peer.py`: diffusers' `UNet2DModel` configured as close to a scoreflow DDPM++
preset as its options allow, so that the benchmark runs without a score_sde_pytorch checkout.

What is matched (from the scoreflow module, so the two cannot drift apart): resolution and channels, widths per
level (`nf * ch_mult`), `num_res_blocks` blocks per level on the way down and `num_res_blocks + 1` on the way
up, each taking a skip, attention (one head) after every down block at `attn_resolutions` and in the middle
(block, attention, block), BigGAN-style resampling inside a residual block (average pooling down, nearest
neighbour up: diffusers' `downsample_type="resnet"` / `upsample_type="resnet"`), dropout, GroupNorm with eps
1e-6, SiLU, and the time embedding: DDPM++'s sinusoidal embedding of the conditioning (`999 t`) with `nf`
features (diffusers' `Timesteps` with `flip_sin_to_cos=False, freq_shift=1` is the same formula), then two
dense layers to `4 nf`, added to every block through its own dense layer.

What diffusers does not offer, and so differs:
  * the up path at the attention resolution: DDPM++ attends once per level, after its last block; diffusers'
    `AttnUpBlock2D` attends after every block and `ResnetUpsampleBlock2D` never. `diffusers_network` builds
    both and keeps the one whose parameter count is nearer to scoreflow's (the counts: `bench/RESULTS.md`);
  * the resampling blocks' 1x1 shortcut: DDPM++ has one on every up/down block, diffusers only where the width
    changes (fewer parameters, less work);
  * DDPM++'s skip rescaling: its blocks and attention return `(x + h) / sqrt(2)`, diffusers' `x + h`
    (`UNet2DModel` does not expose the blocks' output scale: one multiply per block);
  * GroupNorm groups: DDPM++ uses `min(C // 4, 32)` per layer, diffusers one count for all (`min(nf // 4, 32)`
    here: 8 rather than 8-32 for digits, 32 everywhere for CIFAR-10 as in DDPM++);
  * attention: diffusers' `Attention` with PyTorch's fused `scaled_dot_product_attention`, DDPM++ einsums.
"""

from __future__ import annotations

import importlib
import sys
import types

PIP_HINT = "`pip install diffusers` (or `pip install -e '.[bench]'`)"


def import_diffusers():
  """`diffusers`, or SystemExit naming the pip command.

  diffusers imports torchvision when it is installed. PyPI's torchvision wheels are built against CUDA builds of
  torch; beside the CPU-only torch (this project's `[test]` extra) their compiled operators cannot load and
  `import torchvision` fails while registering their meta kernels ("operator torchvision::nms does not exist").
  The U-Net uses none of them, so then torchvision is imported without those two registration modules, as
  `tests/test_evaluate_inception.py` does for pytorch-fid.
  """
  try:
    importlib.import_module("torchvision")
  except ImportError:
    pass
  except RuntimeError as error:
    if "torchvision::" not in str(error):
      raise
    for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
      del sys.modules[name]
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
      sys.modules[name] = types.ModuleType(name)
    importlib.import_module("torchvision")
  try:
    return importlib.import_module("diffusers")
  except ImportError as error:
    raise SystemExit(f"error: the diffusers peer (--peers diffusers) needs the diffusers package, which did not "
                     f"import ({error}). Install it with {PIP_HINT}; or time only score_sde_pytorch's network "
                     "with --reference DIR --peers reference.") from error


def _unet(diffusers, model, shape: tuple[int, int, int], *, attend_every_up_block: bool):
  """diffusers' `UNet2DModel` with `model`'s (a scoreflow `UNet`) widths, depth, attention and dropout."""
  resolution, _, channels = shape
  down, up = [], []
  for level in range(len(model.ch_mult)):
    attends = resolution >> level in model.attn_resolutions
    down.append("AttnDownBlock2D" if attends else "ResnetDownsampleBlock2D")
    up.append("AttnUpBlock2D" if attends and attend_every_up_block else "ResnetUpsampleBlock2D")
  return diffusers.UNet2DModel(
      sample_size=resolution, in_channels=channels, out_channels=channels,
      block_out_channels=tuple(model.nf * mult for mult in model.ch_mult), layers_per_block=model.num_res_blocks,
      down_block_types=tuple(down), up_block_types=tuple(reversed(up)), mid_block_type="UNetMidBlock2D",
      downsample_type="resnet", upsample_type="resnet", dropout=model.dropout, attention_head_dim=None,
      norm_num_groups=min(model.nf // 4, 32), norm_eps=1e-6, act_fn="silu",
      time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1, center_input_sample=False)


def diffusers_network(preset: str, shape: tuple[int, int, int]):
  """`(network, description)`: the `UNet2DModel` nearest in parameter count to scoreflow's `preset` on images of
  `shape` (H, W, C), of the two up-path layouts diffusers allows (see the module docstring)."""
  diffusers = import_diffusers()
  from scoreflow.models import build_model, count_parameters  # pylint: disable=import-outside-toplevel

  model = build_model(preset)
  if getattr(model, "embedding_type", None) != "positional" or getattr(model, "resblock_type", None) != "biggan":
    raise SystemExit(f"error: the diffusers peer matches DDPM++ presets (positional embedding, BigGAN blocks); "
                     f"{preset!r} is not one.")
  target = count_parameters(model, (1, *shape))
  layouts = {True: "attention after every block", False: "no attention"}
  candidates = []
  for every in layouts:
    network = _unet(diffusers, model, shape, attend_every_up_block=every)
    candidates.append((sum(p.numel() for p in network.parameters()), every, network))
  (count, every, network), (other_count, other, _) = sorted(candidates, key=lambda c: abs(c[0] - target))
  description = (f"diffusers {diffusers.__version__} UNet2DModel: {count:,} parameters, {count / target - 1:+.1%} "
                 f"vs scoreflow's {preset} ({target:,}); up path at {model.attn_resolutions}: {layouts[every]} "
                 f"(with {layouts[other]}: {other_count:,}, {other_count / target - 1:+.1%})")
  return network, description
