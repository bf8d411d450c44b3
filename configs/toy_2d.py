"""A 2-D toy density (eight Gaussians) with a small MLP on the VP SDE: trains in about a minute on a CPU.

    python run_train.py --config configs/toy_2d.py --workdir /tmp/toy
    python run_train.py --config configs/toy_2d.py --workdir /tmp/moons --config.data.name=two_moons

Samples (probability-flow ODE, adaptive Tsit5) are drawn as a scatter plot into `workdir/samples/`.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.seed = 0
  config.data.name = "eight_gaussians"
  config.data.random_flip = False
  config.sde.name = "vp"
  config.model = default.model_config("mlp_toy")
  config.parameterization.name = "eps"
  config.loss.reduce_mean = True
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 100
  config.optim.schedule = "cosine"
  config.optim.final_lr_ratio = 0.1
  config.training.batch_size = 512
  config.training.num_train_steps = 3000
  config.training.steps_per_call = 1
  config.training.ema_rate = 0.999
  config.training.ema_warmup = True
  config.training.log_every = 100
  config.training.checkpoint_every = 1000
  config.training.snapshot_every = 500
  config.training.sample_every = 0
  config.sampling.method = "ode"
  config.sampling.num_samples = 1000
  config.eval.bpd.num_examples = 4096
  config.eval.samples.num_samples = 4096
  config.eval.batch_size = 512
  return config
