"""Tests for gsu_jax.methods: every registered method on a tiny VAE-like model written here.

Exactness checks capture the update direction ``u`` with an "optimizer" that stores it in its state and leaves the
parameters unchanged (so consecutive steps see the same parameters), then compare ``u`` with references computed
another way: materialised per-example gradients, NumPy float64, finite differences in float64. Compiled steps are
shared through a module-scoped cache: each (method, configuration) compiles once.
"""

from __future__ import annotations

import doctest
import functools
import math
import re
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from gsu_jax import methods
from gsu_jax.methods import METHODS, REQUIRED, make_method, resolve_hparams, split_step_keys
from gsu_jax.per_example import per_example_grads as _per_example_grads
from gsu_jax.projections import mean_normal_plane_projection
from gsu_jax.trees import tree_norm

DATA_DIM, LATENT_DIM = 6, 2
FORGET_SIZE, RETAIN_SIZE = 8, 8
METRIC_NAMES = {"forget_loss", "retain_loss", "cos_forget_retain", "projected", "gated_fraction", "update_norm"}
# Methods whose update ascends the forget loss (to first order) on every step.
FORGET_ASCENDING = ("sa", "sa_conflict", "sa_per_example", "sa_span", "pcgrad", "ascent", "sa_gated")
RETAIN_DESCENDING = ("s", "retain_finetune", "pcgrad")
# Hyperparameters the tests pass by default (sa_gated: a target no example reaches, i.e. full ascent).
TEST_HPARAMS: dict[str, dict[str, Any]] = {
    "sa_gated": {"forget_loss_target": math.inf},
    "sa_span": {"num_directions": 4},
    "remap_surgery": {"image_field": "x"},
    "salun": {"image_field": "x"},
    "salun_surgery": {"image_field": "x"},
    "selective_amnesia": {"image_field": "x"},
    "selective_amnesia_surgery": {"image_field": "x"},
}
TRACE_COUNT = {"loss": 0}


def vae_like_loss(params, example, key):
    """A tiny VAE's negative ELBO: tanh encoder mean, learnt log-variance, linear decoder, one sample per key."""
    TRACE_COUNT["loss"] += 1  # runs only while tracing: counts retraces
    x = example["x"]
    mean = jnp.tanh(x @ params["encoder"]["w"] + params["encoder"]["b"])
    logvar = params["logvar"]
    # float32 draws (cast) so the float64 finite-difference check sees the same noise as the float32 step.
    noise = jax.random.normal(key, (LATENT_DIM,), jnp.float32).astype(mean.dtype)
    z = mean + jnp.exp(0.5 * logvar) * noise
    recon = z @ params["decoder"]["w"] + params["decoder"]["b"]
    kl = 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar)
    # remap_surgery's surrogate: encode x, reconstruct the example's "target" (as gsu_jax.losses.negative_elbo).
    return 0.5 * jnp.sum(jnp.square(example.get("target", x) - recon)) + kl


