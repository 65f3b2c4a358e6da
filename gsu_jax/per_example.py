r"""Per-example gradients and what can be computed without them.

Every function here takes a loss written for ONE example,
``loss_fn(params, example, key) -> f32[]`` (the :data:`LossFn` contract of
``gsu_jax.losses``), the params pytree, a ``batch`` (the example pytree with a
leading axis ``B`` on every leaf) and ``keys`` (``B`` PRNG keys, one per
example, e.g. ``jax.random.split(key, B)``). Examples and keys are vmapped
together, so every example sees its own key.

Materialising ``B`` gradients costs ``B x |params|`` floats. Most uses only
need a weighted sum of them or their inner products with one direction ``v``,
and those come cheaply from the vector of per-example losses
``f(theta) = [loss(theta, x_1, k_1), ..., loss(theta, x_B, k_B)]``:

* ``[<grad loss(x_i), v>]_i = J_f v``: one forward-mode product (``jax.jvp``);
* ``sum_i w_i grad loss(x_i) = J_f^T w``: one reverse-mode product
  (``jax.vjp``).

:func:`per_example_projected_mean` combines both to give the mean of
per-example normal-plane projections without ever holding ``B`` gradients.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gsu_jax import projections, trees

PyTree = Any
LossFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]


def _check_loss_fn(loss_fn: Any) -> None:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable loss_fn(params, example, key) -> scalar, got {loss_fn!r}.")


def _batch_size(batch: PyTree, keys: Any) -> int:
    """The common leading axis of ``batch`` and ``keys``, checked."""
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not leaves:
        raise ValueError("batch has no leaves; it must be the example pytree with a leading axis B on every leaf.")
    size, first_path = None, None
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        path_str = jax.tree_util.keystr(path)
        if not shape:
            raise ValueError(f"batch{path_str} is a scalar; every leaf of batch needs a leading example axis B.")
        if size is None:
            size, first_path = shape[0], path_str
        elif shape[0] != size:
            raise ValueError(
                f"every leaf of batch must have the same leading axis: "
                f"batch{first_path} has {size}, batch{path_str} has {shape[0]}."
            )
    if size == 0:
        raise ValueError("batch is empty (B = 0); at least one example is needed.")
    key_shape = jnp.shape(keys)
    if not key_shape or key_shape[0] != size:
        raise ValueError(
            f"keys must hold one PRNG key per example, i.e. have leading axis "
            f"B = {size} (batch{first_path}); got keys of shape {key_shape}."
        )
    return size


def _check_batched(name: str, value: Any, size: int) -> None:
    if jnp.shape(value) != (size,):
        raise ValueError(f"{name} must have shape ({size},), one entry per example; got shape {jnp.shape(value)}.")


def _check_real_scalar(name: str, value: Any) -> None:
    if isinstance(value, jax.core.Tracer):
        if jnp.shape(value) != ():
            raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}.")
        return
    array = np.asarray(value)
    if array.shape != () or not np.isrealobj(array) or array.dtype == object:
        raise TypeError(f"{name} must be a real scalar, got {value!r}.")
    if not np.isfinite(array):
        raise ValueError(f"{name} must be finite, got {value!r}.")


def _cast_like(tree: PyTree, reference: PyTree) -> PyTree:
    return jax.tree.map(lambda x, r: jnp.asarray(x, jnp.result_type(r)), tree, reference)


def check_chunk_size(chunk_size: Any) -> None:
    """Refuses a ``chunk_size`` that is neither ``None`` nor an integer >= 1 (the one rule for every function that
    takes one: the per-example engine and :func:`gsu_jax.methods.make_method`)."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size={chunk_size!r} is invalid: allowed: None or an integer >= 1 (examples per chunk)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is invalid: allowed: None or an integer >= 1 (examples per chunk)")


def _leading_size(data: PyTree) -> int:
    return jnp.shape(jax.tree.leaves(data)[0])[0]


