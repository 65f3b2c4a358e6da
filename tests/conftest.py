"""Shared pytest configuration and fixtures for the gsu-jax test suite."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import hypothesis
import jax
import numpy as np
import pytest

# JAX compiles on first use, so one example can take far longer than the next:
# wall-clock deadlines would only measure compilation. Every property test sets
# its own bounded max_examples.
hypothesis.settings.register_profile("gsu_jax", deadline=None, print_blob=True)
hypothesis.settings.load_profile("gsu_jax")

# A small nested pytree layout (dicts, a list, a scalar leaf) for property
# tests. Property tests vary values, scales and seeds over a fixed set of
# layouts so jitted functions compile once per layout, not once per example.
TREE_LAYOUT = {
    "dense": {"kernel": (5, 3), "bias": (3,)},
    "conv": [(2, 2, 1, 2)],
    "scale": (),
}


@pytest.fixture(scope="session")
def make_tree() -> Callable[..., Any]:
    """Returns ``make_tree(seed, layout=TREE_LAYOUT, *, leading=(), scale=1.0,
    dtype=np.float32)``: a pytree of standard-normal arrays (times ``scale``)
    shaped like ``layout`` (shape tuples as leaves), each leaf with the extra
    leading axes ``leading`` in front; numpy arrays, deterministic in ``seed``.
    """

    def build(
        seed: int, layout: Any = None, *, leading: tuple[int, ...] = (), scale: float = 1.0, dtype: Any = np.float32
    ) -> Any:
        rng = np.random.default_rng(seed)
        layout = TREE_LAYOUT if layout is None else layout
        return jax.tree.map(
            lambda shape: (scale * rng.standard_normal(tuple(leading) + shape)).astype(dtype),
            layout,
            is_leaf=lambda node: isinstance(node, tuple),
        )

    return build
