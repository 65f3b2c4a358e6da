"""Unlearning methods: one registry, one pure step, any optax optimizer, any per-example loss.

Every method is a rule that turns the gradients of two batch losses into ONE update direction ``u``, which the
optimizer then *descends* (``params <- params + optimizer(u)``, so plain SGD does ``params - lr * u``). Notation
(after Bae, Kim, Jung & Lim, "Gradient Surgery for One-shot Unlearning on Generative Model", 2023, arXiv:2307.04550,
the method this project reimplements): ``l(x)`` is the per-example loss (``LossFn``), ``L_f`` / ``L_r`` the mean
loss over the forget / retain batch, ``g_f = grad L_f`` and ``g_r = grad L_r``, ``P_v(a) = a - (<a, v> / ||v||^2)
v`` the projection onto the normal plane of ``v`` and ``P^c_v`` the same projection applied only on conflict
(``<a, v> < 0``). Inner products run over the whole parameter pytree.

============================ ================================================================= ==================
name                         update direction ``u`` (descended)                                projection
============================ ================================================================= ==================
``sa``                       ``P_{g_r}(-g_f)``                                                 always
``sa_conflict``              ``P^c_{g_r}(-g_f)``                                               on conflict
``sa_per_example``           ``mean_i P^(c)_{g_r}(-grad l(x_i))`` (jvp/vjp, no B gradients)   per example
``sa_span``                  ``-g_f`` minus its least-squares part in ``span{G_1..G_K}``,      span
                             ``G_k`` = mean gradient of the k-th of K groups of the retain batch
``pcgrad``                   ``P^c_{g_r}(-g_f) + P^c_{-g_f}(g_r)``                              on conflict
``s``                        ``P_{g_f}(g_r) = g_r - (<g_f, g_r> / ||g_f||^2) g_f``             always
``ascent``                   ``-g_f``                                                          none
``ascent_descent``           even steps ``-g_f``, odd steps ``g_r``                           none
``retain_finetune``          ``g_r``                                                           none
``uno``                      ``grad [L_r + lambda cos^2(g_f, g_r)]`` (gradient of a gradient)  none
``uno_s``                    even steps ``uno``, odd steps ``s``                              alternating
``sa_gated`` (ours)          ``mean_i w_i P^c_{g_r}(-grad l(x_i)) + (1 - mean_i w_i) g_r``,    per example
                             ``w_i = 1[l(x_i) < target]`` (``combine='fill'``, the default)
``remap_surgery`` (ours,     ``a_t P^c_{M g_r}(M g_s) + rho g_r``, ``g_s = grad mean_i            on conflict
recommended)                 l(x_i -> n(x_i))``: each forget example reconstructs its nearest
                             retained image ``n(x_i)``; ``M`` the decoder; ``a_t`` annealed
``salun`` (SalUn)            ``m * clip(g_c' + alpha g_r)``: ``g_c'`` the gradient of the          none
                             random-label loss (prediction under the forget label pulled to
                             the model's own under a retained label), ``m`` the top-50 %
                             saliency mask of ``|g_f|`` fixed at the first step
``selective_amnesia``        ``clip(g_n + gamma g_r + 2 lambda F (theta - theta*))``: ``g_n``     none
(Selective Amnesia)          the gradient of the forget examples mapped to uniform noise,
                             ``F`` the retain Fisher and ``theta*`` fixed at the first step
``*_surgery`` of both        the forget part projected off ``g_r`` before the rest                on conflict
============================ ================================================================= ==================

``METHODS[name]`` (:mod:`gsu_jax.method_registry`) holds each rule's one-line statement, its source, its
hyperparameters with defaults and where the guidance add-on enters; the rules themselves are in
:mod:`gsu_jax.update_rules` (``sa_gated``, ours, explained there), :mod:`gsu_jax.remap_surgery` (the recommended
method, :data:`RECOMMENDED_METHOD`, explained there) and :mod:`gsu_jax.published_rules` (SalUn and Selective
Amnesia, with where ours differs from their code). Those two fix a state at their first step (a mask; an anchor
and its Fisher): :class:`MethodState` carries it, so the step signature is the same for every method. This module builds the step and re-exports the registry. Build
a method with :func:`make_method`; its ``step`` is pure and meant to be jitted once::

    method = make_method("sa", loss_fn=loss_fn, optimizer=optax.adam(1e-3))
    opt_state = method.init(params)
    step = jax.jit(method.step)
    params, opt_state, metrics = step(params, opt_state, forget_batch, retain_batch, key)

**Where the projection happens.** Every projection is one of the pure functions of :mod:`gsu_jax.projections`
(``normal_plane_projection``, ``off_span_projection``) or :func:`gsu_jax.per_example.per_example_projected_mean`,
applied to the raw gradients; the result goes to the optimizer. This is the maths of the optax transforms
(:func:`gsu_jax.project_normal_plane` wraps ``normal_plane_projection``), but not a chain
``optax.chain(project_normal_plane(), optimizer)``: the guidance gradient must be added *after* the projection
(below) and some rules need two projections (``pcgrad``) or none, so one code path serves them all. The order is the
same as in the chain (projection first, before any scaling or momentum).

**Guidance add-on** (any method). With ``guidance_weight = w > 0`` and ``guidance_loss(params, key) -> f32[]``,
the step descends ``u + w * grad guidance_loss`` (after the method's projection, never projected itself). Why after:
the projection protects the retained loss from the *forget ascent*; the guidance term is a separate objective that
is descended like any loss term (UNO's reference adds it to the loss), so ``w`` means the same for every method and
a guided step is exactly "method + w * gradient of the guidance loss". Adding it before the projection would let
the retain gradient cancel part of it (and, for ascent rules, ascend it). This differs from the reference code,
which adds the term to both ``L_f`` and ``L_r`` before its projection; a guided result must be labelled as guided.

**Keys.** ``forget_key, retain_key, guidance_key = jax.random.split(key, 3)`` and one key per example
(``jax.random.split(forget_key, B_f)``, as :func:`gsu_jax.losses.example_keys`); :func:`split_step_keys` returns
exactly the keys a step uses, so results can be reproduced outside it.

**Metrics** (all ``f32[]``): ``forget_loss`` and ``retain_loss`` (``L_f``, ``L_r`` before the step),
``cos_forget_retain`` (``cos(g_f, g_r)``; absent for ``ascent``, ``retain_finetune`` and ``remap_surgery``, whose
step computes only the gradient its rule reads, :attr:`Method.gradients`), ``projected`` (1 if the projection
removed a component; for per-example rules the fraction of examples projected), ``gated_fraction`` (share of
forget examples gated out; 0 for ungated rules), ``update_norm`` (``||u||``, guidance included), and ``guidance_loss`` when guidance is on.

**One flat vector.** By default the step runs on the raveled parameter vector (``flat_parameters`` of
:func:`make_method`): rules see ``StepInputs.params`` and the gradients as one array, and the optimizer gets the
update unravelled into the parameter pytree, so its state keeps the pytree's structure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from gsu_jax import per_example
from gsu_jax.losses import GuidanceLossFn, LossFn, batch_size
from gsu_jax.method_registry import (
    METHODS,
    RECOMMENDED_METHOD,
    REQUIRED,
    Method,
    is_nonnegative_finite,
    is_positive_int,
    resolve_hparams,
)
from gsu_jax.remap_surgery import balanced_retained_images, nearest_retained_images
from gsu_jax.trees import tree_add_scaled, tree_norm
from gsu_jax.update_rules import (
    Batch,
    Direction,
    DirectionRule,
    Params,
    StepInputs,
    cosine,
    losses_and_mean_grad,
    uno_orthogonality_weight,
)

__all__ = [
    "METHODS",
    "RECOMMENDED_METHOD",
    "REQUIRED",
    "Direction",
    "DirectionRule",
    "Method",
    "MethodState",
    "StepInputs",
    "UnlearningMethod",
    "balanced_retained_images",
    "chunk_size_for_budget",
    "make_method",
    "nearest_retained_images",
    "resolve_hparams",
    "split_step_keys",
    "step_temp_bytes",
    "uno_orthogonality_weight",
]

Metrics = dict[str, jax.Array]


class MethodState(NamedTuple):
    """What :meth:`UnlearningMethod.init` returns and ``step`` threads through.

    Attributes:
      step: ``i32[]``, number of steps applied so far; alternating rules read its parity, which keeps ``step`` pure.
      optimizer: the wrapped optax optimizer's state.
      rule: the rule's fixed state (:class:`gsu_jax.update_rules.RuleState`: zeros until the first step computes
        it), in the step's parameter layout; ``()`` for a rule without one.
    """

    step: jax.Array
    optimizer: optax.OptState
    rule: Any = ()


class UnlearningMethod(NamedTuple):
    """A built method: ``init(params) -> MethodState``, ``step(params, state, forget, retain, key)``.

    ``step(params, state, forget_batch, retain_batch, key) -> (params, state, metrics)`` is a pure function of
    arrays (jit it once; batches of fixed shapes never retrace).
    """

    init: Callable[[Params], MethodState]
    step: Callable[[Params, MethodState, Batch, Batch, jax.Array], tuple[Params, MethodState, Metrics]]


# ------------------------------------------------------------------------------------------------- the step


def _one_float_dtype(params: Params) -> bool:
    """Whether every leaf has the same floating dtype (what a flat vector can hold without casts)."""
    dtypes = {jnp.result_type(leaf) for leaf in jax.tree.leaves(params)}
    return len(dtypes) == 1 and jnp.issubdtype(next(iter(dtypes)), jnp.floating)


def _on_vector(loss_fn: LossFn, unravel: Callable[[jax.Array], Params]) -> LossFn:
    """``loss_fn`` as a function of the flat parameter vector."""

    def loss(vector: jax.Array, example: Any, key: jax.Array) -> jax.Array:
        return loss_fn(unravel(vector), example, key)

    return loss


def split_step_keys(key: jax.Array, forget_batch: Batch, retain_batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The keys one step uses: ``(forget_keys key[B_f], retain_keys key[B_r], guidance_key)``.

    ``forget_key, retain_key, guidance_key = jax.random.split(key, 3)``, then one key per example with
    ``jax.random.split(forget_key, B_f)`` (resp. ``retain_key``).
    """
    forget_key, retain_key, guidance_key = jax.random.split(key, 3)
    forget_keys = jax.random.split(forget_key, batch_size(forget_batch))
    retain_keys = jax.random.split(retain_key, batch_size(retain_batch))
    return forget_keys, retain_keys, guidance_key


