"""CIFAR-10, DDPM++ (continuous) on the VP SDE: Song et al. (2021), Table 3 ("DDPM++ cont. (VP)").

Paper hyper-parameters: VP SDE with beta in [0.1, 20]; the 61.80 M-parameter DDPM++ (4 BigGAN residual blocks per
resolution, attention at 16x16, positional embedding of 999 t, dropout 0.1, skip rescaling); noise prediction
(eps) with the loss averaged over dimensions; Adam at 2e-4 with a 5000-step warm-up, gradient clipping at 1;
batch 128 for 1.3 M steps; EMA 0.9999; data centred to [-1, 1] with random flips; Euler-Maruyama sampling with
1000 steps. CIFAR-10 must be prepared with tfds in `config.data.data_dir` (see the README).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.name = "cifar10"
  config.data.random_flip = True
  config.data.scaler = "centred"
  config.sde.name = "vp"
  config.model = default.model_config("ddpmpp_cifar10")
  config.parameterization.name = "eps"
  config.loss.reduce_mean = True
  config.training.ema_rate = 0.9999
  # The reference JAX code fuses 5 steps per call; on accelerators that hides dispatch latency.
  config.training.steps_per_call = 5
  config.sampling.method = "pc"
  config.sampling.predictor = "euler_maruyama"
  config.sampling.corrector = "none"
  config.sampling.num_steps = 1000
  return config
