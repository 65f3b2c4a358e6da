"""gsu-jax: gradient-surgery machine unlearning for generative models in JAX/Flax."""

from gsu_jax.per_example import (
    per_example_directional_derivatives,
    per_example_grads,
    per_example_losses,
    per_example_projected_mean,
    weighted_grad_sum,
)
from gsu_jax.surgery import ProjectNormalPlaneState, ProjectOffSpanState, project_normal_plane, project_off_span

__version__ = "0.1.0"

__all__ = [
    "ProjectNormalPlaneState",
    "ProjectOffSpanState",
    "per_example_directional_derivatives",
    "per_example_grads",
    "per_example_losses",
    "per_example_projected_mean",
    "project_normal_plane",
    "project_off_span",
    "weighted_grad_sum",
]
