"""Small pytree helpers for the gradient-surgery transforms.

Every inner product here accumulates in at least float32: a leaf of dtype ``d``
is upcast to ``jnp.promote_types(d, float32)`` (bfloat16 and float16 leaves to
float32, float64 leaves stay float64) before it is multiplied and summed, and the
sum over leaves happens in that dtype too. Gradients of a bfloat16 model summed
in bfloat16 lose about three significant digits over a few thousand entries; the
projections built on these helpers need the inner products to float32 accuracy.

Trees with an extra leading axis ("stacked" trees) hold several trees of one
structure at once: per-example updates ``[B, ...]`` or ``K`` span directions
``[K, ...]``. :func:`check_tree_match` validates both kinds against a reference
tree and names the first mismatching leaf path.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

# Contractions over the parameter axis must not run in TF32 (the default for
# float32 matmuls on recent NVIDIA GPUs): it would cost three digits of the
# orthogonality the projections promise.
_HIGHEST = jax.lax.Precision.HIGHEST


def accumulation_dtype(*dtypes: Any) -> jnp.dtype:
    """The dtype inner products of leaves with these dtypes accumulate in.

    Args:
      *dtypes: dtypes (or anything ``jnp.promote_types`` accepts).

    Returns:
      ``float32`` for bfloat16/float16/float32 inputs, ``float64`` when any input
      is float64.
    """
    result = jnp.dtype(jnp.float32)
    for dtype in dtypes:
        result = jnp.promote_types(result, dtype)
    return result


def _tree_accumulation_dtype(*trees: PyTree) -> jnp.dtype:
    return accumulation_dtype(*(jnp.result_type(x) for t in trees for x in jax.tree.leaves(t)))


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Inner product ``<a, b>`` over all leaves of two trees of one structure.

    Args:
      a: a pytree of floating-point arrays.
      b: a pytree with the structure and leaf shapes of ``a``.

    Returns:
      ``f32[]`` (``f64[]`` if a leaf is float64): ``sum_leaves sum(a * b)``,
      accumulated in that dtype whatever the leaves' dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> from gsu_jax.trees import tree_vdot
      >>> a = {"w": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.arange(3.0)}
      >>> float(tree_vdot(a, a))
      11.0
    """
    dtype = _tree_accumulation_dtype(a, b)
    products = jax.tree.map(lambda x, y: jnp.sum(jnp.asarray(x, dtype) * jnp.asarray(y, dtype)), a, b)
    return sum(jax.tree.leaves(products), jnp.zeros([], dtype))


def tree_squared_norm(a: PyTree) -> jax.Array:
    """``<a, a>``, accumulated like :func:`tree_vdot`."""
    return tree_vdot(a, a)


def tree_max_abs(a: PyTree) -> jax.Array:
    """``max |a|`` over all entries of all leaves (0 for a tree of empty leaves).

    Args:
      a: a pytree of floating-point arrays.

    Returns:
      a scalar in the accumulation dtype of ``a``.
    """
    dtype = _tree_accumulation_dtype(a)
    maxima = [jnp.max(jnp.abs(jnp.asarray(x, dtype)), initial=0) for x in jax.tree.leaves(a)]
    return jnp.max(jnp.stack(maxima)) if maxima else jnp.zeros([], dtype)


