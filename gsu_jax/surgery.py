r"""Gradient surgery as optax transforms: project updates off retained directions.

Two transforms, both :class:`optax.GradientTransformationExtraArgs` whose
``update`` takes the direction(s) to protect as the extra keyword argument
``direction``:

* :func:`project_normal_plane` removes from the update its component along one
  direction (a retain-set gradient): the update then lies in the normal plane of
  that direction.
* :func:`project_off_span` removes the component in the span of ``K``
  directions, or (``only_on_conflict=True``) the least that leaves no conflict
  with any of them.

Like every optax transform these act on gradient-like updates that the chain
ends up descending (``optax.sgd`` steps ``theta - eta p``). The guarantee both
give (Bae et al. 2023, "Gradient Surgery for One-shot Unlearning on Generative
Model"): if ``d = grad L_r(theta)`` and ``p`` is the output, then
``L_r(theta - eta p) = L_r(theta) - eta <d, p> + O(eta^2)`` with ``<d, p> = 0``
(or ``>= 0`` on the conflict-only variants), so a small step along ``p`` leaves
the retained loss unchanged to first order (or does not increase it). Place the
transform first in an ``optax.chain``, before any scaling or
adaptive preconditioning, since the guarantee is about the direction of the raw
update the chain receives; what the following transforms then do with it (Adam
rescales coordinates) is outside it.

Numerics: all inner products accumulate in float32 (float64 for float64 leaves)
whatever the leaves' dtype; the directions are normalised by their largest entry
before any product, so nothing overflows or underflows for finite inputs, a zero
direction leaves the update unchanged and no NaN is produced. Outputs keep the
dtype of each leaf of ``updates``. Mismatched ``direction`` trees raise at trace
time, naming the first mismatching leaf path (see
:func:`gsu_jax.trees.check_tree_match`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gsu_jax import trees

PyTree = Any

_HIGHEST = jax.lax.Precision.HIGHEST
_INT32_MAX = np.iinfo(np.int32).max


class ProjectNormalPlaneState(NamedTuple):
    """Diagnostics kept by :func:`project_normal_plane`.

    Attributes:
      count: ``i32[]``, the number of ``update`` calls so far.
      conflicts: ``i32[]``, how many updates so far had a negative inner product
        with their direction (each example counts once with
        ``per_example=True``); with ``only_on_conflict=True`` exactly these had
        their component removed.
      last_cosine: ``f32[]``, the cosine between the incoming update (with
        ``per_example=True`` the mean of the examples' updates) and the direction
        at the latest call; 0 when either is zero.
    """

    count: jax.Array
    conflicts: jax.Array
    last_cosine: jax.Array


class ProjectOffSpanState(NamedTuple):
    """Diagnostics kept by :func:`project_off_span`.

    Attributes:
      count: ``i32[]``, the number of ``update`` calls so far.
      conflicts: ``i32[]``, how many (update, direction) pairs so far had a
        negative inner product.
      last_min_cosine: ``f32[]``, the smallest cosine between the incoming update
        and any of the ``K`` directions at the latest call (0 for a zero update or
        a zero direction).
    """

    count: jax.Array
    conflicts: jax.Array
    last_min_cosine: jax.Array


def check_flag(name: str, value: Any) -> None:
    """Raises TypeError unless ``value`` is a bool (flags select code paths)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}.")


def check_nonnegative(name: str, value: Any) -> None:
    """Checks a hyperparameter when it is concrete; traced values pass through.

    Traced values arrive through ``optax.inject_hyperparams``, which calls the
    factory inside the jitted update.
    """
    if isinstance(value, jax.core.Tracer):
        return
    try:
        number = float(np.asarray(value))
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real scalar, got {value!r}.") from None
    if not (np.isfinite(number) and number >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}.")


