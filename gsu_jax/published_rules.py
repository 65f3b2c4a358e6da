"""Two published generative-unlearning baselines, ``salun`` and ``selective_amnesia``, and their surgery variants.

Both descend a *bounded* forget objective (one with a minimum) and fix something at the original parameters
``theta*`` at their first step (a :class:`gsu_jax.update_rules.RuleState`), so they are the published counterparts
of our recommended method's idea. ``salun_surgery`` / ``selective_amnesia_surgery`` project that forget objective's
gradient off ``g_r`` on conflict (:func:`gsu_jax.projections.normal_plane_projection`), which answers whether
gradient surgery helps them; everything else is the same.

**SalUn** (Fan et al., "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency in Both Image
Classification and Generation", ICLR 2024, arXiv:2310.12508; reference code ``DDPM/runners/diffusion.py`` of
``OPTML-Group/Unlearn-Saliency``), for a class-conditional DDPM:

.. math::

   m = 1\\big[|\\nabla L_f(\\theta^*)| \\ge \\text{the } \\mathrm{mask\\_fraction} \\text{ quantile from the top}\\big],
   \\qquad u = m \\odot \\mathrm{clip}\\big(\\nabla \\tfrac1B \\textstyle\\sum_i
   \\lVert \\epsilon_\\theta(x_{t,i}, c_i) - \\mathrm{sg}[\\epsilon_\\theta(x_{t,i}, c'_i)] \\rVert^2
   + \\alpha\\, g_r,\\ \\mathrm{grad\\_clip}\\big)

The mask ``m`` keeps the ``mask_fraction`` (50 %) of all parameters with the largest forget-loss gradient
magnitude at ``theta*`` (one global threshold). Where ours differs from the reference, and why: its mask sums
per-batch-clipped gradients of the guided prediction over the whole forget set, ours takes the gradient of the
first forget batch (128 examples of one class: the saliency ranks coordinates, and it settles long before the
whole set); its ``c'`` is ``(c + 1) mod 10`` (the paper: a random label ``c' != c``), ours is the label of
retain example ``i mod B_r`` of the step's shuffled retain batch, a random *retained* class (no class count
needed, and never the forgotten one when classes are forgotten); its retain loss is summed over pixels with
``alpha = 1e-3`` while the forget loss is a pixel mean, so on our pixel-mean losses the same balance is
``alpha = 1e-3 * H*W*C`` (``retain_weight=None``, 0.784 on MNIST).

**Selective Amnesia** (Heng & Soh, "Selective Amnesia: A Continual Learning Approach to Forgetting in Deep
Generative Models", NeurIPS 2023, arXiv:2305.10120; reference ``ddpm/runners/diffusion.py`` and
``vae/train_forget.py`` of ``clear-nus/selective-amnesia``): the forget examples are mapped to a surrogate
(uniform noise images under the forget label), the retained data is replayed, and an EWC penalty anchors the
parameters to ``theta*``:

.. math::

   u = \\mathrm{clip}\\big(\\nabla \\tfrac1B \\textstyle\\sum_i l(x_i \\to n_i) + \\gamma\\, g_r
   + 2 \\lambda F \\odot (\\theta - \\theta^*),\\ \\mathrm{grad\\_clip}\\big), \\qquad n_i \\sim U[0, 1]^{H W C}

(the gradient of ``lambda * sum F (theta - theta*)^2``, the reference's penalty, which has no 1/2). ``F`` is
the diagonal empirical Fisher at ``theta*`` (:func:`gsu_jax.remap_surgery.retain_fisher_diagonal`). Where ours
differs, and why: the reference replays 500 samples per retained class that the frozen original generated, ours
replays the real retained data of the step's retain batch (the same data every method of this project reads);
its Fisher averages, over 500 generated samples of every class, the squared per-example gradient of the eps
loss summed over all ``T`` timesteps, ours averages the squared per-example gradients of the first retain batch
at one random timestep each (one pass instead of ``T``); its losses are summed over pixels, ours are pixel means.
The last two change the scale of the penalty relative to the data terms: SA's ``F`` is larger than ours by about
``(H*W*C)^2`` times between ``T`` and ``T^2`` and its data gradients by ``H*W*C``, so at the same ``lambda`` its
anchor is stronger than ours by ``H*W*C`` times ``T`` to ``T^2``; ``lambda = 10`` (the published CIFAR-10 DDPM
value, our default) therefore anchors little here, and ``ewc_weight`` is a measured row of the DDPM table, not a
faithful conversion. The reference also trains its forget and replay terms without label dropout
(``cond_drop_prob=0``); ours keep the model's training dropout (0.1 on our DDPMs), so about a tenth of the
surrogate terms train the null label. The noise surrogate is drawn afresh every step from each example's key
(``fold_in(key_i, 0x5A)``: the DDPM loss only splits its key three ways; the VAE draws its latent noise from the key
itself, whose entry 90 onwards would share that stream, beyond our latent sizes of at most 16); for the
unconditional VAE it is the reconstruction target of each forget image (the reference's VAE is conditional).

Both are the reference's published optimiser: Adam 1e-4 after clipping the update's global norm to 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gsu_jax.remap_surgery import retain_fisher_diagonal
from gsu_jax.trees import top_magnitude_mask
from gsu_jax.update_rules import (
    Direction,
    DirectionRule,
    Params,
    RuleState,
    StepInputs,
    losses_and_mean_grad,
    on_parameter_tree,
    project_flagged,
    zero_diagnostic,
)

# The key stream of the noise surrogate, folded into each example's key (module docstring: what else draws from it).
_SURROGATE_STREAM = 0x5A
# SalUn's alpha (the reference's README command) on a retain loss summed over the pixels of an example.
SALUN_PIXEL_SUM_ALPHA = 1e-3


def _field(batch: Any, name: str, method: str) -> jax.Array:
    if not (isinstance(batch, Mapping) and name in batch):
        raise ValueError(
            f"{method} reads the examples' {name!r} field, which the batch lacks; allowed: batches of mappings "
            "holding it (images: set image_field to the field the loss reads; salun also needs 'label', i32[B])"
        )
    return batch[name]


def _surgery(forget_grad: Params, retain_grad: Params, project: bool) -> tuple[Params, jax.Array]:
    """``(P^c_{g_r}(forget_grad), projected)`` for a surgery variant, ``(forget_grad, 0)`` otherwise."""
    if not project:
        return forget_grad, zero_diagnostic()
    return project_flagged(forget_grad, retain_grad, only_on_conflict=True)


def clip_global_norm(tree: Params, max_norm: float | None) -> Params:
    """``tree * min(1, max_norm / ||tree||)`` (optax's ``clip_by_global_norm``, the reference's
    ``torch.nn.utils.clip_grad_norm_``); ``None``: unchanged."""
    if max_norm is None:
        return tree
    clipped, _ = optax.clip_by_global_norm(max_norm).update(tree, optax.EmptyState())
    return clipped


# --------------------------------------------------------------------------------------------------- SalUn


def _salun_mask(inputs: StepInputs, hparams: Mapping[str, Any]) -> Params:
    """The saliency mask at ``theta*``: top ``mask_fraction`` of ``|grad L_f|`` on the first forget batch."""
    _, forget_grad = losses_and_mean_grad(
        inputs.loss_fn, inputs.params, inputs.forget_batch, inputs.forget_keys, inputs.chunk_size
    )
    return top_magnitude_mask(forget_grad, hparams["mask_fraction"])


SALUN_STATE = RuleState(template=lambda params: jax.tree.map(jnp.zeros_like, params), compute=_salun_mask)


def pseudo_labels(forget_batch: Any, retain_batch: Any) -> jax.Array:
    """SalUn's ``c'_i``: the label of retain example ``i mod B_r`` (a random retained class, batches shuffled)."""
    retain_labels = jnp.asarray(_field(retain_batch, "label", "salun"))
    size = jnp.shape(_field(forget_batch, "label", "salun"))[0]
    return retain_labels[jnp.arange(size) % retain_labels.shape[0]]


def salun_retain_weight(hparams: Mapping[str, Any], retain_batch: Any) -> float:
    """``retain_weight``, or (None) the reference's alpha rescaled to pixel-mean losses: ``1e-3 * H*W*C``."""
    if hparams["retain_weight"] is not None:
        return hparams["retain_weight"]
    image = _field(retain_batch, hparams["image_field"], "salun")
    return SALUN_PIXEL_SUM_ALPHA * math.prod(jnp.shape(image)[1:])