def capture_direction() -> optax.GradientTransformation:
    """An "optimizer" whose state is the last update direction it saw and whose updates are zero."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(updates, state, params=None):
        del state, params
        return jax.tree.map(jnp.zeros_like, updates), updates

    return optax.GradientTransformation(init, update)


@pytest.fixture(scope="module")
def problem():
    key_params, key_forget, key_retain = jax.random.split(jax.random.key(0), 3)
    k1, k2 = jax.random.split(key_params)
    params = {
        "encoder": {"w": 0.5 * jax.random.normal(k1, (DATA_DIM, LATENT_DIM)), "b": jnp.zeros(LATENT_DIM)},
        "logvar": jnp.full((LATENT_DIM,), -1.0, jnp.float32),  # not weakly typed: steps return strong types
        "decoder": {"w": 0.5 * jax.random.normal(k2, (LATENT_DIM, DATA_DIM)), "b": jnp.zeros(DATA_DIM)},
    }
    forget_center = jnp.array([2.0, 1.5, 0.0, 0.0, 0.5, 0.0])
    retain_center = jnp.array([0.5, 0.0, 1.5, -1.0, 0.0, 1.0])
    # Labels only salun reads (its pseudo labels come from the retain batch); the loss ignores them.
    forget = {
        "x": forget_center + 0.3 * jax.random.normal(key_forget, (FORGET_SIZE, DATA_DIM)),
        "label": jnp.zeros(FORGET_SIZE, jnp.int32),
    }
    retain = {
        "x": retain_center + 0.3 * jax.random.normal(key_retain, (RETAIN_SIZE, DATA_DIM)),
        "label": jnp.arange(1, RETAIN_SIZE + 1, dtype=jnp.int32),
    }
    return params, forget, retain


class StepCache:
    """Builds and jits each (method, optimizer, loss, hparams) once for the whole module."""

    def __init__(self):
        self._steps: dict[tuple, tuple[methods.UnlearningMethod, Callable]] = {}

    def get(self, name, *, guidance_weight=0.0, **hparams):
        hparams = {**TEST_HPARAMS.get(name, {}), **hparams}
        cache_key = (name, guidance_weight, tuple(sorted(hparams.items())))
        if cache_key not in self._steps:
            method = make_method(
                name,
                loss_fn=vae_like_loss,
                optimizer=capture_direction(),
                guidance_loss=_guidance_loss if guidance_weight else None,
                guidance_weight=guidance_weight,
                **hparams,
            )
            self._steps[cache_key] = (method, jax.jit(method.step))
        return self._steps[cache_key]

    def direction(self, name, params, forget, retain, key, **kwargs):
        """``(u, metrics)`` of one step of ``name`` from a fresh state (capture optimizer)."""
        method, step = self.get(name, **kwargs)
        _, state, metrics = step(params, method.init(params), forget, retain, key)
        return state.optimizer, metrics


@pytest.fixture(scope="module")
def steps():
    return StepCache()


def _guidance_loss(params, key):
    """A stand-in guidance objective: a random quadratic in the decoder bias."""
    target = jax.random.normal(key, (DATA_DIM,))
    return jnp.sum(jnp.square(params["decoder"]["b"] - target))


per_example_grads = jax.jit(functools.partial(_per_example_grads, vae_like_loss))


def _mean_loss(params, batch, keys):
    return jnp.mean(jax.vmap(vae_like_loss, in_axes=(None, 0, 0))(params, batch, keys))


@jax.jit
def _gradients(params, forget, retain, key):
    """``(forget_keys, retain_keys, g_f, g_r)`` with exactly the keys a step draws from ``key``."""
    forget_keys, retain_keys, _ = split_step_keys(key, forget, retain)
    g_f = jax.grad(_mean_loss)(params, forget, forget_keys)
    g_r = jax.grad(_mean_loss)(params, retain, retain_keys)
    return forget_keys, retain_keys, g_f, g_r


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)])


def _expected_loss(params, batch, key, *, samples=64):
    """``E_eps mean_i l(x_i)`` over ``samples`` fixed noise draws (common random numbers across calls)."""
    size = batch["x"].shape[0]
    keys = jax.random.split(key, samples * size).reshape(samples, size)
    return float(jnp.mean(jax.vmap(lambda k: _mean_loss(params, batch, k))(keys)))


# ------------------------------------------------------------------------------------------------ registry


def test_registry_lists_every_method_with_its_record():
    expected = {
        "sa",
        "sa_conflict",
        "sa_per_example",
        "sa_span",
        "pcgrad",
        "s",
        "ascent",
        "ascent_descent",
        "retain_finetune",
        "uno",
        "uno_s",
        "sa_gated",
        "remap_surgery",
        "salun",
        "salun_surgery",
        "selective_amnesia",
        "selective_amnesia_surgery",
    }
    assert set(METHODS) == expected
    for name, record in METHODS.items():
        assert record.name == name
        assert record.rule and record.source and record.guidance
        assert set(record.defaults) == set(record.hparams)
    assert METHODS["uno"].defaults == {"orthogonality_weight": None}  # 1e3 / B_r, below
    assert METHODS["sa_gated"].defaults["forget_loss_target"] is REQUIRED
    assert "ours" in METHODS["sa_gated"].source


def test_resolve_hparams_fills_defaults_and_normalises_types():
    assert resolve_hparams("sa_span", num_directions=np.int64(4)) == {
        "num_directions": 4,
        "only_on_conflict": False,
    }
    resolved = resolve_hparams("sa_gated", forget_loss_target=3)
    assert resolved == {
        "forget_loss_target": 3.0,
        "temperature": 0.0,
        "only_on_conflict": True,
        "combine": "fill",
        "ascend_only": None,
    }
    assert isinstance(resolved["forget_loss_target"], float)


# ------------------------------------------------------------------------------------- every method, jitted


@pytest.mark.parametrize("name", sorted(METHODS))
def test_step_is_jitted_once_deterministic_and_finite(name, steps, problem):
    params, forget, retain = problem
    method, step = steps.get(name)
    state = method.init(params)
    key = jax.random.key(1)
    first = step(params, state, forget, retain, key)
    traces = TRACE_COUNT["loss"]
    again = step(params, state, forget, retain, key)
    chex.assert_trees_all_equal(first, again)  # same key, same everything
    new_params, new_state, metrics = first
    moved = jax.tree.map(lambda p, u: p - 0.01 * u, new_params, new_state.optimizer)
    step(moved, new_state, forget, retain, jax.random.key(2))  # new values, same shapes
    assert TRACE_COUNT["loss"] == traces, "the jitted step retraced"

    chex.assert_trees_all_equal_shapes_and_dtypes(new_state.optimizer, params)
    chex.assert_tree_all_finite(new_state.optimizer)
    assert int(new_state.step) == 1
    # A step computes only the gradients its rule reads; cos(g_f, g_r) needs both.
    expected = METRIC_NAMES if METHODS[name].gradients == {"forget", "retain"} else METRIC_NAMES - {"cos_forget_retain"}
    assert set(metrics) == expected
    for metric_name, value in metrics.items():
        assert value.shape == () and value.dtype == jnp.float32, metric_name
        assert np.isfinite(value), metric_name
    assert 0.0 <= float(metrics["projected"]) <= 1.0
    assert -1.0 <= float(metrics.get("cos_forget_retain", 0.0)) <= 1.0
    np.testing.assert_allclose(float(metrics["update_norm"]), np.linalg.norm(_flat(new_state.optimizer)), rtol=1e-5)


# One method per code path of a flat step: a projection of the two mean gradients, one gradient only, the jvp route,
# the linearisation with a mask, the group gradients taken leaf by leaf, a gradient of a gradient, the mask and the
# per-example Fisher of the recommended method.
FLAT_PATHS = ("s", "ascent", "sa_per_example", "sa_gated", "sa_span", "uno", "remap_surgery")


@pytest.mark.parametrize("name", FLAT_PATHS)
def test_the_flat_step_equals_the_step_on_the_parameter_tree(name, steps, problem):
    """The default step runs on one raveled parameter vector (masks included: ``sa_gated`` ascends the decoder
    only, ``remap_surgery`` pulls it only); ``flat_parameters=False`` keeps every leaf. Same direction and metrics
    to float32 rounding."""
    params, forget, retain = problem
    key = jax.random.key(3)
    extra = {"ascend_only": "decoder"} if name == "sa_gated" else {}
    flat_direction, flat_metrics = steps.direction(name, params, forget, retain, key, **extra)
    tree_direction, tree_metrics = steps.direction(name, params, forget, retain, key, flat_parameters=False, **extra)
    chex.assert_trees_all_close(flat_direction, tree_direction, rtol=2e-5, atol=1e-6)
    assert flat_metrics.keys() == tree_metrics.keys()
    for metric_name in flat_metrics:
        np.testing.assert_allclose(flat_metrics[metric_name], tree_metrics[metric_name], rtol=2e-5, atol=1e-6)


def test_the_optimizer_descends_the_update_direction(problem):
    """The step hands ``u`` to the optimizer as a gradient: plain SGD moves the parameters to ``params - lr * u``."""
    params, forget, retain = problem
    key = jax.random.key(1)
    method = make_method("sa", loss_fn=vae_like_loss, optimizer=optax.sgd(0.05))
    new_params, state, metrics = jax.jit(method.step)(params, method.init(params), forget, retain, key)
    capture = make_method("sa", loss_fn=vae_like_loss, optimizer=capture_direction())
    _, captured, captured_metrics = jax.jit(capture.step)(params, capture.init(params), forget, retain, key)
    chex.assert_trees_all_close(
        new_params, jax.tree.map(lambda p, u: p - 0.05 * u, params, captured.optimizer), rtol=1e-6, atol=1e-7
    )
    chex.assert_trees_all_equal(metrics, captured_metrics)
    assert int(state.step) == 1


@pytest.mark.parametrize("name", sorted(set(FORGET_ASCENDING) | set(RETAIN_DESCENDING)))
def test_few_sgd_steps_move_the_losses_the_right_way(name, steps, problem):
    """Three SGD steps (lr 0.02) along each method's update raise the expected forget loss (or lower the retain)."""
    params, forget, retain = problem
    method, step = steps.get(name)
    state = method.init(params)
    updated = params
    for index in range(3):
        _, state, _ = step(updated, state, forget, retain, jax.random.key(10 + index))
        updated = jax.tree.map(lambda p, u: p - 0.02 * u, updated, state.optimizer)
    eval_key = jax.random.key(99)
    if name in FORGET_ASCENDING:
        assert _expected_loss(updated, forget, eval_key) > _expected_loss(params, forget, eval_key) + 1e-3
    if name in RETAIN_DESCENDING:
        assert _expected_loss(updated, retain, eval_key) < _expected_loss(params, retain, eval_key) - 1e-3


