"""Pure evaluation functions for unlearning runs (issue 4, item 3).

Everything here is a pure function of arrays: no models, no files, no randomness. The orchestration that
decodes samples, runs the evaluator and writes the report lives elsewhere and calls these.

* Forget fraction: the share of generated samples the evaluator labels as a forget class
  (:func:`forget_fraction` on labels in numpy, :func:`forget_fraction_from_logits` on logits, jit-able).
* Stopping rule: :func:`stopping_step` (first update count whose fraction is below the threshold) and
  :func:`auto_threshold` (the retrain-from-scratch oracle's fraction plus ``num_std`` binomial standard errors,
  docs/protocol.md §4).
* Sample quality: :func:`frechet_distance` on classifier features (the protocol's "classifier FID"), with
  :func:`feature_statistics` / :func:`frechet_distance_from_stats` so the real-data side is computed once;
  :func:`inception_score` on the evaluator's class probabilities.
* Privacy: :func:`membership_inference_auc`, a loss-threshold membership-inference AUC.
* Forget sets of examples (not whole classes): :func:`loss_gap` (the forget training examples' loss minus held-out
  examples', matched by class when labels are given, with its standard error), :func:`loss_gap_band` (the oracle's gap +- ``num_std`` SE, the stop)
  and :func:`reached_stop` (one test for both kinds of stop).
* Reporting: :func:`time_to_unlearn` and :func:`summarize` (mean/std over seeds with "not reached" kept explicit).

Precision: everything except the jit-able forget fraction converts to numpy float64 first. Classifier-FID is a
difference of traces of 200x200 covariances estimated from tens of thousands of float32 features; in float32
the cancellation error is of the order of the differences between methods we want to read.

Bad input raises :class:`MetricsError` (a ``ValueError``) before any work, naming the argument and what is
allowed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

__all__ = [
    "FeatureStatistics",
    "MetricsError",
    "auto_threshold",
    "feature_statistics",
    "forget_fraction",
    "forget_fraction_from_logits",
    "frechet_distance",
    "frechet_distance_from_stats",
    "inception_score",
    "LossGapBand",
    "loss_gap",
    "loss_gap_band",
    "reached_stop",
    "membership_inference_auc",
    "stopping_step",
    "summarize",
    "time_to_unlearn",
]


class MetricsError(ValueError):
    """Bad input to a metric: names the argument, the bad value and what is allowed."""


# --------------------------------------------------------------------------------------------------------------
# Input validation (shared; every public function validates before computing anything).


def _number(value, name: str, *, allow_infinite: bool = False) -> int | float:
    """``value`` as a finite Python int (integer input) or float, refusing bools, strings, arrays and NaN/inf
    (``allow_infinite``: +-inf is kept, NaN still refused)."""
    if value is None or isinstance(value, bool | str | bytes):
        raise MetricsError(f"{name} must be a real number, got {value!r}")
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        raise MetricsError(f"{name} must be a real number, got {value!r}") from None
    if array.ndim != 0 or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise MetricsError(f"{name} must be a real number, got {value!r}")
    if np.issubdtype(array.dtype, np.integer):
        return int(array)
    result = float(array)
    if allow_infinite and math.isinf(result):
        return result
    if not math.isfinite(result):
        allowed = "finite (or +-inf, a diverged run's loss)" if allow_infinite else "finite"
        raise MetricsError(f"{name} must be {allowed}, got {result!r}")
    return result


def _real_scalar(value, name: str) -> float:
    """``value`` as a finite Python float (see :func:`_number`)."""
    return float(_number(value, name))


def _float_array(values, name: str, *, ndim: int) -> np.ndarray:
    """``values`` as a non-empty, finite float64 array of rank ``ndim``."""
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as error:  # ragged nested lists
        raise MetricsError(f"{name} must be a rectangular numeric array: {error}") from None
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise MetricsError(f"{name} must be numeric, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise MetricsError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if array.size == 0:
        raise MetricsError(f"{name} must not be empty, got shape {array.shape}")
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        bad = int(np.sum(~np.isfinite(array)))
        raise MetricsError(f"{name} must be finite, found {bad} NaN/inf value(s)")
    return array


def _class_ids(forget_classes, name: str = "forget_classes") -> np.ndarray:
    """``forget_classes`` (an int or a sequence of ints) as a non-empty 1-D int64 array of non-negative ids."""
    classes = np.atleast_1d(np.asarray(forget_classes))
    if classes.size == 0:
        raise MetricsError(f"{name} must name at least one class, got {forget_classes!r}")
    if classes.ndim != 1 or not np.issubdtype(classes.dtype, np.integer):
        raise MetricsError(f"{name} must be an int or a 1-D sequence of ints, got {forget_classes!r}")
    if np.any(classes < 0):
        raise MetricsError(f"{name} must be non-negative class ids, got {classes.tolist()}")
    return classes.astype(np.int64)


# --------------------------------------------------------------------------------------------------------------
# Forget fraction.


def forget_fraction(predicted_labels, forget_classes) -> float:
    r"""Share of samples the evaluator labels as any forget class.

    .. math:: \mathrm{ff} = \frac{1}{N} \sum_{i=1}^{N} [\hat y_i \in \mathcal{F}]

    Args:
        predicted_labels: ``int[N]``, the evaluator's label for each generated sample, ``N >= 1``.
        forget_classes: an int or ``int[C]``, the forget class ids (non-negative, duplicates harmless).

    Returns:
        The fraction in ``[0, 1]`` as a Python float.

    Raises:
        MetricsError: empty or non-integer labels, empty or negative forget classes.

    Example:
        >>> forget_fraction([1, 3, 1, 7], forget_classes=1)
        0.5
        >>> forget_fraction([1, 3, 1, 7], forget_classes=[3, 7])
        0.5
    """
    labels = np.asarray(predicted_labels)
    if labels.ndim != 1 or labels.size == 0:
        raise MetricsError(f"predicted_labels must be a non-empty 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise MetricsError(f"predicted_labels must be integer class ids, got dtype {labels.dtype}")
    classes = _class_ids(forget_classes)
    return float(np.mean(np.isin(labels, classes)))


def forget_fraction_from_logits(logits, forget_classes) -> jnp.ndarray:
    r"""Jit-able forget fraction from evaluator logits: the monitoring step's hot path.

    The predicted label is ``argmax`` over classes (first index on ties, as :func:`numpy.argmax`), so this equals
    ``forget_fraction(np.argmax(logits, -1), forget_classes)``.

    Only shapes are checked (they are static under ``jax.jit``); values cannot be, so NaN logits are not refused
    here. ``forget_classes`` is a traced argument: changing the class ids does not recompile.

    Args:
        logits: ``f32[N, K]``, evaluator logits for ``N >= 1`` samples over ``K`` classes.
        forget_classes: ``i32[]`` or ``i32[C]``, the forget class ids.

    Returns:
        ``f32[]``, the fraction in ``[0, 1]``.

    Raises:
        MetricsError: logits not ``[N, K]`` with ``N, K >= 1``, forget classes not a scalar or 1-D integer array.

    Example:
        >>> import jax
        >>> logits = jnp.array([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
        >>> float(jax.jit(forget_fraction_from_logits)(logits, jnp.array([1])))
        0.5
    """
    logits = jnp.asarray(logits)
    classes = jnp.asarray(forget_classes)
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise MetricsError(f"logits must have shape [N, K] with N, K >= 1, got {logits.shape}")
    if classes.ndim > 1 or classes.size == 0 or not jnp.issubdtype(classes.dtype, jnp.integer):
        raise MetricsError(
            f"forget_classes must be a scalar or non-empty 1-D integer array, got shape {classes.shape} "
            f"dtype {classes.dtype}"
        )
    predicted = jnp.argmax(logits, axis=-1)
    is_forget = jnp.any(predicted[:, None] == jnp.atleast_1d(classes)[None, :], axis=-1)
    return jnp.mean(is_forget.astype(jnp.float32))


# --------------------------------------------------------------------------------------------------------------
# Stopping rule.


def stopping_step(fractions, threshold: float) -> int | None:
    r"""Number of updates after which the forget fraction first drops strictly below ``threshold``.

    ``fractions[t]`` is the forget fraction measured after ``t`` updates have been applied: ``fractions[0]`` is
    the model before any update. We count updates applied (docs/protocol.md §2 caveat): the published code reads the
    fraction *before* each update, so its "2.7 steps" is 1.7 of ours.

    .. math:: t^\star = \min\{t : \mathrm{ff}_t < \tau\}

    Args:
        fractions: ``float[T + 1]``, fractions in ``[0, 1]`` after ``0, 1, ..., T`` updates.
        threshold: ``tau`` in ``(0, 1]``; equality does not count as below.

    Returns:
        ``t*`` (``0`` when the model is already below the threshold), or ``None`` if no entry is below it
        (not reached within the budget).

    Raises:
        MetricsError: empty, non-1-D or non-finite fractions, fractions outside ``[0, 1]``, threshold outside
            ``(0, 1]``.

    Example:
        >>> stopping_step([0.05, 0.03, 0.02, 0.01], threshold=0.02)
        3
        >>> stopping_step([0.05, 0.03], threshold=0.02) is None
        True
    """
    values = _float_array(fractions, "fractions", ndim=1)
    if np.any((values < 0.0) | (values > 1.0)):
        raise MetricsError(f"fractions must lie in [0, 1], got min {values.min()} max {values.max()}")
    tau = _real_scalar(threshold, "threshold")
    if not 0.0 < tau <= 1.0:
        raise MetricsError(f"threshold must lie in (0, 1], got {tau}")
    below = np.flatnonzero(values < tau)
    return int(below[0]) if below.size else None


def auto_threshold(oracle_fraction: float, num_samples: int, *, num_std: float = 2.0) -> float:
    r"""The ``auto`` stopping threshold: the oracle's forget fraction plus ``num_std`` binomial standard errors.

    The oracle (a model retrained without the forget set) still generates some samples the evaluator calls a
    forget class; its fraction ``p`` on the same ``n`` monitoring samples is the level "forgotten" can mean
    (docs/protocol.md §4). Counts out of ``n`` fluctuate by a binomial standard error, so

    .. math:: \tau = \min\Bigl(1,\ \max\bigl(p + k\sqrt{p(1-p)/n},\ u_0\bigr)\Bigr),
              \qquad u_0 = 1 - \Phi(-k)^{1/n}.

    The Wald term ``p + k SE`` alone degenerates at ``p = 0`` (SE 0: a threshold of 0 that no fraction can be
    below) and is too tight near it. ``u_0`` is the exact one-sided upper confidence bound on a binomial rate when
    zero of ``n`` samples were observed, at the confidence level of ``k`` normal standard deviations
    (``Phi(-k) = 0.0228`` for ``k = 2``, so ``u_0 ~ 3.8 / n``; ``k = 1.645`` gives the rule of three,
    ``3 / n``). The floor only binds when the oracle produced zero or one forget sample; it keeps the threshold
    monotone in ``p``.

    Args:
        oracle_fraction: ``p`` in ``[0, 1]``, the oracle's forget fraction on the ``n`` monitoring samples.
        num_samples: ``n >= 1``, the number of monitoring samples the fraction was measured on.
        num_std: ``k > 0``, how many standard errors above the oracle.

    Returns:
        The threshold ``tau`` in ``(0, 1]``.

    Raises:
        MetricsError: ``p`` outside ``[0, 1]``, ``n`` not a positive int, ``k`` not positive and finite.

    Example:
        >>> round(auto_threshold(0.04, 1024), 6)  # 0.04 + 2 * sqrt(0.04 * 0.96 / 1024)
        0.052247
        >>> round(auto_threshold(0.0, 1024) * 1024, 2)  # floor: about 3.8 samples of 1024
        3.78
    """
    p = _real_scalar(oracle_fraction, "oracle_fraction")
    if not 0.0 <= p <= 1.0:
        raise MetricsError(f"oracle_fraction must lie in [0, 1], got {p}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
        raise MetricsError(f"num_samples must be a positive int, got {num_samples!r}")
    k = _real_scalar(num_std, "num_std")
    if k <= 0.0:
        raise MetricsError(f"num_std must be positive, got {k}")
    n = int(num_samples)
    wald = p + k * math.sqrt(p * (1.0 - p) / n)
    tail = 0.5 * math.erfc(k / math.sqrt(2.0))  # Phi(-k)
    zero_count_upper_bound = -math.expm1(math.log(tail) / n)  # 1 - tail ** (1 / n), accurate for large n
    return min(1.0, max(wald, zero_count_upper_bound))


# --------------------------------------------------------------------------------------------------------------
# Fréchet distance on features.


class FeatureStatistics(NamedTuple):
    """Gaussian fitted to a feature set; unpacks as ``(mean, covariance)``.

    Attributes:
        mean: ``f64[F]``, the sample mean.
        covariance: ``f64[F, F]``, the unbiased sample covariance (divides by ``N - 1``).
    """

    mean: np.ndarray
    covariance: np.ndarray


def feature_statistics(features) -> FeatureStatistics:
    r"""Mean and unbiased covariance of a feature set, in float64.

    .. math:: \mu = \frac1N \sum_i x_i, \qquad
              \Sigma = \frac{1}{N-1} \sum_i (x_i - \mu)(x_i - \mu)^\top

    Compute this once for the real data and reuse it with :func:`frechet_distance_from_stats`.

    Args:
        features: ``float[N, F]`` with ``N >= 2`` (a covariance needs two samples), finite.

    Returns:
        :class:`FeatureStatistics` ``(mean f64[F], covariance f64[F, F])``.

    Raises:
        MetricsError: not 2-D, fewer than two samples, no feature dimension, NaN/inf.

    Example:
        >>> mu, sigma = feature_statistics([[0.0, 1.0], [2.0, 1.0]])
        >>> mu.tolist(), sigma.tolist()
        ([1.0, 1.0], [[2.0, 0.0], [0.0, 0.0]])
    """
    return _statistics_of(_feature_matrix(features, "features"))


def _feature_matrix(features, name: str) -> np.ndarray:
    """``features`` validated as ``float64[N, F]`` with ``N >= 2`` samples (a covariance needs two)."""
    matrix = _float_array(features, name, ndim=2)
    if matrix.shape[0] < 2:
        raise MetricsError(f"{name} must have at least 2 samples for a covariance, got shape {matrix.shape}")
    return matrix


def _statistics_of(matrix: np.ndarray) -> FeatureStatistics:
    mean = matrix.mean(axis=0)
    centered = matrix - mean
    return FeatureStatistics(mean=mean, covariance=centered.T @ centered / (matrix.shape[0] - 1))


def _checked_statistics(stats, name: str) -> FeatureStatistics:
    """``stats`` (any ``(mean, covariance)`` pair) validated as a Gaussian's parameters, in float64."""
    try:
        mean, covariance = stats
    except (TypeError, ValueError):
        raise MetricsError(f"{name} must be a (mean, covariance) pair, got {type(stats).__name__}") from None
    mean = _float_array(mean, f"{name}.mean", ndim=1)
    covariance = _float_array(covariance, f"{name}.covariance", ndim=2)
    dim = mean.shape[0]
    if covariance.shape != (dim, dim):
        raise MetricsError(
            f"{name}.covariance must have shape ({dim}, {dim}) to match its mean, got {covariance.shape}"
        )
    # Tolerances admit covariances computed in float32 elsewhere (relative rounding ~1e-7 per entry, more for
    # rank-deficient ones: dead ReLU units, fewer samples than features); genuine errors are far larger.
    scale = max(float(np.max(np.abs(covariance))), np.finfo(np.float64).tiny)
    asymmetry = float(np.max(np.abs(covariance - covariance.T)))
    if asymmetry > 1e-5 * scale:
        raise MetricsError(f"{name}.covariance must be symmetric, max |C - C^T| is {asymmetry:.3g}")
    covariance = 0.5 * (covariance + covariance.T)
    smallest = float(np.linalg.eigvalsh(covariance)[0])
    if smallest < -1e-5 * scale:
        raise MetricsError(f"{name}.covariance must be positive semi-definite, smallest eigenvalue is {smallest:.3g}")
    return FeatureStatistics(mean=mean, covariance=covariance)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix via ``eigh``, rounding-error negatives clipped to 0."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance_from_stats(stats_a, stats_b) -> float:
    r"""Fréchet (2-Wasserstein squared) distance between two Gaussians given by their statistics.

    .. math:: d^2 = \lVert\mu_a - \mu_b\rVert^2 + \operatorname{tr}\Sigma_a + \operatorname{tr}\Sigma_b
                    - 2 \operatorname{tr}\bigl(\Sigma_a^{1/2} \Sigma_b \Sigma_a^{1/2}\bigr)^{1/2}

    ``tr (Sigma_a Sigma_b)^{1/2}`` equals the sum of the square roots of the eigenvalues of the symmetric PSD
    matrix ``Sigma_a^{1/2} Sigma_b Sigma_a^{1/2}`` (similar to ``Sigma_a Sigma_b``). Computing it with ``eigh``
    in float64 and clipping rounding-error negatives avoids ``scipy.linalg.sqrtm``'s complex results and its
    failure on singular covariances (``N < F`` samples). The result is a squared distance, so rounding below 0
    (sets compared with themselves) is clipped to 0.

    Args:
        stats_a: ``(mean f[F], covariance f[F, F])``, e.g. from :func:`feature_statistics`.
        stats_b: the same for the other set, same ``F``.

    Returns:
        ``d^2 >= 0`` as a Python float (the "FID" value; no square root is taken, as in the FID literature).

    Raises:
        MetricsError: malformed statistics, mismatched feature dimensions, asymmetric or non-PSD covariance.

    Example:
        >>> stats = (np.zeros(2), np.eye(2))
        >>> frechet_distance_from_stats(stats, (np.ones(2), 4 * np.eye(2)))  # |1|^2*2 + (1 - 2)^2*2
        4.0
    """
    mean_a, cov_a = _checked_statistics(stats_a, "stats_a")
    mean_b, cov_b = _checked_statistics(stats_b, "stats_b")
    if mean_a.shape != mean_b.shape:
        raise MetricsError(
            f"stats_a and stats_b must have the same feature dimension, got {mean_a.shape[0]} and {mean_b.shape[0]}"
        )
    return _frechet_distance(mean_a, cov_a, mean_b, cov_b)


def _frechet_distance(mean_a, cov_a, mean_b, cov_b) -> float:
    sqrt_a = _psd_sqrt(cov_a)
    inner = sqrt_a @ cov_b @ sqrt_a
    inner_eigenvalues = np.linalg.eigvalsh(0.5 * (inner + inner.T))
    trace_sqrt_product = float(np.sum(np.sqrt(np.clip(inner_eigenvalues, 0.0, None))))
    difference = mean_a - mean_b
    distance = float(difference @ difference) + float(np.trace(cov_a) + np.trace(cov_b)) - 2.0 * trace_sqrt_product
    return max(distance, 0.0)


def frechet_distance(features_a, features_b) -> float:
    r"""Fréchet distance between Gaussians fitted to two feature sets (the protocol's classifier FID).

    Fits :func:`feature_statistics` to each set and applies :func:`frechet_distance_from_stats`. In the
    protocol the features are the evaluator's 200-d post-ReLU hidden layer on real images and on generated
    samples. Symmetric in its arguments and invariant to the order of samples within each set.

    Args:
        features_a: ``float[Na, F]``, ``Na >= 2``, finite.
        features_b: ``float[Nb, F]``, ``Nb >= 2``, finite, same ``F``.

    Returns:
        ``d^2 >= 0`` as a Python float.

    Raises:
        MetricsError: not 2-D, fewer than two samples, NaN/inf, mismatched feature dimensions.

    Example:
        >>> x = np.random.default_rng(0).normal(size=(500, 3))
        >>> round(frechet_distance(x, x + 2.0), 9)  # a shift by c moves only the means: |c|^2 = 3 * 4
        12.0
    """
    a = _feature_matrix(features_a, "features_a")
    b = _feature_matrix(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise MetricsError(
            f"features_a and features_b must have the same feature dimension, got {a.shape[1]} and {b.shape[1]}"
        )
    mean_a, cov_a = _statistics_of(a)
    mean_b, cov_b = _statistics_of(b)
    return _frechet_distance(mean_a, cov_a, mean_b, cov_b)


# --------------------------------------------------------------------------------------------------------------
# Inception score.


def inception_score(probs, *, num_splits: int = 1) -> tuple[float, float]:
    r"""Inception score of generated samples under the evaluator's class probabilities.

    .. math:: \mathrm{IS} = \exp\Bigl(\frac1N \sum_i \mathrm{KL}\bigl(p(y \mid x_i)\,\Vert\,p(y)\bigr)\Bigr),
              \qquad p(y) = \frac1N \sum_i p(y \mid x_i)

    It lies in ``[1, K]``: 1 when every sample gets the same distribution (e.g. uniform), ``K`` when every sample
    is classified with certainty and the classes are balanced. With ``num_splits > 1`` the samples are cut into
    contiguous, nearly equal parts (:func:`numpy.array_split`), the score is computed per part, and the mean and
    population standard deviation over parts are returned (as in the original Inception-score code).
    Terms with ``p(y|x) = 0`` contribute 0 (``0 log 0 = 0``).

    Args:
        probs: ``float[N, K]``, non-negative rows summing to 1 within ``1e-3`` (float32 softmax output is fine;
            rows are renormalised in float64).
        num_splits: number of parts, ``1 <= num_splits <= N``.

    Returns:
        ``(mean, std)`` over parts as Python floats (``std`` is 0.0 for one part).

    Raises:
        MetricsError: not 2-D, empty, NaN/inf, negative entries, rows not summing to 1, bad ``num_splits``.

    Example:
        >>> inception_score(np.eye(4))
        (4.0, 0.0)
        >>> inception_score(np.full((3, 4), 0.25))
        (1.0, 0.0)
    """
    p = _float_array(probs, "probs", ndim=2)
    if np.any(p < 0.0):
        raise MetricsError(f"probs must be non-negative, got minimum {p.min()}")
    row_sums = p.sum(axis=1)
    worst = int(np.argmax(np.abs(row_sums - 1.0)))
    if abs(row_sums[worst] - 1.0) > 1e-3:
        raise MetricsError(f"probs rows must sum to 1 (within 1e-3), row {worst} sums to {row_sums[worst]}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or not 1 <= num_splits <= len(p):
        raise MetricsError(f"num_splits must be an int in [1, {len(p)}] (the number of samples), got {num_splits!r}")
    p = p / row_sums[:, None]
    scores = []
    for part in np.array_split(p, int(num_splits)):
        marginal = part.mean(axis=0)
        positive = part > 0.0  # where p(y|x) > 0, p(y) > 0 too
        log_ratio = np.log(np.where(positive, part, 1.0)) - np.log(np.where(positive, marginal, 1.0))
        kl = np.sum(np.where(positive, part * log_ratio, 0.0), axis=1)
        scores.append(math.exp(float(np.mean(kl))))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------------------------
# Membership inference.


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values``; tied values share the average of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts_group = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    group_starts = np.flatnonzero(starts_group)
    group_sizes = np.diff(np.append(group_starts, values.size))
    group_ranks = group_starts + (group_sizes + 1) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = group_ranks[np.cumsum(starts_group) - 1]
    return ranks


def membership_inference_auc(member_losses, nonmember_losses) -> float:
    r"""AUC of the loss-threshold membership-inference attack.

    The attacker guesses "member" when an example's loss is low. Members are the forget examples (trained on,
    then unlearned); non-members are held-out examples of the same distribution (of the forget classes, or the
    whole held-out split for a forget set of examples). The AUC is the probability that a
    random non-member has a higher loss than a random member, ties counting half:

    .. math:: \mathrm{AUC} = P(L_{\mathrm{non}} > L_{\mathrm{mem}}) + \tfrac12 P(L_{\mathrm{non}} = L_{\mathrm{mem}})
              = \frac{R_{\mathrm{non}} - m(m+1)/2}{n\,m}

    (Mann-Whitney U; ``R_non`` is the sum of the non-members' average ranks in the pooled losses, ``n`` members,
    ``m`` non-members). Reading: 0.5 = members and non-members indistinguishable by loss (the ideal after
    unlearning, what the oracle should show); towards 1 = forget examples still have lower loss, i.e. still
    memorised; below 0.5 = forget examples have *higher* loss than unseen ones (over-unlearning, itself a
    detectable signature).

    Args:
        member_losses: ``float[n]``, per-example losses of the forget examples, ``n >= 1``, finite.
        nonmember_losses: ``float[m]``, per-example losses of held-out examples, ``m >= 1``, finite.

    Returns:
        The AUC in ``[0, 1]`` as a Python float.

    Raises:
        MetricsError: not 1-D, empty, NaN/inf.

    Example:
        >>> membership_inference_auc([1.0, 2.0], [3.0, 4.0])  # every non-member loss is higher
        1.0
        >>> membership_inference_auc([1.0, 2.0], [2.0, 0.0])  # pairs: 2>1, 2=2 (half), 0<1, 0<2
        0.375
    """
    members = _float_array(member_losses, "member_losses", ndim=1)
    nonmembers = _float_array(nonmember_losses, "nonmember_losses", ndim=1)
    n, m = members.size, nonmembers.size
    ranks = _average_ranks(np.concatenate([members, nonmembers]))
    u_nonmember = float(np.sum(ranks[n:])) - m * (m + 1) / 2.0
    return u_nonmember / (n * m)


# --------------------------------------------------------------------------------------------------------------
# Reporting.


def time_to_unlearn(step_time_s: float, steps: float | None) -> float | None:
    r"""Time to unlearn: step time times the number of updates to the threshold (the protocol's definition).

    .. math:: T = t_{\mathrm{step}} \cdot t^\star

    Used per seed (``steps`` an int from :func:`stopping_step`) or on aggregates (mean step time times mean
    stopping step, as in the published table). ``steps = 0`` (already below the threshold) gives 0 s.

    Args:
        step_time_s: seconds per update, positive and finite (measured on the compiled step, synchronised).
        steps: updates applied until the threshold, ``>= 0``, or ``None`` when the threshold was not reached.

    Returns:
        Seconds as a Python float, or ``None`` when ``steps`` is ``None`` (not reached has no time to unlearn;
        the caller reports it as such rather than as the budget).

    Raises:
        MetricsError: non-positive or non-finite step time, negative or non-finite steps.

    Example:
        >>> time_to_unlearn(0.005, 3)
        0.015
        >>> time_to_unlearn(0.005, None) is None
        True
    """
    seconds = _real_scalar(step_time_s, "step_time_s")
    if seconds <= 0.0:
        raise MetricsError(f"step_time_s must be positive, got {seconds}")
    if steps is None:
        return None
    count = _real_scalar(steps, "steps")
    if count < 0.0:
        raise MetricsError(f"steps must be non-negative or None, got {count}")
    return seconds * count


def summarize(values: Iterable[float | int | None]) -> dict:
    """Summary over seeds of a per-seed value where ``None`` means "not reached".

    ``mean`` and ``std`` are taken over the seeds that reached (non-``None`` values) only, and ``num_reached``
    says how many those were: a mean over 3 of 10 seeds is optimistic (the censored seeds would have needed more
    than the budget), so a report must show ``num_reached`` beside it. ``std`` is the sample standard deviation
    (``ddof=1``), the spread of the seeds as draws from the run-to-run distribution; it is ``None`` with fewer
    than two reached seeds, ``mean`` is ``None`` with none. A seed's value may be infinite (the held-out loss of
    a run that diverged): the mean is then infinite too (``None`` if both signs occur) and the spread is ``None``.

    Args:
        values: per-seed real numbers or ``None``, at least one entry, not NaN.

    Returns:
        ``{"mean": float | None, "std": float | None, "per_seed": list, "num_reached": int, "num_seeds": int}``;
        ``per_seed`` keeps the input order, ``None`` entries, and ints as ints (plain Python types, JSON-ready).

    Raises:
        MetricsError: no values, a value that is neither a real number nor ``None``, NaN.

    Example:
        >>> summarize([2, None, 4])
        {'mean': 3.0, 'std': 1.4142135623730951, 'per_seed': [2, None, 4], 'num_reached': 2, 'num_seeds': 3}
    """
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise MetricsError(f"values must be a sequence of numbers or None, got {type(values).__name__}")
    per_seed = [
        None if value is None else _number(value, f"values[{index}]", allow_infinite=True)
        for index, value in enumerate(values)
    ]
    if not per_seed:
        raise MetricsError("values must hold at least one seed's value, got none")
    reached = np.array([value for value in per_seed if value is not None], dtype=np.float64)
    finite = bool(np.isfinite(reached).all())
    mean = float(reached.mean()) if reached.size else None
    return {
        "mean": None if mean is not None and math.isnan(mean) else mean,
        "std": float(reached.std(ddof=1)) if reached.size >= 2 and finite else None,
        "per_seed": per_seed,
        "num_reached": int(reached.size),
        "num_seeds": len(per_seed),
    }


# ------------------------------------------------------------------------------------------- example sets


def loss_gap(forget_losses, heldout_losses, *, forget_labels=None, heldout_labels=None) -> tuple[float, float]:
    r"""``(gap, se)``: how much lower the loss of the forget training examples is than that of held-out examples.

    Without labels: :math:`\bar l_f - \bar l_h` with Welch's standard error :math:`\sqrt{s_f^2/n_f + s_h^2/n_h}`.
    With labels (what :mod:`gsu_jax.unlearning.evaluation` passes), *class-matched*: each forget example is compared
    with the held-out mean of its own class, :math:`\mathrm{gap} = \frac1{n_f}\sum_i (l_i - \bar l_{h,c_i})`, with
    :math:`\mathrm{se}^2 = s_d^2/n_f + \sum_c w_c^2 s_{h,c}^2/n_{h,c}` (:math:`s_d` the sample deviation of the
    differences, :math:`w_c` the forget examples' share of class :math:`c`).

    Why a gap: a model that trained on an example fits it better than an unseen one of the same distribution (a
    negative gap); a model that never saw it (the oracle) shows only chance. Why class-matched: the loss differs far
    more between classes than between seen and unseen examples (on the protocol VAE a 1 has a -ELBO near 80, other
    digits near 170), so an unmatched gap on a few dozen examples is mostly the draw's class mix, and its standard
    error swamps the memorisation it should measure.

    Raises:
        MetricsError: fewer than two finite losses on either side; labels given for one side only or of the wrong
            length; a forget example whose class has fewer than two held-out examples.
    """
    forget = _float_array(forget_losses, "forget_losses", ndim=1)
    heldout = _float_array(heldout_losses, "heldout_losses", ndim=1)
    for name, values in (("forget_losses", forget), ("heldout_losses", heldout)):
        if values.size < 2:
            raise MetricsError(f"{name} needs at least 2 losses for a standard error, got {values.size}")
    if (forget_labels is None) != (heldout_labels is None):
        raise MetricsError("give forget_labels and heldout_labels together (class-matched gap) or neither")
    if forget_labels is None:
        se = math.sqrt(forget.var(ddof=1) / forget.size + heldout.var(ddof=1) / heldout.size)
        return float(forget.mean() - heldout.mean()), se
    forget_classes, heldout_classes = np.asarray(forget_labels).ravel(), np.asarray(heldout_labels).ravel()
    if forget_classes.size != forget.size or heldout_classes.size != heldout.size:
        raise MetricsError(
            f"labels must match the losses: {forget_classes.size} forget labels for {forget.size} losses, "
            f"{heldout_classes.size} held-out labels for {heldout.size} losses"
        )
    differences = np.empty_like(forget)
    variance = 0.0
    for label in np.unique(forget_classes):
        chosen, matched = forget_classes == label, heldout[heldout_classes == label]
        if matched.size < 2:
            raise MetricsError(
                f"class {label} has {matched.size} held-out examples; a class-matched gap needs at least 2 per "
                "forget class"
            )
        differences[chosen] = forget[chosen] - matched.mean()
        variance += (chosen.sum() / forget.size) ** 2 * matched.var(ddof=1) / matched.size
    variance += differences.var(ddof=1) / forget.size
    return float(differences.mean()), math.sqrt(variance)


class LossGapBand(NamedTuple):
    """The oracle's band for a forget set of examples: the run stops at the first gap ``>= low``
    (:func:`reached_stop`); ``high`` tells an overshoot in the report."""

    low: float
    high: float


def loss_gap_band(oracle_gap: float, oracle_se: float, *, num_std: float = 2.0) -> LossGapBand:
    """The oracle's loss gap +- ``num_std`` of its standard errors (the example-set analogue of
    :func:`auto_threshold`: the oracle scores the run, it is never an input to a method)."""
    gap, se = _real_scalar(oracle_gap, "oracle_gap"), _real_scalar(oracle_se, "oracle_se")
    if se < 0:
        raise MetricsError(f"oracle_se must be >= 0, got {se}")
    return LossGapBand(gap - num_std * se, gap + num_std * se)


def reached_stop(value: float, threshold: float | LossGapBand) -> bool:
    """Whether a monitored value meets the stop: a forget fraction strictly below a threshold, or a finite loss gap
    that has risen to a :class:`LossGapBand` (``gap >= low``).

    One-sided, like the fraction's threshold: unlearning raises the gap from the original's (negative: it fits its
    training examples better than unseen ones) toward the oracle's, and a step that overshoots the band has still
    forgotten -- too much, which the report shows (the gap at the stop above ``high``, an MIA AUC below 0.5) instead
    of hiding it as "never reached"."""
    if isinstance(threshold, LossGapBand):
        return bool(math.isfinite(value) and value >= threshold.low)
    return value < threshold
