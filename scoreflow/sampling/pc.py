r"""Predictor-corrector sampling of the reverse-time SDE (Song et al. 2021, Algorithm 1 with Algorithms 2-4)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from scoreflow.sde import AbstractSDE
from scoreflow.sampling import _common
from scoreflow.sampling._common import SampleInfo, ScoreFn
from scoreflow.sampling.correctors import CORRECTORS, Corrector, none_corrector
from scoreflow.sampling.predictors import PREDICTORS, Predictor, none_predictor


def pc_sample(key, sde: AbstractSDE, score_fn: ScoreFn, shape, *,
              predictor: str | Predictor = "reverse_diffusion",
              corrector: str | Corrector = "langevin",
              num_steps: int = 1000, snr=0.16, n_corrector_steps: int = 1, eps=1e-3, denoise: bool = True,
              dtype=jnp.float32, corrector_first: bool = False, x_T=None,
              project: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None
              ) -> tuple[jax.Array, SampleInfo]:
  r"""Samples the reverse SDE with a predictor-corrector scheme, as one `lax.scan`.

  On the grid :math:`T = t_0 > t_1 > \dots > t_N = \epsilon` (uniform in `t`), starting from
  :math:`x_{t_0} \sim` the prior, each of the `N` steps runs, in the paper's order (Algorithm 1),

  1. the predictor from :math:`t_i` to :math:`t_{i+1}` (one reverse-SDE step), then
  2. `n_corrector_steps` corrector (Langevin) steps at :math:`t_{i+1}`.

  With `corrector_first=True` it runs the 2021 code's order instead: correct at :math:`t_i`, then predict to
  :math:`t_{i+1}`. Predictor `"none"` with corrector `"ald"` (or `"langevin"`) is annealed Langevin dynamics
  (Song & Ermon 2019) at the levels :math:`t_1, \dots, t_N` (in either order, so that it ends at :math:`\epsilon`);
  corrector `"none"` gives a predictor-only sampler.

  The function is pure and traceable; `shape`, `num_steps`, `n_corrector_steps`, the names, `denoise`, `dtype` and
  `corrector_first` fix the program and must be Python values. Jit it with those (and `score_fn`) closed over,
  e.g. `jax.jit(lambda key: pc_sample(key, sde, score_fn, (512, 2), num_steps=500))`, or with
  `jax.jit(pc_sample, static_argnames=(...))`; a new key or new `sde`/`snr`/`eps` values then do not recompile.
  It also runs under `jax.vmap` over keys.

  Args:
    key: PRNG key.
    sde: the forward process.
    score_fn: `score_fn(x [B, *D], t [B]) -> [B, *D]`.
    shape: sample shape `[B, *D]` (Python ints).
    predictor: a name in :data:`~scoreflow.sampling.predictors.PREDICTORS` (`"euler_maruyama"`,
      `"reverse_diffusion"`, `"ancestral"`, `"none"`) or a :class:`~scoreflow.sampling.predictors.Predictor`.
    corrector: a name in :data:`~scoreflow.sampling.correctors.CORRECTORS` (`"langevin"`, `"ald"`, `"none"`) or
      a :class:`~scoreflow.sampling.correctors.Corrector`.
    num_steps: the number of noise levels / predictor steps `N`.
    snr: the corrector's signal-to-noise ratio `r` (0.16 for VE/CIFAR-10 in the paper, 0.01 for VP).
    n_corrector_steps: corrector steps per level `M`.
    eps: the last time :math:`\epsilon`.
    denoise: if True, finish with Tweedie's denoiser, the posterior mean
      :math:`\hat x_0 = E[x_0 \mid x_\epsilon] = (x + \sigma_\epsilon^2 s_\theta(x, \epsilon))/\alpha_\epsilon`
      (one more evaluation), as NCSNv2 does after annealed Langevin dynamics. The 2021 code instead returns the
      last predictor step without its noise, which agrees with it to first order in the last step size; returning
      the noise-free mean of a final *corrector* step would shrink narrow modes by a factor
      :math:`1 - \epsilon_{\rm Langevin}/s^2`, so neither order uses that.
    dtype: floating dtype of the samples (and of the times passed to `score_fn`).
    corrector_first: run the corrector before the predictor at each level (the 2021 code's order).
    x_T: optional initial state `[B, *D]` replacing the prior draw (e.g. to compare samplers on shared noise).
    project: optional `project(key, x [B, *D], t [B]) -> x`, applied after every predictor step (at its end time)
      and after every single corrector step: a constraint on the state, e.g. inpainting's replacement of the
      observed values by a fresh forward-noised observation (:func:`scoreflow.inpaint_sample`). With it the
      corrector's `n_corrector_steps` run one at a time.

  Returns:
    `(x, info)`: samples `[B, *D]` in `dtype` and a :class:`~scoreflow.sampling.SampleInfo` with
    `nfe = N * (predictor.nfe + M * corrector.nfe_per_step)`, plus one with `denoise`.

  Raises:
    ValueError: for an unknown predictor/corrector name, a bad `shape`, `num_steps < 1`,
      `n_corrector_steps < 0`, `snr <= 0`, `eps` outside `(0, T)`, or `x_T` of the wrong shape.

  References:
    Song, Sohl-Dickstein, Kingma, Kumar, Ermon, Poole. Score-Based Generative Modeling through Stochastic
    Differential Equations. ICLR 2021.

  Example:
    >>> import jax, jax.numpy as jnp, scoreflow as sf
    >>> from scoreflow.testing import GaussianMixture
    >>> sde = sf.VPSDE()
    >>> score_fn = GaussianMixture.gaussian(jnp.zeros(2), 1.0).score(sde)
    >>> x, info = sf.pc_sample(jax.random.key(0), sde, score_fn, (8, 2), num_steps=100)
    >>> x.shape, int(info.nfe)
    ((8, 2), 201)
  """
  owner = "pc_sample"
  key_init, key_steps = jax.random.split(key)
  shape, dtype, score_fn, x = _common.start(owner, key_init, sde, score_fn, shape, dtype, eps, x_T, num_steps)
  _common.check_num_steps(owner, n_corrector_steps, minimum=0, name="n_corrector_steps")
  _common.check_range(owner, "snr", snr, low=0, low_open=True)
  predictor = _common.choose(owner, "predictor", predictor, PREDICTORS)
  corrector = _common.choose(owner, "corrector", corrector, CORRECTORS)
  times = _common.time_grid(sde, num_steps, eps, "uniform", dtype)
  run_predictor = predictor.update is not none_predictor
  run_corrector = corrector.update is not none_corrector and n_corrector_steps > 0

  def correct(key, x, t, alpha):
    if not run_corrector:
      return x
    if project is None:
      x, _ = corrector.update(key, sde, score_fn, x, _common.batch_time(t, x), snr=snr, n_steps=n_corrector_steps,
                              alpha=_common.batch_time(alpha, x))
      return x

    def one_step(i, x):
      key_update, key_project = jax.random.split(jax.random.fold_in(key, i))
      x, _ = corrector.update(key_update, sde, score_fn, x, _common.batch_time(t, x), snr=snr, n_steps=1,
                              alpha=_common.batch_time(alpha, x))
      return project(key_project, x, _common.batch_time(t, x))

    return jax.lax.fori_loop(0, n_corrector_steps, one_step, x)

  def predict(key, x, t, t_next):
    if not run_predictor:
      return x
    key_update, key_project = jax.random.split(key) if project is not None else (key, None)
    x, _ = predictor.update(key_update, sde, score_fn, x, _common.batch_time(t, x), _common.batch_time(t_next, x))
    return x if project is None else project(key_project, x, _common.batch_time(t_next, x))

  def step(x, inputs):
    step_key, t, t_next = inputs
    key_predictor, key_corrector = jax.random.split(step_key)
    # The signal that one forward step of the grid keeps, (alpha(t) / alpha(t_next))^2: 1 - beta_i for the VP and
    # sub-VP SDEs, 1 for VE; the Langevin correctors scale their step by it (Song et al. 2021, Algorithm 5).
    alpha = jnp.exp(2 * (sde.log_alpha(t) - sde.log_alpha(t_next)))
    if corrector_first and run_predictor:
      x = predict(key_predictor, correct(key_corrector, x, t, alpha), t, t_next)
    else:
      x = correct(key_corrector, predict(key_predictor, x, t, t_next), t_next, alpha)
    return x, None

  x, _ = jax.lax.scan(step, x, (jax.random.split(key_steps, num_steps), times[:-1], times[1:]))
  nfe = num_steps * (predictor.nfe * run_predictor + corrector.nfe_per_step * n_corrector_steps * run_corrector)
  return _common.finish(sde, score_fn, x, eps, denoise, _common.fixed_step_info(nfe, num_steps))
