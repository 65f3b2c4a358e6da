"""The update rules of the unlearning methods: what each turns one step's gradients into.

A rule is ``rule(inputs: StepInputs, hparams) -> Direction``: it reads the shared work of a step (the per-example
forget losses, ``g_f = grad L_f`` and ``g_r = grad L_r``, the batches and their keys) and returns the update
direction ``u`` that the optimizer descends, with two diagnostics. :mod:`gsu_jax.methods` registers each rule under
a method name and builds the step around it; the notation and the table of rules are in its docstring. The
recommended method's rule lives in :mod:`gsu_jax.remap_surgery`.

Every projection is a pure function of :mod:`gsu_jax.projections` (or, per example, of
:func:`gsu_jax.per_example.per_example_projected_mean`), applied to the raw gradients before the optimizer sees them.

**Our rule, ``sa_gated``** (not from the paper): ascent that knows when it has forgotten. Each forget example
ascends (per-example SA, projected off ``g_r`` on conflict) only while its loss is below ``forget_loss_target``,
e.g. the loss a model retrained without the forget set has on it; an example at or above it is gated out and its
``1/B`` share of the step goes to retain descent (``combine='fill'``), so a fully gated step is plain descent on
``L_r``. Why the fill: with Adam a zero update does not stop the parameters (the first moment keeps them moving
along the last ascent direction for tens of steps), so "stop ascending" must be an active retain step.
``ascend_only`` (a regex over parameter paths, e.g. ``'decoder'``) restricts the ascent to the generator: the
negative ELBO can be raised cheaply through the encoder alone (a worse posterior) without changing what the
decoder generates. Measured on the embedded digits (MLP VAE, Adam, 3 seeds, 30 steps, forget digit 1, auto
threshold on 1024 samples; a first measurement, ``unlearn.py`` produces the full tables): with
``ascend_only='decoder'`` and ``combine='fill'`` the FID no longer drifts after the stop, where ``sa`` keeps
degrading (latent 16, lr 3e-3: ``sa_gated`` FID at the end 13.7-16.6 against the original's 21.2; latent 2, both at
lr 3e-3: 46-59 against ``sa``'s 266-1039). The target sets the speed and is model-dependent: at latent 16 the
oracle's own forget loss closes the gate before the generated forget fraction reaches the threshold (1 of 3 seeds
stopped within 30 steps), ``oracle + (oracle - original)`` stops in 3-5 steps with FID below the original's at the
stop and at the end; at latent 2 the oracle's level stops in 3-4 steps (FID +12-32% at the stop, where the oracle
itself is +28%) and twice the gap degrades the end FID.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from gsu_jax import per_example, projections, trees
from gsu_jax.losses import LossFn, batch_size
from gsu_jax.models import conv
from gsu_jax.projections import off_span_projection
from gsu_jax.trees import tree_add_scaled, tree_max_abs, tree_squared_norm, tree_vdot

Params = Any  # a pytree of arrays (an nnx.State)
Batch = Any  # the per-example pytree with a leading axis B

# Floor under squared norms in cosines (UNO's cos^2 and the cos metric): keeps zero gradients finite without
# changing any cosine of gradients whose squared norms exceed ~1e-20.
_NORM_FLOOR = 1e-24


class StepInputs(NamedTuple):
    """Everything a direction rule may read (the shared work of one :func:`gsu_jax.methods.make_method` step).

    Attributes:
      loss_fn: the per-example loss.
      params: current parameters.
      step: ``i32[]`` steps applied so far.
      forget_batch, retain_batch: the two batches (leading axes ``B_f``, ``B_r``).
      forget_keys, retain_keys: ``key[B_f]``, ``key[B_r]``, one per example.
      forget_losses: ``f32[B_f]``, the per-example forget losses ``l(x_i)``.
      forget_grad, retain_grad: ``g_f``, ``g_r`` (like ``params``); ``None`` for a gradient the method's
        registry record does not list in ``gradients`` (the step does not compute it).
      chunk_size: examples processed at once by every pass over a batch (``None``: whole batches), the
        :func:`gsu_jax.methods.make_method` step option.
      unravel: ``None`` when ``params`` is the parameter pytree itself; otherwise ``params`` (and every gradient)
        is the flat parameter vector of :func:`jax.flatten_util.ravel_pytree` and this maps such a vector back to
        the pytree (:func:`param_mask` reads the parameter paths through it).
      rule_state: what the method's :class:`RuleState` computed at its first step (a saliency mask, an anchor and
        its Fisher), in the layout of ``params``; ``()`` for a rule without one.
    """

    loss_fn: LossFn
    params: Params
    step: jax.Array
    forget_batch: Batch
    retain_batch: Batch
    forget_keys: jax.Array
    retain_keys: jax.Array
    forget_losses: jax.Array
    forget_grad: Params | None
    retain_grad: Params | None
    chunk_size: int | None = None
    unravel: Callable[[jax.Array], Params] | None = None
    rule_state: Any = ()


class RuleState(NamedTuple):
    """A rule's fixed state: computed once, at the method's first step, and read by every step after it.

    Some published rules fix something at the original parameters ``theta*`` from the data (SalUn's saliency mask,
    Selective Amnesia's EWC anchor and Fisher). The step computes it when ``step == 0`` (``jax.lax.cond``: later steps
    only carry it), so the step signature stays ``step(params, state, forget, retain, key)`` and a resumed run
    restores it with the rest of the method's state.

    Attributes:
      template: ``template(params) -> pytree``, zeros of the state's shapes and dtypes for parameters laid out as
        ``params`` (a tree, or the flat vector of a flat step); what ``init`` stores before the first step.
      compute: ``compute(inputs, hparams) -> pytree`` like ``template``, from the first step's :class:`StepInputs`.
    """

    template: Callable[[Params], Any]
    compute: Callable[[StepInputs, Mapping[str, Any]], Any]


class Direction(NamedTuple):
    """What a rule returns: the update ``u`` (descended by the optimizer) and two ``f32[]`` diagnostics."""

    update: Params
    projected: jax.Array
    gated_fraction: jax.Array


DirectionRule = Callable[[StepInputs, Mapping[str, Any]], Direction]


# --------------------------------------------------------------------------------------- gradients and trees


def losses_and_mean_grad(
    loss_fn: LossFn, params: Params, batch: Batch, keys: jax.Array, chunk_size: int | None = None
) -> tuple[jax.Array, Params]:
    """``(l(x_i) f32[B], grad mean_i l(x_i))`` in one forward and one backward pass.

    With ``chunk_size`` the pass runs ``chunk_size`` examples at a time (``jax.lax.scan`` over chunks, the
    remainder on its own) and sums ``grad sum_{i in chunk} l(x_i)`` before dividing by ``B``: the same gradient up
    to float rounding with the activations of one chunk.
    """
    size = batch_size(batch)
    if chunk_size is None or chunk_size >= size:

        def mean_loss(params: Params) -> tuple[jax.Array, jax.Array]:
            losses = jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, batch, keys)
            return jnp.mean(losses), losses

        (_, losses), grad = jax.value_and_grad(mean_loss, has_aux=True)(params)
        return losses, grad

    def summed_grad_and_losses(chunk: tuple[Batch, jax.Array]) -> tuple[Params, jax.Array]:
        batch_chunk, keys_chunk = chunk

        def summed_loss(p: Params) -> tuple[jax.Array, jax.Array]:
            losses = jax.vmap(loss_fn, in_axes=(None, 0, 0))(p, batch_chunk, keys_chunk)
            return jnp.sum(losses), losses

        grad, losses = jax.grad(summed_loss, has_aux=True)(params)
        return grad, losses

    def chunked() -> tuple[Params, jax.Array]:
        return per_example.scan_over_chunks(summed_grad_and_losses, (batch, keys), chunk_size=chunk_size)

    # The loop body is grad of a vmap: the convolutions of our models take their loop-friendly derivative there
    # (gsu_jax.models.conv; 23x faster chunked conv-VAE steps on XLA:CPU). A loss that differentiates inside itself
    # (a jvp or grad around those convolutions) cannot: its trace fails, and the pass is traced again with lax's
    # own convolution (a genuine error in the loss fails that second trace too and propagates).
    try:
        with conv.reverse_mode_loop_body():
            grad, losses = chunked()
    except (TypeError, ValueError):
        grad, losses = chunked()
    return losses, jax.tree.map(lambda leaf: leaf / size, grad)


def _negate(tree: Params) -> Params:
    return jax.tree.map(jnp.negative, tree)


def cosine(a: Params, b: Params) -> jax.Array:
    """``cos(a, b)`` over whole trees, finite for zero trees (squared norms floored at 1e-24)."""
    return tree_vdot(a, b) * jax.lax.rsqrt(
        jnp.maximum(tree_squared_norm(a), _NORM_FLOOR) * jnp.maximum(tree_squared_norm(b), _NORM_FLOOR)
    )


def project_flagged(updates: Params, direction: Params, *, only_on_conflict: bool) -> tuple[Params, jax.Array]:
    """``(P_d(u), projected)``: the normal-plane projection and ``1.0`` if it removed a component (its coefficient
    is nonzero), else ``0.0``; the flag is read off the projection's own coefficient, not a pass over the trees."""
    parts = projections.normal_plane_parts(updates, direction, only_on_conflict=only_on_conflict, eps=0.0)
    return parts.projected, (parts.coefficient != 0).astype(jnp.float32)


