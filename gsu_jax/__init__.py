"""gsu-jax: gradient-surgery machine unlearning for generative models in JAX/Flax.

The public API, by what it is:

* the projections, pure functions of pytrees (:mod:`gsu_jax.projections`): :func:`normal_plane_projection`,
  :func:`mean_normal_plane_projection`, :func:`off_span_projection`;
* the same as optax transforms taking the protected direction as the extra argument ``direction=``
  (:mod:`gsu_jax.surgery`): :func:`project_normal_plane`, :func:`project_off_span` and their states;
* the per-example engine (:mod:`gsu_jax.per_example`): per-example losses and gradients, and what needs none of
  them materialised (directional derivatives, weighted sums, :func:`per_example_projected_mean`);
* the unlearning methods (:mod:`gsu_jax.methods`): :func:`make_method`, the registry :data:`METHODS` and
  :data:`RECOMMENDED_METHOD`;
* unlearning your own model in one call (:mod:`gsu_jax.unlearner`): :func:`unlearn` and its :class:`UnlearnResult`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gsu_jax.per_example import (
    per_example_directional_derivatives,
    per_example_grads,
    per_example_losses,
    per_example_projected_mean,
    weighted_grad_sum,
)
from gsu_jax.projections import mean_normal_plane_projection, normal_plane_projection, off_span_projection
from gsu_jax.surgery import ProjectNormalPlaneState, ProjectOffSpanState, project_normal_plane, project_off_span

if TYPE_CHECKING:
    from gsu_jax.methods import METHODS, RECOMMENDED_METHOD, make_method
    from gsu_jax.unlearner import UnlearnResult, unlearn

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "RECOMMENDED_METHOD",
    "ProjectNormalPlaneState",
    "ProjectOffSpanState",
    "UnlearnResult",
    "make_method",
    "mean_normal_plane_projection",
    "normal_plane_projection",
    "off_span_projection",
    "per_example_directional_derivatives",
    "per_example_grads",
    "per_example_losses",
    "per_example_projected_mean",
    "project_normal_plane",
    "project_off_span",
    "unlearn",
    "weighted_grad_sum",
]

# The methods import Flax and the models (about a second on top of JAX and optax), which the transforms and the
# per-example engine do not need: they are imported on first use, so `import gsu_jax` costs what JAX and optax cost.
_LAZY_ATTRIBUTES = {
    "METHODS": "gsu_jax.methods",
    "RECOMMENDED_METHOD": "gsu_jax.methods",
    "make_method": "gsu_jax.methods",
    "UnlearnResult": "gsu_jax.unlearner",
    "unlearn": "gsu_jax.unlearner",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_ATTRIBUTES:
        value = getattr(importlib.import_module(_LAZY_ATTRIBUTES[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
