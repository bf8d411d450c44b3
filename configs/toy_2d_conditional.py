"""Class-conditional eight Gaussians: `toy_2d.py`'s MLP with a class embedding of the 8 components (the toy stream
labels each point with the component it was drawn from) and label dropout 0.1, so that one network gives every
component's score and the mixture's for classifier-free guidance. Trains in about a minute on a CPU:

    python run_train.py --config configs/toy_2d_conditional.py --workdir /tmp/toy_conditional

Samples go to `workdir/samples/` with their labels (`labels` in the `.npz`: `i % 8`, guidance scale 0).
"""

from configs import toy_2d


def get_config():
  config = toy_2d.get_config()
  config.data.name = "eight_gaussians"
  config.model.num_classes = 8
  config.training.label_dropout = 0.1
  return config