def _uno_objective(params, forget, retain, forget_keys, retain_keys, *, weight):
    """``L_r + weight * cos^2(grad L_f, grad L_r)`` with first-order gradients only."""
    g_f = _flat_jax(jax.grad(_mean_loss)(params, forget, forget_keys))
    retain_loss, g_r = jax.value_and_grad(_mean_loss)(params, retain, retain_keys)
    g_r = _flat_jax(g_r)
    return retain_loss + weight * jnp.square(g_f @ g_r) / ((g_f @ g_f) * (g_r @ g_r))


def _default_uno_weight(retain):
    """UNO's default lambda on mean losses: the reference's 1e3 on summed losses divided by B_r."""
    return 1e3 / jax.tree.leaves(retain)[0].shape[0]


def test_uno_default_weight_is_the_reference_weight_rescaled_to_mean_losses():
    """grad [sum_i l_i + 1e3 cos^2] = B_r * grad [mean_i l_i + (1e3 / B_r) cos^2]: cos^2 does not see the scale."""
    assert methods.uno_orthogonality_weight(None, 128) == 1e3 / 128
    assert methods.uno_orthogonality_weight(1e3, 128) == 1e3
    assert methods.uno_orthogonality_weight(0.0, 7) == 0.0


def _flat_jax(tree):
    return jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(tree)])


