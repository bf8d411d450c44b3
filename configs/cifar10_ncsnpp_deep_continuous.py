"""CIFAR-10, NCSN++ (deep, continuous) on the VE SDE: Song et al. (2021), Table 3 ("NCSN++ cont. (deep, VE)"):
8 residual blocks per resolution (107.59 M parameters), 950 k steps; otherwise `cifar10_ncsnpp_continuous.py`,
including the reference code's VE kernel sigma(t) = 0.01 * 5000^t (`sde.ve_kernel="reference"`)."""

from configs import cifar10_ncsnpp_continuous, default


def get_config():
  config = cifar10_ncsnpp_continuous.get_config()
  config.model = default.model_config("ncsnpp_deep_cifar10", centered=False)
  config.training.num_train_steps = 950_000
  return config
