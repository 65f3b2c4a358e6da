"""Tests for gsu_jax.trees: accumulation precision, robustness, tree checks."""

from __future__ import annotations

import doctest

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import strategies as st

from gsu_jax import trees


def flat(tree):
    """All leaves raveled in tree order and concatenated, as float64 NumPy."""
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


@hypothesis.settings(max_examples=25)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), exponent=st.floats(-12.0, 12.0))
def test_tree_vdot_and_norm_match_float64(make_tree, seed, exponent):
    a = make_tree(seed, scale=10.0**exponent)
    b = make_tree(seed + 1)
    a64, b64 = flat(a), flat(b)
    np.testing.assert_allclose(
        float(trees.tree_vdot(a, b)), a64 @ b64, rtol=1e-5, atol=1e-6 * np.linalg.norm(a64) * np.linalg.norm(b64)
    )
    np.testing.assert_allclose(float(trees.tree_squared_norm(a)), a64 @ a64, rtol=1e-5)
    np.testing.assert_allclose(float(trees.tree_norm(a)), np.linalg.norm(a64), rtol=1e-5)
    np.testing.assert_allclose(float(trees.tree_max_abs(a)), np.abs(a64).max(), rtol=1e-7)


def test_tree_vdot_accumulates_bfloat16_in_float32():
    rng = np.random.default_rng(0)
    # 20,000 positive products: summed in bfloat16 the total would be off by
    # far more than 1e-5 relative (bfloat16 keeps 8 significant bits).
    a = {
        "x": jnp.asarray(rng.uniform(0.5, 1.5, 20_000), jnp.bfloat16),
        "y": jnp.asarray(rng.uniform(0.5, 1.5, (50, 40)), jnp.bfloat16),
    }
    b = jax.tree.map(lambda x: x[::-1] if x.ndim == 1 else x.T.T, a)
    result = trees.tree_vdot(a, b)
    assert result.dtype == jnp.float32
    np.testing.assert_allclose(float(result), flat(a) @ flat(b), rtol=1e-6)


def test_float64_leaves_accumulate_in_float64():
    with jax.enable_x64(True):
        a = {"x": jnp.full((3,), 1.0 + 1e-12, jnp.float64)}
        result = trees.tree_vdot(a, a)
        assert result.dtype == jnp.float64
        assert float(result) == pytest.approx(3 * (1.0 + 1e-12) ** 2, rel=1e-15)
    assert trees.accumulation_dtype(jnp.bfloat16, jnp.float16) == jnp.float32


@pytest.mark.parametrize("value", [1e30, 1e18, 1e-14, 1e-16, 1e-30])
def test_tree_norm_has_no_overflow_or_underflow(value):
    tree = {"a": jnp.full((4,), value, jnp.float32), "b": jnp.zeros((2,))}
    # sqrt(<a, a>) is inf (1e60 overflows) or 0 (1e-60 underflows) in float32.
    np.testing.assert_allclose(float(trees.tree_norm(tree)), 2 * value, rtol=1e-6)
    assert float(trees.tree_norm({"a": jnp.zeros(3)})) == 0.0


def test_tree_norm_counts_squares_that_underflow():
    # A million squares of 1.05e-19 underflow in float32 one by one but add 0.4 % to the norm of one 1.2e-15 entry.
    tree = {"small": jnp.full((1_000_000,), 1.05e-19, jnp.float32), "large": jnp.array([1.2e-15], jnp.float32)}
    expected = np.sqrt(1e6 * 1.05e-19**2 + 1.2e-15**2)
    np.testing.assert_allclose(float(trees.tree_norm(tree)), expected, rtol=1e-5)


def test_safe_reciprocal_maps_zero_and_subnormal_to_zero():
    x = jnp.array([2.0, 0.0, 1e-45, -4.0], jnp.float32)
    np.testing.assert_array_equal(np.asarray(trees.safe_reciprocal(x)), [0.5, 0.0, 0.0, -0.25])


