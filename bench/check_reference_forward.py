"""scoreflow's U-Nets against the 2021 reference networks, forward pass by forward pass.

For every U-Net preset with a counterpart in yang-song/score_sde_pytorch, this script builds the reference network
from the reference's own config file, draws random weights and then adds noise to *every* trainable parameter (so
that no path hides behind a zero initialisation: the reference initialises the last convolution of each residual
branch, the attention output and the output layer at scale 1e-10), saves a checkpoint exactly as the reference's
`utils.save_checkpoint` does (`torch.nn.DataParallel` state_dict, the reference's own `ExponentialMovingAverage`
state, `optimizer`, `step`), imports it with :func:`scoreflow.models.importers.from_score_sde_pytorch` and compares
the outputs on random inputs in evaluation mode, with the conditioning the reference feeds:

* raw weights (`ema=False`) against the reference network as trained, and EMA weights (`ema=True`) against the
  reference after `ema.copy_to(model.parameters())` (the raw and EMA weights differ, so a wrong selection shows);
* float32 (the target: relative error `max|ours - ref| / max|ref|` <= 1e-5) and float64 on both sides, where only
  the order of floating-point operations differs, so the error must fall to ~1e-12: a wrong layout, flag or
  constant would not.

Power: for the digits cases, deliberately broken variants (a flag that changes no parameter, such as
`skip_rescale`, `fir`, `centered`, `scale_by_sigma`; the seed's Fourier frequencies instead of the checkpoint's;
3x3 kernels rotated by 180 degrees) must miss the reference by more than 1e-3.

    python bench/check_reference_forward.py --reference /work/ref      # writes bench/results/reference_forward.txt

The reference's `op/` package compiles CUDA kernels at import; it is imported with `torch.utils.cpp_extension.load`
switched off (the FIR resampling then takes its pure-PyTorch CPU path `upfirdn2d_native`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import tempfile
import time

import numpy as np

import _reference

DIGITS = dict(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))

# name: (scoreflow spec, reference config module, reference config overrides {section: {field: value}},
#        (image size, channels), conditioning, note)
CASES = {
    "ddpmpp_cifar10": (
        {"preset": "ddpmpp_cifar10"}, "configs.vp.cifar10_ddpmpp_continuous", {}, (32, 3), "time",
        "cond 999 t; centered data as the config"),
    "ddpmpp_deep_cifar10": (
        {"preset": "ddpmpp_deep_cifar10"}, "configs.vp.cifar10_ddpmpp_deep_continuous", {}, (32, 3), "time",
        "cond 999 t"),
    "ncsnpp_cifar10": (
        {"preset": "ncsnpp_cifar10", "centered": False}, "configs.ve.cifar10_ncsnpp_continuous", {}, (32, 3),
        "sigma", "cond sigma; centered=False (the config's data.centered=False: the network maps x to 2x-1)"),
    "ncsnpp_deep_cifar10": (
        {"preset": "ncsnpp_deep_cifar10", "centered": False}, "configs.ve.cifar10_ncsnpp_deep_continuous", {},
        (32, 3), "sigma", "cond sigma; centered=False"),
    "ncsnpp_celeba64": (
        {"preset": "ncsnpp_celeba64", "centered": False}, "configs.ve.celeba_ncsnpp",
        {"model": {"embedding_type": "fourier", "fourier_scale": 16}, "training": {"continuous": True}}, (64, 3),
        "sigma", "cond sigma; centered=False; the CelebA config made continuous (Fourier embedding, scale 16)"),
    "ncsnpp_celeba64_smld": (
        {"preset": "ncsnpp_celeba64", "centered": False, "embedding_type": "positional",
         "noise_conditioning": "index", "scale_by_sigma": False}, "configs.ve.celeba_ncsnpp", {}, (64, 3),
        "index_over_sigma",
        "configs/ve/celeba_ncsnpp.py as published (discrete SMLD): cond the level i; ours / sigmas[i] vs the "
        "reference's scale_by_sigma"),
    "ddpm_cifar10": (
        {"preset": "ddpm_cifar10", "attn_every_up_block": False}, "configs.vp.ddpm.cifar10", {}, (32, 3), "index",
        "models/ddpm.py; cond the integer step"),
    "ddpmpp_digits": (
        {"preset": "ddpmpp_digits"}, "configs.vp.cifar10_ddpmpp_continuous", {"model": DIGITS}, (8, 1), "time",
        "the CIFAR-10 DDPM++ config at the digits preset's size"),
    "ncsnpp_digits": (
        {"preset": "ncsnpp_digits", "centered": False}, "configs.ve.cifar10_ncsnpp_continuous", {"model": DIGITS},
        (8, 1), "sigma", "the CIFAR-10 NCSN++ config at the digits preset's size; centered=False"),
}
TARGET = 1e-5


def _without_frequencies(params):
  return dict(params, NoiseEmbedding_0={k: v for k, v in params["NoiseEmbedding_0"].items() if k != "frequencies"})


def _rotated_kernels(params):
  """Every 3x3 kernel rotated by 180 degrees: a convolution read as a cross-correlation (or the reverse)."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree_util.tree_map_with_path(
      lambda path, v: v[::-1, ::-1] if path[-1].key == "kernel" and v.ndim == 4 and v.shape[0] == 3 else v, params)


