"""The printed summary of one checkpoint's evaluation results."""

from __future__ import annotations

import math
from typing import Any


def _fmt(value, spec=".4g") -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  return format(value, spec)


def format_results(record: dict[str, Any]) -> str:
  """The human-readable lines of one checkpoint's results."""
  lines = [f"Step {record['step']} ({record['params']} parameters, {record['checkpoint']}):"]
  if "bpd" in record:
    r = record["bpd"]
    what = "bits/dim" if r["dequantized"] else "bits/dim (continuous data: -log2 p(x) / D)"
    reused = f", {r['reused_batches']} batches reused" if r["reused_batches"] else ""
    lines.append(f"  {what} on {r['split']} ({r['num_examples']} examples x {r['num_repeats']} repeats): "
                 f"{_fmt(r['mean'])} ± {_fmt(r['stderr'], '.2g')} (std. error); NFE mean {_fmt(r['nfe_mean'], '.1f')} "
                 f"[{r['nfe_min']}, {r['nfe_max']}]; {r['num_failed']} failed solves{reused}")
    if r["num_failed"]:
      lines.append(f"  warning: {r['num_failed']} likelihood solve(s) failed (see `status` in "
                   f"{r['per_example_file']}); their examples are left out of the mean. Raise "
                   "config.eval.bpd.max_steps or loosen rtol/atol.")
  if "bound" in record:
    r = record["bound"]
    what = ("DDPM variational bound (Ho et al. 2020)" if r["kind"] == "ddpm_vlb" else
            "variational bound (score flow, dequantized)" if r["dequantized"] else "variational bound (nats/dim / ln 2)")
    ode = f" (ODE bits/dim above: {_fmt(record['bpd']['mean'])})" if "bpd" in record else ""
    lines.append(f"  {what} on {r['split']} ({r['num_examples']} examples): {_fmt(r['mean'])} ± "
                 f"{_fmt(r['stderr'], '.2g')} bits/dim (std. error){ode}")
  if "samples" in record:
    r = record["samples"]
    options = ", ".join(f"{k}={v}" for k, v in r["sampler"]["options"].items())
    reused = f", {r['reused_shards']} of {r['num_shards']} shards reused" if r["reused_shards"] else ""
    lines.append(f"  samples: {r['num_samples']} x {tuple(r['shape'])} with {r['sampler']['method']} ({options}), "
                 f"NFE {_fmt(r['nfe_mean'], '.1f')} per sample{reused}, in {r['directory']}")
    if r.get("num_failed_shards"):
      lines.append(f"  warning: {r['num_failed_shards']} shard(s) report a sampler failure (status != 0).")
    if r.get("num_nonfinite"):
      lines.append(f"  warning: {r['num_nonfinite']} of {r['num_samples']} samples hold NaN or infinite values; they "
                   "are left out of the quality metrics. Check the sampler's settings and the checkpoint.")
  if "conditional" in record:
    r = record["conditional"]
    for entry in r["scales"]:
      accuracy = f", digits classifier accuracy {_fmt(entry['accuracy'], '.3f')}" if "accuracy" in entry else ""
      lines.append(f"  class-conditional samples, guidance scale {entry['guidance_scale']:g}: "
                   f"{entry['num_samples']} ({r['samples_per_class']} per class){accuracy}; grid {entry['grid']}")
  for task in ("inpaint", "colorize"):
    if task in record:
      r = record[task]
      what = f"inpainting ({r['mask']} generated)" if task == "inpaint" else "colorization"
      judged = (f", digits classifier accuracy {_fmt(r['completed']['accuracy'], '.3f')} (on the truth: "
                f"{_fmt(r['truth']['accuracy'], '.3f')})" if "completed" in r else "")
      lines.append(f"  {what} of {r['num_examples']} {r['split']} examples: MSE {_fmt(r['mse'])} on the generated "
                   f"values{judged}; NFE {r['nfe']}")
  if "digits" in record:
    r, real = record["digits"], record["digits"]["real_data"]
    matched = (f" (first {r['fd_matched_num_examples']} samples: {_fmt(r['fd_matched'])})"
               if r["fd_matched_num_examples"] < r["num_examples"] else "")

    def scores(q):
      return (f"confidence {_fmt(q['mean_confidence'], '.3f')}, class entropy {_fmt(q['class_entropy'], '.3f')} "
              f"nats, classifier score {_fmt(q['classifier_score'], '.3f')}")

    left_out = f" ({r['num_nonfinite_samples']} non-finite samples left out)" if r.get("num_nonfinite_samples") else ""
    lines.append(f"  digits metric: FD {_fmt(r['fd'])}{matched}, {scores(r)}{left_out}")
    lines.append(f"    real {real['split']} digits ({real['num_examples']}): FD {_fmt(real['fd'])}, {scores(real)}")
  if "fid" in record:
    r = record["fid"]
    kid = f", KID {_fmt(r['kid'])} ± {_fmt(r['kid_std'], '.2g')}" if "kid" in r else ""
    left_out = f", {r['num_nonfinite_samples']} non-finite left out" if r.get("num_nonfinite_samples") else ""
    lines.append(f"  FID {_fmt(r['fid'])}, IS {_fmt(r['inception_score'])} ± {_fmt(r['inception_score_std'], '.2g')}"
                 f"{kid} ({r['num_samples']} samples{left_out} vs {r['reference_num_examples']} reference images)")
  return "\n".join(lines)
