"""Class-conditional 8x8 digits: `digits_vp.py` with a class embedding (10 digits plus the null class) and label
dropout 0.1, so one network gives both s(x, t | y) and s(x, t) for classifier-free guidance (Ho & Salimans 2022).

Trains in about 5 minutes on 2 CPU cores, like digits_vp:

    python run_train.py --config configs/digits_vp_conditional.py --workdir /tmp/digits_vp_conditional

The final sample grid (`workdir/samples/step_1500.png`, DPM-Solver++(2M), 50 steps, guidance scale 0) has one row
per digit, 0 at the top, 10 samples each.
"""

from configs import digits_vp


def get_config():
  config = digits_vp.get_config()
  config.model.num_classes = 10
  config.training.label_dropout = 0.1
  config.sampling.num_samples = 100  # 10 per class: a 10 x 10 grid, one row per digit.
  return config
