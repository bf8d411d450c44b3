"""CIFAR-10, DDPM++ (continuous) on the sub-VP SDE: Song et al. (2021), Table 3 ("DDPM++ cont. (sub-VP)").

As `cifar10_ddpmpp_continuous.py` with the sub-VP SDE (beta in [0.1, 20]); the network predicts the noise scaled by
the sub-VP marginal standard deviation.
"""

from configs import cifar10_ddpmpp_continuous


def get_config():
  config = cifar10_ddpmpp_continuous.get_config()
  config.sde.name = "subvp"
  return config