# 81 lines of code: the argument checks (each a one-line refusal before any tracing) and the one step every
# method shares; the rule itself lives in the registry record.
def make_method(
    name: str,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    guidance_loss: GuidanceLossFn | None = None,
    guidance_weight: float = 0.0,
    chunk_size: int | None = None,
    flat_parameters: bool = True,
    **hparams: Any,
) -> UnlearningMethod:
    """Builds the unlearning method ``name`` (a key of :data:`METHODS`) for a per-example loss and an optimizer.

    The step computes, once, ``l(x_i)`` on the forget batch and ``L_r`` on the retain batch and the gradients
    ``g_f``, ``g_r`` that the method's rule reads (:attr:`Method.gradients`; keys from :func:`split_step_keys`),
    lets the method's rule turn them into the update direction ``u`` (table in the module docstring), adds ``guidance_weight * grad guidance_loss(params,
    guidance_key)`` when guidance is on, and applies ``optimizer`` to ``u`` (descending it).

    Args:
      name: the method (``sorted(METHODS)`` lists them).
      loss_fn: ``loss_fn(params, example, key) -> f32[]``, the loss of ONE example.
      optimizer: any optax gradient transformation (e.g. ``optax.adam(1e-3)``, the protocol's).
      guidance_loss: optional ``guidance_loss(params, key) -> f32[]`` (e.g.
        :func:`gsu_jax.losses.uniformity_guidance_loss`).
      guidance_weight: ``w >= 0``; ``w > 0`` needs ``guidance_loss``.
      chunk_size: a step option, not a hyperparameter (it never changes the update beyond float rounding):
        ``None`` (default) differentiates each batch at once; an int ``c >= 1`` bounds the activation memory of
        every pass over a batch to ``c`` examples: the mean gradients ``g_f``, ``g_r`` (and the per-example
        losses), the per-example projections and directional derivatives (``sa_per_example``, ``sa_gated``), the
        group gradients of ``sa_span`` and UNO's gradient of a gradient (chain rule with chunked Hessian-vector
        products) are each accumulated over ``ceil(B / c)`` chunks with ``jax.lax.scan``. ``B`` need not be a
        multiple of ``c`` (the remainder is one shorter chunk); every example keeps its own key, so the step
        equals the unchunked one to float32 rounding. ``c`` at least both batch sizes is exactly (bit for bit) the
        unchunked step.
        Memory that does not scale with ``c`` remains: parameters, optimizer state, the batches, and ``sa_span``'s
        ``K x |params|`` group gradients. :func:`chunk_size_for_budget` picks ``c`` from a byte budget.
      flat_parameters: a step option too (results equal to float32 rounding). ``True`` (default): when every
        parameter leaf has one floating dtype, the step ravels the parameters once
        (:func:`jax.flatten_util.ravel_pytree`), differentiates the losses with respect to that one vector, runs
        the rule's inner products, norms and projections as single vector operations and unravels the update once
        for the optimizer (which keeps the pytree and its state). Why: a tree operation is one small kernel per
        leaf; on the protocol VAE the flat ``s`` step launches 176 XLA kernels where the leaf-by-leaf one launched
        362, and the per-batch surgery steps take about 1 ms (8 %) less on the 2-core CPU (``sa`` 13.2 -> 12.0 ms),
        more where kernel launches cost (GPUs). ``False``: everything stays a pytree (what a mesh that splits
        parameters over a ``model`` axis needs: the flat vector would gather them).
      **hparams: the method's hyperparameters (``METHODS[name].hparams``).

    Returns:
      ``UnlearningMethod(init, step)``: ``init(params) -> MethodState`` and the pure
      ``step(params, state, forget_batch, retain_batch, key) -> (params, state, metrics)``.

    Raises:
      ValueError: unknown method, bad hyperparameter, negative or non-finite ``guidance_weight``, guidance
        without a ``guidance_loss``, or ``chunk_size < 1`` (all before any work).
      TypeError: ``loss_fn``/``guidance_loss`` not callable, ``optimizer`` not an optax transformation,
        ``chunk_size`` neither None nor an int, or ``flat_parameters`` not a bool.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> def loss_fn(params, example, key):  # a 1-d Gaussian with a learnt mean
      ...     return 0.5 * jnp.square(example["x"] - params["mean"])
      >>> method = make_method("sa", loss_fn=loss_fn, optimizer=optax.sgd(0.1))
      >>> params = {"mean": jnp.zeros(2)}
      >>> forget = {"x": jnp.array([[1.0, 0.0], [1.0, 0.2]])}
      >>> retain = {"x": jnp.array([[0.0, 1.0], [0.2, 1.0]])}
      >>> step = jax.jit(method.step)
      >>> params, state, metrics = step(params, method.init(params), forget, retain, jax.random.key(0))
      >>> sorted(metrics)
      ['cos_forget_retain', 'forget_loss', 'gated_fraction', 'projected', 'retain_loss', 'update_norm']
    """
    resolved = resolve_hparams(name, **hparams)
    per_example.check_chunk_size(chunk_size)
    chunk_size = None if chunk_size is None else int(chunk_size)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (params, example, key) -> f32[], got {loss_fn!r}")
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}")
    if not is_nonnegative_finite(guidance_weight):
        raise ValueError(f"guidance_weight must be a finite number >= 0, got {guidance_weight!r}")
    if guidance_loss is not None and not callable(guidance_loss):
        raise TypeError(f"guidance_loss must be callable (params, key) -> f32[], got {guidance_loss!r}")
    if not isinstance(flat_parameters, bool):
        raise TypeError(f"flat_parameters must be True or False, got {flat_parameters!r}")
    if guidance_weight > 0 and guidance_loss is None:
        raise ValueError(
            f"guidance_weight={guidance_weight} needs a guidance_loss(params, key); allowed: guidance_weight=0 "
            "without one, or pass guidance_loss"
        )
    guided = guidance_weight > 0
    guidance_weight = float(guidance_weight)
    rule, gradients, state_spec = METHODS[name].direction, METHODS[name].gradients, METHODS[name].state

    def init(params: Params) -> MethodState:
        fixed = ()
        if state_spec is not None:
            # The layout the step will see (flat exactly when the step ravels).
            layout = ravel_pytree(params)[0] if flat_parameters and _one_float_dtype(params) else params
            fixed = state_spec.template(layout)
        return MethodState(step=jnp.zeros((), jnp.int32), optimizer=optimizer.init(params), rule=fixed)

    def step(
        params: Params, state: MethodState, forget_batch: Batch, retain_batch: Batch, key: jax.Array
    ) -> tuple[Params, MethodState, Metrics]:
        forget_keys, retain_keys, guidance_key = split_step_keys(key, forget_batch, retain_batch)
        # A chunk holding both batches is the unchunked computation (bit-identical to chunk_size=None).
        chunk = chunk_size
        if chunk is not None and chunk >= max(batch_size(forget_batch), batch_size(retain_batch)):
            chunk = None
        vector, unravel = ravel_pytree(params) if flat_parameters and _one_float_dtype(params) else (params, None)
        step_loss = loss_fn if unravel is None else _on_vector(loss_fn, unravel)

        def losses_and_grad(batch: Batch, keys: jax.Array, role: str) -> tuple[jax.Array, Params | None]:
            if role in gradients:
                return losses_and_mean_grad(step_loss, vector, batch, keys, chunk)
            return per_example.map_over_chunks(
                lambda part: per_example.per_example_losses(step_loss, vector, *part), (batch, keys), chunk_size=chunk
            ), None

        forget_losses, forget_grad = losses_and_grad(forget_batch, forget_keys, "forget")
        retain_losses, retain_grad = losses_and_grad(retain_batch, retain_keys, "retain")
        inputs = StepInputs(
            loss_fn=step_loss,
            params=vector,
            step=state.step,
            forget_batch=forget_batch,
            retain_batch=retain_batch,
            forget_keys=forget_keys,
            retain_keys=retain_keys,
            forget_losses=forget_losses,
            forget_grad=forget_grad,
            retain_grad=retain_grad,
            chunk_size=chunk,
            unravel=unravel,
            rule_state=state.rule,
        )
        if state_spec is not None:
            # Fixed at the first step, from theta* and that step's batches; later steps carry it unchanged.
            fixed = jax.lax.cond(state.step == 0, lambda: state_spec.compute(inputs, resolved), lambda: state.rule)
            inputs = inputs._replace(rule_state=fixed)
        direction = rule(inputs, resolved)
        update = direction.update
        metrics = {}
        if guided:
            guidance_of_vector = guidance_loss if unravel is None else (lambda v, k: guidance_loss(unravel(v), k))
            guidance_value, guidance_grad = jax.value_and_grad(guidance_of_vector)(vector, guidance_key)
            update = tree_add_scaled(update, guidance_grad, guidance_weight)
            metrics["guidance_loss"] = guidance_value.astype(jnp.float32)
        update_norm = tree_norm(update).astype(jnp.float32)
        if unravel is not None:
            update = unravel(update)
        updates, optimizer_state = optimizer.update(update, state.optimizer, params)
        new_params = optax.apply_updates(params, updates)
        metrics.update(
            forget_loss=jnp.mean(forget_losses).astype(jnp.float32),
            retain_loss=jnp.mean(retain_losses).astype(jnp.float32),
            projected=direction.projected.astype(jnp.float32),
            gated_fraction=direction.gated_fraction.astype(jnp.float32),
            update_norm=update_norm,
        )
        if forget_grad is not None and retain_grad is not None:
            metrics["cos_forget_retain"] = cosine(forget_grad, retain_grad).astype(jnp.float32)
        new_state = MethodState(step=state.step + 1, optimizer=optimizer_state, rule=inputs.rule_state)
        return new_params, new_state, metrics

    return UnlearningMethod(init=init, step=step)