def test_a_small_step_against_uno_s_update_descends_its_objective(steps, problem):
    """UNO's update is the gradient of L_r + lambda cos^2: a short step against it lowers that objective."""
    params, forget, retain = problem
    key = jax.random.key(3)
    forget_keys, retain_keys, _, _ = _gradients(params, forget, retain, key)
    update, _ = steps.direction("uno", params, forget, retain, key)
    norm = float(tree_norm(update))
    moved = jax.tree.map(lambda p, u: p - 1e-3 * u / norm, params, update)
    objective = jax.jit(functools.partial(_uno_objective, weight=_default_uno_weight(retain)))
    before = objective(params, forget, retain, forget_keys, retain_keys)
    assert objective(moved, forget, retain, forget_keys, retain_keys) < before - 1e-4 * norm * 1e-3


# ------------------------------------------------------------------------------- exact update directions


def test_sa_is_orthogonal_to_the_retain_gradient_and_s_to_the_forget_gradient(steps, problem):
    params, forget, retain = problem
    key = jax.random.key(5)
    _, _, g_f, g_r = _gradients(params, forget, retain, key)
    g_f, g_r = _flat(g_f), _flat(g_r)
    sa, metrics = steps.direction("sa", params, forget, retain, key)
    sa = _flat(sa)
    assert abs(sa @ g_r) <= 1e-5 * np.linalg.norm(sa) * np.linalg.norm(g_r)
    np.testing.assert_allclose(sa, -g_f + (g_f @ g_r) / (g_r @ g_r) * g_r, rtol=1e-5, atol=1e-6)
    assert float(metrics["projected"]) == 1.0
    np.testing.assert_allclose(
        float(metrics["cos_forget_retain"]), g_f @ g_r / np.linalg.norm(g_f) / np.linalg.norm(g_r), rtol=1e-5
    )
    np.testing.assert_allclose(float(metrics["update_norm"]), np.linalg.norm(sa), rtol=1e-5)

    s, _ = steps.direction("s", params, forget, retain, key)
    s = _flat(s)
    assert abs(s @ g_f) <= 1e-5 * np.linalg.norm(s) * np.linalg.norm(g_f)
    np.testing.assert_allclose(s, g_r - (g_f @ g_r) / (g_f @ g_f) * g_f, rtol=1e-5, atol=1e-6)


def test_sa_conflict_projects_only_on_conflict(steps, problem):
    params, forget, retain = problem
    key = jax.random.key(5)
    for retain_batch in (retain, forget):  # g_r = g_f: a sure conflict
        _, _, g_f, g_r = _gradients(params, forget, retain_batch, key)
        g_f, g_r = _flat(g_f), _flat(g_r)
        update, metrics = steps.direction("sa_conflict", params, forget, retain_batch, key)
        conflict = (-g_f) @ g_r < 0
        expected = -g_f + (g_f @ g_r) / (g_r @ g_r) * g_r if conflict else -g_f
        np.testing.assert_allclose(_flat(update), expected, rtol=1e-5, atol=1e-6)
        assert float(metrics["projected"]) == float(conflict)


def _numpy_pcgrad(g_f: np.ndarray, g_r: np.ndarray) -> np.ndarray:
    ascent, retain = -g_f, g_r
    dot = ascent @ retain
    ascent_part = ascent - dot / (retain @ retain) * retain if dot < 0 else ascent
    retain_part = retain - dot / (ascent @ ascent) * ascent if dot < 0 else retain
    return ascent_part + retain_part


@pytest.mark.parametrize("retain_source", ["retain", "forget", "negated"])
def test_pcgrad_equals_a_numpy_float64_reference(retain_source, steps, problem):
    params, forget, retain = problem
    retain_batch = {"retain": retain, "forget": forget, "negated": {"x": -retain["x"]}}[retain_source]
    key = jax.random.key(6)
    _, _, g_f, g_r = _gradients(params, forget, retain_batch, key)
    g_f, g_r = _flat(g_f), _flat(g_r)
    update, metrics = steps.direction("pcgrad", params, forget, retain_batch, key)
    np.testing.assert_allclose(_flat(update), _numpy_pcgrad(g_f, g_r), rtol=1e-5, atol=1e-6)
    assert float(metrics["projected"]) == float(-g_f @ g_r < 0)
    # Two-task PCGrad ascends the forget loss and descends the retain loss together, to first order.
    assert -_flat(update) @ g_f >= -1e-6 and _flat(update) @ g_r >= -1e-6


