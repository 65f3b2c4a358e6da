"""Tests for gsu_jax.metrics: each metric against an independent computation, its invariances, and refusals."""

import doctest
import json
import math

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gsu_jax import metrics
from gsu_jax.metrics import MetricsError

# Hypothesis examples are bounded: the machine is shared and these properties fail fast when they fail at all.
BOUNDED = settings(max_examples=40, deadline=None)


def _random_spd(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A well-conditioned random symmetric positive-definite matrix."""
    factor = rng.normal(size=(dim, dim))
    return factor @ factor.T / dim + 0.5 * np.eye(dim)


def test_module_examples_run():
    """Every docstring example is runnable and prints what it claims."""
    result = doctest.testmod(metrics, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def test_metrics_error_is_a_value_error():
    assert issubclass(MetricsError, ValueError)


# ----------------------------------------------------------------------------------------------------------------
# Forget fraction.


def test_forget_fraction_counts_any_forget_class():
    labels = np.array([0, 1, 2, 1, 9, 9, 3, 1])
    assert metrics.forget_fraction(labels, 1) == 3 / 8
    assert metrics.forget_fraction(labels, [1, 9]) == 5 / 8
    assert metrics.forget_fraction(labels, np.array([1, 1, 9])) == 5 / 8  # duplicates harmless
    assert metrics.forget_fraction(labels, 5) == 0.0
    assert isinstance(metrics.forget_fraction(labels, 1), float)


@pytest.fixture(scope="module")
def jitted_fraction_from_logits():
    return jax.jit(metrics.forget_fraction_from_logits)


@BOUNDED
@given(
    logits=hnp.arrays(np.float32, (32, 5), elements=st.integers(-3, 3).map(float)),  # small ints: many argmax ties
    forget_classes=st.lists(st.integers(0, 4), min_size=2, max_size=2),
)
def test_forget_fraction_from_logits_matches_numpy_on_argmax(jitted_fraction_from_logits, logits, forget_classes):
    expected = metrics.forget_fraction(np.argmax(logits, axis=-1), forget_classes)
    got = jitted_fraction_from_logits(jnp.asarray(logits), jnp.asarray(forget_classes, dtype=jnp.int32))
    assert got.shape == () and got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), expected, rtol=0, atol=1e-7)


def test_forget_fraction_from_logits_accepts_a_scalar_class():
    logits = jnp.array([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [0.0, 3.0]])
    chex.assert_trees_all_close(metrics.forget_fraction_from_logits(logits, 1), jnp.float32(0.75))


@pytest.mark.parametrize(
    ("labels", "classes", "match"),
    [
        ([], 1, "predicted_labels"),
        ([[1, 2]], 1, "predicted_labels"),
        ([0.0, 1.0], 1, "predicted_labels"),
        ([0, 1], [], "forget_classes"),
        ([0, 1], [-1], "forget_classes"),
        ([0, 1], 1.5, "forget_classes"),
    ],
)
def test_forget_fraction_refusals(labels, classes, match):
    with pytest.raises(MetricsError, match=match):
        metrics.forget_fraction(labels, classes)


@pytest.mark.parametrize(
    ("logits", "classes", "match"),
    [
        (jnp.zeros((4,)), jnp.array([1]), "logits"),
        (jnp.zeros((0, 3)), jnp.array([1]), "logits"),
        (jnp.zeros((4, 3)), jnp.zeros((0,), jnp.int32), "forget_classes"),
        (jnp.zeros((4, 3)), jnp.array([1.0]), "forget_classes"),
    ],
)
def test_forget_fraction_from_logits_refusals(logits, classes, match):
    with pytest.raises(MetricsError, match=match):
        metrics.forget_fraction_from_logits(logits, classes)


# ----------------------------------------------------------------------------------------------------------------
# Stopping rule and the auto threshold.


def test_stopping_step_first_update_count_strictly_below():
    assert metrics.stopping_step([0.01, 0.5, 0.0], 0.02) == 0  # already below before any update
    assert metrics.stopping_step([0.05, 0.04, 0.01, 0.0], 0.02) == 2  # the first, not the last
    assert metrics.stopping_step([0.05, 0.04, 0.03], 0.02) is None  # never
    assert metrics.stopping_step([0.05, 0.02, 0.02], 0.02) is None  # equality is not below
    assert metrics.stopping_step([0.05, 0.02, 0.0195], 0.02) == 2
    assert metrics.stopping_step(np.array([0.3, 0.1], np.float32), 0.2) == 1
    assert metrics.stopping_step(jnp.array([0.3, 0.1]), 0.2) == 1
    assert isinstance(metrics.stopping_step([0.3, 0.1], 0.2), int)


@BOUNDED
@given(
    fractions=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20),
    threshold=st.floats(1e-6, 1.0),
)
def test_stopping_step_against_a_loop(fractions, threshold):
    expected = next((t for t, fraction in enumerate(fractions) if fraction < threshold), None)
    assert metrics.stopping_step(fractions, threshold) == expected


@pytest.mark.parametrize(
    ("fractions", "threshold", "match"),
    [
        ([], 0.02, "fractions"),
        ([0.1, float("nan")], 0.02, "fractions"),
        ([0.1, 1.5], 0.02, "fractions"),
        ([0.1, -0.1], 0.02, "fractions"),
        ([[0.1]], 0.02, "fractions"),
        ([0.1], 0.0, "threshold"),
        ([0.1], -0.5, "threshold"),
        ([0.1], 1.5, "threshold"),
        ([0.1], float("nan"), "threshold"),
        ([0.1], True, "threshold"),
        ([0.1], "auto", "threshold"),
    ],
)
def test_stopping_step_refusals(fractions, threshold, match):
    with pytest.raises(MetricsError, match=match):
        metrics.stopping_step(fractions, threshold)


def test_auto_threshold_by_hand():
    # Wald: 0.04 + 2 * sqrt(0.04 * 0.96 / 1024) = 0.04 + 2 * 0.0061237244 = 0.0522474487.
    assert metrics.auto_threshold(0.04, 1024) == pytest.approx(0.0522474487, abs=1e-9)
    # Three standard errors: 0.25 + 3 * sqrt(0.25 * 0.75 / 128) = 0.25 + 3 * 0.0382733 = 0.3648198.
    assert metrics.auto_threshold(0.25, 128, num_std=3.0) == pytest.approx(0.3648198, abs=1e-6)


def test_auto_threshold_floor_at_zero_oracle_fraction():
    # Phi(-2) = 0.0227501319481792; the zero-count bound is 1 - Phi(-2) ** (1 / n).
    n = 1024
    expected = 1.0 - 0.0227501319481792 ** (1.0 / n)
    assert metrics.auto_threshold(0.0, n) == pytest.approx(expected, rel=1e-9)
    assert metrics.auto_threshold(0.0, n) > 0.0  # reachable: a fraction of 0 is below it
    # At the 95% one-sided level (1.645 std) the bound is -ln(0.05) / n = 2.996 / n: the rule of three.
    assert metrics.auto_threshold(0.0, 10_000, num_std=1.6448536) == pytest.approx(3 / 10_000, rel=2e-3)
    # The floor binds for one observed forget sample too, and no longer from two on.
    assert metrics.auto_threshold(1 / n, n) == pytest.approx(expected, rel=1e-9)
    two = 2 / n
    assert metrics.auto_threshold(two, n) == pytest.approx(two + 2 * math.sqrt(two * (1 - two) / n), rel=1e-12)


@BOUNDED
@given(
    p=st.floats(0.0, 0.5),
    dp=st.floats(0.0, 0.5),
    n=st.integers(1, 100_000),
    num_std=st.floats(0.5, 4.0),
)
def test_auto_threshold_monotone_above_oracle_and_valid(p, dp, n, num_std):
    low = metrics.auto_threshold(p, n, num_std=num_std)
    high = metrics.auto_threshold(p + dp, n, num_std=num_std)
    assert p <= low <= 1.0 and 0.0 < low
    assert low <= high + 1e-15
    # A valid argument for stopping_step.
    metrics.stopping_step([p], low)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"oracle_fraction": -0.1, "num_samples": 10}, "oracle_fraction"),
        ({"oracle_fraction": 1.1, "num_samples": 10}, "oracle_fraction"),
        ({"oracle_fraction": float("nan"), "num_samples": 10}, "oracle_fraction"),
        ({"oracle_fraction": 0.1, "num_samples": 0}, "num_samples"),
        ({"oracle_fraction": 0.1, "num_samples": 10.0}, "num_samples"),
        ({"oracle_fraction": 0.1, "num_samples": True}, "num_samples"),
        ({"oracle_fraction": 0.1, "num_samples": 10, "num_std": 0.0}, "num_std"),
        ({"oracle_fraction": 0.1, "num_samples": 10, "num_std": float("inf")}, "num_std"),
    ],
)
def test_auto_threshold_refusals(kwargs, match):
    with pytest.raises(MetricsError, match=match):
        metrics.auto_threshold(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance.


@pytest.fixture(scope="module")
def feature_sets():
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(6, 6))
    a = rng.normal(size=(800, 6)) @ mixing
    b = rng.normal(size=(600, 6)) @ (mixing + 0.3 * rng.normal(size=(6, 6))) + 0.7
    return a.astype(np.float32), b.astype(np.float32)


def test_frechet_distance_of_a_set_with_itself_is_zero(feature_sets):
    a, _ = feature_sets
    scale = float(np.trace(np.cov(a.astype(np.float64), rowvar=False)))
    assert 0.0 <= metrics.frechet_distance(a, a) <= 1e-9 * scale
    assert 0.0 <= metrics.frechet_distance(a, a.copy()) <= 1e-9 * scale


def test_frechet_distance_of_a_shifted_set_is_the_squared_shift(feature_sets):
    a, _ = feature_sets
    a = a.astype(np.float64)
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, -0.25])
    distance = metrics.frechet_distance(a, a + shift)
    # Same covariance, so only the mean term survives: |shift|^2 = 1 + 4 + 0.25 + 0 + 9 + 0.0625.
    assert distance == pytest.approx(14.3125, rel=1e-9)
    assert distance > metrics.frechet_distance(a, a)


def test_frechet_distance_symmetric_and_invariant_to_sample_order(feature_sets):
    a, b = feature_sets
    reference = metrics.frechet_distance(a, b)
    assert reference > 0.0
    assert metrics.frechet_distance(b, a) == pytest.approx(reference, rel=1e-9)
    rng = np.random.default_rng(1)
    shuffled = metrics.frechet_distance(a[rng.permutation(len(a))], b[rng.permutation(len(b))])
    assert shuffled == pytest.approx(reference, rel=1e-9)


def test_frechet_distance_invariant_to_a_common_rotation(feature_sets):
    a, b = (x.astype(np.float64) for x in feature_sets)
    rotation, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(6, 6)))
    assert metrics.frechet_distance(a @ rotation, b @ rotation) == pytest.approx(
        metrics.frechet_distance(a, b), rel=1e-9
    )


def test_frechet_distance_from_stats_equals_from_features(feature_sets):
    a, b = feature_sets
    stats_a = metrics.feature_statistics(a)
    assert stats_a.mean.dtype == np.float64 and stats_a.covariance.shape == (6, 6)
    # Unbiased covariance, as numpy's default.
    np.testing.assert_allclose(stats_a.covariance, np.cov(a.astype(np.float64), rowvar=False), rtol=1e-12)
    np.testing.assert_allclose(stats_a.mean, a.astype(np.float64).mean(0), rtol=1e-12)
    from_stats = metrics.frechet_distance_from_stats(stats_a, metrics.feature_statistics(b))
    assert from_stats == pytest.approx(metrics.frechet_distance(a, b), rel=1e-12)
    # Plain (mean, covariance) tuples work too.
    plain = metrics.frechet_distance_from_stats(tuple(stats_a), tuple(metrics.feature_statistics(b)))
    assert plain == pytest.approx(from_stats, rel=1e-12)


@BOUNDED
@given(
    mean_a=hnp.arrays(np.float64, 3, elements=st.floats(-5, 5)),
    mean_b=hnp.arrays(np.float64, 3, elements=st.floats(-5, 5)),
    var_a=hnp.arrays(np.float64, 3, elements=st.floats(1e-3, 10)),
    var_b=hnp.arrays(np.float64, 3, elements=st.floats(1e-3, 10)),
)
def test_frechet_distance_closed_form_for_diagonal_covariances(mean_a, mean_b, var_a, var_b):
    # Commuting covariances: d^2 = |mu_a - mu_b|^2 + sum_i (sigma_a,i - sigma_b,i)^2.
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    got = metrics.frechet_distance_from_stats((mean_a, np.diag(var_a)), (mean_b, np.diag(var_b)))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_for_full_covariances():
    linalg = pytest.importorskip("scipy.linalg", reason="scipy is the independent reference for the matrix sqrt")
    rng = np.random.default_rng(3)
    for dim in (1, 2, 5, 20):
        mean_a, mean_b = rng.normal(size=dim), rng.normal(size=dim)
        cov_a, cov_b = _random_spd(rng, dim), _random_spd(rng, dim)
        sqrt_product = np.real(linalg.sqrtm(cov_a @ cov_b))
        expected = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * sqrt_product)
        got = metrics.frechet_distance_from_stats((mean_a, cov_a), (mean_b, cov_b))
        assert got == pytest.approx(expected, rel=1e-9), dim


def test_frechet_distance_of_large_samples_approaches_the_population_value():
    # Known Gaussians in 2-d: N(0, I) and N((1, 0), diag(4, 1)); population d^2 = 1 + (1 - 2)^2 = 2.
    rng = np.random.default_rng(4)
    a = rng.normal(size=(40_000, 2))
    b = rng.normal(size=(40_000, 2)) * np.array([2.0, 1.0]) + np.array([1.0, 0.0])
    assert metrics.frechet_distance(a, b) == pytest.approx(2.0, abs=0.05)


def test_frechet_distance_with_fewer_samples_than_dimensions():
    # Singular covariances (N < F), the case where sqrtm goes complex: finite, non-negative, ~0 against itself.
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(10, 50)), rng.normal(size=(12, 50)) + 0.1
    distance = metrics.frechet_distance(a, b)
    assert math.isfinite(distance) and distance > 0.0
    assert metrics.frechet_distance(a, a) <= 1e-9 * np.trace(np.cov(a, rowvar=False))


@pytest.mark.parametrize(
    ("features_a", "features_b", "match"),
    [
        (np.zeros((5, 3)), np.zeros((5, 4)), "same feature dimension"),
        (np.zeros((1, 3)), np.zeros((5, 3)), "features_a.*at least 2 samples"),
        (np.zeros((5, 3)), np.zeros((0, 3)), "features_b"),
        (np.zeros((5,)), np.zeros((5, 3)), "features_a"),
        (np.zeros((5, 3)), np.full((5, 3), np.nan), "features_b.*finite"),
        (np.zeros((5, 3)), np.zeros((5, 3), dtype=object), "features_b"),
    ],
)
def test_frechet_distance_refusals(features_a, features_b, match):
    with pytest.raises(MetricsError, match=match):
        metrics.frechet_distance(features_a, features_b)


def test_frechet_distance_from_stats_accepts_float32_statistics_computed_elsewhere():
    # As the orchestration might compute them on the accelerator: float32, rank-deficient (dead units, N < F).
    rng = np.random.default_rng(8)
    features = np.maximum(rng.normal(size=(40, 64)), 0.0).astype(np.float32)
    features[:, :8] = 0.0  # dead ReLU units: zero variance
    features_jax = jnp.asarray(features)
    mean = jnp.mean(features_jax, axis=0)
    centered = features_jax - mean
    covariance = centered.T @ centered / (features.shape[0] - 1)
    from_float32 = metrics.frechet_distance_from_stats((mean, covariance), metrics.feature_statistics(features + 1.0))
    assert from_float32 == pytest.approx(64.0, rel=1e-4)  # same covariance, shift of 1 in each of 64 dims


@pytest.mark.parametrize(
    ("stats_b", "match"),
    [
        ((np.zeros(3), np.eye(4)), "stats_b.covariance.*shape"),
        ((np.zeros(4), np.eye(4)), "same feature dimension"),
        ((np.zeros(3), np.triu(np.ones((3, 3)))), "symmetric"),
        ((np.zeros(3), -np.eye(3)), "positive semi-definite"),
        ((np.zeros(3), np.full((3, 3), np.nan)), "finite"),
        (np.eye(3), "pair"),
    ],
)
def test_frechet_distance_from_stats_refusals(stats_b, match):
    with pytest.raises(MetricsError, match=match):
        metrics.frechet_distance_from_stats((np.zeros(3), np.eye(3)), stats_b)


def test_feature_statistics_refuses_a_single_sample():
    with pytest.raises(MetricsError, match="features.*at least 2 samples"):
        metrics.feature_statistics(np.zeros((1, 4)))


# ----------------------------------------------------------------------------------------------------------------
# Inception score.


def test_inception_score_extremes():
    assert metrics.inception_score(np.full((10, 7), 1 / 7)) == pytest.approx((1.0, 0.0))
    confident_balanced = np.tile(np.eye(7), (3, 1))  # every class 3 times, each with certainty
    assert metrics.inception_score(confident_balanced) == pytest.approx((7.0, 0.0))
    # Split into 3 parts of one full cycle each: every part scores 7.
    assert metrics.inception_score(confident_balanced, num_splits=3) == pytest.approx((7.0, 0.0))
    # Confident but all the same class: no diversity, score 1.
    assert metrics.inception_score(np.tile(np.eye(7)[2], (5, 1))) == pytest.approx((1.0, 0.0))


def test_inception_score_splits_mean_and_population_std():
    probs = np.concatenate([np.tile(np.eye(4), (2, 1)), np.full((8, 4), 0.25)])  # parts score 4 and 1
    mean, std = metrics.inception_score(probs, num_splits=2)
    assert mean == pytest.approx(2.5) and std == pytest.approx(1.5)


@BOUNDED
@given(logits=hnp.arrays(np.float64, (12, 4), elements=st.floats(-8, 8)))
def test_inception_score_equals_brute_force_and_lies_in_range(logits):
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    marginal = probs.mean(0)
    kl = [sum(p_y * math.log(p_y / marginal[y]) for y, p_y in enumerate(row) if p_y > 0) for row in probs]
    expected = math.exp(sum(kl) / len(kl))
    score, std = metrics.inception_score(probs.astype(np.float32))
    assert score == pytest.approx(expected, rel=1e-5)
    assert 1.0 - 1e-9 <= score <= 4.0 + 1e-9 and std == 0.0


@pytest.mark.parametrize(
    ("probs", "num_splits", "match"),
    [
        (np.zeros((0, 3)), 1, "probs"),
        (np.full((2, 3), np.nan), 1, "probs.*finite"),
        (np.array([[1.5, -0.5], [0.5, 0.5]]), 1, "non-negative"),
        (np.array([[0.5, 0.4], [0.5, 0.5]]), 1, "sum to 1"),
        (np.full((3, 2), 0.5), 0, "num_splits"),
        (np.full((3, 2), 0.5), 4, "num_splits"),
        (np.full((3, 2), 0.5), 1.0, "num_splits"),
        (np.full((6,), 0.5), 1, "probs"),
    ],
)
def test_inception_score_refusals(probs, num_splits, match):
    with pytest.raises(MetricsError, match=match):
        metrics.inception_score(probs, num_splits=num_splits)


# ----------------------------------------------------------------------------------------------------------------
# Membership inference.


def test_mia_auc_orientation_on_separated_losses():
    members = np.linspace(0.0, 1.0, 50)  # still memorised: low loss
    nonmembers = np.linspace(2.0, 3.0, 40)
    assert metrics.membership_inference_auc(members, nonmembers) == 1.0
    assert metrics.membership_inference_auc(nonmembers, members) == 0.0  # over-unlearned: members lose more


def test_mia_auc_of_identical_distributions_is_one_half():
    rng = np.random.default_rng(6)
    members, nonmembers = rng.gamma(2.0, size=5_000), rng.gamma(2.0, size=4_000)
    # The AUC's standard deviation under H0 is sqrt((n + m + 1) / (12 n m)) ~ 0.0061; allow five of them.
    assert metrics.membership_inference_auc(members, nonmembers) == pytest.approx(0.5, abs=0.031)
    # All tied: exactly 0.5.
    assert metrics.membership_inference_auc(np.ones(7), np.ones(3)) == 0.5


@BOUNDED
@given(
    members=st.lists(st.integers(0, 5).map(float), min_size=1, max_size=25),
    nonmembers=st.lists(st.integers(0, 5).map(float), min_size=1, max_size=25),
)
def test_mia_auc_equals_brute_force_pair_count_with_ties(members, nonmembers):
    wins = sum((non > mem) + 0.5 * (non == mem) for mem in members for non in nonmembers)
    expected = wins / (len(members) * len(nonmembers))
    got = metrics.membership_inference_auc(members, nonmembers)
    assert got == pytest.approx(expected, abs=1e-12)
    # Swapping the roles mirrors the AUC.
    assert metrics.membership_inference_auc(nonmembers, members) == pytest.approx(1.0 - expected, abs=1e-12)


def test_mia_auc_invariant_to_monotone_transforms_and_order():
    rng = np.random.default_rng(7)
    members, nonmembers = rng.normal(size=300), rng.normal(0.3, size=200)
    reference = metrics.membership_inference_auc(members, nonmembers)
    assert metrics.membership_inference_auc(np.exp(members), np.exp(nonmembers)) == pytest.approx(reference)
    assert metrics.membership_inference_auc(members[::-1], rng.permutation(nonmembers)) == pytest.approx(reference)


@pytest.mark.parametrize(
    ("members", "nonmembers", "match"),
    [
        ([], [1.0], "member_losses"),
        ([1.0], [], "nonmember_losses"),
        ([1.0, np.nan], [1.0], "member_losses.*finite"),
        ([1.0], [np.inf], "nonmember_losses.*finite"),
        ([[1.0]], [1.0], "member_losses"),
        ([True, False], [1.0], "member_losses.*numeric"),
    ],
)
def test_mia_auc_refusals(members, nonmembers, match):
    with pytest.raises(MetricsError, match=match):
        metrics.membership_inference_auc(members, nonmembers)


# ----------------------------------------------------------------------------------------------------------------
# Reporting.


def test_time_to_unlearn():
    assert metrics.time_to_unlearn(0.0051, 4.6) == pytest.approx(0.02346)
    assert metrics.time_to_unlearn(0.005, 0) == 0.0
    assert metrics.time_to_unlearn(np.float32(0.5), np.int64(3)) == pytest.approx(1.5)
    assert metrics.time_to_unlearn(0.005, None) is None


@pytest.mark.parametrize(
    ("step_time_s", "steps", "match"),
    [
        (0.0, 3, "step_time_s"),
        (-1.0, 3, "step_time_s"),
        (float("nan"), 3, "step_time_s"),
        (None, 3, "step_time_s"),
        (0.1, -1, "steps"),
        (0.1, float("inf"), "steps"),
        (0.1, "3", "steps"),
    ],
)
def test_time_to_unlearn_refusals(step_time_s, steps, match):
    with pytest.raises(MetricsError, match=match):
        metrics.time_to_unlearn(step_time_s, steps)


def test_summarize_keeps_not_reached_explicit():
    summary = metrics.summarize([3, None, 5, np.int64(4), None])
    assert summary == {"mean": 4.0, "std": 1.0, "per_seed": [3, None, 5, 4, None], "num_reached": 3, "num_seeds": 5}
    assert all(type(value) is int for value in summary["per_seed"] if value is not None)
    json.dumps(summary)  # plain Python types throughout


def test_summarize_edge_cases():
    nothing = metrics.summarize([None, None])
    assert nothing == {"mean": None, "std": None, "per_seed": [None, None], "num_reached": 0, "num_seeds": 2}
    one = metrics.summarize([None, 2.5])
    assert one["mean"] == 2.5 and one["std"] is None and one["num_reached"] == 1
    floats = metrics.summarize(np.array([1.0, 2.0, 4.0], np.float32))
    assert floats["mean"] == pytest.approx(7 / 3) and floats["std"] == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert all(type(value) is float for value in floats["per_seed"])
    from_jax = metrics.summarize([jnp.float32(1.5), jnp.int32(2)])
    assert from_jax["per_seed"] == [1.5, 2] and type(from_jax["per_seed"][1]) is int


def test_summarize_keeps_a_diverged_seed_infinite():
    """A run that diverged has an infinite held-out loss: the summary says so instead of refusing the report."""
    diverged = metrics.summarize([170.0, math.inf, None])
    assert diverged == {
        "mean": math.inf,
        "std": None,
        "per_seed": [170.0, math.inf, None],
        "num_reached": 2,
        "num_seeds": 3,
    }
    both = metrics.summarize([math.inf, -math.inf])
    assert both["mean"] is None and both["std"] is None


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([], "at least one"),
        ([1.0, float("nan")], r"values\[1\].*finite"),
        ([1.0, "2"], r"values\[1\]"),
        ([True], r"values\[0\]"),
        ([[1.0, 2.0]], r"values\[0\]"),
        (3.0, "sequence"),
        ("12", "sequence"),
    ],
)
def test_summarize_refusals(values, match):
    with pytest.raises(MetricsError, match=match):
        metrics.summarize(values)
