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
============================ ================================================================= ==================

``METHODS[name]`` holds each rule's one-line statement, its source, its hyperparameters with defaults and where
the guidance add-on enters. Build one with :func:`make_method`; its ``step`` is pure and meant to be jitted once::

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

**Our method, ``sa_gated``** (not from the paper): ascent that knows when it has forgotten. Each forget example
ascends (per-example SA, projected off ``g_r`` on conflict) only while its loss is below ``forget_loss_target``,
e.g. the loss a model retrained without the forget set has on it; an example at or above it is gated out and its
``1/B`` share of the step goes to retain descent (``combine='fill'``), so a fully gated step is plain descent on
``L_r``. Why the fill: with Adam a zero update does not stop the parameters (the first moment keeps them moving
along the last ascent direction for tens of steps), so "stop ascending" must be an active retain step.
``ascend_only`` (a regex over parameter paths, e.g. ``'decoder'``) restricts the ascent to the generator: the
negative ELBO can be raised cheaply through the encoder alone (a worse posterior) without changing what the
decoder generates. Measured on the embedded digits (MLP VAE, Adam, 3 seeds, 30 steps, forget digit 1, auto
threshold on 1024 samples; a first measurement, ``unlearn.py`` produces the full tables): with ``ascend_only='decoder'`` and
``combine='fill'`` the FID no longer drifts after the stop, where ``sa`` keeps degrading (latent 16, lr 3e-3:
``sa_gated`` FID at the end 13.7-16.6 against the original's 21.2; latent 2, both at lr 3e-3: 46-59 against
``sa``'s 266-1039).
The target sets the speed and is model-dependent: at latent 16 the oracle's own forget loss closes the gate before
the generated forget fraction reaches the threshold (1 of 3 seeds stopped within 30 steps), ``oracle + (oracle - original)`` stops
in 3-5 steps with FID below the original's at the stop and at the end; at latent 2 the oracle's level stops in 3-4
steps (FID +12-32% at the stop, where the oracle itself is +28%) and twice the gap degrades the end FID.

**The recommended method, ``remap_surgery``** (:data:`RECOMMENDED_METHOD`; ours). Ascent (``sa`` and its
variants) maximises a loss that has no maximum, so after the forget point it keeps going and wrecks the model;
the gentle rules (``s``, ``uno``) never forget. ``remap_surgery`` instead *descends* a bounded surrogate: each forget
example ``x_i`` is encoded as usual but must reconstruct ``n(x_i)``, the retained image nearest to it in pixel space
(within the step's retain batch, :func:`nearest_retained_images`), so the generator learns to draw a retained
image wherever it drew the forgotten class, and the surrogate has a minimum to stop at. Training the generator
towards a surrogate in place of the forgotten data is the idea of Selective Amnesia (Heng & Soh, "Selective Amnesia:
A Continual Learning Approach to Forgetting in Deep Generative Models", 2023, arXiv:2305.10120, whose surrogate is
noise or another class); here the surrogate is the nearest retained image and the retained data is protected by
gradient surgery instead of replay and a Fisher penalty. Only the decoder follows it
(``forget_only='decoder'``: the encoder could lower the surrogate by moving the posterior instead of changing what
the prior decodes to). Its gradient ``g_s`` is projected off the (decoder part of the) retain gradient on conflict,
weighted by ``a_t = forget_weight * 2^(-t / forget_half_life)`` (annealed: once the class is gone the step becomes
retain descent, which repairs what the pull cost) and added to ``retain_weight * g_r``. It reads the forget and
retain batches only: no oracle, no classifier (``+guided`` adds the guidance term like any method). The README's
ablation table measures each of these choices; ``gate`` and ``saliency`` (a SalUn-style mask: Fan et al., "SalUn:
Empowering Machine Unlearning via Gradient-based Weight Saliency in Both Image Classification and Generation", 2024,
arXiv:2310.12508) are measured options that are off by default because they did not help.

**Metrics** (all ``f32[]``): ``forget_loss`` and ``retain_loss`` (``L_f``, ``L_r`` before the step),
``cos_forget_retain`` (``cos(g_f, g_r)``), ``projected`` (1 if the projection removed a component; for per-example
rules the fraction of examples projected), ``gated_fraction`` (share of forget examples gated out; 0 for ungated
rules), ``update_norm`` (``||u||``, guidance included), and ``guidance_loss`` when guidance is on. Both gradients
are always computed because the metrics need them, so ``ascent`` and ``retain_finetune`` pay for the second one.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gsu_jax import per_example
from gsu_jax.losses import GuidanceLossFn, LossFn, batch_size
from gsu_jax.projections import normal_plane_projection, off_span_projection
from gsu_jax.trees import tree_add_scaled, tree_max_abs, tree_norm, tree_squared_norm, tree_vdot

Params = Any  # a pytree of arrays (an nnx.State)
Batch = Any  # the per-example pytree with a leading axis B
Metrics = dict[str, jax.Array]

# Floor under squared norms in cosines (UNO's cos^2 and the cos metric): keeps zero gradients finite without
# changing any cosine of gradients whose squared norms exceed ~1e-20.
_NORM_FLOOR = 1e-24


class MethodState(NamedTuple):
    """What :meth:`UnlearningMethod.init` returns and ``step`` threads through.

    Attributes:
      step: ``i32[]``, number of steps applied so far; alternating rules read its parity, which keeps ``step`` pure.
      optimizer: the wrapped optax optimizer's state.
    """

    step: jax.Array
    optimizer: optax.OptState


class UnlearningMethod(NamedTuple):
    """A built method: ``init(params) -> MethodState``, ``step(params, state, forget, retain, key)``.

    ``step(params, state, forget_batch, retain_batch, key) -> (params, state, metrics)`` is a pure function of
    arrays (jit it once; batches of fixed shapes never retrace).
    """

    init: Callable[[Params], MethodState]
    step: Callable[[Params, MethodState, Batch, Batch, jax.Array], tuple[Params, MethodState, Metrics]]


class StepInputs(NamedTuple):
    """Everything a direction rule may read (shared work done once per step by :func:`make_method`'s step).

    Attributes:
      loss_fn: the per-example loss.
      params: current parameters.
      step: ``i32[]`` steps applied so far.
      forget_batch, retain_batch: the two batches (leading axes ``B_f``, ``B_r``).
      forget_keys, retain_keys: ``key[B_f]``, ``key[B_r]``, one per example.
      forget_losses: ``f32[B_f]``, the per-example forget losses ``l(x_i)``.
      forget_grad, retain_grad: ``g_f``, ``g_r`` (trees like ``params``).
      chunk_size: examples processed at once by every pass over a batch (``None``: whole batches), the
        :func:`make_method` step option.
    """

    loss_fn: LossFn
    params: Params
    step: jax.Array
    forget_batch: Batch
    retain_batch: Batch
    forget_keys: jax.Array
    retain_keys: jax.Array
    forget_losses: jax.Array
    forget_grad: Params
    retain_grad: Params
    chunk_size: int | None = None


class Direction(NamedTuple):
    """What a rule returns: the update ``u`` (descended by the optimizer) and two ``f32[]`` diagnostics."""

    update: Params
    projected: jax.Array
    gated_fraction: jax.Array


DirectionRule = Callable[[StepInputs, Mapping[str, Any]], Direction]


class _Required:
    """Marks a hyperparameter without a default (the caller must pass it)."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED = _Required()


@dataclasses.dataclass(frozen=True)
class HParam:
    """One hyperparameter of a method: its default (or :data:`REQUIRED`), what it means and what is allowed.

    Attributes:
      default: the value used when the caller passes none; :data:`REQUIRED` when there is none.
      doc: one line on what it does.
      allowed: the allowed values, in words (quoted by refusals).
      is_valid: predicate on a candidate value.
      convert: turns a valid value into its canonical Python type (e.g. ``np.int64(4)`` -> ``4``, ``3`` -> ``3.0``).
    """

    default: Any
    doc: str
    allowed: str
    is_valid: Callable[[Any], bool]
    convert: Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class Method:
    """A registry record (``METHODS[name]``).

    Attributes:
      name: registry key.
      rule: the update rule in one line (``u`` is descended by the optimizer).
      source: where the rule comes from.
      hparams: hyperparameter name -> :class:`HParam` (defaults in :attr:`defaults`).
      guidance: where the guidance add-on enters for this rule (every method accepts it).
      direction: the rule itself, ``(StepInputs, hparams) -> Direction``.
      learning_rate: the learning rate its defaults were measured with, which ``unlearn.py`` gives it unless
        ``config.method_optimizers`` says otherwise; None: the run's ``config.optimizer`` (the protocol's 1e-3).
    """

    name: str
    rule: str
    source: str
    hparams: Mapping[str, HParam]
    guidance: str
    direction: DirectionRule = dataclasses.field(repr=False)
    learning_rate: float | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        """Hyperparameter name -> default (:data:`REQUIRED` where the caller must pass a value)."""
        return {name: hparam.default for name, hparam in self.hparams.items()}


# ----------------------------------------------------------------------------------------------- tree arithmetic


def _negate(tree: Params) -> Params:
    return jax.tree.map(jnp.negative, tree)


def _cosine(a: Params, b: Params) -> jax.Array:
    return tree_vdot(a, b) * jax.lax.rsqrt(
        jnp.maximum(tree_squared_norm(a), _NORM_FLOOR) * jnp.maximum(tree_squared_norm(b), _NORM_FLOOR)
    )


def _changed(before: Params, after: Params) -> jax.Array:
    """``1.0`` if the projection removed a nonzero component, else ``0.0``."""
    difference = jax.tree.map(jnp.subtract, after, before)
    return (tree_max_abs(difference) > 0).astype(jnp.float32)


# ------------------------------------------------------------------------------------------ two-task PCGrad


def _pcgrad_pair(ascent: Params, retain_grad: Params) -> tuple[Params, jax.Array]:
    """Two-task PCGrad: ``P^c_{g_r}(a) + P^c_{a}(g_r)``, each projected off the *original* other gradient.

    For two tasks the sum has a non-negative inner product with both ``a`` and ``g_r`` (``u.a = ||a||^2 (1 -
    cos^2)`` on conflict), so to first order it ascends the forget loss and descends the retain loss together. A zero
    ``a`` leaves ``g_r`` unchanged (a zero direction removes nothing), so the sum degrades to retain descent.
    """
    ascent_part = normal_plane_projection(ascent, retain_grad, only_on_conflict=True)
    retain_part = normal_plane_projection(retain_grad, ascent, only_on_conflict=True)
    conflict = (tree_vdot(ascent, retain_grad) < 0).astype(jnp.float32)
    return tree_add_scaled(ascent_part, retain_part, 1.0), conflict


# ----------------------------------------------------------------------------------------------- the rules


def _zero() -> jax.Array:
    """The ``f32[]`` diagnostic of a rule that never projects (or never gates)."""
    return jnp.zeros((), jnp.float32)


def _ascent(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
    del hparams
    return Direction(_negate(inputs.forget_grad), _zero(), _zero())


def _retain_finetune(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
    del hparams
    return Direction(inputs.retain_grad, _zero(), _zero())


def _sa_rule(*, only_on_conflict: bool) -> DirectionRule:
    def rule(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
        del hparams
        ascent = _negate(inputs.forget_grad)
        update = normal_plane_projection(ascent, inputs.retain_grad, only_on_conflict=only_on_conflict)
        return Direction(update, _changed(ascent, update), _zero())

    return rule


def _s(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
    del hparams
    update = normal_plane_projection(inputs.retain_grad, inputs.forget_grad, only_on_conflict=False)
    return Direction(update, _changed(inputs.retain_grad, update), _zero())


def _pcgrad(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
    del hparams
    update, conflict = _pcgrad_pair(_negate(inputs.forget_grad), inputs.retain_grad)
    return Direction(update, conflict, _zero())


def _weighted_loss(loss_fn: LossFn) -> LossFn:
    """``(params, {"example": x, "weight": w}, key) -> w * loss_fn(params, x, key)`` (``w`` a constant)."""

    def loss(params: Params, weighted_example: Mapping[str, Any], key: jax.Array) -> jax.Array:
        return weighted_example["weight"] * loss_fn(params, weighted_example["example"], key)

    return loss


def _param_mask(params: Params, pattern: str | None, *, name: str = "ascend_only") -> Params | None:
    """A tree of Python bools like ``params``: True where the leaf's path matches ``pattern`` (``re.search``)."""
    if pattern is None:
        return None
    regex = re.compile(pattern)
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    selected = [bool(regex.search(jax.tree_util.keystr(path))) for path, _ in paths]
    if not any(selected):
        listing = ", ".join(jax.tree_util.keystr(path) for path, _ in paths)
        raise ValueError(f"{name}={pattern!r} matches no parameter; allowed: a regex matching some of {listing}")
    return jax.tree_util.tree_unflatten(treedef, selected)


def _masked_loss(loss_fn: LossFn, mask: Params) -> LossFn:
    """``loss_fn`` differentiable only in the leaves where ``mask`` is True (the others are constants)."""

    def loss(params: Params, example: Any, key: jax.Array) -> jax.Array:
        return loss_fn(jax.tree.map(lambda m, p: p if m else jax.lax.stop_gradient(p), mask, params), example, key)

    return loss


def _masked(tree: Params, mask: Params) -> Params:
    return jax.tree.map(lambda m, leaf: leaf if m else jnp.zeros_like(leaf), mask, tree)


def _gated_ascent(
    inputs: StepInputs, weights: jax.Array, *, only_on_conflict: bool, mask: Params | None = None
) -> Direction:
    """``mean_i w_i P^(c)_{g_r}(-grad l(x_i))`` without materialising per-example gradients.

    The weights enter as a constant factor of each example's loss, ``w_i l(x_i)``, so
    :func:`gsu_jax.per_example.per_example_projected_mean` projects ``-w_i grad l(x_i)``; for ``w_i >= 0`` that is
    ``w_i P^(c)(-grad l(x_i))`` (the conflict test is invariant to positive scaling). ``projected`` is the
    weighted share of examples whose ascent conflicted with ``g_r`` (one extra ``jax.jvp``), or 1 when projecting
    always. With a ``mask`` the gradients are taken in the masked leaves only (zero elsewhere) and projected off
    the masked ``g_r``, which keeps the result orthogonal to the full ``g_r``.
    """
    weights = jax.lax.stop_gradient(weights)
    loss_fn, retain_grad = inputs.loss_fn, inputs.retain_grad
    if mask is not None:
        loss_fn, retain_grad = _masked_loss(loss_fn, mask), _masked(retain_grad, mask)
    update = per_example.per_example_projected_mean(
        _weighted_loss(loss_fn),
        inputs.params,
        {"example": inputs.forget_batch, "weight": weights},
        inputs.forget_keys,
        retain_grad,
        scale=-1.0,
        only_on_conflict=only_on_conflict,
        chunk_size=inputs.chunk_size,
    )
    if only_on_conflict:
        # -grad l(x_i) conflicts with g_r exactly when <grad l(x_i), g_r> > 0.
        derivatives = per_example.per_example_directional_derivatives(
            loss_fn,
            inputs.params,
            inputs.forget_batch,
            inputs.forget_keys,
            retain_grad,
            chunk_size=inputs.chunk_size,
        )
        conflicts = (derivatives > 0).astype(jnp.float32)
        projected = jnp.sum(weights * conflicts) / jnp.maximum(jnp.sum(weights), 1e-12)
    else:
        projected = (jnp.sum(weights) > 0).astype(jnp.float32)
    return Direction(update, projected, 1.0 - jnp.mean(weights))


def _sa_per_example(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
    weights = jnp.ones_like(inputs.forget_losses)
    return _gated_ascent(inputs, weights, only_on_conflict=hparams["only_on_conflict"])


def _forget_gate(losses: jax.Array, *, target: float, temperature: float) -> jax.Array:
    """``w_i = 1[l_i < target]`` (``temperature = 0``) or ``sigmoid((target - l_i) / temperature)``."""
    if temperature == 0.0:
        return (losses < target).astype(jnp.float32)
    return jax.nn.sigmoid((target - losses) / temperature)


def _sa_gated(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
    """Ours: ``sum_i (w_i / B) P^c_{M g_r}(-M grad l(x_i)) + C`` with ``w_i`` the forget gate, ``M`` the mask.

    ``w_i = 1[l(x_i) < target]`` (or ``sigmoid((target - l(x_i)) / temperature)``), ``M`` zeroes the leaves that
    ``ascend_only`` does not match (identity when None) and ``C`` is ``(1 - mean_i w_i) g_r`` for
    ``combine='fill'``, 0 for ``'sa'``; ``'pcgrad'`` instead returns ``P^c_{g_r}(a) + P^c_a(g_r)`` for the gated
    ascent ``a``. With ``target = +inf`` and no mask this is ``sa_per_example``.
    """
    weights = _forget_gate(
        inputs.forget_losses, target=hparams["forget_loss_target"], temperature=hparams["temperature"]
    )
    mask = _param_mask(inputs.params, hparams["ascend_only"])
    gated = _gated_ascent(inputs, weights, only_on_conflict=hparams["only_on_conflict"], mask=mask)
    if hparams["combine"] == "sa":
        return gated
    if hparams["combine"] == "fill":
        # Each gated example hands its 1/B share of the step to retain descent.
        return gated._replace(update=tree_add_scaled(gated.update, inputs.retain_grad, gated.gated_fraction))
    # combine == "pcgrad": the (per-example projected) gated ascent and g_r as two PCGrad tasks.
    update, conflict = _pcgrad_pair(gated.update, inputs.retain_grad)
    return Direction(update, jnp.maximum(gated.projected, conflict), gated.gated_fraction)


def nearest_retained_images(forget_images: jax.Array, retain_images: jax.Array) -> jax.Array:
    """For each forget image, the retain image nearest to it in pixel space (squared Euclidean distance).

    Args:
      forget_images: ``f32[B_f, ...]``.
      retain_images: ``f32[B_r, ...]`` of the same per-example shape.

    Returns:
      ``f32[B_f, ...]``: row ``i`` is ``retain_images[argmin_j ||x_i - r_j||^2]`` (the first on ties).
    """
    flat_forget = forget_images.reshape(forget_images.shape[0], -1)
    flat_retain = retain_images.reshape(retain_images.shape[0], -1)
    # ||x - r||^2 = ||x||^2 - 2 x.r + ||r||^2; the ||x||^2 term does not change the argmin over r.
    distances = jnp.sum(jnp.square(flat_retain), axis=1)[None, :] - 2.0 * flat_forget @ flat_retain.T
    return retain_images[jnp.argmin(distances, axis=1)]


def _remap_surgery(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
    """Ours: ``u = a_t P^(c)_{M g_r}(S(M g_s)) + retain_weight * g_r``, ``g_s`` the gradient of a *bounded* loss.

    ``g_s = grad mean_i w_i l(x_i -> n(x_i))``: each forget example's loss with its reconstruction target replaced
    by ``n(x_i)``, its nearest retained image in the retain batch (:func:`nearest_retained_images`), descended.
    ``M`` restricts it to the leaves matching ``forget_only``; ``w_i = 1`` unless ``gate`` (then ``1[l(x_i -> n_i) >
    l(x_i)]``); ``S`` keeps the ``saliency`` fraction of largest coordinates (identity at 1); the projection follows
    ``projection``; ``a_t = forget_weight * 2^(-t / forget_half_life)`` (constant when the half-life is None).
    """
    mask = _param_mask(inputs.params, hparams["forget_only"], name="forget_only")
    loss_fn, retain_grad = inputs.loss_fn, inputs.retain_grad
    if mask is not None:
        loss_fn, retain_grad = _masked_loss(loss_fn, mask), _masked(retain_grad, mask)
    field = hparams["image_field"]
    if not (isinstance(inputs.forget_batch, Mapping) and field in inputs.forget_batch and field in inputs.retain_batch):
        raise ValueError(
            f"remap_surgery pairs examples by their {field!r} field, which the batches lack; allowed: "
            "batches of mappings holding it (set image_field to the field the loss reconstructs)"
        )
    surrogate = dict(inputs.forget_batch)
    surrogate["target"] = nearest_retained_images(inputs.forget_batch[field], inputs.retain_batch[field])
    if hparams["gate"]:
        # Example i stops pulling once the model reconstructs it at least as well as its surrogate target as
        # itself (same key, so the same reparameterisation noise): it is forgotten, and pulling further would
        # only move the decoder away from what the retained data needs.
        surrogate[_OWN_LOSS] = jax.lax.stop_gradient(inputs.forget_losses)
        loss_fn = _gated_by_own_loss(loss_fn)
    surrogate_losses, surrogate_grad = _losses_and_mean_grad(
        loss_fn, inputs.params, surrogate, inputs.forget_keys, inputs.chunk_size
    )
    gated_fraction = jnp.mean((surrogate_losses == 0.0).astype(jnp.float32)) if hparams["gate"] else _zero()
    if hparams["saliency"] < 1.0:
        surrogate_grad = _most_salient(surrogate_grad, hparams["saliency"])
    if hparams["projection"] == "none":
        update, projected = surrogate_grad, _zero()
    else:
        update = normal_plane_projection(
            surrogate_grad, retain_grad, only_on_conflict=hparams["projection"] == "conflict"
        )
        projected = _changed(surrogate_grad, update)
    forget_weight = hparams["forget_weight"]
    if hparams["forget_half_life"] is not None:
        # Annealing: the pull halves every forget_half_life steps, so after the first few steps (when the forget
        # class is gone from the samples) the update becomes retain descent, which repairs what the pull cost.
        forget_weight = forget_weight * jnp.exp2(-inputs.step.astype(jnp.float32) / hparams["forget_half_life"])
    update = jax.tree.map(lambda s, r: forget_weight * s + hparams["retain_weight"] * r, update, inputs.retain_grad)
    return Direction(update, projected, gated_fraction)


def _most_salient(tree: Params, fraction: float) -> Params:
    """``tree`` with all but its ``fraction`` largest-magnitude nonzero coordinates set to zero (a SalUn-style
    saliency mask, recomputed every step from the surrogate gradient itself; ties at the cut are kept)."""
    magnitudes = jnp.concatenate([jnp.abs(leaf).ravel() for leaf in jax.tree.leaves(tree)])
    nonzero = jnp.sum(magnitudes > 0)
    # The k-th largest magnitude, k = ceil(fraction * number of nonzero coordinates) (masked leaves are zero).
    ordered = jnp.sort(magnitudes)[::-1]
    cut = ordered[jnp.maximum(jnp.ceil(fraction * nonzero).astype(jnp.int32) - 1, 0)]
    return jax.tree.map(lambda leaf: jnp.where(jnp.abs(leaf) >= cut, leaf, 0.0), tree)


_OWN_LOSS = "__own_loss"


def _gated_by_own_loss(loss_fn: LossFn) -> LossFn:
    """``l(x_i -> n_i) * 1[l(x_i -> n_i) > l(x_i)]``, ``l(x_i)`` read from the example's ``_OWN_LOSS`` field."""

    def gated(params: Params, example: Any, key: jax.Array) -> jax.Array:
        own = example[_OWN_LOSS]
        loss = loss_fn(params, {name: value for name, value in example.items() if name != _OWN_LOSS}, key)
        return jnp.where(jax.lax.stop_gradient(loss) > own, loss, 0.0)

    return gated


def _group_mean_grads(inputs: StepInputs, *, num_groups: int) -> Params:
    """``G_k = grad mean_{i in group k} l(x_i)`` for K contiguous equal groups of the retain batch (leading K).

    Uses the retain batch's own per-example keys, so ``mean_k G_k = g_r`` exactly. Computed as the per-example
    gradients of a "group loss" whose one example is a whole group. With the step's ``chunk_size`` at most that
    many examples are differentiated at once: ``chunk_size // group_size`` groups at a time, or, for groups larger
    than a chunk, one group at a time with its mean gradient accumulated over chunks. The K gradients themselves
    (``K x |params|``, what the span projection needs) are always held.
    """
    size = batch_size(inputs.retain_batch)
    if size % num_groups:
        raise ValueError(
            f"sa_span splits the retain batch into num_directions={num_groups} equal groups, but its size {size} "
            f"is not a multiple of {num_groups}; allowed: a divisor of the retain batch size"
        )
    group_size = size // num_groups

    def split(leaf: jax.Array) -> jax.Array:
        return leaf.reshape((num_groups, group_size) + leaf.shape[1:])

    groups = {"examples": jax.tree.map(split, inputs.retain_batch), "keys": split(inputs.retain_keys)}
    loss_fn = inputs.loss_fn

    def group_loss(params: Params, group: Mapping[str, Any], key: jax.Array) -> jax.Array:
        del key  # each member of the group carries its own example key
        return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, group["examples"], group["keys"]))

    group_keys = groups["keys"][:, 0]  # one (unused) key per group, for the common per-example signature
    chunk_size = inputs.chunk_size
    if chunk_size is None or chunk_size >= group_size:
        groups_per_chunk = None if chunk_size is None else chunk_size // group_size
        return per_example.per_example_grads(group_loss, inputs.params, groups, group_keys, chunk_size=groups_per_chunk)

    def group_grad(group: Mapping[str, Any]) -> Params:
        return _losses_and_mean_grad(loss_fn, inputs.params, group["examples"], group["keys"], chunk_size)[1]

    return jax.lax.map(group_grad, groups)


def _sa_span(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
    directions = _group_mean_grads(inputs, num_groups=hparams["num_directions"])
    ascent = _negate(inputs.forget_grad)
    update = off_span_projection(ascent, directions, only_on_conflict=hparams["only_on_conflict"])
    return Direction(update, _changed(ascent, update), _zero())


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


def _uno(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
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
            lambda g_f, g_r: weight * jnp.square(_cosine(g_f, g_r)), argnums=(0, 1)
        )(inputs.forget_grad, inputs.retain_grad)
        forget_part = _mean_hessian_vector_product(
            loss_fn, inputs.params, inputs.forget_batch, inputs.forget_keys, forget_cotangent, inputs.chunk_size
        )
        retain_part = _mean_hessian_vector_product(
            loss_fn, inputs.params, inputs.retain_batch, inputs.retain_keys, retain_cotangent, inputs.chunk_size
        )
        update = jax.tree.map(lambda g, f, r: g + f + r, inputs.retain_grad, forget_part, retain_part)
        return Direction(update, _zero(), _zero())

    def mean_loss(params: Params, batch: Batch, keys: jax.Array) -> jax.Array:
        return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, batch, keys))

    def objective(params: Params) -> jax.Array:
        retain_loss, retain_grad = jax.value_and_grad(mean_loss)(params, inputs.retain_batch, inputs.retain_keys)
        forget_grad = jax.grad(mean_loss)(params, inputs.forget_batch, inputs.forget_keys)
        return retain_loss + weight * jnp.square(_cosine(forget_grad, retain_grad))

    return Direction(jax.grad(objective)(inputs.params), _zero(), _zero())


def _alternate(even: DirectionRule, odd: DirectionRule) -> DirectionRule:
    """``even`` on steps 0, 2, 4, ... and ``odd`` on 1, 3, ... (``lax.cond``: only one branch runs)."""

    def rule(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
        return jax.lax.cond(inputs.step % 2 == 0, lambda: even(inputs, hparams), lambda: odd(inputs, hparams))

    return rule


# ----------------------------------------------------------------------------------------- hyperparameters


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_nonnegative_finite(value: Any) -> bool:
    return _is_real(value) and math.isfinite(value) and value >= 0


def _is_not_nan(value: Any) -> bool:
    return _is_real(value) and not math.isnan(value)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _is_optional_regex(value: Any) -> bool:
    if value is None:
        return True
    if not isinstance(value, str):
        return False
    try:
        re.compile(value)
    except re.error:
        return False
    return True


def _only_on_conflict(default: bool, what: str) -> HParam:
    return HParam(
        default, f"project {what} only where it conflicts (negative inner product)", "True or False", _is_bool, bool
    )


# UNO's reference code sums its losses over the batch and weighs cos^2 by 1e3; cos^2 is scale-free, so on our mean
# losses the same direction needs 1e3 / B (B the retain batch size): None selects that faithful default.
_ORTHOGONALITY_WEIGHT = HParam(
    None,
    "lambda, the weight of cos^2(g_f, g_r); None: 1e3 / B_r, the reference's 1e3 on summed losses rescaled to means",
    "None or a finite number >= 0",
    lambda value: value is None or _is_nonnegative_finite(value),
    lambda value: None if value is None else float(value),
)
_UNO_SUMMED_WEIGHT = 1e3


def uno_orthogonality_weight(weight: float | None, retain_batch_size: int) -> float:
    """The ``lambda`` UNO uses: ``weight``, or ``1e3 / B_r`` (the reference's weight on summed losses) when None."""
    return _UNO_SUMMED_WEIGHT / retain_batch_size if weight is None else float(weight)


# The papers the sources cite (written into report.json with each method's record).
_BAE = 'Bae et al., "Gradient Surgery for One-shot Unlearning on Generative Model", 2023, arXiv:2307.04550'
_PCGRAD = 'Yu et al., "Gradient Surgery for Multi-Task Learning", 2020, arXiv:2001.06782'
_UNO = "Mandal & Gottwald, 2025, arXiv:2506.04712"

_GUIDANCE_AFTER_PROJECTION = "w * grad guidance_loss added to u after the projection (never projected)"
_GUIDANCE_ADDED = "w * grad guidance_loss added to u"

# The method ``unlearn.py`` runs first and ``report.json`` names: forgets and keeps the rest by default (README).
RECOMMENDED_METHOD = "remap_surgery"

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method(
            "sa",
            "u = P_{g_r}(-g_f) = -g_f + (<g_f, g_r> / ||g_r||^2) g_r",
            f"{_BAE}: the abstract's wording",
            {},
            _GUIDANCE_AFTER_PROJECTION,
            _sa_rule(only_on_conflict=False),
        ),
        Method(
            "sa_conflict",
            "u = P_{g_r}(-g_f) if <-g_f, g_r> < 0 else -g_f",
            f"PCGrad-style reading of {_BAE} (PCGrad: {_PCGRAD})",
            {},
            _GUIDANCE_AFTER_PROJECTION,
            _sa_rule(only_on_conflict=True),
        ),
        Method(
            "sa_per_example",
            "u = mean_i P_{g_r}(-grad l(x_i)) (each on conflict by default), via one jvp and one vjp",
            f"per-sample reading of {_BAE}; the B inner products are one jvp and the mean one vjp of the "
            "per-example losses, so no per-example gradient is stored",
            # Projection onto a fixed normal plane is linear, so projecting always gives exactly ``sa``; only the
            # per-example conflict test makes this rule different, hence the default.
            {"only_on_conflict": _only_on_conflict(True, "each example's ascent gradient")},
            _GUIDANCE_AFTER_PROJECTION,
            _sa_per_example,
        ),
        Method(
            "sa_span",
            "u = -g_f minus its least-squares component in span{G_1..G_K}, G_k = mean grad of retain group k",
            f"subspace reading of {_BAE}",
            {
                "num_directions": HParam(
                    8,
                    "K, the number of equal contiguous groups of the retain batch (K = B_r: per-example)",
                    "an integer >= 1 dividing the retain batch size",
                    _is_positive_int,
                    int,
                ),
                "only_on_conflict": _only_on_conflict(False, "-g_f off the span"),
            },
            _GUIDANCE_AFTER_PROJECTION,
            _sa_span,
        ),
        Method(
            "pcgrad",
            "u = P^c_{g_r}(-g_f) + P^c_{-g_f}(g_r) (each projected off the other only on conflict)",
            f"two-task PCGrad ({_PCGRAD}), the method Bae et al. cite",
            {},
            _GUIDANCE_AFTER_PROJECTION,
            _pcgrad,
        ),
        Method(
            "s",
            "u = P_{g_f}(g_r) = g_r - (<g_f, g_r> / ||g_f||^2) g_f",
            f"UNO's reading of gradient surgery ({_UNO})",
            {},
            _GUIDANCE_AFTER_PROJECTION,
            _s,
        ),
        Method("ascent", "u = -g_f", "gradient ascent baseline (A)", {}, _GUIDANCE_ADDED, _ascent),
        Method(
            "ascent_descent",
            "u = -g_f on even steps, g_r on odd steps (first step ascends)",
            f"ascent-descent baseline (A-D), as in the UNO reference code ({_UNO})",
            {},
            _GUIDANCE_ADDED,
            _alternate(_ascent, _retain_finetune),
        ),
        Method(
            "retain_finetune",
            "u = g_r",
            "fine-tuning on the retain set baseline",
            {},
            _GUIDANCE_ADDED,
            _retain_finetune,
        ),
        Method(
            "uno",
            "u = grad [L_r + lambda cos^2(g_f, g_r)] (gradient through the gradients)",
            f"UNO ({_UNO}), lambda = 1e3",
            {"orthogonality_weight": _ORTHOGONALITY_WEIGHT},
            "w * grad guidance_loss added to u (outside cos^2, unlike the reference code)",
            _uno,
        ),
        Method(
            "uno_s",
            "u = uno's update on even steps, s's on odd steps (first step is UNO)",
            f"UNO-S ({_UNO})",
            {"orthogonality_weight": _ORTHOGONALITY_WEIGHT},
            _GUIDANCE_AFTER_PROJECTION,
            _alternate(_uno, _s),
        ),
        Method(
            "remap_surgery",
            "u = P^c_{g_r}(g_s) + g_r, g_s = grad mean_i l(x_i -> nearest retained image) (a bounded forget loss)",
            "ours (gsu-jax): forget by descending a surrogate whose minimum exists, projected off g_r; a surrogate "
            "target for the forgotten data as in Selective Amnesia (Heng & Soh, 2023, arXiv:2305.10120)",
            {
                "forget_only": HParam(
                    "decoder",
                    "the surrogate moves only the parameters whose path matches this regex; None: all",
                    "None or a valid regular expression",
                    _is_optional_regex,
                    lambda value: value,
                ),
                "projection": HParam(
                    "conflict",
                    "g_s projected off g_r: 'conflict' (only when <g_s, g_r> < 0), 'always' or 'none'",
                    "'conflict', 'always' or 'none'",
                    lambda value: value in ("conflict", "always", "none"),
                    str,
                ),
                "gate": HParam(
                    False,
                    "drop example i from the surrogate once l(x_i -> n_i) <= l(x_i) (forgotten)",
                    "True or False",
                    _is_bool,
                    bool,
                ),
                "forget_half_life": HParam(
                    20.0,
                    "steps over which forget_weight halves (annealing); None: constant",
                    "None or a finite number > 0",
                    lambda v: v is None or (_is_nonnegative_finite(v) and v > 0),
                    lambda v: None if v is None else float(v),
                ),
                "saliency": HParam(
                    1.0,
                    "keep only this fraction of the surrogate gradient's coordinates, the largest (SalUn-style: Fan et al., 2024, arXiv:2310.12508)",
                    "a number in (0, 1]",
                    lambda v: _is_nonnegative_finite(v) and 0 < v <= 1,
                    float,
                ),
                "forget_weight": HParam(
                    1.0,
                    "weight of the projected surrogate gradient",
                    "a finite number >= 0",
                    _is_nonnegative_finite,
                    float,
                ),
                "retain_weight": HParam(
                    1.0, "weight of g_r added to the update", "a finite number >= 0", _is_nonnegative_finite, float
                ),
                "image_field": HParam(
                    "image",
                    "the example field that is paired and replaced by 'target'",
                    "a string naming a field of the examples",
                    lambda v: isinstance(v, str),
                    str,
                ),
            },
            _GUIDANCE_AFTER_PROJECTION,
            _remap_surgery,
            learning_rate=3e-3,
        ),
        Method(
            "sa_gated",
            "u = mean_i w_i P^c_{g_r}(-grad l(x_i)) + (1 - mean_i w_i) g_r, w_i = 1[l(x_i) < forget_loss_target]",
            "ours (gsu-jax): ascent that stops per example once its loss reaches the retrained oracle's level",
            {
                "forget_loss_target": HParam(
                    REQUIRED,
                    "the retrain-from-scratch oracle's mean forget loss: examples at or above it stop ascending",
                    "a number (+inf: never gate, -inf: gate everything)",
                    _is_not_nan,
                    float,
                ),
                "temperature": HParam(
                    0.0,
                    "0: hard gate 1[l < target]; > 0: smooth gate sigmoid((target - l) / temperature)",
                    "a finite number >= 0",
                    _is_nonnegative_finite,
                    float,
                ),
                "only_on_conflict": _only_on_conflict(True, "each example's ascent gradient"),
                "combine": HParam(
                    "fill",
                    "'fill': gated-out share goes to retain descent; 'sa': gated ascent alone (zero once all are "
                    "gated); 'pcgrad': two-task PCGrad of the gated ascent and g_r",
                    "'fill', 'sa' or 'pcgrad'",
                    lambda value: value in ("fill", "sa", "pcgrad"),
                    str,
                ),
                "ascend_only": HParam(
                    None,
                    "ascend only the parameters whose path matches this regex (e.g. 'decoder'); None: all",
                    "None or a valid regular expression",
                    _is_optional_regex,
                    lambda value: value,
                ),
            },
            _GUIDANCE_AFTER_PROJECTION,
            _sa_gated,
        ),
    )
}


