"""Shared pytest configuration and fixtures for the gsu-jax test suite."""

from __future__ import annotations

import os
import shutil
import tempfile
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

# One persistent XLA compilation cache for the whole test session, shared by both xdist workers and every
# train.py / unlearn.py subprocess (they inherit the environment): most of the suite's time is compiling the same
# smoke-config programs again in each process. The directory is new for every session, so each run starts cold and
# the suite's measured time stays honest. JAX writes cache entries in place; a process that reads an entry another
# one is still writing (or one a SIGKILLed run left half-written) gets a decompression error, which JAX turns into a
# warning and a fresh compile. The two warnings are ignored so the one-line-error tests see only the product's line.
CACHE_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
CACHE_WARNINGS = (
    "ignore:Error reading persistent compilation cache entry",
    "ignore:Error writing persistent compilation cache entry",
)
_CACHE_OWNED = pytest.StashKey[str]()
# XLA:CPU's LLVM back end at optimisation level 0 for everything the tests compile (in-process and in the
# subprocesses, which inherit XLA_FLAGS). The suite is dominated by compiling tiny programs, not by running them;
# measured on 2 cores, level 0 took the suite from 995 to 809 s of worker time (8 min 37 s to 7 min 4 s). It changes
# the machine code, not the HLO or its semantics; results differ from the default level by float32 summation
# order only, which the tests' tolerances (and their bit-identity checks, which compare runs under the same flags)
# allow. The README's tables and bench numbers come from runs without it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and not os.environ.get("GSU_JAX_TEST_XLA_CACHE"):
        # The controlling process (or a run without xdist): made before xdist starts its workers, which inherit it.
        directory = tempfile.mkdtemp(prefix="gsu_jax_test_xla_cache_")
        config.stash[_CACHE_OWNED] = directory
        os.environ["GSU_JAX_TEST_XLA_CACHE"] = directory
        os.environ[CACHE_VARIABLE] = directory
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), *CACHE_WARNINGS]))
        if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), TEST_XLA_FLAGS]))
    # jax is already imported here (above), so its flags are set directly as well as through the environment.
    jax.config.update("jax_compilation_cache_dir", os.environ["GSU_JAX_TEST_XLA_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    for entry in CACHE_WARNINGS:
        config.addinivalue_line("filterwarnings", entry)


def pytest_unconfigure(config: pytest.Config) -> None:
    directory = config.stash.get(_CACHE_OWNED, None)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


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