# ------------------------------------------------------------------------------------------- memory budget


def _abstract(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` of every leaf (arrays, numpy arrays or structs already), for compiling only."""
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf)), tree)


def step_temp_bytes(method: UnlearningMethod, params: Params, forget_batch: Batch, retain_batch: Batch) -> int:
    """Bytes of temporaries XLA assigns to one compiled ``method.step`` (arguments and outputs excluded).

    The step is compiled for the shapes of its arguments, never run (arrays or ``jax.ShapeDtypeStruct``
    accepted). This is ``compiled.memory_analysis().temp_size_in_bytes``: the working memory the step needs
    beyond its inputs and outputs, where the activations of the per-example passes live.

    Raises:
      RuntimeError: the backend reports no memory analysis.
    """
    abstract_params = _abstract(params)
    state = jax.eval_shape(method.init, abstract_params)
    compiled = (
        jax.jit(method.step)
        .lower(abstract_params, state, _abstract(forget_batch), _abstract(retain_batch), jax.random.key(0))
        .compile()
    )
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise RuntimeError(f"the {jax.default_backend()} backend reports no memory analysis of a compiled step")
    return int(analysis.temp_size_in_bytes)


def chunk_size_for_budget(
    name: str,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    params: Params,
    forget_batch: Batch,
    retain_batch: Batch,
    budget_bytes: int,
    guidance_loss: GuidanceLossFn | None = None,
    guidance_weight: float = 0.0,
    **hparams: Any,
) -> int | None:
    """The ``chunk_size`` for :func:`make_method` whose step fits ``budget_bytes`` of temporaries.

    Compiles (never runs) the step for the given shapes: ``None`` when the unchunked step's
    :func:`step_temp_bytes` is within the budget, otherwise the largest power of two ``c`` below the larger batch
    whose chunked step is (bisection over the exponents: about ``log2(log2 B)`` + 2 compilations; the temporary
    memory grows with ``c``). Parameters, optimizer state and batches are not counted: they are the step's
    arguments.

    Args:
      name, loss_fn, optimizer, guidance_loss, guidance_weight, **hparams: as for :func:`make_method`.
      params, forget_batch, retain_batch: arrays or ``jax.ShapeDtypeStruct`` of the step's shapes.
      budget_bytes: the most bytes of temporaries allowed (> 0).

    Returns:
      ``None`` (no chunking needed) or the chunk size.

    Raises:
      ValueError: ``budget_bytes`` not a positive integer, or even ``chunk_size=1`` exceeds it (the message gives
        that step's bytes); the refusals of :func:`make_method`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> def loss_fn(params, example, key):
      ...     return jnp.sum(jnp.tanh(example["x"] @ params["w"]) ** 2)
      >>> params = {"w": jnp.ones((64, 64))}
      >>> batch = {"x": jax.ShapeDtypeStruct((256, 64), jnp.float32)}
      >>> chunk_size_for_budget("sa", loss_fn=loss_fn, optimizer=optax.sgd(0.1), params=params,
      ...                       forget_batch=batch, retain_batch=batch, budget_bytes=1 << 30) is None
      True
    """
    if not is_positive_int(budget_bytes):
        raise ValueError(f"budget_bytes must be an integer > 0, got {budget_bytes!r}")

    def temp_bytes(chunk_size: int | None) -> int:
        method = make_method(
            name,
            loss_fn=loss_fn,
            optimizer=optimizer,
            guidance_loss=guidance_loss,
            guidance_weight=guidance_weight,
            chunk_size=chunk_size,
            **hparams,
        )
        return step_temp_bytes(method, params, forget_batch, retain_batch)

    if temp_bytes(None) <= budget_bytes:
        return None
    smallest = temp_bytes(1)
    if smallest > budget_bytes:
        raise ValueError(
            f"method {name!r} needs {smallest} bytes of temporaries even with chunk_size=1, over "
            f"budget_bytes={budget_bytes}; allowed: a budget of at least {smallest} bytes"
        )
    largest = max(batch_size(forget_batch), batch_size(retain_batch))
    low, high = 0, max(0, math.ceil(math.log2(largest)) - 1)  # 2**low fits; find the largest exponent that fits
    while low < high:
        middle = (low + high + 1) // 2
        if temp_bytes(2**middle) <= budget_bytes:
            low = middle
        else:
            high = middle - 1
    return 2**low
