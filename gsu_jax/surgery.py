r"""Gradient surgery as optax transforms: project updates off retained directions.

Two transforms, both :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes the direction(s) to
protect as the extra keyword argument ``direction``; each wraps a pure function of :mod:`gsu_jax.projections` and
adds diagnostics in its state:

* :func:`project_normal_plane` (:func:`~gsu_jax.projections.normal_plane_projection`) removes from the update its
  component along one direction (a retain-set gradient): the update then lies in the normal plane of that
  direction.
* :func:`project_off_span` (:func:`~gsu_jax.projections.off_span_projection`) removes the component in the span of
  ``K`` directions, or (``only_on_conflict=True``) the least that leaves no conflict with any of them.

Like every optax transform these map updates shaped like the parameters to updates of the same shapes, so they
compose with ``optax.chain``, ``optax.MultiSteps``, ``optax.apply_if_finite``, ``optax.inject_hyperparams`` and
``optax.masked``. Per-example updates (a leading batch axis) are not parameter-shaped: average their projections
with :func:`gsu_jax.projections.mean_normal_plane_projection`, or, from a per-example loss without materialising
them, :func:`gsu_jax.per_example.per_example_projected_mean`, and hand the result to the optimizer.

The updates are gradient-like: the chain ends up descending them (``optax.sgd`` steps ``theta - eta p``). The
guarantee (Bae, Kim, Jung & Lim, "Gradient Surgery for One-shot Unlearning on Generative Model", 2023,
arXiv:2307.04550): if ``d = grad L_r(theta)`` and ``p`` is the output, then ``L_r(theta - eta p) = L_r(theta) -
eta <d, p> + O(eta^2)`` with ``<d, p> = 0`` (or ``>= 0`` on the conflict-only variants), so a small step along
``p`` leaves the retained loss unchanged to first order (or does not increase it). Place the transform first in an
``optax.chain``, before any scaling or adaptive preconditioning, since the guarantee is about the direction of the
raw update the chain receives; what the following transforms then do with it (Adam rescales coordinates) is
outside it.

Under ``optax.masked`` build the wrapper with ``mask_compatible_extra_args=True``: ``masked`` hands the inner
transform masked updates, and only with that flag does it mask ``direction`` (a tree like the parameters, or
stacked like them) the same way; the projection then acts on the selected leaves alone, inner products included.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gsu_jax import projections, trees

PyTree = Any

_INT32_MAX = np.iinfo(np.int32).max


class ProjectNormalPlaneState(NamedTuple):
    """Diagnostics kept by :func:`project_normal_plane`.

    Attributes:
      count: ``i32[]``, the number of ``update`` calls so far.
      conflicts: ``i32[]``, how many updates so far had a negative inner product
        with their direction; with ``only_on_conflict=True`` exactly these had
        their component removed.
      last_cosine: ``f32[]``, the cosine between the incoming update and the
        direction at the latest call; 0 when either is zero.
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


def _saturating_add(counter: jax.Array, increment: jax.Array) -> jax.Array:
    increment = increment.astype(jnp.int32)
    return jnp.where(counter > _INT32_MAX - increment, _INT32_MAX, counter + increment)


def _is_masked_node(node: Any) -> bool:
    return isinstance(node, optax.MaskedNode)


def _check_masked_alike(updates: PyTree, direction: PyTree) -> None:
    """Refuses, with the fix, a direction left unmasked by ``optax.masked(..., mask_compatible_extra_args=False)``."""
    masked_updates = any(_is_masked_node(node) for node in jax.tree.leaves(updates, is_leaf=_is_masked_node))
    masked_direction = any(_is_masked_node(node) for node in jax.tree.leaves(direction, is_leaf=_is_masked_node))
    if masked_updates and not masked_direction:
        raise ValueError(
            "the updates are masked by optax.masked but the direction is not; allowed: "
            "optax.masked(transform, mask, mask_compatible_extra_args=True), which masks direction like the updates."
        )


