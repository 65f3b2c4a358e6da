"""Tests for the gradient-surgery projections (gsu_jax.projections) and the optax transforms wrapping them
(gsu_jax.surgery).

Every numerical result is compared with an independent float64 NumPy reference
written here; properties (orthogonality, idempotence, invariances, conflict
rules) are checked on random pytrees with hypothesis.
"""

from __future__ import annotations

import doctest
import functools

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
from flax import nnx
from hypothesis import strategies as st

import gsu_jax
from gsu_jax import projections, surgery

# --------------------------------------------------------------------------
# Independent float64 references (NumPy / SciPy only).


def flat(tree):
    """All leaves raveled in tree order and concatenated, as float64 NumPy."""
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def reference_normal_plane(u, d, *, eps=0.0, only_on_conflict=False):
    """u - <u, d> / (<d, d> + eps) d in float64; u when nothing is removed."""
    inner, squared = u @ d, d @ d
    if squared + eps == 0 or (only_on_conflict and inner >= 0):
        return u.copy()
    return u - inner / (squared + eps) * d


def reference_off_span(u, rows):
    """u minus its exact least-squares component in the span of the rows."""
    coefficients = np.linalg.lstsq(rows.T, u, rcond=None)[0]
    return u - rows.T @ coefficients


def reference_dual_cone(u, rows):
    """argmin ||x - u|| s.t. <x, row_k> >= 0: x = u + rows^T lam, lam = NNLS."""
    lam, _ = scipy.optimize.nnls(rows.T, -u)
    return u + rows.T @ lam


def stacked_rows(stacked, size):
    return np.stack([flat(jax.tree.map(lambda x, k=k: x[k], stacked)) for k in range(size)])


def assert_close(actual, expected, scale, tol):
    error = np.linalg.norm(np.asarray(actual) - np.asarray(expected))
    assert error <= tol * scale, (error, tol * scale)


# --------------------------------------------------------------------------
# Transforms under test, built once so their jitted updates compile once per
# tree layout.

NORMAL_PLANE = gsu_jax.project_normal_plane()
NORMAL_PLANE_CONFLICT = gsu_jax.project_normal_plane(only_on_conflict=True)
OFF_SPAN = gsu_jax.project_off_span()
OFF_SPAN_CONFLICT = gsu_jax.project_off_span(only_on_conflict=True)


def jitted(transform):
    @jax.jit
    def apply(updates, direction):
        return transform.update(updates, transform.init(direction), direction=direction)

    return apply


APPLY = {
    "plane": jitted(NORMAL_PLANE),
    "plane_conflict": jitted(NORMAL_PLANE_CONFLICT),
    "span": jitted(OFF_SPAN),
    "span_conflict": jitted(OFF_SPAN_CONFLICT),
}
# The per-example projection is a pure function (its output is shaped like one example, not like its input, so it
# cannot be an optax transform).
MEAN_PROJECTION = {
    "per_example": jax.jit(projections.mean_normal_plane_projection),
    "per_example_conflict": jax.jit(functools.partial(projections.mean_normal_plane_projection, only_on_conflict=True)),
}

seeds = st.integers(0, 2**31 - 1)
exponents = st.floats(-6.0, 6.0)


def mixed(make_tree, seed, alpha, u_exponent, d_exponent):
    """(u, d) with u = noise + alpha * d, at scales 10**exponent."""
    d = make_tree(seed, scale=10.0**d_exponent)
    noise = make_tree(seed + 1, scale=10.0**d_exponent)
    u = jax.tree.map(lambda n, x: (10.0 ** (u_exponent - d_exponent) * (n + alpha * x)).astype(np.float32), noise, d)
    return u, d


# --------------------------------------------------------------------------
# project_normal_plane.


@hypothesis.settings(max_examples=40)
@hypothesis.given(
    seed=seeds, alpha=st.floats(-5.0, 5.0), u_exponent=exponents, d_exponent=exponents, only_on_conflict=st.booleans()
)
def test_normal_plane_matches_reference_and_is_orthogonal(
    make_tree, seed, alpha, u_exponent, d_exponent, only_on_conflict
):
    u, d = mixed(make_tree, seed, alpha, u_exponent, d_exponent)
    name = "plane_conflict" if only_on_conflict else "plane"
    out, state = APPLY[name](u, d)
    u64, d64, out64 = flat(u), flat(d), flat(out)
    expected = reference_normal_plane(u64, d64, only_on_conflict=only_on_conflict)
    assert_close(out64, expected, np.linalg.norm(u64), 1e-5)
    assert jax.tree.structure(out) == jax.tree.structure(u)
    inner = u64 @ d64
    if only_on_conflict and inner >= 0:
        chex.assert_trees_all_equal(out, jax.tree.map(jnp.asarray, u))
    else:
        assert abs(out64 @ d64) <= 1e-5 * np.linalg.norm(out64) * np.linalg.norm(d64)
    assert int(state.count) == 1 and int(state.conflicts) == int(inner < 0)
    cosine = inner / (np.linalg.norm(u64) * np.linalg.norm(d64))
    np.testing.assert_allclose(float(state.last_cosine), cosine, atol=1e-5)