@pytest.mark.parametrize("only_on_conflict", [True, False])
def test_sa_per_example_equals_the_materialised_computation(only_on_conflict, steps, problem):
    params, forget, retain = problem
    key = jax.random.key(7)
    forget_keys, _, _, g_r = _gradients(params, forget, retain, key)
    grads = per_example_grads(params, forget, forget_keys)
    expected = mean_normal_plane_projection(jax.tree.map(jnp.negative, grads), g_r, only_on_conflict=only_on_conflict)
    update, metrics = steps.direction("sa_per_example", params, forget, retain, key, only_on_conflict=only_on_conflict)
    chex.assert_trees_all_close(update, expected, rtol=1e-5, atol=1e-6)
    derivatives = _flat_rows(grads) @ _flat(g_r)
    expected_fraction = np.mean(derivatives > 0) if only_on_conflict else 1.0
    np.testing.assert_allclose(float(metrics["projected"]), expected_fraction, rtol=1e-6)
    if not only_on_conflict:  # projection off a fixed vector is linear: the mean of projections is sa's update
        sa, _ = steps.direction("sa", params, forget, retain, key)
        chex.assert_trees_all_close(update, sa, rtol=1e-5, atol=1e-6)


def _flat_rows(stacked) -> np.ndarray:
    leaves = jax.tree.leaves(stacked)
    return np.concatenate([np.asarray(leaf, np.float64).reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def test_sa_span_is_orthogonal_to_every_group_gradient(steps, problem):
    params, forget, retain = problem
    key = jax.random.key(8)
    _, retain_keys, g_f, g_r = _gradients(params, forget, retain, key)
    groups = 4
    size = RETAIN_SIZE // groups
    group_grads = np.stack(
        [
            _flat(
                jax.grad(_mean_loss)(
                    params, {"x": retain["x"][k * size : (k + 1) * size]}, retain_keys[k * size : (k + 1) * size]
                )
            )
            for k in range(groups)
        ]
    )
    np.testing.assert_allclose(group_grads.mean(axis=0), _flat(g_r), rtol=1e-5, atol=1e-6)
    update, metrics = steps.direction("sa_span", params, forget, retain, key)
    update = _flat(update)
    for group_grad in group_grads:
        assert abs(update @ group_grad) <= 1e-4 * np.linalg.norm(update) * np.linalg.norm(group_grad)
    # The residual is -g_f minus its least-squares part in the span.
    coefficients, *_ = np.linalg.lstsq(group_grads.T, -_flat(g_f), rcond=None)
    np.testing.assert_allclose(update, -_flat(g_f) - group_grads.T @ coefficients, rtol=1e-3, atol=1e-4)
    assert float(metrics["projected"]) == 1.0
    chunked, _ = steps.direction("sa_span", params, forget, retain, key, chunk_size=3)
    np.testing.assert_allclose(_flat(chunked), update, rtol=1e-5, atol=1e-6)


def test_sa_span_with_one_direction_is_sa(steps, problem):
    params, forget, retain = problem
    key = jax.random.key(8)
    span, _ = steps.direction("sa_span", params, forget, retain, key, num_directions=1)
    sa, _ = steps.direction("sa", params, forget, retain, key)
    chex.assert_trees_all_close(span, sa, rtol=1e-4, atol=1e-5)


def test_uno_gradient_matches_float64_finite_differences(steps, problem):
    params, forget, retain = problem
    key = jax.random.key(9)
    forget_keys, retain_keys, _, _ = _gradients(params, forget, retain, key)
    update, _ = steps.direction("uno", params, forget, retain, key)
    update = _flat(update)
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64), params)
        forget64 = {"x": jnp.asarray(forget["x"], jnp.float64)}
        retain64 = {"x": jnp.asarray(retain["x"], jnp.float64)}
        flat_params, unravel = ravel_pytree(params64)
        objective = jax.jit(
            lambda flat: _uno_objective(
                unravel(flat), forget64, retain64, forget_keys, retain_keys, weight=_default_uno_weight(retain)
            )
        )
        rng = np.random.default_rng(0)
        step = 1e-5
        for _ in range(4):
            tangent = rng.standard_normal(flat_params.shape[0])
            tangent /= np.linalg.norm(tangent)
            numeric = (objective(flat_params + step * tangent) - objective(flat_params - step * tangent)) / (2 * step)
            np.testing.assert_allclose(update @ tangent, float(numeric), rtol=2e-3, atol=2e-3 * np.linalg.norm(update))


