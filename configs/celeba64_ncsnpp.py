"""CelebA 64x64, NCSN++ on the VE SDE, with the CelebA settings of Song et al. (2021)'s code.

CelebA is centre-cropped to 140x140 and resized to 64x64 (by the data pipeline), flipped at random and kept in
[0, 1] (`centered=False`); VE SDE with sigma in [0.01, 90]; the NCSN++ of the CIFAR-10 VE model at 64x64
(attention at 16x16, 62.7 M parameters); the score parameterization with the sigma^2-weighted loss summed over
dimensions; Adam at 2e-4, 5000-step warm-up, clipping at 1; batch 128 for 1.3 M steps; EMA 0.999;
predictor-corrector sampling with snr 0.17. (The 2021 repository trained this model on the discrete SMLD ladder;
this is its continuous-time version, as for CIFAR-10.) CelebA must be prepared with tfds in `data_dir`.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "celeb_a"
  config.data.image_size = 64
  config.data.random_flip = True
  config.data.scaler = "unit_interval"
  config.sde.name = "ve"
  config.sde.sigma_min = 0.01
  config.sde.sigma_max = 90.0
  config.model = default.model_config("ncsnpp_celeba64", centered=False)
  config.parameterization.name = "score"
  config.loss.reduce_mean = False
  config.training.ema_rate = 0.999
  config.training.steps_per_call = 5
  config.sampling.method = "pc"
  config.sampling.predictor = "reverse_diffusion"
  config.sampling.corrector = "langevin"
  config.sampling.snr = 0.17
  config.sampling.eps = 1e-5  # The reference code samples VE models down to t = 1e-5 (VP: 1e-3).
  config.sampling.num_steps = 1000
  return config