def _saturating_add(counter: jax.Array, increment: jax.Array) -> jax.Array:
    increment = increment.astype(jnp.int32)
    return jnp.where(counter > _INT32_MAX - increment, _INT32_MAX, counter + increment)


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """``numerator / denominator`` where the denominator is positive, else 0."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1), 0)


def normalise_direction(direction: PyTree, eps: jax.typing.ArrayLike, dtype: Any) -> tuple[PyTree, jax.Array]:
    """Scales ``direction`` by ``1 / max|direction|`` and ``eps`` to match.

    ``<u, d> / (<d, d> + eps) * d`` equals ``<u, h> / (<h, h> + eps / s^2) * h``
    for ``h = d / s``, ``s = max|d|``; computing the right-hand side keeps
    ``<h, h>`` in ``[1, size]`` so it can neither overflow nor underflow.

    Args:
      direction: the direction tree.
      eps: the non-negative damping of :func:`project_normal_plane`.
      dtype: the accumulation dtype.

    Returns:
      ``(h, eps / s^2)``: ``h`` in ``dtype`` (all zeros for a zero or subnormal
      direction) and the damping rescaled to it (inf, i.e. "no projection", if it
      overflows).
    """
    inverse_scale = trees.safe_reciprocal(trees.tree_max_abs(direction).astype(dtype))
    unit = jax.tree.map(lambda d: jnp.asarray(d, dtype) * inverse_scale, direction)
    eps = jnp.asarray(eps, dtype)
    scaled_eps = jnp.where(eps > 0, eps * jnp.square(inverse_scale), 0)
    return unit, scaled_eps


def removal_coefficients(
    inner: jax.Array,
    squared_norm: jax.Array,
    scaled_eps: jax.Array,
    only_on_conflict: bool,
) -> jax.Array:
    """``<u, h> / (<h, h> + eps')``, zeroed where nothing is to be removed.

    Args:
      inner: ``<u, h>`` for one update or ``f32[B]`` for B of them.
      squared_norm: ``<h, h>``.
      scaled_eps: the damping rescaled by :func:`normalise_direction`.
      only_on_conflict: keep the coefficient only where ``inner < 0``.

    Returns:
      the coefficients ``c`` with output ``u - c h``; 0 for a zero direction.
    """
    coefficients = _safe_divide(inner, squared_norm + scaled_eps)
    if only_on_conflict:
        coefficients = jnp.where(inner < 0, coefficients, 0)
    return coefficients


def project_normal_plane(
    *,
    only_on_conflict: bool = False,
    per_example: bool = False,
    eps: jax.typing.ArrayLike = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Projects updates onto the normal plane of a direction.

    With ``u = updates`` and ``d = direction`` (pytrees of one structure, inner
    products over all leaves together):

    .. math::

      P_d(u) = u - \frac{\langle u, d\rangle}{\langle d, d\rangle + \epsilon}\, d

    so ``<P_d(u), d> = 0`` (for ``eps = 0``). With ``only_on_conflict=True`` the
    component is removed only when ``<u, d> < 0`` and ``u`` is returned unchanged
    otherwise (PCGrad, Yu et al. 2020). With ``per_example=True`` every leaf of
    ``u`` carries a leading axis of ``B`` examples, each example's update is
    projected on its own, and the mean is returned:
    ``(1/B) sum_i P_d(u_i)``, a tree shaped like ``direction``.

    First-order guarantee: for ``d = grad L(theta)``, a step ``theta -/+ eta p``
    along the output ``p`` changes ``L`` by ``-/+ eta <d, p> + O(eta^2)``, and
    ``<d, p> = 0`` (``>= 0`` with ``only_on_conflict``, so a descent step does
    not increase ``L`` to first order; for ``per_example`` the mean of
    per-example projections is orthogonal too). Gradient-surgery unlearning
    passes the forget-set ascent direction ``-grad L_f`` as ``updates`` and the
    retain-set gradient as ``direction``: the retained loss is unchanged to first
    order.

    Numerics: inner products accumulate in float32 (float64 for float64 leaves);
    they are taken with ``d / max|d|`` so they cannot overflow or underflow. A
    zero direction returns ``u`` unchanged. The output has the dtype of each leaf
    of ``updates``. With ``eps = 0`` the result is invariant to positive
    rescaling of ``d`` (to any non-zero rescaling without ``only_on_conflict``).

    Args:
      only_on_conflict: remove the component only when ``<u, d> < 0``.
      per_example: ``updates`` leaves have a leading example axis; return the mean
        of the per-example projections. (Without materialised per-example
        gradients, :func:`gsu_jax.per_example_projected_mean` computes the same.)
      eps: non-negative damping added to ``<d, d>`` (absolute, in the units of
        ``d`` squared). The default 0 gives the exact projection; stability for
        zero or tiny directions does not depend on it. May be injected with
        ``optax.inject_hyperparams``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; its ``update(updates,
      state, params=None, *, direction, **extra_args)`` returns
      ``(projected, state)`` with a :class:`ProjectNormalPlaneState`.

    Raises:
      TypeError: (at construction) a flag is not a bool or ``eps`` is not a real
        scalar; (at trace time) a leaf of ``updates`` or ``direction`` is not a
        floating-point array.
      ValueError: (at construction) ``eps`` is negative or not finite; (at trace
        time) ``direction`` does not match ``updates`` in structure or leaf shapes
        (with ``per_example``: ``updates`` leaves are not ``[B, *direction
        shape]`` with one common ``B >= 1``); the message names the first
        mismatching leaf path.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import gsu_jax
      >>> params = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
      >>> optimizer = optax.chain(gsu_jax.project_normal_plane(), optax.sgd(0.1))
      >>> opt_state = optimizer.init(params)
      >>> forget_grad = {"w": jnp.array([1.0, 2.0, 3.0]), "b": jnp.array(1.0)}
      >>> retain_grad = {"w": jnp.array([1.0, 1.0, 0.0]), "b": jnp.array(0.0)}
      >>> ascent = jax.tree.map(jnp.negative, forget_grad)
      >>> updates, opt_state = jax.jit(optimizer.update)(
      ...     ascent, opt_state, params, direction=retain_grad)
      >>> [round(x, 4) for x in updates["w"].tolist()], round(float(updates["b"]), 4)
      ([-0.05, 0.05, 0.3], 0.1)
      >>> float(gsu_jax.trees.tree_vdot(updates, retain_grad))
      0.0
    """
    check_flag("only_on_conflict", only_on_conflict)
    check_flag("per_example", per_example)
    check_nonnegative("eps", eps)

    def init_fn(params):
        del params
        return ProjectNormalPlaneState(
            count=jnp.zeros([], jnp.int32),
            conflicts=jnp.zeros([], jnp.int32),
            last_cosine=jnp.zeros([], jnp.float32),
        )

    def update_fn(updates, state, params=None, *, direction, **extra_args):
        del params, extra_args
        if per_example:
            trees.check_tree_match(
                updates, direction, tree_name="updates", reference_name="direction", leading_axis=True
            )
        else:
            trees.check_tree_match(direction, updates, tree_name="direction", reference_name="updates")
        dtype = trees.accumulation_dtype(*(jnp.result_type(x) for x in jax.tree.leaves((updates, direction))))
        unit, scaled_eps = normalise_direction(direction, eps, dtype)
        squared_norm = trees.tree_squared_norm(unit)

        if per_example:
            inner = trees.stacked_vdot(updates, unit)
            # The mean over examples as a contraction with uniform weights: XLA:CPU
            # reduces over a leading (major) axis of a large [B, ...] array ~40x
            # slower than it runs this dot (measured: 315 ms vs 4-8 ms at B=64 on the
            # 784-400 VAE).
            num_examples = jax.tree.leaves(updates)[0].shape[0]
            uniform = jnp.full((num_examples,), 1.0 / num_examples, dtype)
            mean_update = jax.tree.map(
                lambda u: jnp.tensordot(uniform, jnp.asarray(u, dtype), axes=1, precision=_HIGHEST), updates
            )
        else:
            inner = trees.tree_vdot(updates, unit)
            mean_update = updates
        coefficients = removal_coefficients(inner, squared_norm, scaled_eps, only_on_conflict)
        mean_coefficient = jnp.mean(coefficients)

        def project(mean_u, h, u):
            return (jnp.asarray(mean_u, dtype) - mean_coefficient * h).astype(jnp.result_type(u))

        projected = jax.tree.map(project, mean_update, unit, updates)

        cosine = _safe_divide(jnp.mean(inner), trees.tree_norm(mean_update).astype(dtype) * jnp.sqrt(squared_norm))
        new_state = ProjectNormalPlaneState(
            count=optax.safe_increment(state.count),
            conflicts=_saturating_add(state.conflicts, jnp.sum(inner < 0)),
            last_cosine=cosine.astype(jnp.float32),
        )
        return projected, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _regularised_solve(gram: jax.Array, rhs: jax.Array, ridge: jax.Array) -> jax.Array:
    """``(gram + ridge I)^{-1} rhs`` for a symmetric PSD ``gram`` via ``eigh``.

    Eigenvalues that rounding pushed below zero are clamped to zero, so with
    ``ridge > 0`` every factor ``1 / (lambda + ridge)`` is finite and at most
    ``1 / ridge``.
    """
    eigenvalues, eigenvectors = jnp.linalg.eigh(gram)
    eigenvalues = jnp.maximum(eigenvalues, 0)
    coordinates = jnp.matmul(eigenvectors.T, rhs, precision=_HIGHEST)
    return jnp.matmul(eigenvectors, coordinates / (eigenvalues + ridge), precision=_HIGHEST)


def _nonnegative_dual(
    gram: jax.Array,
    conflict: jax.Array,
    ridge: jax.Array,
    tolerance: jax.Array,
) -> jax.Array:
    r"""Solves ``min_{lam >= 0} 1/2 lam^T (G + ridge I) lam - lam^T conflict``.

    Lawson-Hanson active-set iterations on the ``K x K`` problem: start from
    ``lam = 0``; while some direction outside the active set has remaining
    conflict ``(conflict - (G + ridge I) lam)_j > tolerance``, add the largest,
    solve the equality-constrained problem on the active set, and if a
    coefficient turns non-positive step back to the boundary and drop it. At
    termination the KKT conditions hold up to ``tolerance``; at most ``4K + 2``
    iterations run (a safety cap: Lawson-Hanson terminates in finitely many, in
    practice about ``K``), and every iterate has ``lam >= 0``.

    Args:
      gram: ``f32[K, K]`` Gram matrix of unit directions (zero rows for zero
        directions, which never enter).
      conflict: ``f32[K]``, ``-<u, h_k>``.
      ridge: the ridge added to the diagonal.
      tolerance: conflicts at most this large are left.

    Returns:
      ``f32[K]`` multipliers ``lam >= 0``.
    """
    size = conflict.shape[0]
    indices = jnp.arange(size)
    usable = jnp.diagonal(gram) > 0
    regularised = gram + ridge * jnp.eye(size, dtype=gram.dtype)

    def solve_on(active):
        pairs = active[:, None] & active[None, :]
        solution = _regularised_solve(jnp.where(pairs, gram, 0), jnp.where(active, conflict, 0), ridge)
        return jnp.where(active, solution, 0)

    def keep_going(carry):
        iteration, _, _, _, done = carry
        return ~done & (iteration < 4 * size + 2)

    def step(carry):
        iteration, lam, active, adding, _ = carry
        remaining = conflict - jnp.matmul(regularised, lam, precision=_HIGHEST)
        candidates = jnp.where(usable & ~active, remaining, -jnp.inf)
        entering = jnp.argmax(candidates)
        enters = adding & (candidates[entering] > tolerance)
        trial_active = active | (enters & (indices == entering))
        trial = solve_on(trial_active)
        feasible = jnp.all(jnp.where(trial_active, trial > 0, True))
        # In exact arithmetic an entering index has a positive coefficient; if
        # rounding says otherwise no further progress is possible.
        stalled = enters & (trial[entering] <= 0)
        finished = (adding & ~enters) | stalled

        # Infeasible: move from lam towards the trial point until the first
        # coefficient reaches zero, and drop every coefficient that did.
        shrinking = trial_active & (trial <= 0)
        gap = lam - trial
        ratios = jnp.where(shrinking & (gap > 0), lam / jnp.where(gap > 0, gap, 1), jnp.inf)
        fraction = jnp.clip(jnp.min(ratios), 0, 1)
        stepped = lam + fraction * (trial - lam)
        stepped_active = trial_active & (stepped > 0) & ~(shrinking & (ratios <= fraction))
        stepped = jnp.where(stepped_active, stepped, 0)

        new_lam = jnp.where(finished, lam, jnp.where(feasible, trial, stepped))
        new_active = jnp.where(finished, active, jnp.where(feasible, trial_active, stepped_active))
        return iteration + 1, new_lam, new_active, feasible, finished

    initial = (
        jnp.zeros([], jnp.int32),
        jnp.zeros_like(conflict),
        jnp.zeros(size, bool),
        jnp.ones([], bool),
        jnp.zeros([], bool),
    )
    _, lam, _, _, _ = jax.lax.while_loop(keep_going, step, initial)
    return lam


def project_off_span(
    *,
    only_on_conflict: bool = False,
    ridge: jax.typing.ArrayLike = 1e-6,
) -> optax.GradientTransformationExtraArgs:
    r"""Projects updates off the span of ``K`` directions.

    ``direction`` is a tree whose leaves carry a leading axis of ``K``
    directions ``d_1..d_K`` (each shaped like ``updates``). Inner products run
    over whole trees. Internally every direction is scaled to unit norm
    (``h_k = d_k / ||d_k||``; zero directions stay zero and are ignored), which
    changes neither their span nor the cone they generate, so the result is
    invariant to positive rescaling of each direction.

    **Least squares** (``only_on_conflict=False``): with ``H`` the ``K x n``
    matrix of unit directions and ``G = H H^T`` their Gram matrix,

    .. math::

      P(u) = u - H^T (G + \rho I)^{-1} H u,
      \qquad \rho = (\text{ridge} + K \epsilon_{32}) \operatorname{tr}(G)/K

    i.e. ``u`` minus its (ridge-regularised) least-squares component in the span.
    The relative ridge keeps duplicated, dependent or zero directions finite
    (``eps_32`` is the float32 machine epsilon, a floor that keeps rounding in
    ``G`` harmless even for ``ridge = 0``). ``G`` is solved with ``eigh`` in
    float32 (float64 for float64 leaves). Then ``<P(u), h_k> = rho * alpha_k``,
    zero up to the ridge.

    **Only on conflict** (``only_on_conflict=True``): the output is the vector
    closest to ``u`` that conflicts with no direction,

    .. math::

      P(u) = \operatorname{argmin}_x \|x - u\|^2
      \quad\text{s.t.}\quad \langle x, d_k\rangle \ge 0 \ \ \forall k,

    the projection of ``u`` onto the dual cone of the directions (the GEM /
    A-GEM rule of continual learning, Lopez-Paz & Ranzato 2017). Why this rule:
    it is the smallest change to ``u`` after which no retained direction's loss
    increases to first order; it leaves ``u`` unchanged when nothing conflicts;
    it only ever removes conflicting parts; and for ``K = 1`` it is exactly
    PCGrad (:func:`project_normal_plane` with ``only_on_conflict=True``).
    Unlike PCGrad's sequential projections for ``K > 1`` it does not depend on
    the order of the directions. It is solved in the ``K``-dimensional dual
    ``min_{lam >= 0} 1/2 lam^T (G + rho I) lam + lam^T H u`` and ``P(u) = u + H^T
    lam``, by Lawson-Hanson active-set iterations (exact at termination, capped at
    ``4K + 2`` iterations inside ``jax.lax.while_loop``). Tolerance: conflicts
    with ``<x, h_k> >= -4 K eps_32 ||u||`` are accepted (``eps_32`` the float32
    machine epsilon); the ridge leaves a further ``rho * lam_k``, so the output
    satisfies ``<P(u), h_k> >= -(4 K eps_32 ||u|| + rho lam_k)`` for every ``k``.

    First-order guarantee: if ``d_k = grad L_k(theta)`` then a descent step
    ``theta - eta p`` changes each ``L_k`` by ``-eta <d_k, p> + O(eta^2)``, with
    ``<d_k, p> = 0`` (least squares: unchanged to first order) or ``>= 0``
    (conflict only: none increases to first order), up to the ridge.

    Args:
      only_on_conflict: use the dual-cone rule above instead of least squares.
      ridge: non-negative relative ridge ``rho / (tr(G)/K) - K eps_32`` added to
        the Gram matrix of the unit directions. May be injected with
        ``optax.inject_hyperparams``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; its ``update(updates,
      state, params=None, *, direction, **extra_args)`` returns
      ``(projected, state)`` with a :class:`ProjectOffSpanState`; ``projected``
      has the structure and leaf dtypes of ``updates``.

    Raises:
      TypeError: (at construction) ``only_on_conflict`` is not a bool or
        ``ridge`` not a real scalar; (at trace time) a leaf is not floating-point.
      ValueError: (at construction) ``ridge`` negative or not finite; (at trace
        time) ``direction`` leaves are not ``[K, *updates shape]`` with one common
        ``K >= 1``, or the structures differ; the message names the first
        mismatching leaf path.

    Example:
      >>> import jax.numpy as jnp
      >>> import gsu_jax
      >>> transform = gsu_jax.project_off_span()
      >>> updates = {"w": jnp.array([1.0, 2.0, 3.0])}
      >>> directions = {"w": jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])}
      >>> out, _ = transform.update(updates, transform.init(updates),
      ...                           direction=directions)
      >>> [round(x, 5) for x in out["w"].tolist()]
      [0.0, 0.0, 3.0]
      >>> cone = gsu_jax.project_off_span(only_on_conflict=True)
      >>> out, _ = cone.update({"w": jnp.array([-1.0, 2.0, 3.0])}, cone.init(updates),
      ...                      direction=directions)
      >>> bool(jnp.allclose(out["w"], jnp.array([0.0, 2.0, 3.0]), atol=1e-5))
      True
    """
    check_flag("only_on_conflict", only_on_conflict)
    check_nonnegative("ridge", ridge)

    def init_fn(params):
        del params
        return ProjectOffSpanState(
            count=jnp.zeros([], jnp.int32),
            conflicts=jnp.zeros([], jnp.int32),
            last_min_cosine=jnp.zeros([], jnp.float32),
        )

    def update_fn(updates, state, params=None, *, direction, **extra_args):
        del params, extra_args
        size = trees.check_tree_match(
            direction, updates, tree_name="direction", reference_name="updates", leading_axis=True
        )
        dtype = trees.accumulation_dtype(*(jnp.result_type(x) for x in jax.tree.leaves((updates, direction))))
        # Scale each direction by its largest entry, then by its norm: unit
        # directions without ever squaring an unscaled entry.
        inverse_max = trees.safe_reciprocal(trees.stacked_max_abs(direction).astype(dtype))
        scaled_gram = trees.stacked_gram(direction, inverse_max)
        inverse_norm = trees.safe_reciprocal(jnp.sqrt(jnp.diagonal(scaled_gram)))
        gram = scaled_gram * inverse_norm[:, None] * inverse_norm[None, :]
        row_scale = inverse_max * inverse_norm
        unit = jax.tree.map(
            lambda d: jnp.asarray(d, dtype) * row_scale.reshape((size,) + (1,) * (jnp.ndim(d) - 1)), direction
        )
        inner = trees.stacked_vdot(unit, updates)

        machine_eps = jnp.finfo(dtype).eps
        mean_diagonal = jnp.trace(gram) / size
        rho = (jnp.asarray(ridge, dtype) + size * machine_eps) * mean_diagonal + jnp.finfo(dtype).tiny
        update_norm = trees.tree_norm(updates).astype(dtype)
        if only_on_conflict:
            tolerance = 4 * size * machine_eps * update_norm
            weights = _nonnegative_dual(gram, -inner, rho, tolerance)
        else:
            weights = -_regularised_solve(gram, inner, rho)
        correction = trees.stacked_combination(weights, unit)
        projected = jax.tree.map(
            lambda u, c: (jnp.asarray(u, dtype) + c).astype(jnp.result_type(u)), updates, correction
        )

        cosines = _safe_divide(inner, update_norm)
        new_state = ProjectOffSpanState(
            count=optax.safe_increment(state.count),
            conflicts=_saturating_add(state.conflicts, jnp.sum(inner < 0)),
            last_min_cosine=jnp.min(cosines).astype(jnp.float32),
        )
        return projected, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