def salun_rule(*, project: bool) -> DirectionRule:
    """SalUn's update (module docstring); with ``project``, its forget gradient projected off ``g_r`` on conflict."""

    def rule(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
        labels = pseudo_labels(inputs.forget_batch, inputs.retain_batch)
        relabelled = {**inputs.forget_batch, "pseudo_label": labels}
        _, forget_grad = losses_and_mean_grad(
            inputs.loss_fn, inputs.params, relabelled, inputs.forget_keys, inputs.chunk_size
        )
        forget_part, projected = _surgery(forget_grad, inputs.retain_grad, project)
        weight = salun_retain_weight(hparams, inputs.retain_batch)
        update = jax.tree.map(lambda f, r: f + weight * r, forget_part, inputs.retain_grad)
        # The reference clips the whole gradient, then masks it (the optimiser sees the masked update).
        update = clip_global_norm(update, hparams["grad_clip"])
        update = jax.tree.map(jnp.multiply, update, inputs.rule_state)
        return Direction(update, projected, zero_diagnostic())

    return rule


# -------------------------------------------------------------------------------------- Selective Amnesia


def _amnesia_anchor(inputs: StepInputs, hparams: Mapping[str, Any]) -> dict[str, Params]:
    """``theta*`` and the diagonal Fisher there, from the first retain batch's per-example gradients."""
    del hparams
    fisher = on_parameter_tree(
        inputs,
        lambda loss_fn, params: retain_fisher_diagonal(
            loss_fn, params, inputs.retain_batch, inputs.retain_keys, inputs.chunk_size
        ),
    )
    return {"anchor": inputs.params, "fisher": fisher}


AMNESIA_STATE = RuleState(
    template=lambda params: {
        "anchor": jax.tree.map(jnp.zeros_like, params),
        "fisher": jax.tree.map(jnp.zeros_like, params),
    },
    compute=_amnesia_anchor,
)


def noise_surrogates(forget_batch: Any, keys: jax.Array, image_field: str = "image") -> jax.Array:
    """One uniform ``[0, 1]`` noise image per forget example (like its ``image_field``), drawn from its key's own
    surrogate stream."""
    image = _field(forget_batch, image_field, "selective_amnesia")
    shape, dtype = jnp.shape(image)[1:], jnp.result_type(image)
    return jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, _SURROGATE_STREAM), shape, dtype))(keys)


def selective_amnesia_rule(*, project: bool) -> DirectionRule:
    """Selective Amnesia's update (module docstring); with ``project``, the surrogate gradient projected off
    ``g_r`` on conflict."""

    def rule(inputs: StepInputs, hparams: Mapping[str, Any]) -> Direction:
        noise = noise_surrogates(inputs.forget_batch, inputs.forget_keys, hparams["image_field"])
        surrogate = {**inputs.forget_batch, "target": noise}
        _, surrogate_grad = losses_and_mean_grad(
            inputs.loss_fn, inputs.params, surrogate, inputs.forget_keys, inputs.chunk_size
        )
        forget_part, projected = _surgery(surrogate_grad, inputs.retain_grad, project)
        anchor, fisher = inputs.rule_state["anchor"], inputs.rule_state["fisher"]
        ewc, replay = 2.0 * hparams["ewc_weight"], hparams["replay_weight"]
        update = jax.tree.map(
            lambda s, r, p, a, f: s + replay * r + ewc * f * (p - a),
            forget_part,
            inputs.retain_grad,
            inputs.params,
            anchor,
            fisher,
        )
        return Direction(clip_global_norm(update, hparams["grad_clip"]), projected, zero_diagnostic())

    return rule
