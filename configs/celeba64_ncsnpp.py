"""CelebA 64x64, NCSN++ on the VE SDE, with the CelebA settings of Song et al. (2021)'s code.

CelebA is centre-cropped to 140x140 and resized to 64x64 (by the data pipeline), flipped at random and kept in
[0, 1] (`centered=False`); VE SDE with sigma_min = 0.01, sigma_max = 90; the NCSN++ of the CIFAR-10 VE model at
64x64 (attention at 16x16, 62.76 M parameters); the score parameterization with the sigma^2-weighted loss summed
over dimensions; Adam at 2e-4, 5000-step warm-up, clipping at 1; batch 128 for 1.3 M steps; EMA 0.999;
predictor-corrector sampling with snr 0.17. (The 2021 repository trained this model on the discrete SMLD ladder,
with a sinusoidal embedding of the level index; this is its continuous-time version, as for CIFAR-10, with the
Fourier embedding of log sigma.) CelebA must be prepared with tfds in `data_dir`.

The reference code's VE kernel sigma(t) = sigma_min (sigma_max / sigma_min)^t (`sde.ve_kernel="reference"`, as in
`cifar10_ncsnpp_continuous.py`); with `--config.sde.ve_kernel=exact` (Eq. 29) sigma(t) < 0.01 for
t < ln 2 / (2 ln 9000) = 0.03806, 3.81 % of the training times and the last 38 of the 1000 sampling steps.
"""

from configs import cifar10_ncsnpp_continuous, default


def get_config():
  """The CIFAR-10 NCSN++ (continuous VE) configuration with CelebA's data, sigma_max, model size and snr."""
  config = cifar10_ncsnpp_continuous.get_config()
  config.data.name = "celeb_a"
  config.data.image_size = 64
  config.sde.sigma_max = 90.0
  config.model = default.model_config("ncsnpp_celeba64", centered=False)
  config.sampling.snr = 0.17
  return config
