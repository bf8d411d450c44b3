"""Samplers for score-based models: predictor-corrector, probability-flow ODE, DDIM, EDM and DPM-Solver++.

Each sampler is a pure function `sampler(key, sde, score_fn, shape, **options) -> (x, SampleInfo)` that compiles
to one XLA program; options that fix the program (shape, step counts, method names, dtype) are Python values.
"""

from scoreflow.sampling._common import SampleInfo as SampleInfo
from scoreflow.sampling._common import time_grid as time_grid

from scoreflow.sampling.predictors import PREDICTORS as PREDICTORS
from scoreflow.sampling.predictors import Predictor as Predictor
from scoreflow.sampling.predictors import ancestral_posterior as ancestral_posterior
from scoreflow.sampling.predictors import ancestral_predictor as ancestral_predictor
from scoreflow.sampling.predictors import euler_maruyama_predictor as euler_maruyama_predictor
from scoreflow.sampling.predictors import none_predictor as none_predictor
from scoreflow.sampling.predictors import reverse_diffusion_predictor as reverse_diffusion_predictor

from scoreflow.sampling.correctors import CORRECTORS as CORRECTORS
from scoreflow.sampling.correctors import Corrector as Corrector
from scoreflow.sampling.correctors import annealed_langevin_corrector as annealed_langevin_corrector
from scoreflow.sampling.correctors import langevin_corrector as langevin_corrector
from scoreflow.sampling.correctors import none_corrector as none_corrector

from scoreflow.sampling.pc import pc_sample as pc_sample
from scoreflow.sampling.ode import ode_sample as ode_sample
from scoreflow.sampling.ddim import ddim_sample as ddim_sample
from scoreflow.sampling.ddim import ddim_step as ddim_step
from scoreflow.sampling.edm import edm_sample as edm_sample
from scoreflow.sampling.edm import edm_sigmas as edm_sigmas
from scoreflow.sampling.dpm_solver import dpm_solver_pp_sample as dpm_solver_pp_sample
