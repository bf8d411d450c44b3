"""CIFAR-10, DDPM++ (deep, continuous) on the VP SDE: Song et al. (2021), Table 3 ("DDPM++ cont. (deep, VP)").

As `cifar10_ddpmpp_continuous.py` with 8 residual blocks per resolution (106.63 M parameters), trained for 950 k steps.
"""

from configs import cifar10_ddpmpp_continuous, default


def get_config():
  config = cifar10_ddpmpp_continuous.get_config()
  config.model = default.model_config("ddpmpp_deep_cifar10")
  config.training.num_train_steps = 950_000
  return config
