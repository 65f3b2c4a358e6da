"""Float64 references of every method's update direction, against which the bench checks each timed step.

:class:`ReferenceRules` evaluates each rule from per-example gradients computed independently of the library's
step; :func:`adam_first_moment_direction` reads a timed step's direction off Adam's first moment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from bench import common
from bench.common import CorrectnessError

ADAM_B1 = 0.9  # optax's and torch's default; the bench's Adam (bench.step.adam) uses it


# ----------------------------------------------------------------------------------------------------------------
# Reference directions in float64


class ReferenceRules:
    """Every method's update direction at fixed params, batches and key, in float64, from per-example gradients.

    The per-example gradients come from ``jax.vmap(jax.value_and_grad(loss_fn))`` over chunks (no code shared
    with the library's step), at matmul precision "highest", with the keys the step itself uses
    (``gsu_jax.methods.split_step_keys``).
    """

    def __init__(self, loss_fn, params, forget, retain, key, *, chunk: int = 16):
        from gsu_jax.methods import split_step_keys

        self.loss_fn, self.params, self.forget, self.retain = loss_fn, params, forget, retain
        self.forget_keys, self.retain_keys, _ = split_step_keys(key, forget, retain)
        flat, self.unravel = ravel_pytree(params)
        self.size = flat.size

        @jax.jit
        def losses_and_flat_grads(at, batch, keys):
            values, grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0, 0))(at, batch, keys)
            return values, jax.vmap(lambda g: ravel_pytree(g)[0])(grads)

        def per_example(batch, keys, at=params):
            n = keys.shape[0]
            values, grads = [], []
            for start in range(0, n, chunk):
                part = jax.tree_util.tree_map(lambda x: x[start : start + chunk], batch)
                v, g = losses_and_flat_grads(at, part, keys[start : start + chunk])
                values.append(np.asarray(v, np.float64))
                grads.append(np.asarray(g))
            return np.concatenate(values), np.concatenate(grads)  # f64[B], f32[B, P]

        self._per_example = per_example
        # Full float32 matmuls: on GPU the default may be TF32, and the reference must be the accurate side.
        with jax.default_matmul_precision("highest"):
            self.forget_losses, self.forget_grads = per_example(forget, self.forget_keys)
            _, self.retain_grads = per_example(retain, self.retain_keys)
        self.g_f = self.forget_grads.mean(axis=0, dtype=np.float64)
        self.g_r = self.retain_grads.mean(axis=0, dtype=np.float64)

    @staticmethod
    def project(a: np.ndarray, v: np.ndarray, *, only_on_conflict: bool) -> np.ndarray:
        inner = a @ v
        if only_on_conflict and inner >= 0:
            return a
        return a - inner / (v @ v) * v

    def per_example_ascent(self, weights: np.ndarray, *, only_on_conflict: bool) -> np.ndarray:
        total = np.zeros(self.size)
        for weight, grad in zip(weights, self.forget_grads):
            if weight > 0:
                total += weight * self.project(-grad.astype(np.float64), self.g_r, only_on_conflict=only_on_conflict)
        return total / len(weights)

    def span(self, num_groups: int, *, ridge: float = 1e-6) -> np.ndarray:
        groups = self.retain_grads.reshape(num_groups, -1, self.size).mean(axis=1, dtype=np.float64)
        units = groups / np.linalg.norm(groups, axis=1, keepdims=True)
        gram = units @ units.T
        rho = (ridge + num_groups * np.finfo(np.float32).eps) * np.trace(gram) / num_groups
        ascent = -self.g_f
        coefficients = np.linalg.solve(gram + rho * np.eye(num_groups), units @ ascent)
        return ascent - units.T @ coefficients

    def uno(self, weight: float) -> np.ndarray:
        """``grad [L_r + w cos^2(g_f, g_r)] = g_r + 2 w cos grad cos`` with Hessian-vector products (jvp of grad)."""
        loss_fn, params = self.loss_fn, self.params

        def mean_loss(p, batch, keys):
            return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0, 0))(p, batch, keys))

        grad_f = jax.grad(lambda p: mean_loss(p, self.forget, self.forget_keys))
        grad_r = jax.grad(lambda p: mean_loss(p, self.retain, self.retain_keys))

        @jax.jit
        def hvps(gf, gr):
            hf_gr = jax.jvp(grad_f, (params,), (gr,))[1]
            hf_gf = jax.jvp(grad_f, (params,), (gf,))[1]
            hr_gf = jax.jvp(grad_r, (params,), (gf,))[1]
            hr_gr = jax.jvp(grad_r, (params,), (gr,))[1]
            return [ravel_pytree(t)[0] for t in (hf_gr, hf_gf, hr_gf, hr_gr)]

        g_f, g_r = self.g_f, self.g_r
        with jax.default_matmul_precision("highest"):
            products = hvps(self.unravel(g_f.astype(np.float32)), self.unravel(g_r.astype(np.float32)))
        hf_gr, hf_gf, hr_gf, hr_gr = (np.asarray(h, np.float64) for h in products)
        n_f, n_r = np.linalg.norm(g_f), np.linalg.norm(g_r)
        cos = (g_f @ g_r) / (n_f * n_r)
        grad_cos = (hf_gr + hr_gf) / (n_f * n_r) - cos * (hf_gf / n_f**2 + hr_gr / n_r**2)
        return g_r + 2.0 * weight * cos * grad_cos

    def remap_surgery(self, hp: Mapping[str, Any]) -> np.ndarray:
        """Step 0 of ``remap_surgery`` (``a_0 = forget_weight``): ``a_0 P^(c)_{M g_r}(D M g_s) + rho D g_r'`` with
        the retained partners (nearest, or the float64 Sinkhorn pairing) found in float64, ``g_s`` from per-example gradients of the surrogate loss,
        ``M`` the ``forget_only`` coordinates, ``D`` from the retain batch's squared per-example gradients and
        ``g_r'`` the retain gradient at ``theta - retain_lookahead * a_0 * P(D M g_s)`` (``g_r`` without the
        lookahead)."""
        if hp["gate"] or hp["saliency"] < 1.0:
            raise CorrectnessError("no float64 reference for remap_surgery with gate or saliency set")
        field = hp["image_field"]
        images = np.asarray(self.forget[field], np.float64).reshape(len(self.forget_keys), -1)
        retained = np.asarray(self.retain[field], np.float64).reshape(len(self.retain_keys), -1)
        distances = (images**2).sum(1)[:, None] - 2.0 * images @ retained.T + (retained**2).sum(1)[None, :]
        partners = np.argmin(distances, axis=1) if hp["pairing"] == "nearest" else sinkhorn_partners(distances)
        surrogate = dict(self.forget, target=np.asarray(self.retain[field])[partners])
        with jax.default_matmul_precision("highest"):
            _, surrogate_grads = self._per_example(surrogate, self.forget_keys)
        paths = jax.tree_util.tree_flatten_with_path(self.params)[0]
        pattern = re.compile(hp["forget_only"] or "")
        mask = np.concatenate([np.full(leaf.size, bool(pattern.search(jax.tree_util.keystr(p)))) for p, leaf in paths])
        g_s = surrogate_grads.mean(axis=0, dtype=np.float64) * mask
        scale = np.ones(self.size)
        if hp["precondition"] != "none":
            fisher = np.mean(self.retain_grads.astype(np.float64) ** 2, axis=0)
            power = 1.0 if hp["precondition"] == "retain_fisher" else 0.5
            scale = (fisher + hp["fisher_damping"] * fisher.mean()) ** -power
        pull = scale * g_s
        if hp["projection"] != "none":
            pull = self.project(pull, self.g_r * mask, only_on_conflict=hp["projection"] == "conflict")
        retain_grad = self.g_r
        if hp["retain_lookahead"] > 0.0:
            # g_r where the forget part of the step leads: theta - lookahead * a_0 * pull.
            ahead = (
                np.asarray(ravel_pytree(self.params)[0], np.float64)
                - hp["retain_lookahead"] * hp["forget_weight"] * pull
            )
            with jax.default_matmul_precision("highest"):
                _, grads = self._per_example(self.retain, self.retain_keys, self.unravel(ahead.astype(np.float32)))
            retain_grad = grads.mean(axis=0, dtype=np.float64)
        return hp["forget_weight"] * pull + hp["retain_weight"] * scale * retain_grad

    def selective_amnesia(self, hp: Mapping[str, Any], *, project: bool) -> np.ndarray:
        """Step 0 of ``selective_amnesia`` (``project``: ``_surgery``): ``clip(P^c_{g_r}(g_s) + replay * g_r)``,
        ``g_s`` from per-example gradients of the loss towards one uniform-noise image per forget example (the
        library's draw, :func:`gsu_jax.published_rules.noise_surrogates`: data, not maths). The EWC term
        ``2 lambda F (theta - theta*)`` is zero at step 0, where ``theta = theta*``."""
        from gsu_jax.published_rules import noise_surrogates

        noise = noise_surrogates(self.forget, self.forget_keys, hp["image_field"])
        with jax.default_matmul_precision("highest"):
            _, surrogate_grads = self._per_example(dict(self.forget, target=np.asarray(noise)), self.forget_keys)
        g_s = surrogate_grads.mean(axis=0, dtype=np.float64)
        if project:
            g_s = self.project(g_s, self.g_r, only_on_conflict=True)
        update = g_s + hp["replay_weight"] * self.g_r
        if hp["grad_clip"] is not None:
            update = update * min(1.0, hp["grad_clip"] / np.linalg.norm(update))
        return update

    def direction(self, name: str, hparams: Mapping[str, Any]) -> np.ndarray:
        """The update ``u`` of method ``name`` at step 0 (alternating rules start with their even branch)."""
        from gsu_jax.methods import resolve_hparams

        hp = resolve_hparams(name, **hparams)
        g_f, g_r = self.g_f, self.g_r
        if name == "s":
            return self.project(g_r, g_f, only_on_conflict=False)
        if name in ("sa", "sa_conflict"):
            return self.project(-g_f, g_r, only_on_conflict=name == "sa_conflict")
        if name == "pcgrad":
            return self.project(-g_f, g_r, only_on_conflict=True) + self.project(g_r, -g_f, only_on_conflict=True)
        if name in ("ascent", "ascent_descent"):
            return -g_f
        if name == "retain_finetune":
            return g_r
        if name == "sa_per_example":
            return self.per_example_ascent(np.ones(len(self.forget_losses)), only_on_conflict=hp["only_on_conflict"])
        if name == "sa_gated":
            if hp["temperature"] == 0.0:
                weights = (self.forget_losses < hp["forget_loss_target"]).astype(np.float64)
            else:
                weights = 1.0 / (1.0 + np.exp(-(hp["forget_loss_target"] - self.forget_losses) / hp["temperature"]))
            if hp.get("ascend_only") is not None:
                raise CorrectnessError("no float64 reference for sa_gated with ascend_only set")
            gated = self.per_example_ascent(weights, only_on_conflict=hp["only_on_conflict"])
            if hp["combine"] == "sa":
                return gated
            if hp["combine"] == "fill":  # the gated-out share of the step goes to retain descent
                return gated + (1.0 - weights.mean()) * g_r
            if hp["combine"] == "pcgrad":
                return self.project(gated, g_r, only_on_conflict=True) + self.project(g_r, gated, only_on_conflict=True)
        if name == "sa_span" and not hp["only_on_conflict"]:
            return self.span(hp["num_directions"])
        if name == "remap_surgery":
            return self.remap_surgery(hp)
        if name in ("selective_amnesia", "selective_amnesia_surgery"):
            return self.selective_amnesia(hp, project=name == "selective_amnesia_surgery")
        if name in ("uno", "uno_s"):
            from gsu_jax.methods import uno_orthogonality_weight

            return self.uno(uno_orthogonality_weight(hp["orthogonality_weight"], len(self.retain_keys)))
        raise CorrectnessError(f"no float64 reference for method {name!r} with {hp}: add one to bench/step.py")


def sinkhorn_partners(cost: np.ndarray, *, epsilon: float = 0.01, iterations: int = 200) -> np.ndarray:
    """Row-wise argmax of the entropic optimal-transport plan between uniform measures, in float64 numpy (the
    reference of :func:`gsu_jax.remap_surgery.balanced_retained_images`: cost scaled by its mean, log domain)."""

    def logsumexp(x, axis):
        return np.logaddexp.reduce(x, axis=axis)

    cost = np.maximum(cost, 0.0)
    cost = cost / max(cost.mean(), np.finfo(np.float64).tiny)
    rows, cols = cost.shape
    f, g = np.zeros(rows), np.zeros(cols)
    for _ in range(iterations):
        f = -epsilon * np.log(rows) - epsilon * logsumexp((g[None, :] - cost) / epsilon, axis=1)
        g = -epsilon * np.log(cols) - epsilon * logsumexp((f[:, None] - cost) / epsilon, axis=0)
    return np.argmax(g[None, :] - cost, axis=1)


def direction_tolerance(name: str) -> float:
    """Relative tolerance of a method's direction against the float64 reference: the default-precision bound of
    :func:`bench.common.default_precision_tolerance`, ten times wider for UNO (a difference of Hessian-vector
    products, computed by two different AD routes)."""
    return common.default_precision_tolerance() * (10 if name in ("uno", "uno_s") else 1)


# ----------------------------------------------------------------------------------------------------------------
# Timing


def adam_first_moment_direction(opt_state: Any) -> np.ndarray:
    """The update direction ``u`` of a first Adam step, read off the optimizer state: Adam starts from ``mu = 0``,
    so after one step ``mu = (1 - b1) u`` exactly (up to one float32 rounding). This checks the very function
    that is timed (same compiled step, same optimizer) without a second compilation."""
    found = [
        node for node in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda n: hasattr(n, "mu")) if hasattr(node, "mu")
    ]
    if len(found) != 1:
        raise CorrectnessError(f"expected one Adam state in the optimizer state, found {len(found)}")
    return np.asarray(ravel_pytree(found[0].mu)[0], np.float64) / (1.0 - ADAM_B1)
