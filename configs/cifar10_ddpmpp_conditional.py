"""Class-conditional CIFAR-10: the paper's DDPM++ cont. (VP) (`cifar10_ddpmpp_continuous.py`, Song et al. 2021)
with a learned embedding of the 10 classes plus the null class added to its noise embedding, trained with label
dropout 0.1 for classifier-free guidance (Ho & Salimans 2022). Sample grids have one row per class.
CIFAR-10 must be prepared with tfds in `config.data.data_dir` (see the README).
"""

from configs import cifar10_ddpmpp_continuous


def get_config():
  config = cifar10_ddpmpp_continuous.get_config()
  config.model.num_classes = 10
  config.training.label_dropout = 0.1
  config.sampling.num_samples = 100  # 10 per class: a 10 x 10 grid, one row per class.
  return config