def resolve_hparams(name: str, **hparams: Any) -> dict[str, Any]:
    """Validates ``hparams`` for method ``name`` and fills in the defaults.

    Args:
      name: a key of :data:`METHODS`.
      **hparams: hyperparameters of that method (see ``METHODS[name].hparams``).

    Returns:
      Every hyperparameter of the method, by name (ints and floats as Python ``int``/``float``).

    Raises:
      ValueError: unknown method, unknown or invalid hyperparameter, or a required one missing; the message names
        the bad value and lists what is allowed.
    """
    if name not in METHODS:
        raise ValueError(f"unknown unlearning method {name!r}; allowed: {', '.join(sorted(METHODS))}")
    method = METHODS[name]
    unknown = sorted(set(hparams) - set(method.hparams))
    if unknown:
        allowed = ", ".join(f"{key}={hparam.default!r}" for key, hparam in method.hparams.items()) or "none"
        raise ValueError(f"method {name!r} has no hyperparameter {', '.join(unknown)}; allowed: {allowed}")
    resolved = {}
    for key, hparam in method.hparams.items():
        value = hparams.get(key, hparam.default)
        if value is REQUIRED:
            raise ValueError(f"method {name!r} needs {key} ({hparam.doc}); allowed: {hparam.allowed}")
        if not hparam.is_valid(value):
            raise ValueError(f"method {name!r}: {key}={value!r} is invalid; allowed: {hparam.allowed}")
        resolved[key] = hparam.convert(value)
    return resolved


