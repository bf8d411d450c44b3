"""8x8 handwritten digits with a small NCSN++ on the VE SDE (score parameterization, output scaled by 1/sigma).

Trains in under 10 minutes on 2 CPU cores to samples that read as digits:

    python run_train.py --config configs/digits_ve.py --workdir /tmp/digits_ve

`sigma_max = 10` follows Song & Ermon (2020)'s rule (about the largest distance between two training images
in [-1, 1]: 9.6). Samples use the paper's VE sampler: reverse-diffusion predictor with a Langevin corrector.
"""

from configs import default, digits_vp


def get_config():
  """digits_vp's data, optimiser and schedule, with the VE process, NCSN++ and the paper's VE sampler."""
  config = digits_vp.get_config()
  config.sde.name = "ve"
  config.sde.sigma_min = 0.01
  config.sde.sigma_max = 10.0
  config.model = default.model_config("ncsnpp_digits")
  config.parameterization.name = "score"
  config.loss.reduce_mean = False
  config.optim.warmup_steps = 50
  config.training.num_train_steps = 1200
  config.training.checkpoint_every = 500
  config.training.snapshot_every = 100
  config.sampling.method = "pc"
  config.sampling.predictor = "reverse_diffusion"
  config.sampling.corrector = "langevin"
  config.sampling.snr = 0.16
  config.sampling.eps = 1e-5  # The reference code samples VE models down to t = 1e-5 (VP: 1e-3).
  config.sampling.num_steps = 300
  return config