# Power: deliberately broken variants of the digits cases (spec overrides, params transform), each of which the
# check must catch (relative error far above the target). The flags change no parameter.
POWER = {
    "ddpmpp_digits": {
        "skip_rescale=False": ({"skip_rescale": False}, None),
        "fir=True (FIR instead of nearest/average resampling)": ({"fir": True}, None),
        "3x3 kernels rotated by 180 degrees": ({}, _rotated_kernels),
    },
    "ncsnpp_digits": {
        "centered=True (no 2x-1)": ({"centered": True}, None),
        "seed's Fourier frequencies instead of the checkpoint's W": ({}, _without_frequencies),
        "scale_by_sigma=False": ({"scale_by_sigma": False}, None),
    },
}
POWER_MIN = 1e-3


def import_reference(path: str):
  _reference.add_reference(path)
  from models import ddpm, ema, ncsnpp, up_or_down_sampling  # pylint: disable=import-outside-toplevel

  # Its FIR filters are float32 tensors (exact: multiples of 1/64); cast them to the input's dtype so that the
  # float64 rows run (a no-op in float32).
  upfirdn2d = up_or_down_sampling.upfirdn2d
  up_or_down_sampling.upfirdn2d = lambda x, k, **kwargs: upfirdn2d(x, k.to(x.dtype), **kwargs)
  return {"ncsnpp": ncsnpp.NCSNpp, "ddpm": ddpm.DDPM}, ema.ExponentialMovingAverage


@contextlib.contextmanager
def _sinusoidal_embedding_in(dtype):
  """The reference's `layers.get_timestep_embedding` computes in float32 whatever its input; for the float64 rows
  it is replaced by the same formula in float64 (Ho et al.'s embedding, `max_positions` 10000):
  `[sin(c w_j), cos(c w_j)]`, `w_j = exp(-log(10000) j / (d/2 - 1))`."""
  import torch  # pylint: disable=import-outside-toplevel
  from models import layers as reference_layers  # pylint: disable=import-outside-toplevel

  original = reference_layers.get_timestep_embedding
  if dtype != torch.float64:
    yield
    return

  def embedding(timesteps, embedding_dim, max_positions=10000):
    half = embedding_dim // 2
    w = torch.exp(torch.arange(half, dtype=torch.float64) * -(np.log(max_positions) / (half - 1)))
    angles = timesteps.double()[:, None] * w[None, :]
    out = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return torch.nn.functional.pad(out, (0, 1)) if embedding_dim % 2 else out

  reference_layers.get_timestep_embedding = embedding
  try:
    yield
  finally:
    reference_layers.get_timestep_embedding = original


def reference_config(module: str, overrides, image):
  config = importlib.import_module(module).get_config()
  config.data.image_size, config.data.num_channels = image
  for section, values in overrides.items():
    for field, value in values.items():
      setattr(getattr(config, section), field, value)
  return config


def randomize(model, generator, scale: float = 0.5):
  """Adds noise to every trainable parameter: `scale / sqrt(fan_in)` for weights, 0.1 for biases and norms."""
  import torch  # pylint: disable=import-outside-toplevel

  with torch.no_grad():
    for name, p in model.named_parameters():
      if not p.requires_grad:
        continue  # The frozen Fourier frequencies: random already.
      if p.ndim >= 2:
        fan_in = p.shape[0] if name.endswith(".W") else p[0].numel()  # NIN's W is [in, out].
        p.add_(torch.randn(p.shape, generator=generator) * (scale / np.sqrt(fan_in)))
      else:
        p.add_(torch.randn(p.shape, generator=generator) * 0.1)