@hypothesis.settings(max_examples=20)
@hypothesis.given(
    seed=seeds, alpha=st.floats(-5.0, 5.0), factor_exponent=st.floats(-15.0, 15.0), only_on_conflict=st.booleans()
)
def test_normal_plane_idempotent_and_invariant_to_direction_scale(
    make_tree, seed, alpha, factor_exponent, only_on_conflict
):
    u, d = mixed(make_tree, seed, alpha, 0.0, 0.0)
    apply = APPLY["plane_conflict" if only_on_conflict else "plane"]
    once, _ = apply(u, d)
    twice, _ = apply(once, d)
    scale = np.linalg.norm(flat(u))
    assert_close(flat(twice), flat(once), scale, 1e-6)
    for factor in (10.0**factor_exponent, 3.0):
        rescaled = jax.tree.map(lambda x: (x * factor).astype(np.float32), d)
        assert_close(flat(apply(u, rescaled)[0]), flat(once), scale, 1e-6)
    # Linear in the update (positively homogeneous with only_on_conflict).
    doubled = jax.tree.map(lambda x: 2 * x, u)
    assert_close(flat(apply(doubled, d)[0]), 2 * flat(once), scale, 1e-6)


def test_already_orthogonal_update_is_unchanged(make_tree):
    d = make_tree(0)
    # Disjoint supports: <u, d> is exactly zero in any precision.
    u = jax.tree.map(np.zeros_like, d)
    u["dense"]["kernel"] = make_tree(1)["dense"]["kernel"]
    d["dense"]["kernel"] = np.zeros_like(d["dense"]["kernel"])
    for name in ("plane", "plane_conflict"):
        chex.assert_trees_all_equal(APPLY[name](u, d)[0], jax.tree.map(jnp.asarray, u))
    # Orthogonal in float64 with overlapping supports: unchanged to rounding.
    u64, d64 = flat(make_tree(2)), flat(d)
    u64 -= (u64 @ d64) / (d64 @ d64) * d64
    treedef = jax.tree.structure(d)
    sizes = np.cumsum([np.size(x) for x in jax.tree.leaves(d)])[:-1]
    u_tree = jax.tree.unflatten(
        treedef,
        [part.reshape(np.shape(x)).astype(np.float32) for part, x in zip(np.split(u64, sizes), jax.tree.leaves(d))],
    )
    assert_close(flat(APPLY["plane"](u_tree, d)[0]), u64, np.linalg.norm(u64), 1e-6)


@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_zero_direction_returns_update_unchanged(make_tree, eps):
    u = make_tree(0)
    zero = jax.tree.map(np.zeros_like, u)
    transform = gsu_jax.project_normal_plane(eps=eps)
    out, state = jax.jit(lambda u, d: transform.update(u, transform.init(u), direction=d))(u, zero)
    chex.assert_trees_all_equal(out, jax.tree.map(jnp.asarray, u))
    chex.assert_tree_all_finite((out, state))
    out, _ = APPLY["span_conflict"](u, jax.tree.map(lambda x: x[None], zero))
    chex.assert_trees_all_equal(out, jax.tree.map(jnp.asarray, u))


@pytest.mark.parametrize(
    "u_scale, d_scale",
    [
        (1e30, 1e-30),
        (1e-30, 1e30),
        (1e-30, 1e-30),
        (1e30, 1e30),
        (1.0, 1e-40),
    ],
)
def test_extreme_finite_inputs_give_finite_outputs(make_tree, u_scale, d_scale):
    u = make_tree(0, scale=u_scale)
    d = make_tree(1, scale=d_scale)
    stacked = jax.tree.map(lambda a, b: np.stack([a, b, a]), d, make_tree(2))
    for name in ("plane", "plane_conflict"):
        chex.assert_tree_all_finite(APPLY[name](u, d))
    for name in ("span", "span_conflict"):
        chex.assert_tree_all_finite(APPLY[name](u, stacked))
    per_example_u = jax.tree.map(lambda x: np.stack([x, -x]), u)
    chex.assert_tree_all_finite(MEAN_PROJECTION["per_example_conflict"](per_example_u, d))