# ------------------------------------------------------------------------------------------------- the step


def split_step_keys(key: jax.Array, forget_batch: Batch, retain_batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The keys one step uses: ``(forget_keys key[B_f], retain_keys key[B_r], guidance_key)``.

    ``forget_key, retain_key, guidance_key = jax.random.split(key, 3)``, then one key per example with
    ``jax.random.split(forget_key, B_f)`` (resp. ``retain_key``).
    """
    forget_key, retain_key, guidance_key = jax.random.split(key, 3)
    forget_keys = jax.random.split(forget_key, batch_size(forget_batch))
    retain_keys = jax.random.split(retain_key, batch_size(retain_batch))
    return forget_keys, retain_keys, guidance_key


def _losses_and_mean_grad(
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

    grad, losses = per_example.scan_over_chunks(summed_grad_and_losses, (batch, keys), chunk_size=chunk_size)
    return losses, jax.tree.map(lambda leaf: leaf / size, grad)


def make_method(
    name: str,
    *,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    guidance_loss: GuidanceLossFn | None = None,
    guidance_weight: float = 0.0,
    chunk_size: int | None = None,
    **hparams: Any,
) -> UnlearningMethod:
    """Builds the unlearning method ``name`` (a key of :data:`METHODS`) for a per-example loss and an optimizer.

    The step computes, once and for every method, ``l(x_i)`` and ``g_f`` on the forget batch and ``L_r``, ``g_r`` on
    the retain batch (keys from :func:`split_step_keys`), lets the method's rule turn them into the update
    direction ``u`` (table in the module docstring), adds ``guidance_weight * grad guidance_loss(params,
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
      **hparams: the method's hyperparameters (``METHODS[name].hparams``).

    Returns:
      ``UnlearningMethod(init, step)``: ``init(params) -> MethodState`` and the pure
      ``step(params, state, forget_batch, retain_batch, key) -> (params, state, metrics)``.

    Raises:
      ValueError: unknown method, bad hyperparameter, negative or non-finite ``guidance_weight``, guidance
        without a ``guidance_loss``, or ``chunk_size < 1`` (all before any work).
      TypeError: ``loss_fn``/``guidance_loss`` not callable, ``optimizer`` not an optax transformation, or
        ``chunk_size`` neither None nor an int.

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
    if chunk_size is not None and not _is_positive_int(chunk_size):
        if isinstance(chunk_size, numbers.Integral) and not isinstance(chunk_size, bool):
            raise ValueError(
                f"chunk_size must be >= 1 (examples per chunk), got {chunk_size!r}; allowed: None or an integer >= 1"
            )
        raise TypeError(f"chunk_size must be None or an integer >= 1 (examples per chunk), got {chunk_size!r}")
    chunk_size = None if chunk_size is None else int(chunk_size)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (params, example, key) -> f32[], got {loss_fn!r}")
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(f"optimizer must be an optax GradientTransformation, got {optimizer!r}")
    if not _is_nonnegative_finite(guidance_weight):
        raise ValueError(f"guidance_weight must be a finite number >= 0, got {guidance_weight!r}")
    if guidance_loss is not None and not callable(guidance_loss):
        raise TypeError(f"guidance_loss must be callable (params, key) -> f32[], got {guidance_loss!r}")
    if guidance_weight > 0 and guidance_loss is None:
        raise ValueError(
            f"guidance_weight={guidance_weight} needs a guidance_loss(params, key); allowed: guidance_weight=0 "
            "without one, or pass guidance_loss"
        )
    guided = guidance_weight > 0
    guidance_weight = float(guidance_weight)
    rule = METHODS[name].direction

    def init(params: Params) -> MethodState:
        return MethodState(step=jnp.zeros((), jnp.int32), optimizer=optimizer.init(params))

    def step(
        params: Params, state: MethodState, forget_batch: Batch, retain_batch: Batch, key: jax.Array
    ) -> tuple[Params, MethodState, Metrics]:
        forget_keys, retain_keys, guidance_key = split_step_keys(key, forget_batch, retain_batch)
        # A chunk holding both batches is the unchunked computation (bit-identical to chunk_size=None).
        chunk = chunk_size
        if chunk is not None and chunk >= max(batch_size(forget_batch), batch_size(retain_batch)):
            chunk = None
        forget_losses, forget_grad = _losses_and_mean_grad(loss_fn, params, forget_batch, forget_keys, chunk)
        retain_losses, retain_grad = _losses_and_mean_grad(loss_fn, params, retain_batch, retain_keys, chunk)
        inputs = StepInputs(
            loss_fn=loss_fn,
            params=params,
            step=state.step,
            forget_batch=forget_batch,
            retain_batch=retain_batch,
            forget_keys=forget_keys,
            retain_keys=retain_keys,
            forget_losses=forget_losses,
            forget_grad=forget_grad,
            retain_grad=retain_grad,
            chunk_size=chunk,
        )
        direction = rule(inputs, resolved)
        update = direction.update
        metrics = {}
        if guided:
            guidance_value, guidance_grad = jax.value_and_grad(guidance_loss)(params, guidance_key)
            update = tree_add_scaled(update, guidance_grad, guidance_weight)
            metrics["guidance_loss"] = guidance_value.astype(jnp.float32)
        updates, optimizer_state = optimizer.update(update, state.optimizer, params)
        new_params = optax.apply_updates(params, updates)
        metrics.update(
            forget_loss=jnp.mean(forget_losses).astype(jnp.float32),
            retain_loss=jnp.mean(retain_losses).astype(jnp.float32),
            cos_forget_retain=_cosine(forget_grad, retain_grad).astype(jnp.float32),
            projected=direction.projected.astype(jnp.float32),
            gated_fraction=direction.gated_fraction.astype(jnp.float32),
            update_norm=tree_norm(update).astype(jnp.float32),
        )
        return new_params, MethodState(step=state.step + 1, optimizer=optimizer_state), metrics

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
    if not _is_positive_int(budget_bytes):
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