def inputs(config, conditioning: str, image, batch: int, rng):
  """`(x NCHW float64, reference cond, scoreflow cond)` as the reference's training/sampling code feeds them."""
  size, channels = image
  t = rng.uniform(1e-3, 1.0, batch)
  if conditioning == "time":  # VP continuous: labels = 999 t on centred data.
    x = rng.standard_normal((batch, channels, size, size))
    return x, 999.0 * t, 999.0 * t
  if conditioning == "sigma":  # VE continuous: labels = sigma(t) on [0, 1] data.
    sigma = config.model.sigma_min * (config.model.sigma_max / config.model.sigma_min) ** t
    x = rng.uniform(0, 1, (batch, channels, size, size)) + sigma[:, None, None, None] * rng.standard_normal(
        (batch, channels, size, size))
    return x, sigma, sigma
  levels = rng.integers(0, config.model.num_scales, batch)
  x = rng.standard_normal((batch, channels, size, size))
  return x, levels, levels


def run_case(name, reference_classes, ema_class, reference_path, batch, seed):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel

  from scoreflow.models import build_model  # pylint: disable=import-outside-toplevel
  from scoreflow.models.importers import from_score_sde_pytorch  # pylint: disable=import-outside-toplevel

  spec, module, overrides, image, conditioning, note = CASES[name]
  cwd = os.getcwd()
  os.chdir(reference_path)
  try:
    config = reference_config(module, overrides, image)
  finally:
    os.chdir(cwd)
  torch.manual_seed(seed)
  generator = torch.Generator().manual_seed(seed)
  # float(): the `sigmas` buffer (float64 at construction) in float32 from the start, so that both sides divide by
  # the same numbers in the float64 rows as well.
  reference = reference_classes[config.model.name](config).float().eval()
  randomize(reference, generator)
  ema = ema_class(reference.parameters(), decay=config.model.ema_rate)  # shadow = the current weights
  randomize(reference, generator, scale=0.2)  # The raw weights move away from the EMA ones.
  checkpoint = {"model": torch.nn.DataParallel(reference).state_dict(), "ema": ema.state_dict(),
                "optimizer": {"state": {}, "param_groups": []}, "step": 1234}
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "checkpoint_1.pth")
    torch.save(checkpoint, path)
    started = time.perf_counter()
    raw = from_score_sde_pytorch(path, spec, ema=False)
    averaged = from_score_sde_pytorch(path, spec)
    import_s = (time.perf_counter() - started) / 2
  model = build_model(spec)
  num_params = sum(p.numel() for p in reference.parameters())  # The frozen Fourier W included, as in ours.
  ours_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(raw))
  x, cond_ref, cond_ours = inputs(config, conditioning, image, batch, np.random.default_rng(seed))
  sigmas = reference.sigmas.double().numpy()

  def reference_forward(dtype):
    net = reference.to(dtype)
    cond = torch.from_numpy(np.asarray(cond_ref))
    cond = cond.long() if conditioning in ("index", "index_over_sigma") else cond.to(dtype)
    with torch.no_grad(), _sinusoidal_embedding_in(dtype):
      out = net(torch.from_numpy(x).to(dtype), cond)
    return out.double().numpy().transpose(0, 2, 3, 1)

  apply = jax.jit(lambda params, x, cond: model.apply({"params": params}, x, cond, train=False))

  def ours_forward(params, dtype):
    params = jax.tree.map(lambda v: jnp.asarray(v, dtype), params)
    cond = (jnp.asarray(cond_ours, jnp.int32) if conditioning in ("index", "index_over_sigma")
            else jnp.asarray(cond_ours, dtype))
    out = apply(params, jnp.asarray(x.transpose(0, 2, 3, 1), dtype), cond)
    assert out.dtype == dtype, (out.dtype, dtype)
    out = np.asarray(out, np.float64)
    if conditioning == "index_over_sigma":
      out = out / sigmas[np.asarray(cond_ours)][:, None, None, None]
    return out

  def error(ours, ref):
    return float(np.max(np.abs(ours - ref))), float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))

  rows = {}
  started = time.perf_counter()
  ref_raw32 = reference_forward(torch.float32)
  rows["raw f32"] = error(ours_forward(raw, jnp.float32), ref_raw32)
  ema.copy_to(reference.parameters())
  ref_ema32 = reference_forward(torch.float32)
  rows["ema f32"] = error(ours_forward(averaged, jnp.float32), ref_ema32)
  rows["ema f64"] = error(ours_forward(averaged, jnp.float64), reference_forward(torch.float64))
  seconds = time.perf_counter() - started
  power = {}
  for label, (overrides, transform) in POWER.get(name, {}).items():
    broken = build_model(dict(spec, **overrides))
    params = transform(averaged) if transform else averaged
    out = broken.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32),
                       jnp.asarray(cond_ours, jnp.float32))
    power[label] = error(np.asarray(out, np.float64), ref_ema32)[1]
  raw_vs_ema = float(np.max(np.abs(ref_raw32 - ref_ema32)) / np.max(np.abs(ref_ema32)))
  return dict(name=name, note=note, num_params=num_params, ours_params=ours_params, rows=rows, power=power,
              raw_vs_ema=raw_vs_ema, ref_max=float(np.max(np.abs(ref_ema32))), import_s=import_s, seconds=seconds,
              fourier="NoiseEmbedding_0" in averaged and "frequencies" in averaged["NoiseEmbedding_0"])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reference", required=True, help="path of a score_sde_pytorch checkout")
  parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {list(CASES)}")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                       "reference_forward.txt"))
  args = parser.parse_args()
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_enable_x64", True)  # For the float64 rows; float32 rows pass float32 arrays throughout.
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(max(1, os.cpu_count() or 1))

  reference_classes, ema_class = import_reference(args.reference)
  names = [n for n in args.cases.split(",") if n]
  unknown = sorted(set(names) - set(CASES))
  if unknown:
    raise SystemExit(f"error: unknown cases {unknown}; choose from {list(CASES)}.")
  lines = [f"# scoreflow UNet vs score_sde_pytorch ({os.path.abspath(args.reference)}), batch {args.batch}, "
           f"seed {args.seed}, eval mode",
           "# relative error = max|ours - ref| / max|ref|; target <= 1e-5 in float32",
           f"# {'case':<22} {'params':>11} {'raw f32 rel':>11} {'ema f32 abs':>11} {'ema f32 rel':>11} "
           f"{'ema f64 rel':>11} {'raw/ema':>8} {'pass':>4}"]
  print("\n".join(lines), flush=True)
  failures = []
  for name in names:
    result = run_case(name, reference_classes, ema_class, os.path.abspath(args.reference), args.batch, args.seed)
    rows = result["rows"]
    ok = max(rows["raw f32"][1], rows["ema f32"][1]) <= TARGET and rows["ema f64"][1] <= 1e-10
    if result["num_params"] != result["ours_params"]:
      ok = False
    if not ok:
      failures.append(name)
    line = (f"{name:<24} {result['num_params']:>11,} {rows['raw f32'][1]:>11.2e} {rows['ema f32'][0]:>11.2e} "
            f"{rows['ema f32'][1]:>11.2e} {rows['ema f64'][1]:>11.2e} {result['raw_vs_ema']:>8.2f} "
            f"{'yes' if ok else 'NO':>4}")
    print(line, flush=True)
    lines.append(line)
    lines.append(f"#   {result['note']}; max|ref| {result['ref_max']:.3g}; Fourier W imported: {result['fourier']}; "
                 f"import {result['import_s']:.1f} s, forwards {result['seconds']:.1f} s")
    print(lines[-1], flush=True)
    for label, relative in result["power"].items():
      caught = relative > POWER_MIN
      if not caught:
        failures.append(f"{name} power: {label}")
      lines.append(f"#   power, broken variant {label}: relative error {relative:.2e} "
                   f"({'caught' if caught else 'NOT CAUGHT'})")
      print(lines[-1], flush=True)
  lines.append(f"# {'all cases pass' if not failures else 'FAILED: ' + ', '.join(failures)}")
  print(lines[-1])
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, "w", encoding="utf-8") as file:
    file.write("\n".join(lines) + "\n")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
