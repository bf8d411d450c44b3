"""CIFAR-10, the original DDPM (Ho et al. 2020) as reproduced by Song et al. (2021), Table 1 ("DDPM").

The discrete DDPM chain (1000 levels, beta linear from 1e-4 to 0.02, i.e. beta_min = 0.1, beta_max = 20 in the
continuous notation) trained with the simple loss (noise prediction, mean over dimensions) on the 35.7 M-parameter
DDPM U-Net (2 DDPM residual blocks per resolution, attention at 16x16, sinusoidal embedding of the step index,
dropout 0.1); Adam at 2e-4 with a 5000-step warm-up, clipping at 1; batch 128, 1.3 M steps; EMA 0.9999; ancestral
sampling with 1000 steps.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "cifar10"
  config.data.random_flip = True
  config.data.scaler = "centred"
  config.sde.name = "ddpm"
  config.sde.beta_min = 0.1
  config.sde.beta_max = 20.0
  config.sde.num_scales = 1000
  config.model = default.model_config("ddpm_cifar10")
  config.parameterization.name = "eps"
  config.loss.name = "ddpm"
  config.loss.reduce_mean = True
  config.training.ema_rate = 0.9999
  config.training.steps_per_call = 5
  config.sampling.method = "pc"
  config.sampling.predictor = "ancestral"
  config.sampling.corrector = "none"
  config.sampling.num_steps = 1000
  return config