def tree_norm(a: PyTree) -> jax.Array:
    """Euclidean norm of a tree, free of overflow and underflow.

    Where the plain ``sqrt(<a, a>)`` would overflow (float32 entries from about
    1e19) or could have lost precision to squares that underflowed (``<a, a>``
    below :func:`underflow_floor`), the squares are taken of ``a / max|a|``
    instead (``jax.lax.cond``), so the result is finite and accurate for every
    finite tree.

    Args:
      a: a pytree of floating-point arrays.

    Returns:
      ``||a||`` as a scalar in the accumulation dtype of ``a``.
    """
    squared = tree_squared_norm(a)

    def raw(squared: jax.Array, a: PyTree) -> jax.Array:
        del a
        return jnp.sqrt(squared)

    def rescaled(squared: jax.Array, a: PyTree) -> jax.Array:
        del squared
        scale = tree_max_abs(a)
        inverse = safe_reciprocal(scale)
        scaled = jax.tree.map(lambda x: jnp.asarray(x, scale.dtype) * inverse, a)
        return scale * jnp.sqrt(tree_squared_norm(scaled))

    # The raw sum of squares when it is finite and no flushed square can matter (the common case: one pass, no
    # maximum). The tree is an operand, not a closure: called eagerly, a closure's arrays would be compiled into the
    # branch as constants, which XLA's algebraic simplifier may rescale out of the squares (overflowing them).
    safe = jnp.isfinite(squared) & (squared >= underflow_floor(a, squared.dtype))
    return jax.lax.cond(safe, raw, rescaled, squared, a)


def underflow_floor(a: PyTree, dtype: Any) -> float:
    """``n * tiny / eps`` of ``dtype`` for a tree of ``n`` entries: a sum of ``n`` products at least this large has
    lost at most one rounding unit to products that underflowed (each such product loses less than ``tiny``).

    Example:
      >>> import jax.numpy as jnp
      >>> from gsu_jax.trees import underflow_floor
      >>> f"{underflow_floor({'w': jnp.zeros(1000)}, jnp.float32):.3g}"
      '9.86e-29'
    """
    entries = max(sum(int(np.size(leaf)) for leaf in jax.tree.leaves(a)), 1)
    info = np.finfo(dtype)
    return entries * float(info.tiny) / float(info.eps)


def safe_reciprocal(x: jax.Array) -> jax.Array:
    """``1 / x`` where ``|x|`` is at least the smallest normal number, else 0.

    Used to normalise a direction by its largest entry: a zero (or subnormal)
    direction maps to the zero direction instead of to inf or NaN.
    """
    tiny = jnp.finfo(x.dtype).tiny
    usable = jnp.abs(x) >= tiny
    return jnp.where(usable, 1 / jnp.where(usable, x, 1), 0)


def tree_add_scaled(a: PyTree, b: PyTree, scale: jax.typing.ArrayLike) -> PyTree:
    """``a + scale * b`` leaf by leaf, computed in float32 (or wider).

    Args:
      a: a pytree of floating-point arrays.
      b: a pytree with the structure and leaf shapes of ``a``.
      scale: a scalar.

    Returns:
      a tree like ``a``, each leaf in ``a``'s dtype.
    """

    def add(x, y):
        dtype = accumulation_dtype(x.dtype, y.dtype, jnp.result_type(scale))
        return (x.astype(dtype) + scale * y.astype(dtype)).astype(x.dtype)

    return jax.tree.map(add, a, b)


def stacked_vdot(stacked: PyTree, tree: PyTree) -> jax.Array:
    """Inner products ``<stacked[k], tree>`` for every index ``k`` of the stack.

    Args:
      stacked: a pytree whose leaves are ``[K, *s]`` where ``tree``'s are ``s``.
      tree: a pytree of floating-point arrays.

    Returns:
      ``f32[K]`` (float64 if a leaf is float64).
    """
    dtype = _tree_accumulation_dtype(stacked, tree)

    def products(s, t):
        return jnp.sum((s.astype(dtype) * t.astype(dtype)).reshape(s.shape[0], -1), axis=1)

    return sum(jax.tree.leaves(jax.tree.map(products, stacked, tree)))


def stacked_max_abs(stacked: PyTree) -> jax.Array:
    """``max |stacked[k]|`` for every index ``k`` of the stack: ``f32[K]``."""
    dtype = _tree_accumulation_dtype(stacked)
    maxima = [
        jnp.max(jnp.abs(x.astype(dtype)).reshape(x.shape[0], -1), axis=1, initial=0) for x in jax.tree.leaves(stacked)
    ]
    return jnp.max(jnp.stack(maxima), axis=0)


