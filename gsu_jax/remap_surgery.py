"""The recommended unlearning method, ``remap_surgery`` (ours): forget by descending a bounded surrogate.

Ascent (``sa`` and its variants) maximises a loss that has no maximum, so after the forget point it keeps going and
wrecks the model; the gentle rules (``s``, ``uno``) never forget. ``remap_surgery`` instead *descends* a bounded
surrogate: each forget example ``x_i`` is encoded as usual but must reconstruct ``n(x_i)``, a retained image near it
in pixel space, so the generator learns to draw a retained image wherever it drew the forgotten class, and the
surrogate has a minimum to stop at. ``n`` pairs the forget batch with the step's retain batch by entropic optimal
transport (``pairing='balanced'``, the default, :func:`balanced_retained_images`): each retain image carries equal
mass in the plan (the row-wise argmax is near-balanced), so the forget class's region is redrawn with most of the
retain batch's images instead of with the few retained images nearest to it (``pairing='nearest'``, :func:`nearest_retained_images`, the previous
default). Measured on every digit at latents 2 and 16, 3 seeds (README, issue 12), balanced pairing at
``forget_weight=0.7`` meets each target on at least as many cases as nearest pairing at 1.0, and on more for the
updates to the threshold and the FID at the stop and at the end.
Training the generator towards a surrogate in place of the forgotten data is the idea of Selective Amnesia (Heng &
Soh, "Selective Amnesia: A Continual Learning Approach to Forgetting in Deep Generative Models", 2023,
arXiv:2305.10120, whose surrogate is noise or another class); here the surrogate is a nearby retained image and
the retained data is protected by gradient surgery instead of replay and a Fisher penalty. Only the
decoder follows it (``forget_only='decoder'``: the encoder could lower the surrogate by moving the posterior instead
of changing what the prior decodes to). Its gradient ``g_s`` is projected off the (decoder part of the) retain
gradient on conflict (:func:`gsu_jax.projections.normal_plane_projection`), weighted by ``a_t = forget_weight *
2^(-t / forget_half_life)`` (annealed: once the class is gone the step becomes retain descent, which repairs what
the pull cost) and added to ``retain_weight * g_r``. It reads the forget and retain batches only: no oracle, no
classifier (``+guided`` adds the guidance term like any method).

**Steps in the retain data's metric** (``precondition='retain_rms'``, the default, with plain SGD). Both gradients
are divided per coordinate by ``sqrt(F_r + damping * mean(F_r))``, ``F_r = mean_j (grad l(r_j))^2`` the diagonal of
the retain batch's empirical Fisher (its per-example gradients, one extra pass), *before* the projection, so the
applied update stays orthogonal to ``g_r``. Why: Adam's first steps move every coordinate by about the learning
rate whatever its gradient (``m / sqrt(v) = sign(g)`` at step 1), and on a converged model that alone costs the
retained data (one Adam 3e-3 step of retain-only descent raised the latent-2 VAE's held-out -ELBO by 6.5 %). This
is Adam with its second moment taken from the retained data's per-example gradients instead of from the update
itself: coordinates the retained examples are sensitive to move less, the surrogate's strong coordinates more.
``'retain_fisher'`` divides by ``F_r`` itself (a diagonal natural-gradient step).

**Repairing within the step** (``retain_lookahead``, default 3e-3, the SGD learning rate). The forget part of a
step damages the retained data through curvature, not slope: to first order it changes the held-out retained
-ELBO by -0.5 to 0 nats (the projection's doing), in fact it raises it by 0.1 to 8.3 nats (``python -m
bench.curvature``). The retain part therefore takes ``g_r`` where the forget part leads, ``theta - lr * a_t *
P(D g_s)``: descending the retained loss *there* undoes, to first order, what the forget part costs it, within the
same update (one more gradient pass over the retain batch). It lowered the held-out retain -ELBO at the stop on every
latent-16 digit (README, issue 12). The README's ablation table
measures each of these choices; ``gate`` and ``saliency`` (a SalUn-style mask: Fan et al., "SalUn: Empowering Machine Unlearning via
Gradient-based Weight Saliency in Both Image Classification and Generation", 2024, arXiv:2310.12508) are measured
options that are off by default because they did not help, as are ``unmatched_weight`` / ``unmatched_objective``
(the encoder following the surrogate, or ascending the forget examples' own loss): they bring the
membership-inference AUC toward the oracle's but cost the forgetting or, for the ascent, diverge (README, issue 12).

:data:`gsu_jax.methods.METHODS` registers :func:`remap_surgery_rule` with its hyperparameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gsu_jax import per_example
from gsu_jax.losses import LossFn
from gsu_jax.trees import top_magnitude_mask
from gsu_jax.update_rules import (
    Direction,
    Params,
    StepInputs,
    losses_and_mean_grad,
    masked_loss,
    masked_tree,
    on_parameter_tree,
    param_mask,
    project_flagged,
    zero_diagnostic,
)


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


def balanced_retained_images(
    forget_images: jax.Array, retain_images: jax.Array, *, epsilon: float = 0.01, iterations: int = 200
) -> jax.Array:
    """For each forget image, a retain image from an (entropic) optimal-transport pairing of the two batches.

    Where :func:`nearest_retained_images` lets many forget images share the retained image (and the class) nearest
    to them, the Sinkhorn plan between the uniform measures on the two batches (cost ``||x_i - r_j||^2`` scaled by
    its mean, entropy ``epsilon``) gives every retain image equal mass; each forget image takes its row's argmax.
    That rounding is near-balanced, not one-to-one: on the protocol's 128 + 128 MNIST batches 100-118 of the 128
    retain images are some forget image's target (nearest pairing: far fewer), and the argmax agrees with the exact
    optimal assignment on 66-85 % of rows (more iterations do not change it; the rounding does).

    Args:
      forget_images: ``f32[B_f, ...]``.
      retain_images: ``f32[B_r, ...]`` of the same per-example shape.
      epsilon: entropic regularisation, relative to the mean cost.
      iterations: Sinkhorn iterations (log domain).

    Returns:
      ``f32[B_f, ...]``: row ``i`` is ``retain_images[argmax_j P_ij]``.
    """
    # In float32 at least (epsilon = 0.01 is meaningless in bfloat16), clamped at 0 (the expanded square can round
    # below it for near-identical images), scaled by a mean kept away from 0 (identical batches: every pairing is
    # as good, and the potentials stay finite).
    dtype = jnp.promote_types(forget_images.dtype, jnp.float32)
    flat_forget = forget_images.reshape(forget_images.shape[0], -1).astype(dtype)
    flat_retain = retain_images.reshape(retain_images.shape[0], -1).astype(dtype)
    cost = jnp.maximum(
        jnp.sum(jnp.square(flat_forget), axis=1)[:, None]
        - 2.0 * flat_forget @ flat_retain.T
        + jnp.sum(jnp.square(flat_retain), axis=1)[None, :],
        0.0,
    )
    cost = jax.lax.stop_gradient(cost / jnp.maximum(jnp.mean(cost), jnp.finfo(dtype).tiny))
    log_a = -jnp.log(cost.shape[0]) * jnp.ones(cost.shape[0])
    log_b = -jnp.log(cost.shape[1]) * jnp.ones(cost.shape[1])

    def sweep(_, potentials):
        f, g = potentials
        f = epsilon * log_a - epsilon * jax.nn.logsumexp((g[None, :] - cost) / epsilon, axis=1)
        g = epsilon * log_b - epsilon * jax.nn.logsumexp((f[:, None] - cost) / epsilon, axis=0)
        return f, g

    _, g = jax.lax.fori_loop(0, iterations, sweep, (jnp.zeros(cost.shape[0]), jnp.zeros(cost.shape[1])))
    return retain_images[jnp.argmax(g[None, :] - cost, axis=1)]


def remap_surgery_rule(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
    """Ours: ``u = a_t P^(c)_{M g_r}(D S(M g_s)) + retain_weight * D g_r``, ``g_s`` the gradient of a *bounded* loss.

    ``g_s = grad mean_i w_i l(x_i -> n(x_i))``: each forget example's loss with its reconstruction target replaced
    by ``n(x_i)``, its partner in the retain batch (``pairing``: :func:`balanced_retained_images` or
    :func:`nearest_retained_images`), descended.
    ``M`` restricts it to the leaves matching ``forget_only`` (the other leaves get ``unmatched_weight`` times the
    surrogate's gradient, or with ``unmatched_objective='ascent'`` minus that times the gradient of the forget
    examples' own mean loss; 0, the default, leaves them out and projects off ``M g_r``); ``w_i = 1`` unless ``gate`` (then ``1[l(x_i -> n_i) >
    l(x_i)]``); ``S`` keeps the ``saliency`` fraction of largest coordinates (identity at 1); the projection follows
    ``projection``; ``a_t = forget_weight * 2^(-t / forget_half_life)`` (constant when the half-life is None);
    ``g_r`` in the retain part is taken at ``theta - retain_lookahead * a_t * P(D S(M g_s))`` when
    ``retain_lookahead > 0`` (one more pass over the retain batch; ``D`` stays the one at ``theta``);
    ``D = (F_r + fisher_damping * mean(F_r))^-p`` per coordinate (:func:`retain_fisher_diagonal`; ``p = 1/2`` for
    ``precondition='retain_rms'``, 1 for ``'retain_fisher'``, ``D = 1`` for ``'none'``).
    """
    mask = param_mask(inputs, hparams["forget_only"], name="forget_only")
    loss_fn, retain_grad = inputs.loss_fn, inputs.retain_grad
    unmatched_weight, unmatched_objective = hparams["unmatched_weight"], hparams["unmatched_objective"]
    if mask is None and unmatched_weight > 0.0:
        raise ValueError(
            f"remap_surgery: unmatched_weight={unmatched_weight} needs forget_only (every parameter already follows "
            "the surrogate when forget_only is None); allowed: unmatched_weight=0 or a forget_only pattern"
        )
    unmatched_move = mask is not None and unmatched_weight > 0.0
    if mask is not None and not (unmatched_move and unmatched_objective == "surrogate"):
        loss_fn = masked_loss(loss_fn, mask)
    if mask is not None and not unmatched_move:
        retain_grad = masked_tree(retain_grad, mask)
    field = hparams["image_field"]
    if not (isinstance(inputs.forget_batch, Mapping) and field in inputs.forget_batch and field in inputs.retain_batch):
        raise ValueError(
            f"remap_surgery pairs examples by their {field!r} field, which the batches lack; allowed: "
            "batches of mappings holding it (set image_field to the field the loss reconstructs)"
        )
    surrogate = dict(inputs.forget_batch)
    pairing = nearest_retained_images if hparams["pairing"] == "nearest" else balanced_retained_images
    surrogate["target"] = pairing(inputs.forget_batch[field], inputs.retain_batch[field])
    if hparams["gate"]:
        # Example i stops pulling once the model reconstructs it at least as well as its surrogate target as
        # itself (same key, so the same reparameterisation noise): it is forgotten, and pulling further would
        # only move the decoder away from what the retained data needs.
        surrogate[_OWN_LOSS] = jax.lax.stop_gradient(inputs.forget_losses)
        loss_fn = _gated_by_own_loss(loss_fn)
    surrogate_losses, surrogate_grad = losses_and_mean_grad(
        loss_fn, inputs.params, surrogate, inputs.forget_keys, inputs.chunk_size
    )
    gated_fraction = jnp.mean((surrogate_losses == 0.0).astype(jnp.float32)) if hparams["gate"] else zero_diagnostic()
    if unmatched_move and unmatched_objective == "surrogate":
        surrogate_grad = _scaled_outside(surrogate_grad, mask, unmatched_weight)
    elif unmatched_move:
        # 'ascent': the unmatched parameters (the encoder) ascend the forget examples' OWN loss, which the prior's
        # samples never see (they are decoded only), so it cannot undo the surrogate's forgetting.
        _, own_grad = losses_and_mean_grad(
            masked_loss(inputs.loss_fn, _complement(mask)),
            inputs.params,
            inputs.forget_batch,
            inputs.forget_keys,
            inputs.chunk_size,
        )
        surrogate_grad = jax.tree.map(lambda s, o: s - unmatched_weight * o, surrogate_grad, own_grad)
    if hparams["saliency"] < 1.0:
        surrogate_grad = _most_salient(surrogate_grad, hparams["saliency"])
    retain_direction = inputs.retain_grad
    if hparams["precondition"] != "none":
        # Natural-gradient steps in the retain data's (diagonal, damped) Fisher metric: a coordinate the retained
        # data is sensitive to moves less. Done before the projection, so the update the optimizer applies is
        # still orthogonal to g_r (a projection followed by any per-coordinate scaling would not be).
        power = 1.0 if hparams["precondition"] == "retain_fisher" else 0.5
        inverse = _inverse_fisher(inputs, hparams["fisher_damping"], power)
        surrogate_grad = jax.tree.map(jnp.multiply, surrogate_grad, inverse)
        retain_direction = jax.tree.map(jnp.multiply, retain_direction, inverse)
    if hparams["projection"] == "none":
        update, projected = surrogate_grad, zero_diagnostic()
    else:
        update, projected = project_flagged(
            surrogate_grad, retain_grad, only_on_conflict=hparams["projection"] == "conflict"
        )
    forget_weight = hparams["forget_weight"]
    if hparams["forget_half_life"] is not None:
        # Annealing: the pull halves every forget_half_life steps, so after the first few steps (when the forget
        # class is gone from the samples) the update becomes retain descent, which repairs what the pull cost.
        forget_weight = forget_weight * jnp.exp2(-inputs.step.astype(jnp.float32) / hparams["forget_half_life"])
    if hparams["retain_lookahead"] > 0.0:
        # The retained data's loss rises after a forget step through curvature, not slope: on the protocol VAEs the
        # forget part changes the held-out retained -ELBO by 0 to -0.5 nats to first order but raises it by +0.1 to
        # +8.3 (bench.curvature). g_r taken where that part of the step leads repairs the rise to first order.
        ahead = jax.tree.map(lambda p, s: p - hparams["retain_lookahead"] * forget_weight * s, inputs.params, update)
        _, retain_direction = losses_and_mean_grad(
            inputs.loss_fn, ahead, inputs.retain_batch, inputs.retain_keys, inputs.chunk_size
        )
        if hparams["precondition"] != "none":
            retain_direction = jax.tree.map(jnp.multiply, retain_direction, inverse)
    update = jax.tree.map(lambda s, r: forget_weight * s + hparams["retain_weight"] * r, update, retain_direction)
    return Direction(update, projected, gated_fraction)


def retain_fisher_diagonal(
    loss_fn: LossFn,
    params: Params,
    batch: Any,
    keys: jax.Array,
    chunk_size: int | None = None,
    *,
    one_at_a_time: bool | None = None,
) -> Params:
    """``F_r = mean_i (grad l(x_i))^2``, the diagonal of the empirical Fisher of the retain batch (per-example
    gradients, ``chunk_size`` examples at a time, or one at a time with ``one_at_a_time``, whatever ``chunk_size``;
    None, the default: one at a time on the CPU).

    Why one at a time on the CPU: there the ``B`` per-example gradients of a ``vmap`` are batched outer products,
    which XLA:CPU runs about 25x slower than ``B`` ordinary gradients in a ``lax.scan`` (protocol VAE, 128
    examples: 750 ms against 29 ms on a 2-core CPU, equal to float32 rounding). Accelerators keep the vmap.
    """
    if one_at_a_time is None:
        one_at_a_time = jax.default_backend() == "cpu"
    if one_at_a_time:
        chunk_size = 1

    def squared_grad_sum(chunk: tuple[Any, jax.Array]) -> Params:
        grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))(params, *chunk)
        return jax.tree.map(lambda leaf: jnp.sum(jnp.square(leaf), axis=0), grads)

    total = per_example.sum_over_chunks(squared_grad_sum, (batch, keys), chunk_size=chunk_size)
    size = jax.tree.leaves(keys)[0].shape[0]
    return jax.tree.map(lambda leaf: leaf / size, total)


def _inverse_fisher(inputs: StepInputs, damping: float, power: float) -> Params:
    """``(F_r + damping * mean(F_r))^-power`` per coordinate (the damping relative to the mean, so scale-free)."""
    fisher = on_parameter_tree(
        inputs,
        lambda loss_fn, params: retain_fisher_diagonal(
            loss_fn, params, inputs.retain_batch, inputs.retain_keys, inputs.chunk_size
        ),
    )
    leaves = jax.tree.leaves(fisher)
    mean = sum(jnp.sum(leaf) for leaf in leaves) / sum(leaf.size for leaf in leaves)
    return jax.tree.map(lambda leaf: (leaf + damping * mean) ** -power, fisher)


def _complement(mask: Params) -> Params:
    """The complement of a :func:`param_mask` mask (a tree of bools or one boolean vector)."""
    return jax.tree.map(lambda chosen: ~chosen if isinstance(chosen, np.ndarray) else not chosen, mask)


def _scaled_outside(tree: Params, mask: Params, weight: float) -> Params:
    """``tree`` multiplied by ``weight`` where ``mask`` (from :func:`param_mask`) is False."""

    def scale(chosen: bool | np.ndarray, leaf: jax.Array) -> jax.Array:
        return (jnp.where(chosen, 1.0, weight) * leaf).astype(leaf.dtype)

    return jax.tree.map(scale, mask, tree)


def _most_salient(tree: Params, fraction: float) -> Params:
    """``tree`` with all but its ``fraction`` largest-magnitude nonzero coordinates set to zero (a SalUn-style
    saliency mask, recomputed every step from the surrogate gradient itself; ties at the cut are kept)."""
    mask = top_magnitude_mask(tree, fraction, among_nonzero=True)
    return jax.tree.map(lambda leaf, keep: jnp.where(keep > 0, leaf, 0.0), tree, mask)


_OWN_LOSS = "__own_loss"


def _gated_by_own_loss(loss_fn: LossFn) -> LossFn:
    """``l(x_i -> n_i) * 1[l(x_i -> n_i) > l(x_i)]``, ``l(x_i)`` read from the example's ``_OWN_LOSS`` field."""

    def gated(params: Params, example: Any, key: jax.Array) -> jax.Array:
        own = example[_OWN_LOSS]
        loss = loss_fn(params, {name: value for name, value in example.items() if name != _OWN_LOSS}, key)
        return jnp.where(jax.lax.stop_gradient(loss) > own, loss, 0.0)

    return gated