def test_alternating_methods_switch_rules_on_the_step_parity(steps, problem):
    params, forget, retain = problem
    key = jax.random.key(11)
    _, _, g_f, g_r = _gradients(params, forget, retain, key)
    expectations = {
        "ascent_descent": (jax.tree.map(jnp.negative, g_f), g_r),
        "uno_s": (
            steps.direction("uno", params, forget, retain, key)[0],
            steps.direction("s", params, forget, retain, key)[0],
        ),
    }
    for name, (even, odd) in expectations.items():
        method, step = steps.get(name)
        state = method.init(params)
        for expected in (even, odd, even):
            _, state, _ = step(params, state, forget, retain, key)  # capture: params stay put
            chex.assert_trees_all_close(state.optimizer, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- sa_gated (ours)


def test_sa_gated_with_an_unreachable_target_is_per_example_sa(steps, problem):
    params, forget, retain = problem
    key = jax.random.key(12)
    gated, metrics = steps.direction("sa_gated", params, forget, retain, key, forget_loss_target=math.inf)
    full, _ = steps.direction("sa_per_example", params, forget, retain, key)
    chex.assert_trees_all_close(gated, full, rtol=1e-6, atol=1e-7)
    assert float(metrics["gated_fraction"]) == 0.0


@pytest.mark.parametrize("combine", ["fill", "sa", "pcgrad"])
def test_sa_gated_with_target_minus_inf_ascends_nothing(combine, steps, problem):
    """Everything gated: no ascent at all; 'fill' and 'pcgrad' then descend the retain loss, 'sa' stands still."""
    params, forget, retain = problem
    key = jax.random.key(12)
    update, metrics = steps.direction(
        "sa_gated", params, forget, retain, key, forget_loss_target=-math.inf, combine=combine
    )
    assert float(metrics["gated_fraction"]) == 1.0
    if combine == "sa":
        chex.assert_trees_all_equal(update, jax.tree.map(jnp.zeros_like, params))
        assert float(metrics["update_norm"]) == 0.0
    else:
        _, _, _, g_r = _gradients(params, forget, retain, key)
        chex.assert_trees_all_close(update, g_r, rtol=1e-6, atol=1e-7)


def _materialised_gated_update(params, forget, retain, key, *, target, temperature, mask=None):
    """``mean_i w_i P^c_{Mg_r}(-M grad l(x_i))`` and the gate weights, from materialised float64 gradients."""
    forget_keys, _, _, g_r = _gradients(params, forget, retain, key)
    losses = np.asarray(jax.vmap(vae_like_loss, in_axes=(None, 0, 0))(params, forget, forget_keys), np.float64)
    if temperature == 0:
        weights = (losses < target).astype(np.float64)
    else:
        weights = 1 / (1 + np.exp(-(target - losses) / temperature))
    grads, direction = _flat_rows(per_example_grads(params, forget, forget_keys)), _flat(g_r)
    if mask is not None:
        grads, direction = grads * mask, direction * mask
    ascents = -grads
    dots = ascents @ direction
    coefficients = np.where(dots < 0, dots / (direction @ direction), 0.0)
    return np.mean(weights[:, None] * (ascents - coefficients[:, None] * direction), axis=0), weights, _flat(g_r)


@pytest.mark.parametrize("temperature", [0.0, 2.0])
def test_sa_gated_weights_each_projected_example_by_its_gate(temperature, steps, problem):
    params, forget, retain = problem
    key = jax.random.key(13)
    forget_keys, _, _, _ = _gradients(params, forget, retain, key)
    losses = np.asarray(jax.vmap(vae_like_loss, in_axes=(None, 0, 0))(params, forget, forget_keys))
    target = float(np.median(losses))
    ascent, weights, g_r = _materialised_gated_update(
        params, forget, retain, key, target=target, temperature=temperature
    )
    update, metrics = steps.direction(
        "sa_gated", params, forget, retain, key, forget_loss_target=target, temperature=temperature
    )
    # combine='fill' (the default): the gated-out share of the step is retain descent.
    np.testing.assert_allclose(_flat(update), ascent + (1 - weights.mean()) * g_r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["gated_fraction"]), 1 - weights.mean(), rtol=1e-5)
    if temperature == 0:
        assert 0.0 < float(metrics["gated_fraction"]) < 1.0