def test_tree_add_scaled_keeps_dtypes():
    a = {"x": jnp.ones(3, jnp.bfloat16), "y": jnp.ones(2, jnp.float32)}
    b = {"x": jnp.full(3, 2.0, jnp.float32), "y": jnp.full(2, 3.0, jnp.float32)}
    out = trees.tree_add_scaled(a, b, -0.5)
    assert out["x"].dtype == jnp.bfloat16 and out["y"].dtype == jnp.float32
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x.astype(jnp.float32), out), {"x": jnp.zeros(3), "y": jnp.full(2, -0.5)}
    )


def test_stacked_helpers_match_numpy(make_tree):
    stacked = make_tree(3, leading=(4,))
    tree = make_tree(4)
    rows = np.stack([flat(jax.tree.map(lambda x, k=k: x[k], stacked)) for k in range(4)])
    vector = flat(tree)
    np.testing.assert_allclose(np.asarray(trees.stacked_vdot(stacked, tree)), rows @ vector, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(trees.stacked_max_abs(stacked)), np.abs(rows).max(axis=1), rtol=1e-7)
    row_scale = jnp.array([1.0, 0.5, 0.0, 2.0])
    scaled = rows * np.asarray(row_scale)[:, None]
    np.testing.assert_allclose(
        np.asarray(trees.stacked_gram(stacked, row_scale)), scaled @ scaled.T, rtol=1e-5, atol=1e-5
    )
    weights = jnp.array([0.5, -1.0, 2.0, 0.0])
    np.testing.assert_allclose(
        flat(trees.stacked_combination(weights, stacked)), np.asarray(weights) @ rows, rtol=1e-5, atol=1e-5
    )


def test_check_tree_match_returns_leading_axis(make_tree):
    reference = make_tree(0)
    assert trees.check_tree_match(make_tree(1), reference, tree_name="a", reference_name="b") is None
    assert (
        trees.check_tree_match(
            make_tree(1, leading=(6,)), reference, tree_name="a", reference_name="b", leading_axis=True
        )
        == 6
    )


def test_check_tree_match_accepts_nnx_state():
    _, state = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    assert trees.check_tree_match(stacked, state, tree_name="a", reference_name="b", leading_axis=True) == 2


@pytest.mark.parametrize(
    "other, leading_axis, error, match",
    [
        ({"w": np.zeros(3)}, False, ValueError, r"a has no leaf b\['v'\]"),
        (
            {"v": np.zeros(2), "w": np.zeros(3), "z": np.zeros(1)},
            False,
            ValueError,
            r"a\['z'\] has no counterpart in b",
        ),
        (
            {"v": np.zeros(2), "x": np.zeros(3)},
            False,
            ValueError,
            r"a has no leaf b\['w'\] \(it has a\['x'\] instead\)",
        ),
        (
            {"v": np.zeros(2), "w": np.zeros(4)},
            False,
            ValueError,
            r"a\['w'\] has shape \(4,\) but b\['w'\] has shape \(3,\)",
        ),
        ({"v": np.zeros(2), "w": np.zeros(3, np.int32)}, False, TypeError, r"a\['w'\] has dtype int32"),
        ({"v": np.zeros((5, 2)), "w": np.zeros((4, 3))}, True, ValueError, r"a\['v'\] has 5, a\['w'\] has 4"),
        (
            {"v": np.zeros((5, 2)), "w": np.zeros(3)},
            True,
            ValueError,
            r"a\['w'\] has shape \(3,\); expected one leading axis",
        ),
        ({"v": np.zeros((0, 2)), "w": np.zeros((0, 3))}, True, ValueError, r"empty leading axis"),
        ([np.zeros(2), np.zeros(3)], False, ValueError, r"a has no leaf b\['v'\] \(it has a\[0\] instead\)"),
    ],
)
def test_check_tree_match_names_the_first_bad_leaf(other, leading_axis, error, match):
    reference = {"v": np.zeros(2), "w": np.zeros(3)}
    with pytest.raises(error, match=match):
        trees.check_tree_match(other, reference, tree_name="a", reference_name="b", leading_axis=leading_axis)


def test_check_tree_match_rejects_different_containers():
    _, state = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
    as_dict = {"bias": state["bias"][...], "kernel": state["kernel"][...]}
    with pytest.raises(ValueError, match="different container types|no leaf"):
        trees.check_tree_match(as_dict, state, tree_name="a", reference_name="b")


def test_docstring_examples_run():
    assert doctest.testmod(trees, raise_on_error=True).attempted > 0