def stacked_gram(stacked: PyTree, row_scale: jax.Array) -> jax.Array:
    """Gram matrix ``G[k, j] = <c_k stacked[k], c_j stacked[j]>``, ``c = row_scale``.

    Args:
      stacked: a pytree whose leaves are ``[K, ...]``.
      row_scale: ``f32[K]`` factors applied to each member before the products
        (used to normalise each member so the products cannot overflow).

    Returns:
      ``f32[K, K]`` (float64 if a leaf is float64).
    """
    dtype = accumulation_dtype(row_scale.dtype, _tree_accumulation_dtype(stacked))

    def gram(x):
        rows = x.astype(dtype).reshape(x.shape[0], -1) * row_scale[:, None]
        return jnp.matmul(rows, rows.T, precision=_HIGHEST)

    return sum(gram(x) for x in jax.tree.leaves(stacked))


def stacked_combination(weights: jax.Array, stacked: PyTree) -> PyTree:
    """``sum_k weights[k] * stacked[k]`` as a tree without the leading axis.

    Args:
      weights: ``f32[K]``.
      stacked: a pytree whose leaves are ``[K, *s]``.

    Returns:
      a tree with leaves ``s``, in the accumulation dtype of weights and leaves.
    """

    def combine(x):
        dtype = accumulation_dtype(weights.dtype, x.dtype)
        return jnp.tensordot(weights.astype(dtype), x.astype(dtype), axes=1, precision=_HIGHEST)

    return jax.tree.map(combine, stacked)