@pytest.mark.parametrize("d_scale", [1e-25, 1e-12, 1e12, 1e25])
@pytest.mark.parametrize("only_on_conflict", [False, True])
def test_raw_and_rescaled_products_give_one_projection(make_tree, d_scale, only_on_conflict):
    # <d, d> falls below trees.underflow_floor at 1e-25 and overflows at 1e25 (the rescaled products), not at 1e-12
    # or 1e12 (the raw ones): either way the projection is the one for d itself, and so is the removal coefficient's
    # zero pattern (the step's "projected" flag).
    u, d = make_tree(0), make_tree(1)
    scaled = jax.tree.map(lambda leaf: leaf * d_scale, d)
    want = projections.normal_plane_parts(u, d, only_on_conflict=only_on_conflict, eps=0.0)
    got = projections.normal_plane_parts(u, scaled, only_on_conflict=only_on_conflict, eps=0.0)
    assert_close(flat(got.projected), flat(want.projected), np.linalg.norm(flat(u)), 1e-5)
    expected = reference_normal_plane(flat(u), flat(d), only_on_conflict=only_on_conflict)
    assert_close(flat(got.projected), expected, np.linalg.norm(flat(u)), 1e-5)
    assert bool(got.coefficient != 0) == bool(want.coefficient != 0)


@pytest.mark.parametrize(
    "u_scale, d_scale, size",
    [
        (1e20, 1e-15, 1000),  # <u, d> and <d, d> finite, their ratio overflows
        (1e-30, 1e8, 1000),  # the ratio underflows
        (1e-22, 1e-17, 100_000),  # every product u_i d_i underflows, their sum looks harmless
    ],
)
def test_projection_is_orthogonal_where_raw_products_fail(u_scale, d_scale, size):
    # Inputs where the raw products of normal_plane_parts would be wrong: it must take the rescaled ones.
    rng = np.random.default_rng(0)
    d = rng.standard_normal(size)
    u = rng.standard_normal(size) - 0.5 * d  # a conflict
    u32, d32 = jnp.asarray(u * u_scale, jnp.float32), jnp.asarray(d * d_scale, jnp.float32)
    for only_on_conflict in (False, True):
        out = np.asarray(projections.normal_plane_projection(u32, d32, only_on_conflict=only_on_conflict), np.float64)
        assert np.all(np.isfinite(out))
        cosine = out @ (d * d_scale) / (np.linalg.norm(out) * np.linalg.norm(d * d_scale))
        assert abs(cosine) < 1e-5, (only_on_conflict, cosine)


@pytest.mark.parametrize("scale", [1e-25, 1.0, 1e25])
@pytest.mark.parametrize("shift", [-0.5, 0.5])
def test_pcgrad_pair_is_the_two_conflict_projections_summed(make_tree, scale, shift):
    # Raw products at scale 1, the two projections on their own at 1e+-25; a conflict at shift -0.5, none at 0.5.
    b = make_tree(1, scale=scale)
    a = jax.tree.map(lambda x, y: x + shift * y, make_tree(0, scale=scale), b)
    total, conflict = projections.pcgrad_pair(a, b)
    fa, fb = flat(a), flat(b)
    expected = reference_normal_plane(fa, fb, only_on_conflict=True) + reference_normal_plane(
        fb, fa, only_on_conflict=True
    )
    assert_close(flat(total), expected, np.linalg.norm(fa) + np.linalg.norm(fb), 1e-5)
    assert float(conflict) == float(fa @ fb < 0)
    chex.assert_trees_all_equal_dtypes(total, a)


def test_damping_eps_follows_the_formula(make_tree):
    u, d = make_tree(0), make_tree(1, scale=1e-3)
    eps = 5e-6
    transform = gsu_jax.project_normal_plane(eps=eps)
    out, _ = transform.update(u, transform.init(u), direction=d)
    expected = reference_normal_plane(flat(u), flat(d), eps=eps)
    assert_close(flat(out), expected, np.linalg.norm(flat(u)), 1e-5)


