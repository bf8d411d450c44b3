"""scoreflow: score-based generative modelling through SDEs, as pure JAX functions over pytrees."""

from scoreflow.sde import AbstractSDE as AbstractSDE
from scoreflow.sde import AbstractVPSDE as AbstractVPSDE
from scoreflow.sde import CosineVPSDE as CosineVPSDE
from scoreflow.sde import DDPMChain as DDPMChain
from scoreflow.sde import SMLDChain as SMLDChain
from scoreflow.sde import SubVPSDE as SubVPSDE
from scoreflow.sde import VESDE as VESDE
from scoreflow.sde import VPSDE as VPSDE

from scoreflow.parameterization import AbstractParameterization as AbstractParameterization
from scoreflow.parameterization import DataParameterization as DataParameterization
from scoreflow.parameterization import EDMPreconditioning as EDMPreconditioning
from scoreflow.parameterization import EpsilonParameterization as EpsilonParameterization
from scoreflow.parameterization import NoiseConditioning as NoiseConditioning
from scoreflow.parameterization import ScoreParameterization as ScoreParameterization
from scoreflow.parameterization import VParameterization as VParameterization
from scoreflow.parameterization import eps_to_score as eps_to_score
from scoreflow.parameterization import make_conditional_score_fn as make_conditional_score_fn
from scoreflow.parameterization import make_score_fn as make_score_fn
from scoreflow.parameterization import score_to_eps as score_to_eps
from scoreflow.parameterization import score_to_v as score_to_v
from scoreflow.parameterization import score_to_x0 as score_to_x0
from scoreflow.parameterization import v_to_score as v_to_score
from scoreflow.parameterization import x0_to_score as x0_to_score

from scoreflow.losses import LossAux as LossAux
from scoreflow.losses import ddpm_loss as ddpm_loss
from scoreflow.losses import dsm_likelihood_bound as dsm_likelihood_bound
from scoreflow.losses import dsm_loss as dsm_loss
from scoreflow.losses import edm_loss as edm_loss
from scoreflow.losses import noisy_classifier_loss as noisy_classifier_loss
from scoreflow.losses import sample_uniform as sample_uniform
from scoreflow.losses import smld_loss as smld_loss


from scoreflow.sampling import CORRECTORS as CORRECTORS
from scoreflow.sampling import Corrector as Corrector
from scoreflow.sampling import PREDICTORS as PREDICTORS
from scoreflow.sampling import Predictor as Predictor
from scoreflow.sampling import SampleInfo as SampleInfo
from scoreflow.sampling import ddim_sample as ddim_sample
from scoreflow.sampling import dpm_solver_pp_sample as dpm_solver_pp_sample
from scoreflow.sampling import edm_sample as edm_sample
from scoreflow.sampling import edm_sigmas as edm_sigmas
from scoreflow.sampling import ode_sample as ode_sample
from scoreflow.sampling import pc_sample as pc_sample
from scoreflow.sampling import time_grid as time_grid

from scoreflow.likelihood import BitsPerDimEstimate as BitsPerDimEstimate
from scoreflow.likelihood import LikelihoodInfo as LikelihoodInfo
from scoreflow.likelihood import ODESolveInfo as ODESolveInfo
from scoreflow.likelihood import SolveStatus as SolveStatus
from scoreflow.likelihood import bits_per_dim as bits_per_dim
from scoreflow.likelihood import decode as decode
from scoreflow.likelihood import dequantize as dequantize
from scoreflow.likelihood import encode as encode
from scoreflow.likelihood import evaluate_bits_per_dim as evaluate_bits_per_dim
from scoreflow.likelihood import exact_divergence as exact_divergence
from scoreflow.likelihood import hutchinson_divergence as hutchinson_divergence
from scoreflow.likelihood import log_likelihood as log_likelihood
from scoreflow.likelihood import sample_probes as sample_probes
from scoreflow.likelihood import summarize_bits_per_dim as summarize_bits_per_dim

from scoreflow.flow import ErrorControl as ErrorControl
from scoreflow.flow import solve_flow as solve_flow

from scoreflow.bounds import DDPMBoundTerms as DDPMBoundTerms
from scoreflow.bounds import continuous_bound_bpd as continuous_bound_bpd
from scoreflow.bounds import continuous_nll_bound as continuous_nll_bound
from scoreflow.bounds import ddpm_kl_term as ddpm_kl_term
from scoreflow.bounds import ddpm_vlb_bpd as ddpm_vlb_bpd
from scoreflow.bounds import ddpm_vlb_terms as ddpm_vlb_terms
from scoreflow.bounds import discretized_gaussian_log_prob as discretized_gaussian_log_prob

from scoreflow.guidance import classifier_free_score as classifier_free_score
from scoreflow.guidance import classifier_guided_score as classifier_guided_score
from scoreflow.guidance import colorize_sample as colorize_sample
from scoreflow.guidance import conditional_score as conditional_score
from scoreflow.guidance import inpaint_sample as inpaint_sample
from scoreflow.guidance import linear_inverse_score as linear_inverse_score
from scoreflow.guidance import masked_inverse_score as masked_inverse_score

__version__ = "0.1.0"
