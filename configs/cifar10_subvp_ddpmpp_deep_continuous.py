"""CIFAR-10, DDPM++ (deep, continuous) on the sub-VP SDE: Song et al. (2021), Table 3 ("DDPM++ cont. (deep,
sub-VP)"): 8 residual blocks per resolution, 950 k steps."""

from configs import cifar10_ddpmpp_deep_continuous


def get_config():
  config = cifar10_ddpmpp_deep_continuous.get_config()
  config.sde.name = "subvp"
  return config