def _split_chunks(data: PyTree, chunk_size: int) -> tuple[PyTree, PyTree]:
    """``(head, tail)``: the first ``n * chunk_size`` rows as ``[n, chunk_size,
    ...]`` and the ``B mod chunk_size`` rows left over (``None`` when none).

    Chunk ``j`` holds the rows ``j, j + n, j + 2n, ...`` (strided, not
    contiguous): the rows of one chunk then lie along the leading axis as in
    ``data``, so a batch sharded over devices along that axis stays sharded
    inside every chunk (each device works on its own examples of each chunk)
    instead of being gathered to split it into contiguous pieces.
    """
    size = _leading_size(data)
    count = size // chunk_size
    full = count * chunk_size
    head = jax.tree.map(lambda x: jnp.swapaxes(x[:full].reshape((chunk_size, count) + x.shape[1:]), 0, 1), data)
    tail = jax.tree.map(lambda x: x[full:], data) if full < size else None
    return head, tail


def _merge_chunks(rows: PyTree) -> PyTree:
    """Inverse of :func:`_split_chunks`'s head: ``[n, chunk_size, ...]`` rows
    back to ``[n * chunk_size, ...]`` in the original order."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:]), rows)


def scan_over_chunks(
    fn: Callable[[PyTree], tuple[PyTree, PyTree]], data: PyTree, *, chunk_size: int | None
) -> tuple[PyTree, PyTree]:
    """``fn(data)`` run ``chunk_size`` rows at a time, for a ``fn`` returning
    ``(total, rows)``: a pytree that is a *sum* over the slice's rows (e.g. the
    gradient of a summed loss) and a pytree with one row per input row (e.g. the
    per-example losses).

    The chunks are visited by one ``jax.lax.scan`` whose carry is the running
    total and whose outputs are the rows, so ``fn``'s intermediates are held for
    one chunk at a time; the last ``B mod chunk_size`` rows (if any) form a
    shorter chunk computed on its own, so any ``B`` is accepted. With ``n =
    B // chunk_size`` chunk ``j`` holds rows ``j, j + n, ...`` (strided), which
    keeps a batch sharded along its leading axis sharded inside each chunk. The result
    equals ``fn(data)`` up to float rounding (the additions happen in another
    order); ``chunk_size=None`` or ``>= B`` calls ``fn(data)``.

    Args:
      fn: ``fn(slice) -> (total, rows)``.
      data: a pytree whose leaves share the leading axis ``B`` (examples, keys,
        per-example weights).
      chunk_size: rows per chunk, or ``None``.

    Returns:
      ``(total, rows)`` with ``fn``'s structures and dtypes.

    Raises:
      TypeError, ValueError: ``chunk_size`` is not ``None`` or an int >= 1.

    Example:
      >>> import jax.numpy as jnp
      >>> total, rows = scan_over_chunks(lambda x: (jnp.sum(x), 2 * x),
      ...                                jnp.arange(5.0), chunk_size=2)
      >>> total.tolist(), rows.tolist()
      (10.0, [0.0, 2.0, 4.0, 6.0, 8.0])
    """
    check_chunk_size(chunk_size)
    size = _leading_size(data)
    if chunk_size is None or chunk_size >= size:
        return fn(data)
    head, tail = _split_chunks(data, chunk_size)

    def accumulate(total, chunk):
        part, rows = fn(chunk)
        return jax.tree.map(jnp.add, total, part), rows

    total_shape, _ = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], head))
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), total_shape)
    total, rows = jax.lax.scan(accumulate, zero, head)
    rows = _merge_chunks(rows)
    if tail is not None:
        tail_total, tail_rows = fn(tail)
        total = jax.tree.map(jnp.add, total, tail_total)
        rows = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), rows, tail_rows)
    return total, rows


def sum_over_chunks(fn: Callable[[PyTree], PyTree], data: PyTree, *, chunk_size: int | None) -> PyTree:
    """:func:`scan_over_chunks` for a ``fn`` that only sums over rows.

    Example:
      >>> import jax.numpy as jnp
      >>> sum_over_chunks(lambda x: jnp.sum(x ** 2), jnp.arange(5.0),
      ...                 chunk_size=2).tolist()
      30.0
    """
    return scan_over_chunks(lambda chunk: (fn(chunk), ()), data, chunk_size=chunk_size)[0]


def map_over_chunks(fn: Callable[[PyTree], PyTree], data: PyTree, *, chunk_size: int | None) -> PyTree:
    """:func:`scan_over_chunks` for a row-wise ``fn`` (one output row per row).

    Example:
      >>> import jax.numpy as jnp
      >>> map_over_chunks(lambda x: 2 * x, jnp.arange(5.0), chunk_size=2).tolist()
      [0.0, 2.0, 4.0, 6.0, 8.0]
    """
    return scan_over_chunks(lambda chunk: ((), fn(chunk)), data, chunk_size=chunk_size)[1]


def per_example_losses(loss_fn: LossFn, params: PyTree, batch: PyTree, keys: jax.Array) -> jax.Array:
    """The loss of every example of a batch, each with its own key.

    Args:
      loss_fn: ``loss_fn(params, example, key) -> f32[]`` for one example.
      params: the parameter pytree (e.g. an ``nnx.State``).
      batch: the example pytree with a leading axis ``B`` on every leaf.
      keys: ``B`` PRNG keys (typed ``key<fry>[B]`` or raw ``u32[B, 2]``).

    Returns:
      ``f32[B]``: ``loss_fn(params, batch[i], keys[i])`` for every ``i``.

    Raises:
      TypeError: ``loss_fn`` is not callable.
      ValueError: ``batch`` leaves or ``keys`` disagree on ``B`` (the message
        names the leaf path), ``B = 0``, or ``loss_fn`` does not return a scalar.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gsu_jax import per_example_losses
      >>> def loss(params, example, key):
      ...   return jnp.sum((params["w"] * example["x"] - example["y"]) ** 2)
      >>> batch = {"x": jnp.arange(3.0)[:, None], "y": jnp.zeros((3, 1))}
      >>> keys = jax.random.split(jax.random.key(0), 3)
      >>> per_example_losses(loss, {"w": jnp.ones(1)}, batch, keys).tolist()
      [0.0, 1.0, 4.0]
    """
    _check_loss_fn(loss_fn)
    size = _batch_size(batch, keys)
    losses = jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, batch, keys)
    if jnp.shape(losses) != (size,):
        raise ValueError(
            "loss_fn must return a scalar per example; the batched losses have "
            f"shape {jnp.shape(losses)}, expected ({size},)."
        )
    return losses


def per_example_grads(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    keys: jax.Array,
    *,
    chunk_size: int | None = None,
) -> PyTree:
    """Gradients of every example's loss: ``jax.vmap(jax.grad(loss_fn))``.

    Args:
      loss_fn: ``loss_fn(params, example, key) -> f32[]`` for one example.
      params: the parameter pytree.
      batch: the example pytree with a leading axis ``B`` on every leaf.
      keys: ``B`` PRNG keys.
      chunk_size: if set, compute the gradients ``chunk_size`` examples at a time
        (``jax.lax.map`` over chunks; the last, shorter chunk when ``B`` is not a
        multiple is computed on its own), so the intermediate activations held at
        once scale with ``chunk_size`` rather than ``B``. The result is the same
        as without chunking (each example's gradient is computed by the same
        vmapped function); the output itself still holds ``B`` gradients.

    Returns:
      a tree like ``params`` with a leading axis ``B`` on every leaf:
      ``grads[i] = grad loss_fn(params, batch[i], keys[i])``.

    Raises:
      TypeError: ``loss_fn`` not callable or ``chunk_size`` not an int.
      ValueError: ``chunk_size < 1``, or the batch checks of
        :func:`per_example_losses`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gsu_jax import per_example_grads
      >>> def loss(params, example, key):
      ...   return jnp.sum((params["w"] * example["x"] - example["y"]) ** 2)
      >>> batch = {"x": jnp.arange(3.0)[:, None], "y": jnp.zeros((3, 1))}
      >>> keys = jax.random.split(jax.random.key(0), 3)
      >>> grads = per_example_grads(loss, {"w": jnp.ones(1)}, batch, keys,
      ...                           chunk_size=2)
      >>> grads["w"].tolist()
      [[0.0], [2.0], [8.0]]
    """
    _check_loss_fn(loss_fn)
    check_chunk_size(chunk_size)
    size = _batch_size(batch, keys)
    grad_one = jax.grad(loss_fn)
    if chunk_size is None or chunk_size >= size:
        return jax.vmap(grad_one, in_axes=(None, 0, 0))(params, batch, keys)
    return jax.lax.map(lambda example_key: grad_one(params, *example_key), (batch, keys), batch_size=chunk_size)


def per_example_directional_derivatives(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    keys: jax.Array,
    tangent: PyTree,
    *,
    chunk_size: int | None = None,
) -> jax.Array:
    """``<grad loss(x_i), tangent>`` for every example, by one ``jax.jvp``.

    Forward-mode differentiation of the vector of per-example losses along
    ``tangent``: about the cost of two forward passes, no gradient materialised.

    Args:
      loss_fn: ``loss_fn(params, example, key) -> f32[]`` for one example.
      params: the parameter pytree.
      batch: the example pytree with a leading axis ``B`` on every leaf.
      keys: ``B`` PRNG keys.
      tangent: a tree like ``params``; its leaves are cast to the dtypes of the
        ``params`` leaves (``jax.jvp`` requires it).
      chunk_size: if set, one ``jax.jvp`` per ``chunk_size`` examples
        (:func:`map_over_chunks`): activation memory of one chunk, same values.

    Returns:
      ``f32[B]`` (the loss dtype): the directional derivatives.

    Raises:
      ValueError, TypeError: ``tangent`` does not match ``params`` (naming the
        first mismatching leaf path), or the checks of :func:`per_example_losses`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gsu_jax import per_example_directional_derivatives
      >>> def loss(params, example, key):
      ...   return jnp.sum((params["w"] * example["x"] - example["y"]) ** 2)
      >>> batch = {"x": jnp.arange(3.0)[:, None], "y": jnp.zeros((3, 1))}
      >>> keys = jax.random.split(jax.random.key(0), 3)
      >>> per_example_directional_derivatives(
      ...     loss, {"w": jnp.ones(1)}, batch, keys, {"w": jnp.full(1, 0.5)}).tolist()
      [0.0, 1.0, 4.0]
    """
    _check_loss_fn(loss_fn)
    check_chunk_size(chunk_size)
    _batch_size(batch, keys)
    trees.check_tree_match(tangent, params, tree_name="tangent", reference_name="params")
    tangent = _cast_like(tangent, params)

    def derivatives(chunk):
        batch_chunk, keys_chunk = chunk
        return jax.jvp(lambda p: per_example_losses(loss_fn, p, batch_chunk, keys_chunk), (params,), (tangent,))[1]

    return map_over_chunks(derivatives, (batch, keys), chunk_size=chunk_size)


def weighted_grad_sum(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    keys: jax.Array,
    weights: jax.Array,
    *,
    chunk_size: int | None = None,
) -> PyTree:
    """``sum_i weights[i] * grad loss(x_i)``, by one ``jax.vjp``.

    Reverse-mode differentiation of the vector of per-example losses with
    cotangent ``weights``: the cost of one forward and one backward pass over the
    batch; with ``weights = 1/B`` this is the gradient of the mean loss.

    Args:
      loss_fn: ``loss_fn(params, example, key) -> f32[]`` for one example.
      params: the parameter pytree.
      batch: the example pytree with a leading axis ``B`` on every leaf.
      keys: ``B`` PRNG keys.
      weights: ``f32[B]``, cast to the loss dtype.
      chunk_size: if set, one ``jax.vjp`` per ``chunk_size`` examples, summed
        (:func:`sum_over_chunks`): activation memory of one chunk, the same sum
        up to float rounding.

    Returns:
      a tree like ``params`` (its dtypes).

    Raises:
      ValueError: ``weights`` is not ``[B]``, or the checks of
        :func:`per_example_losses`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gsu_jax import weighted_grad_sum
      >>> def loss(params, example, key):
      ...   return jnp.sum((params["w"] * example["x"] - example["y"]) ** 2)
      >>> batch = {"x": jnp.arange(3.0)[:, None], "y": jnp.zeros((3, 1))}
      >>> keys = jax.random.split(jax.random.key(0), 3)
      >>> weighted_grad_sum(loss, {"w": jnp.ones(1)}, batch, keys,
      ...                   jnp.array([1.0, 1.0, -1.0]))["w"].tolist()
      [-6.0]
    """
    _check_loss_fn(loss_fn)
    check_chunk_size(chunk_size)
    size = _batch_size(batch, keys)
    _check_batched("weights", weights, size)

    def grad_sum(chunk):
        batch_chunk, keys_chunk, weights_chunk = chunk
        losses, pullback = jax.vjp(lambda p: per_example_losses(loss_fn, p, batch_chunk, keys_chunk), params)
        return pullback(jnp.asarray(weights_chunk, losses.dtype))[0]

    return sum_over_chunks(grad_sum, (batch, keys, weights), chunk_size=chunk_size)


def per_example_projected_mean(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    keys: jax.Array,
    direction: PyTree,
    *,
    scale: jax.typing.ArrayLike = 1.0,
    only_on_conflict: bool = False,
    eps: jax.typing.ArrayLike = 0.0,
    chunk_size: int | None = None,
) -> PyTree:
    r"""Mean of per-example normal-plane projections, without per-example grads.

    Computes, with ``u_i = scale * grad loss(x_i)`` and ``d = direction``,

    .. math::

      \frac1B \sum_i P_d(u_i)
      = \frac{\text{scale}}{B} \sum_i \nabla \ell(x_i)
        - \Big(\frac1B \sum_i c_i\Big) d,
      \qquad c_i = \frac{\text{scale}\,\langle \nabla \ell(x_i), d\rangle}
                        {\langle d, d\rangle + \epsilon}

    (``c_i`` zeroed where ``scale <grad loss(x_i), d> >= 0`` when
    ``only_on_conflict``): exactly what
    :func:`gsu_jax.projections.mean_normal_plane_projection` returns for the
    materialised updates ``scale * per_example_grads(...)`` and ``direction``
    (equal up to float rounding). The ``B`` inner products are one Jacobian-vector product of the
    per-example-loss vector, the weighted sum one vector-Jacobian product; both
    reuse one ``jax.linearize`` of that vector, so the forward pass runs once by
    construction. (Measured on CPU, 784-400-2 VAE, batch 128: a separate
    ``jax.jvp`` plus ``jax.vjp`` compiles to the same FLOP count and time, since
    XLA merges the duplicated forward pass; ``linearize`` does not rely on that.)
    Memory is that of one forward/backward pass; no ``B x |params|`` array
    exists.

    First-order guarantee: the result is orthogonal to ``d``, so a small step
    along it leaves the loss whose gradient is ``d`` unchanged to first order.
    With ``only_on_conflict`` its inner product with ``d`` is non-negative: a
    descent step along it does not increase that loss to first order.

    Args:
      loss_fn: ``loss_fn(params, example, key) -> f32[]`` for one example.
      params: the parameter pytree.
      batch: the example pytree with a leading axis ``B`` on every leaf.
      keys: ``B`` PRNG keys.
      direction: a tree like ``params`` (e.g. the retain-set gradient).
      scale: real scalar multiplying every gradient before the projection (e.g.
        ``-1.0`` for per-sample gradient ascent on a forget batch); its sign
        matters with ``only_on_conflict``.
      only_on_conflict: project an example's update only when it conflicts with
        ``d`` (PCGrad).
      eps: non-negative damping added to ``<d, d>``, as in
        :func:`gsu_jax.projections.normal_plane_projection`.
      chunk_size: if set, the linearisation, the ``B`` inner products and the
        weighted sum run ``chunk_size`` examples at a time (one
        :func:`scan_over_chunks`: ``sum_i scale grad loss(x_i)`` accumulated,
        the inner products kept per example): the activation memory of one
        chunk, the same result up to float rounding.

    Returns:
      a tree like ``params`` (its dtypes).

    Raises:
      TypeError, ValueError: bad flags or scalars, ``direction`` not matching
        ``params`` (naming the first mismatching leaf path), or the checks of
        :func:`per_example_losses`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gsu_jax import per_example_projected_mean
      >>> def loss(params, example, key):
      ...   return jnp.sum((params["w"] * example["x"] - example["y"]) ** 2)
      >>> params = {"w": jnp.ones(2)}
      >>> batch = {"x": jnp.array([[1.0, 0.0], [1.0, 1.0]]), "y": jnp.zeros((2, 2))}
      >>> keys = jax.random.split(jax.random.key(0), 2)
      >>> per_example_projected_mean(loss, params, batch, keys, {"w": jnp.array([1.0, 0.0])},
      ...                            scale=-1.0)["w"].tolist()
      [0.0, -1.0]
    """
    _check_loss_fn(loss_fn)
    projections.check_flag("only_on_conflict", only_on_conflict)
    projections.check_nonnegative("eps", eps)
    _check_real_scalar("scale", scale)
    size = _batch_size(batch, keys)
    trees.check_tree_match(direction, params, tree_name="direction", reference_name="params")
    dtype = trees.accumulation_dtype(*(jnp.result_type(x) for x in jax.tree.leaves((params, direction))))
    unit, scaled_eps = projections.normalise_direction(direction, eps, dtype)
    weights = jnp.full((size,), scale / size, dtype)
    derivatives, mean_update = directional_derivatives_and_weighted_grad_sum(
        loss_fn, params, batch, keys, unit, weights, chunk_size=chunk_size
    )
    inner = scale * derivatives.astype(dtype)
    return mean_of_projections(mean_update, inner, unit, scaled_eps, only_on_conflict=only_on_conflict)


def mean_of_projections(
    mean_update: PyTree, inner: jax.Array, unit: PyTree, scaled_eps: jax.Array, *, only_on_conflict: bool
) -> PyTree:
    """``mean_i P_h(u_i) = mean_i u_i - (mean_i c_i) h`` from the mean update and the ``B`` inner products.

    The identity behind :func:`per_example_projected_mean`, for a caller that has ``mean_i u_i`` and
    ``inner = [<u_i, h>]_i`` already: ``c_i`` are :func:`gsu_jax.projections.removal_coefficients` of ``inner``
    (zeroed where ``<u_i, h> >= 0`` when ``only_on_conflict``), ``h`` and ``scaled_eps`` come from
    :func:`gsu_jax.projections.normalise_direction`. Computed in ``inner``'s dtype; returns a tree like
    ``mean_update`` (its dtypes).
    """
    dtype = jnp.result_type(inner)
    coefficients = projections.removal_coefficients(inner, trees.tree_squared_norm(unit), scaled_eps, only_on_conflict)
    mean_coefficient = jnp.mean(coefficients)
    return jax.tree.map(
        lambda g, h: (jnp.asarray(g, dtype) - mean_coefficient * h).astype(jnp.result_type(g)), mean_update, unit
    )


def directional_derivatives_and_weighted_grad_sum(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    keys: jax.Array,
    tangent: PyTree,
    weights: jax.Array,
    *,
    chunk_size: int | None = None,
) -> tuple[jax.Array, PyTree]:
    """``([<grad loss(x_i), tangent>]_i, sum_i weights[i] * grad loss(x_i))`` from ONE ``jax.linearize``.

    :func:`per_example_directional_derivatives` and :func:`weighted_grad_sum` at once: the per-example-loss vector
    is linearised once (one forward pass), its linear map applied to ``tangent`` (``J_f v``) and transposed onto
    ``weights`` (``J_f^T w``), so the forward pass is never repeated, whatever XLA would have merged.

    Args:
      loss_fn, params, batch, keys: as for :func:`per_example_directional_derivatives`.
      tangent: a tree like ``params`` (cast to its dtypes).
      weights: ``[B]`` weights of the gradient sum (cast to the loss dtype).
      chunk_size: if set, one linearisation per ``chunk_size`` examples (:func:`scan_over_chunks`): the
        activation memory of one chunk, the same values up to float rounding of the sum.

    Returns:
      ``(derivatives [B] in the loss dtype, the weighted sum as a tree like params)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def loss(params, example, key):
      ...   return jnp.sum((params["w"] * example["x"] - example["y"]) ** 2)
      >>> batch = {"x": jnp.arange(3.0)[:, None], "y": jnp.zeros((3, 1))}
      >>> keys = jax.random.split(jax.random.key(0), 3)
      >>> derivatives, grad_sum = directional_derivatives_and_weighted_grad_sum(
      ...     loss, {"w": jnp.ones(1)}, batch, keys, {"w": jnp.full(1, 0.5)}, jnp.array([1.0, 1.0, -1.0]))
      >>> derivatives.tolist(), grad_sum["w"].tolist()
      ([0.0, 1.0, 4.0], [-6.0])
    """
    _check_loss_fn(loss_fn)
    check_chunk_size(chunk_size)
    size = _batch_size(batch, keys)
    _check_batched("weights", weights, size)
    trees.check_tree_match(tangent, params, tree_name="tangent", reference_name="params")
    tangent = _cast_like(tangent, params)

    def both(chunk):
        batch_chunk, keys_chunk, weights_chunk = chunk
        losses, losses_jvp = jax.linearize(lambda p: per_example_losses(loss_fn, p, batch_chunk, keys_chunk), params)
        (grad_sum,) = jax.linear_transpose(losses_jvp, params)(jnp.asarray(weights_chunk, losses.dtype))
        return grad_sum, losses_jvp(tangent)

    return tuple(reversed(scan_over_chunks(both, (batch, keys, weights), chunk_size=chunk_size)))