def test_sa_gated_ascend_only_restricts_the_ascent_to_matching_parameters(steps, problem):
    params, forget, retain = problem
    key = jax.random.key(15)
    update, _ = steps.direction(
        "sa_gated",
        params,
        forget,
        retain,
        key,
        forget_loss_target=math.inf,
        combine="sa",
        ascend_only="^\\['decoder'\\]",
    )
    for leaf_name in ("encoder", "logvar"):
        chex.assert_trees_all_equal(update[leaf_name], jax.tree.map(jnp.zeros_like, params[leaf_name]))
    mask = _flat(
        {
            name: jax.tree.map(lambda leaf: jnp.full_like(leaf, name == "decoder"), subtree)
            for name, subtree in params.items()
        }
    )
    expected, _, g_r = _materialised_gated_update(
        params, forget, retain, key, target=math.inf, temperature=0.0, mask=mask
    )
    np.testing.assert_allclose(_flat(update), expected, rtol=1e-5, atol=1e-6)
    assert _flat(update) @ g_r >= -1e-5 * np.linalg.norm(expected) * np.linalg.norm(g_r)  # no conflict left


def test_guidance_gradient_is_added_after_the_projection(steps, problem):
    params, forget, retain = problem
    key = jax.random.key(14)
    weight = 0.7
    plain, _ = steps.direction("sa", params, forget, retain, key)
    guided, metrics = steps.direction("sa", params, forget, retain, key, guidance_weight=weight)
    _, _, guidance_key = split_step_keys(key, forget, retain)
    guidance_value, guidance_grad = jax.value_and_grad(_guidance_loss)(params, guidance_key)
    chex.assert_trees_all_close(
        guided, jax.tree.map(lambda u, g: u + weight * g, plain, guidance_grad), rtol=1e-6, atol=1e-6
    )
    assert set(metrics) == METRIC_NAMES | {"guidance_loss"}
    np.testing.assert_allclose(float(metrics["guidance_loss"]), float(guidance_value), rtol=1e-6)


# ------------------------------------------------------------------------------------------ chunked steps

# (method, hparams, chunk_size): every method with examples per chunk not dividing either batch (8 = 3 + 3 + 2);
# sa_span with groups both smaller (2 examples: one group per chunk) and larger (4: one group at a time, its
# gradient accumulated over chunks of 3 + 1) than a chunk, and per example (chunks of 1); sa_gated half gated, with
# ascend_only and with combine='pcgrad'.
CHUNKED_CASES = [(name, {}, 3) for name in sorted(METHODS)] + [
    ("sa_span", {"num_directions": 2}, 3),
    ("sa_span", {"num_directions": RETAIN_SIZE}, 1),
    ("sa_gated", {"forget_loss_target": "median", "ascend_only": "decoder"}, 3),
    ("sa_gated", {"forget_loss_target": "median", "combine": "pcgrad"}, 5),
]


@pytest.mark.parametrize("name, hparams, chunk_size", CHUNKED_CASES)
def test_chunked_step_equals_the_unchunked_step(name, hparams, chunk_size, steps, problem):
    """Directions and metrics agree on both step parities (the alternating rules switch on it)."""
    params, forget, retain = problem
    key = jax.random.key(21)
    half_gated = hparams.get("forget_loss_target") == "median"
    if half_gated:
        forget_keys, _, _ = split_step_keys(key, forget, retain)
        losses = jax.vmap(vae_like_loss, in_axes=(None, 0, 0))(params, forget, forget_keys)
        hparams = {**hparams, "forget_loss_target": float(np.median(np.asarray(losses)))}
    results = {}
    for chunk in (None, chunk_size):
        extra = {} if chunk is None else {"chunk_size": chunk}  # None: the step the other tests compiled
        method, step = steps.get(name, **hparams, **extra)
        fresh = method.init(params)
        results[chunk] = [
            step(params, state, forget, retain, key)[1:]
            for state in (fresh, fresh._replace(step=jnp.ones((), jnp.int32)))
        ]
    # K = B_r = 8 per-example span directions: the least-squares solve amplifies the rounding differences.
    rtol, atol = (2e-4, 2e-5) if hparams.get("num_directions") == RETAIN_SIZE else (2e-5, 2e-6)
    chex.assert_trees_all_close(results[chunk_size], results[None], rtol=rtol, atol=atol)
    if half_gated:
        assert 0.0 < float(results[None][0][1]["gated_fraction"]) < 1.0


def test_a_chunk_holding_both_batches_is_bit_identical_to_no_chunking(steps, problem):
    params, forget, retain = problem
    key = jax.random.key(5)
    for name in ("sa_per_example", "uno"):
        reference, _ = steps.direction(name, params, forget, retain, key)
        got, _ = steps.direction(name, params, forget, retain, key, chunk_size=max(FORGET_SIZE, RETAIN_SIZE))
        chex.assert_trees_all_equal(got, reference)


