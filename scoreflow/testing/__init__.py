"""Ground truth for testing score-based models: data with closed-form scores and densities."""

from scoreflow.testing.analytic import GaussianMixture as GaussianMixture
from scoreflow.testing.analytic import LabelledGaussianMixture as LabelledGaussianMixture
from scoreflow.testing.analytic import MultivariateGaussian as MultivariateGaussian
from scoreflow.testing.analytic import affine_score_moments as affine_score_moments
from scoreflow.testing.analytic import ContinuousBoundTerms as ContinuousBoundTerms
from scoreflow.testing.analytic import DDPMBoundClosedForm as DDPMBoundClosedForm
from scoreflow.testing.analytic import ddpm_eps_fn as ddpm_eps_fn
from scoreflow.testing.analytic import expected_continuous_bound as expected_continuous_bound
from scoreflow.testing.analytic import expected_ddpm_kl_terms as expected_ddpm_kl_terms