@hypothesis.settings(max_examples=25)
@hypothesis.given(seed=seeds, shift=st.floats(-2.0, 2.0), only_on_conflict=st.booleans())
def test_per_example_is_the_mean_of_projections(make_tree, seed, shift, only_on_conflict):
    d = make_tree(seed)
    # Examples spread around shift * d, so some conflict and some do not.
    updates = jax.tree.map(lambda n, x: (n + shift * x[None]).astype(np.float32), make_tree(seed + 1, leading=(6,)), d)
    name = "per_example_conflict" if only_on_conflict else "per_example"
    out = MEAN_PROJECTION[name](updates, d)
    rows = stacked_rows(updates, 6)
    d64 = flat(d)
    expected = np.mean([reference_normal_plane(row, d64, only_on_conflict=only_on_conflict) for row in rows], axis=0)
    assert_close(flat(out), expected, np.linalg.norm(rows, axis=1).max(), 1e-5)
    assert jax.tree.structure(out) == jax.tree.structure(d)
    if not only_on_conflict:
        assert abs(flat(out) @ d64) <= 1e-5 * np.linalg.norm(rows) * np.linalg.norm(d64)


# --------------------------------------------------------------------------
# project_off_span.


@hypothesis.settings(max_examples=30)
@hypothesis.given(
    seed=seeds,
    size=st.sampled_from([1, 3]),
    shift=st.floats(-2.0, 2.0),
    d_exponent=exponents,
    only_on_conflict=st.booleans(),
)
def test_off_span_matches_reference(make_tree, seed, size, shift, d_exponent, only_on_conflict):
    directions = make_tree(seed, leading=(size,), scale=10.0**d_exponent)
    rows = stacked_rows(directions, size)
    # u leans towards (shift > 0) or away from (shift < 0) the directions.
    u = jax.tree.map(
        lambda n, x: (n + shift * x.sum(0) / 10.0**d_exponent).astype(np.float32), make_tree(seed + 1), directions
    )
    u64 = flat(u)
    out, state = APPLY["span_conflict" if only_on_conflict else "span"](u, directions)
    out64 = flat(out)
    norm_u = np.linalg.norm(u64)
    row_norms = np.linalg.norm(rows, axis=1)
    if only_on_conflict:
        assert_close(out64, reference_dual_cone(u64, rows), norm_u, 2e-5)
        assert np.all(rows @ out64 >= -2e-5 * norm_u * row_norms)
        if np.all(rows @ u64 >= 0):
            chex.assert_trees_all_close(out, u, atol=1e-6 * norm_u)
    else:
        assert_close(out64, reference_off_span(u64, rows), norm_u, 2e-5)
        assert np.all(np.abs(rows @ out64) <= 2e-5 * norm_u * row_norms)
    assert jax.tree.structure(out) == jax.tree.structure(u)
    assert int(state.conflicts) == int(np.sum(rows @ u64 < 0))
    np.testing.assert_allclose(float(state.last_min_cosine), np.min(rows @ u64 / row_norms) / norm_u, atol=1e-5)


@pytest.mark.parametrize("only_on_conflict", [False, True])
def test_off_span_with_one_direction_equals_normal_plane(make_tree, only_on_conflict):
    for seed in range(4):
        u, d = mixed(make_tree, seed, -1.0 + seed, 0.0, 0.0)
        stacked = jax.tree.map(lambda x: x[None], d)
        suffix = "_conflict" if only_on_conflict else ""
        span, _ = APPLY["span" + suffix](u, stacked)
        plane, _ = APPLY["plane" + suffix](u, d)
        assert_close(flat(span), flat(plane), np.linalg.norm(flat(u)), 1e-5)


@pytest.mark.parametrize("only_on_conflict", [False, True])
def test_off_span_is_stable_for_duplicated_and_zero_directions(make_tree, only_on_conflict):
    first, second = make_tree(0), make_tree(1)
    zero = jax.tree.map(np.zeros_like, first)
    # Duplicated, positively rescaled and zero directions: span and cone are
    # those of the two distinct directions.
    members = [first, second, first, zero, jax.tree.map(lambda x: 1e3 * x, first)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *members)
    rows = stacked_rows(jax.tree.map(lambda *xs: np.stack(xs), first, second), 2)
    u = jax.tree.map(lambda n, a, b: n - a + 0.5 * b, make_tree(2), first, second)
    u64 = flat(u)
    out, state = APPLY["span_conflict" if only_on_conflict else "span"](u, stacked)
    chex.assert_tree_all_finite((out, state))
    reference = reference_dual_cone(u64, rows) if only_on_conflict else reference_off_span(u64, rows)
    assert_close(flat(out), reference, np.linalg.norm(u64), 2e-5)