# --------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("gradient_surgery", {}, "unknown unlearning method 'gradient_surgery'; allowed: ascent, ascent_descent"),
        ("sa", {"num_directions": 4}, "method 'sa' has no hyperparameter num_directions; allowed: none"),
        ("sa_span", {"directions": 4}, "has no hyperparameter directions; allowed: num_directions=8"),
        ("sa_span", {"num_directions": 0}, "num_directions=0 is invalid: allowed: an integer >= 1"),
        ("sa_span", {"chunk_size": 0}, "chunk_size=0 is invalid: allowed: None or an integer >= 1 (examples per"),
        (
            "sa_per_example",
            {"only_on_conflict": "yes"},
            "only_on_conflict='yes' is invalid: expected bool, got str; allowed: True or False",
        ),
        (
            "uno",
            {"orthogonality_weight": -1.0},
            "orthogonality_weight=-1.0 is invalid: allowed: None or a finite number >= 0",
        ),
        ("sa_gated", {}, "method 'sa_gated' needs forget_loss_target"),
        ("sa_gated", {"forget_loss_target": math.nan}, "forget_loss_target=nan is invalid"),
        (
            "sa_gated",
            {"forget_loss_target": 1.0, "combine": "sum"},
            "combine='sum' is invalid: allowed: 'fill', 'sa' or",
        ),
        (
            "sa_gated",
            {"forget_loss_target": 1.0, "ascend_only": "["},
            "ascend_only='[' is invalid: allowed: None or a valid",
        ),
        ("sa", {"guidance_weight": 1.0}, "guidance_weight=1.0 needs a guidance_loss"),
        ("sa", {"guidance_weight": -1.0}, "guidance_weight must be a finite number >= 0, got -1.0"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(name, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_method(name, loss_fn=vae_like_loss, optimizer=optax.sgd(0.1), **kwargs)


def test_bad_callables_are_refused():
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        make_method("sa", loss_fn=None, optimizer=optax.sgd(0.1))
    with pytest.raises(TypeError, match="optimizer must be an optax GradientTransformation"):
        make_method("sa", loss_fn=vae_like_loss, optimizer=0.1)
    with pytest.raises(TypeError, match="guidance_loss must be callable"):
        make_method("sa", loss_fn=vae_like_loss, optimizer=optax.sgd(0.1), guidance_loss="kl")
    for bad in (2.5, True, "4"):
        with pytest.raises(TypeError, match="is invalid: allowed: None or an integer >= 1"):
            make_method("sa", loss_fn=vae_like_loss, optimizer=optax.sgd(0.1), chunk_size=bad)
    with pytest.raises(TypeError, match="flat_parameters must be True or False, got 1"):
        make_method("sa", loss_fn=vae_like_loss, optimizer=optax.sgd(0.1), flat_parameters=1)


def test_sa_gated_refuses_an_ascend_only_pattern_that_matches_nothing(problem):
    params, forget, retain = problem
    method = make_method(
        "sa_gated", loss_fn=vae_like_loss, optimizer=optax.sgd(0.1), forget_loss_target=1.0, ascend_only="generator"
    )
    with pytest.raises(ValueError, match="ascend_only='generator' matches no parameter; allowed: a regex matching"):
        jax.jit(method.step)(params, method.init(params), forget, retain, jax.random.key(0))


def test_sa_span_refuses_a_retain_batch_it_cannot_split(problem):
    params, forget, retain = problem
    method = make_method("sa_span", loss_fn=vae_like_loss, optimizer=optax.sgd(0.1), num_directions=3)
    with pytest.raises(ValueError, match="retain batch into num_directions=3 equal groups, but its size 8"):
        jax.jit(method.step)(params, method.init(params), forget, retain, jax.random.key(0))


def test_sa_gated_runs_on_the_real_vae_loss_with_nnx_state_params():
    """The library's negative ELBO and an NNX VAE: the step jits on an nnx.State and ascends only the decoder."""
    from flax import nnx

    from gsu_jax.losses import negative_elbo
    from gsu_jax.models import MLPVAE

    graphdef, params = nnx.split(MLPVAE(image_shape=(4, 4, 1), hidden=8, latent_dim=2, rngs=nnx.Rngs(0)))
    images = jax.random.uniform(jax.random.key(1), (8, 4, 4, 1))
    forget, retain = {"image": images[:4]}, {"image": images[4:]}
    method = make_method(
        "sa_gated",
        loss_fn=negative_elbo(graphdef),
        optimizer=capture_direction(),
        forget_loss_target=math.inf,
        combine="sa",
        ascend_only="decoder",
    )
    _, state, metrics = jax.jit(method.step)(params, method.init(params), forget, retain, jax.random.key(2))
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.optimizer)[0]:
        is_decoder = "decoder" in jax.tree_util.keystr(path)
        assert bool(jnp.any(leaf != 0)) == is_decoder, jax.tree_util.keystr(path)
    assert np.isfinite(float(metrics["update_norm"])) and float(metrics["update_norm"]) > 0


def test_docstring_examples_run():
    assert doctest.testmod(methods, raise_on_error=True).attempted > 0
