"""A noise-conditional classifier p_t(y | x_t) of the 8x8 digits on the VP SDE, for classifier guidance of
`digits_vp.py`'s score model (Song et al. 2021, Sec. 5; their controllable generation trains such a time-dependent
classifier on perturbed data).

The classifier is the DDPM++ digits U-Net's downsampling path with the same `999 t` noise embedding, global average
pooling and 10 logits (preset `classifier_digits`), trained with the cross-entropy of the labels at
x_t ~ p_t(x_t | x_0), t ~ U[eps, 1] (`config.loss.name = "classifier"`). A few minutes on 2 CPU cores:

    python run_train.py --config configs/digits_classifier.py --workdir /tmp/digits_classifier

The run logs the accuracy on its noisy batches (averaged over t, so well below the clean-data accuracy: at t near 1
nothing is left to classify) and draws no samples. Guide with
`scoreflow.parameterization.make_classifier_log_prob_fn(apply_fn, params, sde, EpsilonParameterization())`.
"""

from configs import default, digits_vp


def get_config():
  config = digits_vp.get_config()  # The digits, the VP SDE, the optimizer and the training schedule of digits_vp.
  config.seed = 0
  config.model = default.model_config("classifier_digits")
  # The noise conditioning of digits_vp's eps network (999 t), so that both read t alike.
  config.parameterization.name = "eps"
  config.loss.name = "classifier"
  config.training.sample_every = 0
  return config