def changed(before: Params, after: Params) -> jax.Array:
    """``1.0`` if the projection removed a nonzero component, else ``0.0``."""
    difference = jax.tree.map(jnp.subtract, after, before)
    return (tree_max_abs(difference) > 0).astype(jnp.float32)


def on_parameter_tree(inputs: StepInputs, compute: Callable[[LossFn, Params], Params]) -> Params:
    """``compute(loss_fn, params)`` run on the parameter pytree, its result (a tree like the parameters) returned
    in the layout of ``inputs.params`` (raveled for a flat step).

    For the passes that hold one gradient per example or per group (``vmap`` of ``grad``). Why: on XLA:CPU such
    gradients taken with respect to the flat vector cost twice those taken leaf by leaf (measured on the protocol
    VAE, B = 128: remap_surgery's retain Fisher 679 ms against 326 ms), while one concatenation of the result costs
    little (341 ms in all).
    """
    if inputs.unravel is None:
        return compute(inputs.loss_fn, inputs.params)
    vector_loss = inputs.loss_fn

    def tree_loss(tree: Params, example: Any, key: jax.Array) -> jax.Array:
        return vector_loss(ravel_pytree(tree)[0], example, key)

    return ravel_pytree(compute(tree_loss, inputs.unravel(inputs.params)))[0]