def test_dual_cone_rule_is_order_free_and_scale_free(make_tree):
    directions = make_tree(5, leading=(4,))
    u = jax.tree.map(lambda n, x: n - x.sum(0), make_tree(6), directions)
    out, _ = APPLY["span_conflict"](u, directions)
    permuted = jax.tree.map(
        lambda x: x[::-1] * np.array([2.0, 1e-3, 1.0, 50.0]).reshape((4,) + (1,) * (x.ndim - 1)).astype(np.float32),
        directions,
    )
    out_permuted, _ = APPLY["span_conflict"](u, permuted)
    assert_close(flat(out_permuted), flat(out), np.linalg.norm(flat(u)), 1e-5)


# --------------------------------------------------------------------------
# Dtypes, pytree kinds.


def test_bfloat16_leaves_keep_their_dtype_and_accuracy(make_tree):
    u = make_tree(0, dtype=jnp.bfloat16)
    d = make_tree(1, dtype=jnp.bfloat16)
    d["dense"]["bias"] = d["dense"]["bias"].astype(np.float32)  # mixed dtypes
    u64, d64 = flat(u), flat(d)
    for name, expected in [
        ("plane", reference_normal_plane(u64, d64)),
        ("plane_conflict", reference_normal_plane(u64, d64, only_on_conflict=True)),
    ]:
        out, _ = APPLY[name](u, d)
        chex.assert_trees_all_equal_dtypes(out, u)
        # Only the final rounding of each output entry to bfloat16 remains.
        assert_close(flat(out), expected, np.linalg.norm(u64), 1e-2)
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), d)
    out, _ = APPLY["span"](u, stacked)
    chex.assert_trees_all_equal_dtypes(out, u)
    per_example = jax.tree.map(lambda x: jnp.stack([x, -x]), u)
    out = MEAN_PROJECTION["per_example"](per_example, d)
    chex.assert_trees_all_equal_dtypes(out, u)


def test_nnx_state_pytrees():
    _, params = nnx.split(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    u = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    d = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    transform = gsu_jax.project_normal_plane()
    out, _ = jax.jit(lambda u, d: transform.update(u, transform.init(params), direction=d))(u, d)
    assert isinstance(out, nnx.State)
    assert jax.tree.structure(out) == jax.tree.structure(params)
    assert_close(flat(out), reference_normal_plane(flat(u), flat(d)), np.linalg.norm(flat(u)), 1e-5)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), d, u)
    out, _ = APPLY["span"](d, stacked)
    assert isinstance(out, nnx.State)


# --------------------------------------------------------------------------
# Composition with optax.


def test_chain_with_adam_equals_projection_then_adam(make_tree):
    params = make_tree(0)
    optimizer = optax.chain(gsu_jax.project_normal_plane(), optax.adam(1e-2))
    adam = optax.adam(1e-2)
    step = jax.jit(optimizer.update)
    state, adam_state = optimizer.init(params), adam.init(params)
    for seed in range(3):
        grads, direction = make_tree(10 + seed), make_tree(20 + seed)
        updates, state = step(grads, state, params, direction=direction)
        projected, _ = NORMAL_PLANE.update(grads, NORMAL_PLANE.init(params), direction=direction)
        expected, adam_state = adam.update(projected, adam_state, params)
        chex.assert_trees_all_close(updates, expected, atol=1e-6, rtol=1e-5)
    assert int(state[0].count) == 3


def test_multi_steps_projects_the_accumulated_update(make_tree):
    params = make_tree(0)
    optimizer = optax.MultiSteps(optax.chain(gsu_jax.project_normal_plane(), optax.sgd(1.0)), every_k_schedule=2)
    step = jax.jit(optimizer.update)
    state = optimizer.init(params)
    first, second, direction = make_tree(1), make_tree(2), make_tree(3)
    updates, state = step(first, state, params, direction=direction)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))
    updates, state = step(second, state, params, direction=direction)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, first, second)
    expected = -reference_normal_plane(flat(mean), flat(direction))
    assert_close(flat(updates), expected, np.linalg.norm(expected), 1e-5)
    assert int(state.inner_opt_state[0].count) == 1


