"""Ground truth for testing score-based models: data with closed-form scores and densities."""

from scoreflow.testing.analytic import GaussianMixture as GaussianMixture