# ----------------------------------------------------------------------------------------------- the rules


def zero_diagnostic() -> jax.Array:
    """The ``f32[]`` diagnostic of a rule that never projects (or never gates)."""
    return jnp.zeros((), jnp.float32)


def ascent_rule(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
    del hparams
    return Direction(_negate(inputs.forget_grad), zero_diagnostic(), zero_diagnostic())


def retain_finetune_rule(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
    del hparams
    return Direction(inputs.retain_grad, zero_diagnostic(), zero_diagnostic())


def sa_rule(*, only_on_conflict: bool) -> DirectionRule:
    def rule(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
        del hparams
        ascent = _negate(inputs.forget_grad)
        update, projected = project_flagged(ascent, inputs.retain_grad, only_on_conflict=only_on_conflict)
        return Direction(update, projected, zero_diagnostic())

    return rule


def s_rule(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
    del hparams
    update, projected = project_flagged(inputs.retain_grad, inputs.forget_grad, only_on_conflict=False)
    return Direction(update, projected, zero_diagnostic())


def pcgrad_rule(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
    """Two-task PCGrad of the ascent ``a = -g_f`` and ``g_r``: on conflict the sum has a non-negative inner product
    with both, so to first order it ascends the forget loss and descends the retain loss together; a zero ``a``
    leaves ``g_r`` unchanged, so the sum degrades to retain descent."""
    del hparams
    update, conflict = projections.pcgrad_pair(_negate(inputs.forget_grad), inputs.retain_grad)
    return Direction(update, conflict, zero_diagnostic())


def param_mask(inputs: StepInputs, pattern: str | None, *, name: str = "ascend_only") -> Params | None:
    """Where the parameter path matches ``pattern`` (``re.search``), in the layout of ``inputs.params``.

    ``None`` for no pattern; a tree of Python bools like the parameter pytree; or, for a flat step
    (``inputs.unravel`` set), a constant boolean vector that is True on the coordinates of the matching leaves.
    """
    if pattern is None:
        return None
    tree = inputs.params
    if inputs.unravel is not None:
        tree = jax.eval_shape(inputs.unravel, jax.ShapeDtypeStruct(inputs.params.shape, inputs.params.dtype))
    regex = re.compile(pattern)
    paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
    selected = [bool(regex.search(jax.tree_util.keystr(path))) for path, _ in paths]
    if not any(selected):
        listing = ", ".join(jax.tree_util.keystr(path) for path, _ in paths)
        raise ValueError(f"{name}={pattern!r} matches no parameter; allowed: a regex matching some of {listing}")
    if inputs.unravel is None:
        return jax.tree_util.tree_unflatten(treedef, selected)
    # ravel_pytree concatenates the leaves in tree_flatten order, the order of ``paths``.
    return np.concatenate([np.full(int(np.prod(leaf.shape)), chosen) for chosen, (_, leaf) in zip(selected, paths)])


def _keep_gradient(mask: bool | np.ndarray, leaf: jax.Array) -> jax.Array:
    if isinstance(mask, np.ndarray):
        return jnp.where(mask, leaf, jax.lax.stop_gradient(leaf))
    return leaf if mask else jax.lax.stop_gradient(leaf)


def masked_loss(loss_fn: LossFn, mask: Params) -> LossFn:
    """``loss_fn`` differentiable only where ``mask`` (from :func:`param_mask`) is True (constant elsewhere)."""

    def loss(params: Params, example: Any, key: jax.Array) -> jax.Array:
        return loss_fn(jax.tree.map(_keep_gradient, mask, params), example, key)

    return loss


def masked_tree(tree: Params, mask: Params) -> Params:
    """``tree`` set to zero where ``mask`` (from :func:`param_mask`) is False."""

    def keep(chosen: bool | np.ndarray, leaf: jax.Array) -> jax.Array:
        if isinstance(chosen, np.ndarray):
            return jnp.where(chosen, leaf, 0.0).astype(leaf.dtype)
        return leaf if chosen else jnp.zeros_like(leaf)

    return jax.tree.map(keep, mask, tree)


def _gated_ascent(
    inputs: StepInputs, weights: jax.Array | None, *, only_on_conflict: bool, mask: Params | None = None
) -> Direction:
    """``mean_i w_i P^(c)_{g_r}(-grad l(x_i))`` without materialising per-example gradients.

    With ``h = g_r / max|g_r|``, ``d_i = <grad l(x_i), h>`` and ``c_i = -w_i d_i / |h|^2`` (zeroed unless
    ``-w_i d_i < 0`` when ``only_on_conflict``) the mean is ``-mean_i w_i grad l(x_i) - mean_i(c_i) h``
    (:func:`gsu_jax.per_example.per_example_projected_mean`'s identity; for ``w_i >= 0`` the conflict test is that
    of the unweighted ascent). ``weights=None`` means every ``w_i = 1``: the ``d_i`` are one ``jax.jvp`` and the
    mean gradient is the step's own ``g_f`` (no further pass); otherwise one ``jax.linearize`` gives the ``d_i``
    (its jvp) and ``mean_i w_i grad l(x_i)`` (its transpose applied to ``w / B``); the mean of projections is then
    :func:`gsu_jax.per_example.mean_of_projections`. ``projected`` (the weighted share of examples whose ascent
    conflicted with ``g_r``, or 1 when projecting always) reads the same ``d_i``. With a ``mask`` the gradients
    are taken in the masked coordinates only and projected off the masked ``g_r``, which keeps the result
    orthogonal to the full ``g_r``.
    """
    loss_fn, retain_grad, forget_grad = inputs.loss_fn, inputs.retain_grad, inputs.forget_grad
    if mask is not None:
        loss_fn, retain_grad, forget_grad = (
            masked_loss(loss_fn, mask),
            masked_tree(retain_grad, mask),
            masked_tree(forget_grad, mask),
        )
    dtype = trees.accumulation_dtype(*(jnp.result_type(x) for x in jax.tree.leaves((inputs.params, retain_grad))))
    unit, _ = projections.normalise_direction(retain_grad, 0.0, dtype)
    size = inputs.forget_losses.shape[0]
    if weights is None:
        weights = jnp.ones((size,), dtype)
        derivatives = per_example.per_example_directional_derivatives(
            loss_fn, inputs.params, inputs.forget_batch, inputs.forget_keys, unit, chunk_size=inputs.chunk_size
        )
        mean_grad = forget_grad
    else:
        weights = jax.lax.stop_gradient(weights).astype(dtype)
        derivatives, mean_grad = per_example.directional_derivatives_and_weighted_grad_sum(
            loss_fn,
            inputs.params,
            inputs.forget_batch,
            inputs.forget_keys,
            unit,
            weights / size,
            chunk_size=inputs.chunk_size,
        )
    derivatives = derivatives.astype(dtype)
    update = per_example.mean_of_projections(
        _negate(mean_grad), -weights * derivatives, unit, jnp.zeros((), dtype), only_on_conflict=only_on_conflict
    )
    if only_on_conflict:
        # -grad l(x_i) conflicts with g_r exactly when <grad l(x_i), g_r> > 0.
        conflicts = (derivatives > 0).astype(dtype)
        projected = jnp.sum(weights * conflicts) / jnp.maximum(jnp.sum(weights), 1e-12)
    else:
        projected = (jnp.sum(weights) > 0).astype(jnp.float32)
    return Direction(update, projected, 1.0 - jnp.mean(weights))


def sa_per_example_rule(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
    return _gated_ascent(inputs, None, only_on_conflict=hparams["only_on_conflict"])


def _forget_gate(losses: jax.Array, *, target: float, temperature: float) -> jax.Array:
    """``w_i = 1[l_i < target]`` (``temperature = 0``) or ``sigmoid((target - l_i) / temperature)``."""
    if temperature == 0.0:
        return (losses < target).astype(jnp.float32)
    return jax.nn.sigmoid((target - losses) / temperature)


def sa_gated_rule(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
    """Ours: ``sum_i (w_i / B) P^c_{M g_r}(-M grad l(x_i)) + C`` with ``w_i`` the forget gate, ``M`` the mask.

    ``w_i = 1[l(x_i) < target]`` (or ``sigmoid((target - l(x_i)) / temperature)``), ``M`` zeroes the leaves that
    ``ascend_only`` does not match (identity when None) and ``C`` is ``(1 - mean_i w_i) g_r`` for
    ``combine='fill'``, 0 for ``'sa'``; ``'pcgrad'`` instead returns ``P^c_{g_r}(a) + P^c_a(g_r)`` for the gated
    ascent ``a``. With ``target = +inf`` and no mask this is ``sa_per_example``.
    """
    weights = _forget_gate(
        inputs.forget_losses, target=hparams["forget_loss_target"], temperature=hparams["temperature"]
    )
    mask = param_mask(inputs, hparams["ascend_only"])
    gated = _gated_ascent(inputs, weights, only_on_conflict=hparams["only_on_conflict"], mask=mask)
    if hparams["combine"] == "sa":
        return gated
    if hparams["combine"] == "fill":
        # Each gated example hands its 1/B share of the step to retain descent.
        return gated._replace(update=tree_add_scaled(gated.update, inputs.retain_grad, gated.gated_fraction))
    # combine == "pcgrad": the (per-example projected) gated ascent and g_r as two PCGrad tasks.
    update, conflict = projections.pcgrad_pair(gated.update, inputs.retain_grad)
    return Direction(update, jnp.maximum(gated.projected, conflict), gated.gated_fraction)


def _retain_groups(inputs: StepInputs, *, num_groups: int) -> dict[str, Any]:
    """The retain batch as K contiguous equal groups (examples ``[K, G, ...]``, keys ``[K, G]``), for
    :func:`_group_grads`. Each example keeps its own key, so ``mean_k G_k = g_r`` exactly."""
    size = batch_size(inputs.retain_batch)
    if size % num_groups:
        raise ValueError(
            f"sa_span splits the retain batch into num_directions={num_groups} equal groups, but its size {size} "
            f"is not a multiple of {num_groups}; allowed: a divisor of the retain batch size"
        )
    group_size = size // num_groups

    def split(leaf: jax.Array) -> jax.Array:
        return leaf.reshape((num_groups, group_size) + leaf.shape[1:])

    return {"examples": jax.tree.map(split, inputs.retain_batch), "keys": split(inputs.retain_keys)}


def _group_grads(loss_fn: LossFn, params: Params, groups: Mapping[str, Any], chunk_size: int | None) -> Params:
    """``G_k = grad mean_{i in group k} l(x_i)`` for each group of ``groups`` (examples ``[K, G, ...]``, keys
    ``[K, G]``), stacked along a leading K.

    Computed as the per-example gradients of a "group loss" whose one example is a whole group. With
    ``chunk_size`` at most that many examples are differentiated at once: ``chunk_size // G`` groups at a time, or,
    for groups larger than a chunk, one group at a time with its mean gradient accumulated over chunks. The K
    gradients themselves (``K x |params|``, what the span projection needs) are always held.
    """
    group_size = groups["keys"].shape[1]

    def group_loss(params: Params, group: Mapping[str, Any], key: jax.Array) -> jax.Array:
        del key  # each member of the group carries its own example key
        return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, group["examples"], group["keys"]))

    group_keys = groups["keys"][:, 0]  # one (unused) key per group, for the common per-example signature
    if chunk_size is None or chunk_size >= group_size:
        groups_per_chunk = None if chunk_size is None else chunk_size // group_size
        return per_example.per_example_grads(group_loss, params, groups, group_keys, chunk_size=groups_per_chunk)

    def group_grad(group: Mapping[str, Any]) -> Params:
        return losses_and_mean_grad(loss_fn, params, group["examples"], group["keys"], chunk_size)[1]

    return jax.lax.map(group_grad, groups)


def sa_span_rule(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
    groups = _retain_groups(inputs, num_groups=hparams["num_directions"])
    ascent = _negate(inputs.forget_grad)
    as_tree = inputs.unravel or (lambda tree: tree)

    def project(loss_fn: LossFn, params: Params) -> Params:
        directions = _group_grads(loss_fn, params, groups, inputs.chunk_size)
        return off_span_projection(as_tree(ascent), directions, only_on_conflict=hparams["only_on_conflict"])

    # On the parameter tree as a whole: with the K group gradients raveled into one [K, n] array XLA:CPU fused the
    # concatenation into every consumer (the projection took 33.7 ms against 23.5 ms leaf by leaf, protocol VAE).
    update = on_parameter_tree(inputs, project)
    return Direction(update, changed(ascent, update), zero_diagnostic())


def _mean_hessian_vector_product(
    loss_fn: LossFn, params: Params, batch: Batch, keys: jax.Array, vector: Params, chunk_size: int | None
) -> Params:
    """``H v`` with ``H`` the Hessian of ``mean_i l(x_i)``: forward-over-reverse, summed ``chunk_size`` examples at
    a time (:func:`gsu_jax.per_example.sum_over_chunks`), so the activations of one chunk are held."""

    def chunk_hvp(chunk: tuple[Batch, jax.Array]) -> Params:
        batch_chunk, keys_chunk = chunk

        def summed_grad(p: Params) -> Params:
            return jax.grad(lambda q: jnp.sum(jax.vmap(loss_fn, in_axes=(None, 0, 0))(q, batch_chunk, keys_chunk)))(p)

        return jax.jvp(summed_grad, (params,), (vector,))[1]

    total = per_example.sum_over_chunks(chunk_hvp, (batch, keys), chunk_size=chunk_size)
    return jax.tree.map(lambda leaf: leaf / batch_size(batch), total)


_UNO_SUMMED_WEIGHT = 1e3


def uno_orthogonality_weight(weight: float | None, retain_batch_size: int) -> float:
    """The ``lambda`` UNO uses: ``weight``, or ``1e3 / B_r`` (the reference's weight on summed losses) when None."""
    return _UNO_SUMMED_WEIGHT / retain_batch_size if weight is None else float(weight)


def uno_rule(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
    """``grad_theta [L_r(theta) + lambda cos^2(grad L_f(theta), grad L_r(theta))]``: nested ``jax.grad``.

    With the step's ``chunk_size`` the same gradient comes from the chain rule instead of differentiating through
    the (chunked) gradients: with ``(a, b) = grad_{(g_f, g_r)} lambda cos^2(g_f, g_r)`` and the Hessians ``H_f``,
    ``H_r`` of ``L_f``, ``L_r`` (symmetric), ``u = g_r + H_f a + H_r b``, each Hessian-vector product accumulated
    over chunks, so no pass holds more than ``chunk_size`` examples' activations.
    """
    loss_fn = inputs.loss_fn
    weight = uno_orthogonality_weight(
        hparams["orthogonality_weight"], inputs.retain_keys.shape[0]
    )  # one key per example
    if inputs.chunk_size is not None:
        forget_cotangent, retain_cotangent = jax.grad(
            lambda g_f, g_r: weight * jnp.square(cosine(g_f, g_r)), argnums=(0, 1)
        )(inputs.forget_grad, inputs.retain_grad)
        forget_part = _mean_hessian_vector_product(
            loss_fn, inputs.params, inputs.forget_batch, inputs.forget_keys, forget_cotangent, inputs.chunk_size
        )
        retain_part = _mean_hessian_vector_product(
            loss_fn, inputs.params, inputs.retain_batch, inputs.retain_keys, retain_cotangent, inputs.chunk_size
        )
        update = jax.tree.map(lambda g, f, r: g + f + r, inputs.retain_grad, forget_part, retain_part)
        return Direction(update, zero_diagnostic(), zero_diagnostic())

    def mean_loss(params: Params, batch: Batch, keys: jax.Array) -> jax.Array:
        return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, batch, keys))

    def objective(params: Params) -> jax.Array:
        retain_loss, retain_grad = jax.value_and_grad(mean_loss)(params, inputs.retain_batch, inputs.retain_keys)
        forget_grad = jax.grad(mean_loss)(params, inputs.forget_batch, inputs.forget_keys)
        return retain_loss + weight * jnp.square(cosine(forget_grad, retain_grad))

    return Direction(jax.grad(objective)(inputs.params), zero_diagnostic(), zero_diagnostic())


def alternate(even: DirectionRule, odd: DirectionRule) -> DirectionRule:
    """``even`` on steps 0, 2, 4, ... and ``odd`` on 1, 3, ... (``lax.cond``: only one branch runs)."""

    def rule(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
        return jax.lax.cond(inputs.step % 2 == 0, lambda: even(inputs, hparams), lambda: odd(inputs, hparams))

    return rule