def test_inject_hyperparams_changes_eps_inside_jit(make_tree):
    params, grads, direction = make_tree(0), make_tree(1), make_tree(2)
    optimizer = optax.chain(optax.inject_hyperparams(gsu_jax.project_normal_plane)(eps=0.0), optax.sgd(1.0))
    step = jax.jit(optimizer.update)
    state = optimizer.init(params)
    updates, state = step(grads, state, params, direction=direction)
    assert_close(
        -flat(updates), reference_normal_plane(flat(grads), flat(direction)), np.linalg.norm(flat(grads)), 1e-5
    )
    state[0].hyperparams["eps"] = jnp.asarray(10.0)
    updates, state = step(grads, state, params, direction=direction)
    assert_close(
        -flat(updates),
        reference_normal_plane(flat(grads), flat(direction), eps=10.0),
        np.linalg.norm(flat(grads)),
        1e-5,
    )
    span = optax.inject_hyperparams(gsu_jax.project_off_span)(ridge=1e-6)
    stacked = jax.tree.map(lambda x: x[None], direction)
    out, _ = jax.jit(span.update)(grads, span.init(params), direction=stacked)
    assert_close(flat(out), reference_normal_plane(flat(grads), flat(direction)), np.linalg.norm(flat(grads)), 1e-5)


def test_apply_if_finite_skips_non_finite_updates(make_tree):
    params, direction = make_tree(0), make_tree(1)
    optimizer = optax.apply_if_finite(
        optax.chain(gsu_jax.project_normal_plane(), optax.sgd(1.0)), max_consecutive_errors=2
    )
    step = jax.jit(optimizer.update)
    state = optimizer.init(params)
    bad = make_tree(2)
    bad["scale"] = np.float32(np.nan)
    updates, state = step(bad, state, params, direction=direction)
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))
    assert int(state.notfinite_count) == 1
    assert int(state.inner_state[0].count) == 0
    good = make_tree(3)
    updates, state = step(good, state, params, direction=direction)
    assert_close(-flat(updates), reference_normal_plane(flat(good), flat(direction)), np.linalg.norm(flat(good)), 1e-5)
    assert int(state.inner_state[0].count) == 1


@pytest.mark.parametrize("name", ["plane", "span_conflict"])
def test_apply_if_finite_around_multi_steps_around_the_transform(make_tree, name):
    """apply_if_finite(MultiSteps(chain(transform, sgd))) in one jitted step: a non-finite gradient is dropped
    before it reaches the accumulator, and every second finite one emits -lr * P(mean of the two), projected with
    the direction passed at the emitting call."""
    learning_rate = 0.5
    transform, reference = {
        "plane": (NORMAL_PLANE, reference_normal_plane),
        "span_conflict": (OFF_SPAN_CONFLICT, reference_dual_cone),
    }[name]
    multi_steps = optax.MultiSteps(optax.chain(transform, optax.sgd(learning_rate)), every_k_schedule=2)
    # MultiSteps is not typed as an extra-args transform, so a wrapper around it would drop direction=; retyping
    # its own init and update keeps it (the README says so too).
    optimizer = optax.apply_if_finite(
        optax.GradientTransformationExtraArgs(multi_steps.init, multi_steps.update), max_consecutive_errors=3
    )

    @jax.jit
    def step(params, state, grads, direction):
        updates, state = optimizer.update(grads, state, params, direction=direction)
        return optax.apply_updates(params, updates), state

    params = make_tree(0)
    state = optimizer.init(params)
    grads = [make_tree(10 + i) for i in range(5)]
    grads[1]["dense"]["bias"][0] = np.nan
    if name == "plane":
        directions = [make_tree(20 + i) for i in range(5)]
        rows = [flat(d) for d in directions]
    else:
        directions = [make_tree(20 + i, leading=(3,)) for i in range(5)]
        rows = [stacked_rows(d, 3) for d in directions]
    expected = flat(params)
    for i, (g, d) in enumerate(zip(grads, directions)):
        params, state = step(params, state, g, d)
        if i == 2:  # the second finite gradient: emit the projected mean of grads 0 and 2
            expected = expected - learning_rate * reference((flat(grads[0]) + flat(grads[2])) / 2, rows[2])
        if i == 4:
            expected = expected - learning_rate * reference((flat(grads[3]) + flat(grads[4])) / 2, rows[4])
        if i in (1, 3):  # nothing applied: the NaN was skipped, or MultiSteps is accumulating
            assert_close(flat(params), expected, np.linalg.norm(expected), 1e-6)
    assert_close(flat(params), expected, np.linalg.norm(expected), 1e-5)
    assert int(state.total_notfinite) == 1
    assert int(state.inner_state.inner_opt_state[0].count) == 2  # the projection ran for the two emitted updates


