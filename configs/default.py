"""Every config field, with the defaults of Song et al. (2021)'s CIFAR-10 runs; the variants edit a few.

Run a variant, not this file: `python run_train.py --config configs/digits_vp.py --workdir /tmp/digits`
(this file alone trains the CIFAR-10 DDPM++ (VP) model, which needs CIFAR-10 prepared with tfds).
Override any field from the command line: `--config.training.batch_size=64 --config.model.nf=32`.

Sections (each is read in one place, `scoreflow.config`):
  seed: the run's seed (parameters, noise, data order).
  data: `scoreflow.data.make_dataset` arguments. `name`: a toy density (checkerboard, two_moons,
    eight_gaussians, swiss_roll, gaussian_mixture), `digits`, or a tfds dataset prepared in `data_dir`
    (`""`: tfds' default directory); `image_size` 0 keeps the dataset's size; `scaler` "centred" ([-1, 1]) or
    "unit_interval" ([0, 1]).
  sde: the forward process. `name`: vp, subvp, ve, cosine_vp (continuous SDEs) or ddpm, smld (discrete
    chains with `num_scales` levels); each takes the fields it needs (beta_*, sigma_*, cosine_*).
  model: a preset of `scoreflow.models.PRESETS` expanded into its fields (so that each can be overridden), see
    `model_config`. `num_classes`: 0 for an unconditional score network; C > 0 makes it class-conditional (a learned
    class embedding added to the noise embedding, labels 0..C-1 from the dataset, C the null class "unconditional"
    of classifier-free guidance; samples are drawn one row per class); for a noise-conditional classifier preset
    (`classifier_digits`, `classifier_cifar10`) the number of logits.
  parameterization: what the network predicts: score, eps, x0, v or edm; its noise conditioning is the model's
    `noise_conditioning` kind, with `time_scale` multiplying t for the "time" kind (999 in the paper);
    `sigma_data`, the data's standard deviation that edm's preconditioning and the edm loss's weighting assume.
  loss: dsm (Eq. 7: `weighting` sigma2 or likelihood, `importance_sampling`, `reduce_mean` over dimensions,
    smallest time `eps`, `t_sampling` iid/stratified/antithetic), edm, ddpm (the DDPM chain's simple loss) or
    smld (NCSN's loss on the SMLD ladder), or classifier (the noise-conditional classifier of classifier guidance:
    cross-entropy of the labels at x_t ~ p_t(x_t | x_0), t ~ U[`eps`, T]; needs a classifier model preset and a
    continuous SDE; the run logs accuracy on the noisy batches and draws no samples).
  optim: Adam/AdamW, peak `learning_rate`, linear warm-up over `warmup_steps`, global-norm `grad_clip`
    (0 disables), `schedule` constant/cosine/linear decaying to `final_lr_ratio` at the end.
  training: global `batch_size` (over all devices and hosts), `num_train_steps` (a resumed run may raise it unless
    `optim.schedule` decays over it), `steps_per_call` (steps fused into one compiled call with lax.scan; every
    interval must be a multiple of it; keep 1 on CPU, where XLA runs convolutions inside a loop body far slower:
    bench/RESULTS.md), EMA `ema_rate` and `ema_warmup`, `nonfinite` ("skip" a step with a
    non-finite loss, gradient or update, or "halt"), `compute_dtype` (float32, or bfloat16 for mixed precision on
    accelerators; no float16, which would need loss scaling), `label_dropout` (probability in [0, 1) that a
    class-conditional model trains a label as the null class, so one network learns the conditional and the
    unconditional score for classifier-free guidance; 0 for unconditional models), intervals `log_every`,
    `checkpoint_every` (periodic checkpoints, `keep_checkpoints` kept), `snapshot_every` (preemption snapshot),
    `sample_every` (sample grids; 0 = only at the end).
  sampling: in-training samples: `method` pc (`predictor`, `corrector`, `num_steps`, `snr`,
    `n_corrector_steps`), ode (`ode_method`, `rtol`, `atol`, `ode_error_control` example|batch), ddim
    (`num_steps`, `eta`), edm (Karras et al.'s Heun
    sampler: `num_steps`, `rho`, churn `s_churn`, `s_min`, `s_max`, `s_noise`) or dpm_solver (DPM-Solver++:
    `num_steps`, `dpm_order` 1 or 2, `dpm_spacing` log_snr or time); `eps` the last time,
    `num_samples`, `use_ema`.
  eval: run_eval.py. checkpoints "latest" | "all" | "2000" | "1000,3000" | inclusive "1000:5000"; use_ema (else raw
    params); tasks, comma-separated: bpd, bound (variational bound), samples, conditional (per-class samples at each
    guidance scale), inpaint, colorize, fid (FID/IS/KID), digits (digits classifier metric), quality (digits on digits,
    fid on other images); init_from (published score_sde .pth / Flax weights evaluated instead of the workdir's
    checkpoints); seed (dequantization, probe and sampler noise, the same for every checkpoint);
    batch_size (likelihood and Inception batches); output_dir ("": workdir/eval); cache_dir ("": output_dir/cache);
    progress_bar; allow_config_mismatch (False: a model-defining field -- model, sde, parameterization,
    data.name/scaler/dequantize/image_size -- that differs from the workdir's config.json is an error; True: a warning,
    and the results are kept apart). bpd: split, num_examples (0: whole split; required for toy data), num_repeats
    (dequantization draws), divergence hutchinson|exact, probe, num_probes, rtol, atol, eps, solver, max_steps,
    per_example. bound: split, num_examples, num_samples (draws per example), eps, importance_sampling, decoder;
    ddpm_estimator exact|sampled, ddpm_variance beta|beta_tilde, ddpm_clip_x0 (DDPM chain). samples: num_samples drawn
    with config.sampling in shards of shard_size, grid_size for the PNG. conditional: guidance_scales (w, comma-
    separated), samples_per_class, shard_size, grid_columns, classifier_workdir (guide an unconditional model with a
    noise-conditional classifier run). inverse (inpaint, colorize): split, num_examples, mask (the region generated:
    lower_half, right_half, centre, checkerboard), predictor, corrector, num_steps, snr, n_corrector_steps, eps,
    grid_size. fid:
    inception_path (pytorch-fid weights converted to .npz; nothing is downloaded), reference_split,
    reference_num_examples (0: all), kid_reference_size, kid_num_subsets, kid_subset_size, is_num_splits. digits:
    reference_split, classifier_steps, classifier_seed.
"""

