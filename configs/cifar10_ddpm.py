"""CIFAR-10, DDPM: the U-Net of Ho et al. (2020) trained with the DDPM setup of Song et al. (2021)'s code.

The network (preset `ddpm_cifar10`, 35,746,307 parameters: Ho et al. report 35.7 M) has the layout of Ho et al.'s
CIFAR-10 U-Net: 2 DDPM residual blocks per resolution, attention at 16x16 after every residual block on both paths
(`attn_every_up_block=True`), a sinusoidal embedding of the integer step, dropout 0.1. Its initialisation follows
the 2021 reference code rather than Ho et al.'s: the attention's q/k/v projections and the 1x1 ("NIN") shortcuts of
the residual blocks that change width use the DDPM initialiser at scale 0.1 (Ho et al.: 1). (The layers both codes
initialise with variance 1e-10 are exact zeros here.) The reference code's own DDPM (`models/ddpm.py`, which its
`configs/vp/ddpm/cifar10.py` trains) attends only once per level on the upsampling path, 35,218,947 parameters:
set `config.model.attn_every_up_block = False` for that network.

Training follows `configs/vp/ddpm/cifar10.py` of the reference code: the discrete DDPM chain (1000 levels, beta
linear from 1e-4 to 0.02, i.e. beta_min = 0.1, beta_max = 20 in the continuous notation) with the simple loss
(noise prediction, mean over dimensions); Adam at 2e-4 with a 5000-step warm-up, clipping at 1; batch 128 for
1.3 M steps (Ho et al.: 800 k); EMA 0.9999; ancestral sampling with 1000 steps.
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