def check_tree_match(
    tree: PyTree,
    reference: PyTree,
    *,
    tree_name: str,
    reference_name: str,
    leading_axis: bool = False,
) -> int | None:
    """Checks that ``tree`` has the structure, leaf shapes and kinds of ``reference``.

    Runs on static information only (structure, shapes, dtypes), so under
    ``jax.jit`` it raises at trace time, before any computation.

    Args:
      tree: the tree to validate.
      reference: the tree it must match.
      tree_name: how error messages call ``tree`` (e.g. ``"direction"``).
      reference_name: how error messages call ``reference`` (e.g. ``"updates"``).
      leading_axis: if True, every leaf of ``tree`` must have one extra leading
        axis, of the same size ``n >= 1`` on every leaf, in front of the shape of
        the corresponding leaf of ``reference``: ``tree`` stacks ``n`` trees like
        ``reference`` (per-example updates ``[B, ...]``, span directions
        ``[K, ...]``).

    Returns:
      ``n`` when ``leading_axis`` is True, else None.

    Raises:
      ValueError: the trees differ in structure (the message names the first leaf
        path present in one tree and not at that position in the other, or the
        container types when the paths agree), a leaf's shape differs (the message
        names its path and both shapes), the leading axes disagree or are empty,
        or (with ``leading_axis``) the trees have no leaves.
      TypeError: a leaf of either tree is not a real floating-point array.

    Example:
      >>> import jax.numpy as jnp
      >>> from gsu_jax.trees import check_tree_match
      >>> params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
      >>> per_example = {"w": jnp.zeros((8, 3, 2)), "b": jnp.zeros((8, 2))}
      >>> check_tree_match(per_example, params, tree_name="updates",
      ...                  reference_name="direction", leading_axis=True)
      8
    """
    tree_leaves, tree_def = jax.tree_util.tree_flatten_with_path(tree)
    ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(reference)
    tree_paths = [jax.tree_util.keystr(path) for path, _ in tree_leaves]
    ref_paths = [jax.tree_util.keystr(path) for path, _ in ref_leaves]

    if tree_paths != ref_paths:
        tree_set, ref_set = set(tree_paths), set(ref_paths)
        missing = [path for path in ref_paths if path not in tree_set]
        extra = [path for path in tree_paths if path not in ref_set]
        if missing:
            detail = f"{tree_name} has no leaf {reference_name}{missing[0]}"
            if extra:
                detail += f" (it has {tree_name}{extra[0]} instead)"
        elif extra:
            detail = f"{tree_name}{extra[0]} has no counterpart in {reference_name}"
        else:
            position = next(i for i, (a, b) in enumerate(zip(tree_paths, ref_paths)) if a != b)
            detail = f"leaf {position} is {tree_name}{tree_paths[position]} but {reference_name}{ref_paths[position]}"
        raise ValueError(
            f"{tree_name} must have the tree structure of {reference_name}: "
            f"{detail} ({len(tree_paths)} vs {len(ref_paths)} leaves)."
        )
    if tree_def != ref_def:
        raise ValueError(
            f"{tree_name} and {reference_name} have the same leaf paths but "
            f"different container types: {tree_def} vs {ref_def}."
        )

    for name, leaves in ((tree_name, tree_leaves), (reference_name, ref_leaves)):
        for path, leaf in leaves:
            dtype = jnp.result_type(leaf)
            if not jnp.issubdtype(dtype, jnp.floating):
                raise TypeError(
                    f"{name}{jax.tree_util.keystr(path)} has dtype {dtype}; only real "
                    "floating-point leaves (float32, bfloat16, float16, float64) are "
                    "allowed."
                )

    if leading_axis and not tree_leaves:
        raise ValueError(f"{tree_name} has no leaves, so it has no leading axis to read.")

    leading = None
    leading_path = None
    for (path, leaf), (_, ref_leaf) in zip(tree_leaves, ref_leaves):
        shape, ref_shape = jnp.shape(leaf), jnp.shape(ref_leaf)
        path_str = jax.tree_util.keystr(path)
        if not leading_axis:
            if shape != ref_shape:
                raise ValueError(
                    f"{tree_name}{path_str} has shape {shape} but "
                    f"{reference_name}{path_str} has shape {ref_shape}; they must be "
                    "equal."
                )
            continue
        if len(shape) != len(ref_shape) + 1 or shape[1:] != ref_shape:
            raise ValueError(
                f"{tree_name}{path_str} has shape {shape}; expected one leading axis "
                f"in front of the shape of {reference_name}{path_str}, i.e. "
                f"(n, *{ref_shape})."
            )
        if leading is None:
            leading, leading_path = shape[0], path_str
        elif shape[0] != leading:
            raise ValueError(
                f"every leaf of {tree_name} must have the same leading axis: "
                f"{tree_name}{leading_path} has {leading}, {tree_name}{path_str} "
                f"has {shape[0]}."
            )
    if leading_axis and leading == 0:
        raise ValueError(f"{tree_name} has an empty leading axis (size 0); at least one entry is needed.")
    return leading


def top_magnitude_mask(a: PyTree, fraction: float, *, among_nonzero: bool = False) -> PyTree:
    """A 0/1 tree like ``a`` (leaf dtypes kept): 1 on the ``fraction`` of coordinates of largest ``|a|``.

    One threshold over the whole tree (a global top-``k``, ``k = ceil(fraction * n)``, at least 1), so a leaf
    with larger gradients keeps more of its coordinates; ties at the threshold are kept. ``n`` counts every
    coordinate, or with ``among_nonzero`` only the nonzero ones (a gradient already zero on masked leaves).

    Example:
      >>> top_magnitude_mask({"a": jnp.array([3.0, -1.0]), "b": jnp.array([0.5, -4.0])}, 0.5)["a"].tolist()
      [1.0, 0.0]
    """
    magnitudes = jnp.concatenate([jnp.abs(leaf).ravel() for leaf in jax.tree.leaves(a)])
    count = jnp.sum(magnitudes > 0) if among_nonzero else magnitudes.size
    ordered = jnp.sort(magnitudes)[::-1]
    cut = ordered[jnp.maximum(jnp.ceil(fraction * count).astype(jnp.int32) - 1, 0)]
    return jax.tree.map(lambda leaf: (jnp.abs(leaf) >= cut).astype(leaf.dtype), a)