import ml_collections

from scoreflow.config import eval_config
from scoreflow.models import PRESETS


def model_config(preset: str, **overrides) -> ml_collections.ConfigDict:
  """`config.model` for a preset of `scoreflow.models.PRESETS`, expanded so that every field can be overridden
  (`num_classes` included: 0, unconditional, unless the preset or `overrides` say otherwise)."""
  return ml_collections.ConfigDict({"preset": preset, "num_classes": 0, **PRESETS[preset], **overrides})


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 42

  config.data = ml_collections.ConfigDict(dict(
      name="cifar10", split="train", data_dir="", image_size=0, random_flip=True, dequantize=False,
      scaler="centred", read_threads=1, prefetch_batches=2))

  config.sde = ml_collections.ConfigDict(dict(
      name="vp", beta_min=0.1, beta_max=20.0, sigma_min=0.01, sigma_max=50.0, ve_kernel="exact", num_scales=1000,
      cosine_s=0.008, cosine_T=0.9946))

  config.model = model_config("ddpmpp_cifar10")

  config.parameterization = ml_collections.ConfigDict(dict(name="eps", time_scale=999.0, sigma_data=0.5))

  config.loss = ml_collections.ConfigDict(dict(
      name="dsm", weighting="sigma2", importance_sampling=False, reduce_mean=True, eps=1e-5, t_sampling="iid",
      p_mean=-1.2, p_std=1.2))

  config.optim = ml_collections.ConfigDict(dict(
      optimizer="adam", learning_rate=2e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=1.0,
      warmup_steps=5000, schedule="constant", final_lr_ratio=0.0))

  config.training = ml_collections.ConfigDict(dict(
      batch_size=128, num_train_steps=1_300_000, steps_per_call=1, ema_rate=0.9999, ema_warmup=False,
      nonfinite="skip", compute_dtype="float32", log_every=50, checkpoint_every=50_000, snapshot_every=10_000,
      keep_checkpoints=3, async_checkpointing=True, sample_every=50_000, progress_bar=True, label_dropout=0.0))

  config.sampling = ml_collections.ConfigDict(dict(
      method="pc", predictor="euler_maruyama", corrector="none", num_steps=1000, snr=0.16, n_corrector_steps=1,
      eps=1e-3, denoise=True, ode_method="tsit5", rtol=1e-5, atol=1e-5, ode_error_control="example", eta=0.0,
      rho=7.0, s_churn=0.0, s_min=0.0,
      s_max=1000.0, s_noise=1.0, dpm_order=2, dpm_spacing="log_snr", num_samples=64, use_ema=True))

  config.eval = eval_config()
  return config