MASK = {"conv": [True], "dense": {"bias": False, "kernel": True}, "scale": False}


def _selected(tree):
    """The leaves MASK selects, as one float64 vector."""
    return flat({"conv": tree["conv"], "kernel": tree["dense"]["kernel"]})


@pytest.mark.parametrize("name", ["plane", "plane_conflict", "span"])
def test_masked_projects_only_the_selected_leaves(make_tree, name):
    transform = {"plane": NORMAL_PLANE, "plane_conflict": NORMAL_PLANE_CONFLICT, "span": OFF_SPAN}[name]
    masked = optax.masked(transform, MASK, mask_compatible_extra_args=True)
    u = make_tree(0)
    if name == "span":
        direction = make_tree(1, leading=(2,))
        rows = np.stack([_selected(jax.tree.map(lambda x, k=k: x[k], direction)) for k in range(2)])
        expected = reference_off_span(_selected(u), rows)
    else:
        # A direction that conflicts with u on the selected leaves and agrees with it on the others, so the
        # conflict test sees the selected leaves only.
        direction = make_tree(1)
        direction["conv"][0] = -u["conv"][0]
        direction["dense"]["kernel"] = -u["dense"]["kernel"] + 0.5 * direction["dense"]["kernel"]
        direction["dense"]["bias"] = 100 * u["dense"]["bias"]
        expected = reference_normal_plane(_selected(u), _selected(direction), only_on_conflict=name == "plane_conflict")
        assert _selected(u) @ _selected(direction) < 0 < flat(u) @ flat(direction)
    out, state = jax.jit(lambda u, d: masked.update(u, masked.init(u), direction=d))(u, direction)
    assert_close(_selected(out), expected, np.linalg.norm(_selected(u)), 1e-5)
    # The leaves outside the mask pass through untouched, bit for bit.
    chex.assert_trees_all_equal(
        (out["dense"]["bias"], out["scale"]), (jnp.asarray(u["dense"]["bias"]), jnp.asarray(u["scale"]))
    )
    assert int(state.inner_state.count) == 1


def test_masked_without_compatible_extra_args_says_how_to_fix_it(make_tree):
    masked = optax.masked(NORMAL_PLANE, MASK)
    u = make_tree(0)
    with pytest.raises(ValueError, match="mask_compatible_extra_args=True"):
        jax.eval_shape(lambda u, d: masked.update(u, masked.init(u), direction=d), u, make_tree(1))


def test_transforms_return_their_pure_functions_bit_for_bit(make_tree):
    u, d, stacked = make_tree(0), make_tree(1), make_tree(2, leading=(3,))
    for only_on_conflict in (False, True):
        plane = gsu_jax.project_normal_plane(only_on_conflict=only_on_conflict, eps=1e-3)
        got, _ = jax.jit(lambda u, d, t=plane: t.update(u, t.init(u), direction=d))(u, d)
        want = jax.jit(
            functools.partial(projections.normal_plane_projection, only_on_conflict=only_on_conflict, eps=1e-3)
        )(u, d)
        chex.assert_trees_all_equal(got, want)
        span = gsu_jax.project_off_span(only_on_conflict=only_on_conflict)
        got, _ = jax.jit(lambda u, d, t=span: t.update(u, t.init(u), direction=d))(u, stacked)
        want = jax.jit(functools.partial(projections.off_span_projection, only_on_conflict=only_on_conflict))(
            u, stacked
        )
        chex.assert_trees_all_equal(got, want)