def project_normal_plane(
    *,
    only_on_conflict: bool = False,
    eps: jax.typing.ArrayLike = 0.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Projects updates onto the normal plane of a direction.

    With ``u = updates`` and ``d = direction`` (pytrees of one structure, inner
    products over all leaves together), the update becomes
    :func:`~gsu_jax.projections.normal_plane_projection`:

    .. math::

      P_d(u) = u - \frac{\langle u, d\rangle}{\langle d, d\rangle + \epsilon}\, d

    so ``<P_d(u), d> = 0`` (for ``eps = 0``). With ``only_on_conflict=True`` the
    component is removed only when ``<u, d> < 0`` and ``u`` is returned unchanged
    otherwise (PCGrad: Yu et al., "Gradient Surgery for Multi-Task Learning",
    2020, arXiv:2001.06782). The output has the shapes and dtypes of ``u``.

    First-order guarantee: for ``d = grad L(theta)``, a step ``theta -/+ eta p``
    along the output ``p`` changes ``L`` by ``-/+ eta <d, p> + O(eta^2)``, and
    ``<d, p> = 0`` (``>= 0`` with ``only_on_conflict``, so a descent step does
    not increase ``L`` to first order). Gradient-surgery unlearning (Bae et al.,
    2023, arXiv:2307.04550) passes the forget-set ascent direction ``-grad L_f``
    as ``updates`` and the retain-set gradient as ``direction``: the retained
    loss is unchanged to first order.

    Numerics: inner products accumulate in float32 (float64 for float64 leaves);
    taken raw where that is safe and with ``d / max|d|`` where the raw ones would
    overflow or underflow, so neither happens. A
    zero direction returns ``u`` unchanged. With ``eps = 0`` the result is
    invariant to positive rescaling of ``d`` (to any non-zero rescaling without
    ``only_on_conflict``).

    Composes with the optax wrappers: ``optax.MultiSteps`` projects the
    accumulated update with the direction of the step that emits it,
    ``optax.apply_if_finite`` skips the projection with the update (around a
    ``MultiSteps``, which optax does not type as an extra-args transform, hand
    it ``optax.GradientTransformationExtraArgs(multi.init, multi.update)`` or it
    drops ``direction``), and ``optax.masked`` needs
    ``mask_compatible_extra_args=True`` so that ``direction`` is masked like the
    updates::

      optax.masked(project_normal_plane(), mask, mask_compatible_extra_args=True)

    projects the selected leaves off the selected leaves of the direction and
    passes the others through. For per-example updates see
    :func:`~gsu_jax.projections.mean_normal_plane_projection`.

    Args:
      only_on_conflict: remove the component only when ``<u, d> < 0``.
      eps: non-negative damping added to ``<d, d>`` (absolute, in the units of
        ``d`` squared). The default 0 gives the exact projection; stability for
        zero or tiny directions does not depend on it. May be injected with
        ``optax.inject_hyperparams``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; its ``update(updates,
      state, params=None, *, direction, **extra_args)`` returns
      ``(projected, state)`` with a :class:`ProjectNormalPlaneState`.

    Raises:
      TypeError: (at construction) ``only_on_conflict`` is not a bool or ``eps``
        is not a real scalar; (at trace time) a leaf of ``updates`` or
        ``direction`` is not a floating-point array.
      ValueError: (at construction) ``eps`` is negative or not finite; (at trace
        time) ``direction`` does not match ``updates`` in structure or leaf shapes
        (the message names the first mismatching leaf path), or ``optax.masked``
        masked the updates but not the direction.

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
    projections.check_flag("only_on_conflict", only_on_conflict)
    projections.check_nonnegative("eps", eps)

    def init_fn(params):
        del params
        return ProjectNormalPlaneState(
            count=jnp.zeros([], jnp.int32),
            conflicts=jnp.zeros([], jnp.int32),
            last_cosine=jnp.zeros([], jnp.float32),
        )

    def update_fn(updates, state, params=None, *, direction, **extra_args):
        del params, extra_args
        _check_masked_alike(updates, direction)
        projected, inner, squared_norm, _ = projections.normal_plane_parts(
            updates, direction, only_on_conflict=only_on_conflict, eps=eps
        )
        update_norm = trees.tree_norm(updates).astype(inner.dtype)
        # inner / sqrt(squared_norm) is at most ||u||: no product of two norms to overflow (raw d can be large).
        cosine = projections.safe_divide(projections.safe_divide(inner, jnp.sqrt(squared_norm)), update_norm)
        new_state = ProjectNormalPlaneState(
            count=optax.safe_increment(state.count),
            conflicts=_saturating_add(state.conflicts, inner < 0),
            last_cosine=cosine.astype(jnp.float32),
        )
        return projected, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def project_off_span(
    *,
    only_on_conflict: bool = False,
    ridge: jax.typing.ArrayLike = 1e-6,
) -> optax.GradientTransformationExtraArgs:
    r"""Projects updates off the span of ``K`` directions, or onto their dual cone.

    ``direction`` is a tree whose leaves carry a leading axis of ``K``
    directions ``d_1..d_K`` (each shaped like ``updates``); the update becomes
    :func:`~gsu_jax.projections.off_span_projection` (see it for the maths and
    the tolerances):

    * ``only_on_conflict=False``: ``u`` minus its ridge-regularised
      least-squares component in ``span{d_1..d_K}``, so ``<P(u), d_k> = 0`` up
      to the ridge;
    * ``only_on_conflict=True``: the vector closest to ``u`` with ``<P(u),
      d_k> >= 0`` for every ``k`` (the projection onto the dual cone, the rule of
      Gradient Episodic Memory, Lopez-Paz & Ranzato, 2017, arXiv:1706.08840);
      for ``K = 1`` it is :func:`project_normal_plane` with
      ``only_on_conflict=True``, and it does not depend on the order of the
      directions.

    The result is invariant to positive rescaling of each direction. First-order
    guarantee: if ``d_k = grad L_k(theta)`` then a descent step ``theta - eta p``
    changes each ``L_k`` by ``-eta <d_k, p> + O(eta^2)``, with ``<d_k, p> = 0``
    (least squares) or ``>= 0`` (conflict only), up to the ridge.

    Composes with the optax wrappers like :func:`project_normal_plane`; under
    ``optax.masked`` pass ``mask_compatible_extra_args=True`` (the stacked
    directions share the parameters' tree structure, so they are masked like the
    updates).

    Args:
      only_on_conflict: use the dual-cone rule instead of least squares.
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
        ``K >= 1``, or the structures differ (the message names the first
        mismatching leaf path), or ``optax.masked`` masked the updates but not
        the direction.

    Example:
      >>> import jax.numpy as jnp
      >>> import gsu_jax
      >>> transform = gsu_jax.project_off_span()
      >>> updates = {"w": jnp.array([1.0, 2.0, 3.0])}
      >>> directions = {"w": jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])}
      >>> out, state = transform.update(updates, transform.init(updates),
      ...                               direction=directions)
      >>> [round(x, 5) for x in out["w"].tolist()], int(state.count)
      ([0.0, 0.0, 3.0], 1)
    """
    projections.check_flag("only_on_conflict", only_on_conflict)
    projections.check_nonnegative("ridge", ridge)

    def init_fn(params):
        del params
        return ProjectOffSpanState(
            count=jnp.zeros([], jnp.int32),
            conflicts=jnp.zeros([], jnp.int32),
            last_min_cosine=jnp.zeros([], jnp.float32),
        )

    def update_fn(updates, state, params=None, *, direction, **extra_args):
        del params, extra_args
        _check_masked_alike(updates, direction)
        projected, inner, update_norm = projections.off_span_parts(
            updates, direction, only_on_conflict=only_on_conflict, ridge=ridge
        )
        cosines = projections.safe_divide(inner, update_norm)
        new_state = ProjectOffSpanState(
            count=optax.safe_increment(state.count),
            conflicts=_saturating_add(state.conflicts, jnp.sum(inner < 0)),
            last_min_cosine=jnp.min(cosines).astype(jnp.float32),
        )
        return projected, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