class JitAndNoJitAgreeTest(chex.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.updates = {
            "a": rng.standard_normal((3, 4)).astype(np.float32),
            "b": [rng.standard_normal(5).astype(np.float32)],
        }
        self.direction = jax.tree.map(lambda x: (rng.standard_normal(x.shape) - x).astype(np.float32), self.updates)

    @chex.variants(with_jit=True, without_jit=True)
    def test_all_transforms(self):
        stacked = jax.tree.map(lambda a, b: np.stack([a, b]), self.direction, self.updates)
        per_example = jax.tree.map(lambda a, b: np.stack([a, -b, 2 * a]), self.updates, self.direction)
        # The conflict-only variants run every code path of the plain ones.
        cases = [
            (NORMAL_PLANE_CONFLICT, self.updates, self.direction),
            (OFF_SPAN_CONFLICT, self.updates, stacked),
        ]
        for transform, updates, direction in cases:
            state = transform.init(self.direction)
            update = lambda u, s, d, t=transform: t.update(u, s, direction=d)
            got = self.variant(update)(updates, state, direction)
            want = jax.jit(update)(updates, state, direction)
            chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
        mean = functools.partial(projections.mean_normal_plane_projection, only_on_conflict=True)
        got = self.variant(mean)(per_example, self.direction)
        chex.assert_trees_all_close(got, jax.jit(mean)(per_example, self.direction), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# Bad inputs.


@pytest.mark.parametrize(
    "factory, kwargs, error, match",
    [
        (gsu_jax.project_normal_plane, {"eps": -1.0}, ValueError, "eps must be"),
        (gsu_jax.project_normal_plane, {"eps": float("nan")}, ValueError, "eps must be"),
        (gsu_jax.project_normal_plane, {"eps": "small"}, TypeError, "eps must be a real scalar"),
        (gsu_jax.project_normal_plane, {"only_on_conflict": 1}, TypeError, "only_on_conflict must be a bool"),
        (gsu_jax.project_normal_plane, {"per_example": True}, TypeError, "unexpected keyword argument 'per_example'"),
        (gsu_jax.project_off_span, {"ridge": -1e-3}, ValueError, "ridge must be"),
        (gsu_jax.project_off_span, {"only_on_conflict": None}, TypeError, "only_on_conflict must be a bool"),
    ],
)
def test_bad_hyperparameters_raise(factory, kwargs, error, match):
    with pytest.raises(error, match=match):
        factory(**kwargs)


@pytest.mark.parametrize(
    "function, kwargs, error, match",
    [
        (projections.normal_plane_projection, {"eps": -1.0}, ValueError, "eps must be"),
        (projections.normal_plane_projection, {"only_on_conflict": 1}, TypeError, "only_on_conflict must be a bool"),
        (projections.mean_normal_plane_projection, {"eps": "small"}, TypeError, "eps must be a real scalar"),
        (projections.off_span_projection, {"ridge": float("inf")}, ValueError, "ridge must be"),
        (projections.off_span_projection, {"only_on_conflict": "no"}, TypeError, "only_on_conflict must be a bool"),
    ],
)
def test_pure_functions_refuse_bad_hyperparameters(make_tree, function, kwargs, error, match):
    with pytest.raises(error, match=match):
        function(make_tree(0), make_tree(1), **kwargs)


def test_mismatched_direction_raises_at_trace_time_naming_the_leaf(make_tree):
    u = make_tree(0)
    missing = make_tree(1)
    del missing["dense"]["bias"]
    wrong_shape = make_tree(1)
    wrong_shape["conv"][0] = np.zeros((2, 2, 1, 3), np.float32)
    integer = make_tree(1)
    integer["scale"] = np.int32(1)
    cases = [
        ("plane", u, missing, ValueError, r"direction has no leaf updates\['dense'\]\['bias'\]"),
        ("plane", u, wrong_shape, ValueError, r"direction\['conv'\]\[0\] has shape \(2, 2, 1, 3\)"),
        ("plane", u, integer, TypeError, r"direction\['scale'\] has dtype int32"),
        (
            "per_example",
            u,
            make_tree(1),
            ValueError,
            r"per_example_updates\['conv'\]\[0\] has shape \(2, 2, 1, 2\); expected one "
            "leading axis",
        ),
        (
            "per_example",
            jax.tree.map(lambda x: np.stack([x, x]), u) | {"scale": np.zeros(3, np.float32)},
            make_tree(1),
            ValueError,
            r"same leading axis",
        ),
        (
            "span",
            u,
            make_tree(1),
            ValueError,
            r"direction\['conv'\]\[0\] has shape \(2, 2, 1, 2\); expected one "
            "leading axis",
        ),
        ("span", u, make_tree(1, leading=(0,)), ValueError, "empty leading axis"),
    ]
    for name, updates, direction, error, match in cases:
        # jax.eval_shape traces without computing: the errors come at trace time.
        with pytest.raises(error, match=match):
            jax.eval_shape({**APPLY, **MEAN_PROJECTION}[name], updates, direction)


def test_missing_direction_argument_raises():
    with pytest.raises(TypeError, match="direction"):
        NORMAL_PLANE.update({"a": jnp.ones(2)}, NORMAL_PLANE.init(None))


@pytest.mark.parametrize("module", [surgery, projections], ids=lambda module: module.__name__)
def test_docstring_examples_run(module):
    assert doctest.testmod(module, raise_on_error=True).attempted > 0
