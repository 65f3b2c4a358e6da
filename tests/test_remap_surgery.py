"""Tests for the recommended method, ``remap_surgery``: its step against a NumPy float64 reference of the rule,
the nearest-retained pairing against brute force, the balanced pairing on cases whose answer is known, the gate and the annealing on toys whose answer is known.

The model is a tiny deterministic autoencoder ``x -> tanh(x E) D + b`` (encoder ``E``, decoder ``D``, ``b``) whose
per-example loss reconstructs the example's ``"target"`` field when it has one (as the VAE and DDPM losses do).
"""

from __future__ import annotations

import re

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gsu_jax import methods
from gsu_jax.methods import make_method
from gsu_jax.remap_surgery import balanced_retained_images, nearest_retained_images, retain_fisher_diagonal

DATA_DIM, HIDDEN = 5, 3
FORGET_SIZE, RETAIN_SIZE = 6, 9


def autoencoder_loss(params, example, key):
    del key  # deterministic: the reference needs no noise
    x = example["image"]
    recon = jnp.tanh(x @ params["encoder"]["w"]) @ params["decoder"]["w"] + params["decoder"]["b"]
    return 0.5 * jnp.sum(jnp.square(example.get("target", x) - recon))


def capture_direction() -> optax.GradientTransformation:
    """An "optimizer" whose state is the last update direction and whose updates are zero."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda updates, state, params=None: (jax.tree.map(jnp.zeros_like, updates), updates),
    )


@pytest.fixture(scope="module")
def problem():
    keys = jax.random.split(jax.random.key(0), 4)
    params = {
        "encoder": {"w": 0.7 * jax.random.normal(keys[0], (DATA_DIM, HIDDEN))},
        "decoder": {"w": 0.7 * jax.random.normal(keys[1], (HIDDEN, DATA_DIM)), "b": jnp.zeros(DATA_DIM)},
    }
    forget = {"image": 1.0 + 0.5 * jax.random.normal(keys[2], (FORGET_SIZE, DATA_DIM))}
    retain = {"image": -0.5 + jax.random.normal(keys[3], (RETAIN_SIZE, DATA_DIM))}
    return params, forget, retain


_STEPS: dict[tuple, tuple] = {}


def _direction(params, forget, retain, *, step=0, **hparams):
    """``(u, metrics)`` of one remap_surgery step at ``state.step = step`` (each configuration jitted once)."""
    key = tuple(sorted(hparams.items()))
    if key not in _STEPS:
        method = make_method("remap_surgery", loss_fn=autoencoder_loss, optimizer=capture_direction(), **hparams)
        _STEPS[key] = (method, jax.jit(method.step))
    method, compiled = _STEPS[key]
    state = method.init(params)._replace(step=jnp.asarray(step, jnp.int32))
    _, state, step_metrics = compiled(params, state, forget, retain, jax.random.key(1))
    return state.optimizer, step_metrics


# ---------------------------------------------------------------------------------------- NumPy reference


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(leaf, np.float64).ravel() for leaf in jax.tree.leaves(tree)])


def _decoder_mask(params) -> np.ndarray:
    """1 on the decoder's coordinates in the flattened order of :func:`_flat` (leaves sorted by path)."""
    return np.concatenate(
        [
            np.full(np.size(leaf), float("decoder" in jax.tree_util.keystr(path)))
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        ]
    )


def _example_grad(params, image, target):
    """The gradient of one example's loss, by jax.grad on that example alone (no vmap), in float64."""
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float64), params)
        example = {"image": jnp.asarray(image, jnp.float64), "target": jnp.asarray(target, jnp.float64)}
        loss, grad = jax.value_and_grad(autoencoder_loss)(params64, example, None)
        return float(loss), _flat(grad)


def _sinkhorn_partners(cost, epsilon=0.01, iterations=200):
    """Row-wise argmax of the entropic transport plan between uniform marginals, cost scaled by its mean: the
    Sinkhorn updates u <- a / (K v), v <- b / (K^T u) of K = exp(-C / epsilon), in log space, in float64."""
    cost = cost / cost.mean()
    log_kernel = -cost / epsilon
    log_u, log_v = np.zeros(cost.shape[0]), np.zeros(cost.shape[1])
    for _ in range(iterations):
        log_u = -np.log(cost.shape[0]) - np.logaddexp.reduce(log_kernel + log_v[None, :], axis=1)
        log_v = -np.log(cost.shape[1]) - np.logaddexp.reduce(log_kernel + log_u[:, None], axis=0)
    return np.argmax(log_kernel + log_v[None, :], axis=1)


def reference_direction(
    params,
    forget,
    retain,
    *,
    forget_only=True,
    projection="conflict",
    forget_weight=1.0,
    retain_weight=1.0,
    gate=False,
    saliency=1.0,
    weight_scale=1.0,
    precondition="retain_rms",
    fisher_damping=0.1,
    unmatched_weight=0.0,
    unmatched_objective="surrogate",
    retain_lookahead=0.0,
    pairing="nearest",
):
    """The rule in NumPy: pair by brute force (or by Sinkhorn iterations written out here), per-example gradients one
    at a time, mask, gate, project, combine."""
    forget_images, retain_images = np.asarray(forget["image"], np.float64), np.asarray(retain["image"], np.float64)
    mask = _decoder_mask(params) if forget_only else 1.0
    cost = np.array([[np.sum((image - r) ** 2) for r in retain_images] for image in forget_images])
    partners = np.argmin(cost, axis=1) if pairing == "nearest" else _sinkhorn_partners(cost)
    surrogate_grads, own_grads, weights = [], [], []
    for image, partner in zip(forget_images, partners):
        surrogate_loss, grad = _example_grad(params, image, retain_images[partner])
        own_loss, own_grad = _example_grad(params, image, image)
        surrogate_grads.append(grad)
        own_grads.append(own_grad)
        weights.append(float(surrogate_loss > own_loss) if gate else 1.0)
    g_s = np.mean(np.asarray(weights)[:, None] * np.asarray(surrogate_grads), axis=0)
    unmatched_move = forget_only and unmatched_weight > 0
    if unmatched_move and unmatched_objective == "surrogate":  # the rest follows the surrogate, scaled
        g_s = (mask + unmatched_weight * (1.0 - mask)) * g_s
    elif unmatched_move:  # the rest ascends the forget examples' own loss
        g_s = mask * g_s - unmatched_weight * (1.0 - mask) * np.mean(own_grads, axis=0)
    else:
        g_s = mask * g_s
    if saliency < 1.0:  # keep the ceil(saliency * nonzero) largest magnitudes
        keep = int(np.ceil(saliency * np.count_nonzero(g_s)))
        g_s = np.where(np.abs(g_s) >= np.sort(np.abs(g_s))[::-1][keep - 1], g_s, 0.0)
    retain_grads = np.asarray([_example_grad(params, image, image)[1] for image in retain_images])
    g_r = np.mean(retain_grads, axis=0)
    retain_direction = g_r
    if precondition != "none":  # (F + damping * mean F)^-p, F the mean squared per-example retain gradient
        fisher = np.mean(retain_grads**2, axis=0)
        inverse = (fisher + fisher_damping * np.mean(fisher)) ** -(1.0 if precondition == "retain_fisher" else 0.5)
        g_s, retain_direction = g_s * inverse, g_r * inverse
    direction = g_r if unmatched_move else mask * g_r
    inner = g_s @ direction
    if projection == "always" or (projection == "conflict" and inner < 0):
        g_s = g_s - inner / (direction @ direction) * direction
    forget_part = forget_weight * weight_scale * g_s
    if retain_lookahead > 0:  # g_r again, at the point the forget part of the step leads to
        flat_params, unravel = jax.flatten_util.ravel_pytree(params)
        ahead = unravel(jnp.asarray(np.asarray(flat_params, np.float64) - retain_lookahead * forget_part, jnp.float32))
        g_ahead = np.mean([_example_grad(ahead, image, image)[1] for image in retain_images], axis=0)
        retain_direction = g_ahead * inverse if precondition != "none" else g_ahead
    return forget_part + retain_weight * retain_direction, np.mean(1.0 - np.asarray(weights))


# ------------------------------------------------------------------------------------------------- tests


def test_nearest_retained_images_match_brute_force():
    rng = np.random.default_rng(0)
    forget = rng.normal(size=(7, 2, 3)).astype(np.float32)
    retain = rng.normal(size=(11, 2, 3)).astype(np.float32)
    retain[4] = retain[9]  # a tie: the first index wins
    forget[0] = retain[9] + 1e-3
    expected = np.stack([retain[np.argmin([np.sum((f - r) ** 2) for r in retain])] for f in forget])
    np.testing.assert_array_equal(np.asarray(nearest_retained_images(forget, retain)), expected)
    assert np.array_equal(np.asarray(nearest_retained_images(forget, retain))[0], retain[4])


def test_balanced_pairing_recovers_a_permutation_and_spends_every_retain_image():
    rng = np.random.default_rng(1)
    retain = rng.normal(size=(12, 3, 4)).astype(np.float32)
    # A permuted, slightly perturbed copy: the optimal-transport pairing is that permutation (the nearest images too).
    order = rng.permutation(12)
    forget = retain[order] + 1e-3 * rng.normal(size=retain.shape).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(balanced_retained_images(forget, retain)), retain[order])
    # Four forget images all nearer to "a" than to "b": nearest sends all four to a, the pairing two to each.
    a, b = np.zeros((3, 4), np.float32), np.ones((3, 4), np.float32)
    pool = np.stack([a, a + 0.01, b, b - 0.01])
    crowd = np.stack([a + 0.1 * (i + 1) for i in range(4)])
    nearest = np.asarray(nearest_retained_images(crowd, pool))
    assert np.all(nearest.mean(axis=(1, 2)) < 0.5)
    paired = np.asarray(balanced_retained_images(crowd, pool))
    np.testing.assert_allclose(np.sort(paired.mean(axis=(1, 2))), [0.0, 0.01, 0.99, 1.0], atol=1e-6)


@pytest.mark.parametrize(
    "hparams",
    [
        {},  # the defaults
        {"pairing": "nearest"},
        {"projection": "always", "forget_weight": 2.0, "retain_weight": 0.5},
        {"projection": "none", "forget_only": None},
        {"gate": True},
        {"saliency": 0.3, "projection": "always"},
        {"precondition": "retain_fisher", "fisher_damping": 0.1, "projection": "always"},
        {"precondition": "retain_rms", "projection": "always"},
        {"unmatched_weight": 0.3, "projection": "always"},
        {"unmatched_weight": 0.5, "unmatched_objective": "ascent", "projection": "always"},
        {"retain_lookahead": 0.05, "projection": "always", "forget_weight": 2.0},
        {"retain_lookahead": 0.05, "precondition": "none"},
    ],
    ids=[
        "defaults",
        "nearest",
        "always",
        "none-all-params",
        "gated",
        "salient",
        "fisher",
        "rms",
        "unmatched",
        "encoder-ascent",
        "lookahead",
        "lookahead-raw",
    ],
)
def test_step_matches_numpy_reference(problem, hparams):
    params, forget, retain = problem
    update, step_metrics = _direction(params, forget, retain, **hparams)
    defaults = methods.resolve_hparams("remap_surgery")
    resolved = {**defaults, **hparams}
    expected, gated = reference_direction(
        params,
        forget,
        retain,
        forget_only=resolved["forget_only"] is not None,
        projection=resolved["projection"],
        forget_weight=resolved["forget_weight"],
        retain_weight=resolved["retain_weight"],
        gate=resolved["gate"],
        saliency=resolved["saliency"],
        precondition=resolved["precondition"],
        fisher_damping=resolved["fisher_damping"],
        unmatched_weight=resolved["unmatched_weight"],
        unmatched_objective=resolved["unmatched_objective"],
        retain_lookahead=resolved["retain_lookahead"],
        pairing=resolved["pairing"],
    )
    np.testing.assert_allclose(_flat(update), expected, rtol=2e-4, atol=2e-5)
    assert float(step_metrics["gated_fraction"]) == pytest.approx(gated)


def test_annealing_halves_the_forget_pull_every_half_life(problem):
    params, forget, retain = problem
    defaults = methods.resolve_hparams("remap_surgery")
    for step in (0, 3, 6):
        update, _ = _direction(params, forget, retain, step=step, forget_half_life=3.0, retain_weight=1.0)
        expected, _ = reference_direction(
            params,
            forget,
            retain,
            weight_scale=0.5 ** (step / 3),
            forget_weight=defaults["forget_weight"],
            retain_lookahead=defaults["retain_lookahead"],
            pairing=defaults["pairing"],
        )
        np.testing.assert_allclose(_flat(update), expected, rtol=2e-4, atol=2e-5)


def test_gate_stops_the_pull_exactly_when_the_example_is_forgotten():
    """One forget point x, one retained point n, a model that outputs its bias b, SGD on the gated pull alone.

    The gate keeps pulling b towards n while ``|b - n| > |b - x|`` and drops the example as soon as b crosses the
    bisector of x and n: from then on the update is zero, so b stays where it first crossed (the known answer), on
    n's side and never at n itself.
    """

    def bias_loss(params, example, key):
        del key
        return 0.5 * jnp.sum(jnp.square(example.get("target", example["image"]) - params["decoder"]["b"]))

    x, n = jnp.array([[0.0, 0.0]]), jnp.array([[4.0, 0.0]])
    method = make_method(
        "remap_surgery",
        loss_fn=bias_loss,
        optimizer=optax.sgd(0.3),
        gate=True,
        retain_weight=0.0,
        forget_half_life=None,
        forget_weight=1.0,
        precondition="none",  # the known answer is for plain SGD on the raw pull at weight 1
    )
    params = {"decoder": {"b": jnp.array([0.0, 1.0])}}
    state = method.init(params)
    step = jax.jit(method.step)
    positions = [float(params["decoder"]["b"][0])]
    for index in range(12):
        params, state, _ = step(params, state, {"image": x}, {"image": n}, jax.random.key(index))
        positions.append(float(params["decoder"]["b"][0]))
    crossed = next(i for i, p in enumerate(positions) if p >= 2.0)  # the bisector is b_0 = 2
    # Before crossing: b_0 <- b_0 + 0.3 (4 - b_0); after: frozen.
    for before, after in zip(positions[:crossed], positions[1 : crossed + 1]):
        assert after == pytest.approx(before + 0.3 * (4.0 - before), rel=1e-6)
    assert positions[crossed:] == [positions[crossed]] * (len(positions) - crossed)
    assert 2.0 <= positions[crossed] < 4.0


def test_batches_without_the_image_field_are_refused(problem):
    params, forget, retain = problem
    method = make_method("remap_surgery", loss_fn=autoencoder_loss, optimizer=optax.sgd(0.1), image_field="pixels")
    message = re.escape("remap_surgery pairs examples by their 'pixels' field, which the batches lack")
    with pytest.raises(ValueError, match=message):
        method.step(params, method.init(params), forget, retain, jax.random.key(0))


def test_unmatched_weight_without_forget_only_is_refused(problem):
    params, forget, retain = problem
    method = make_method(
        "remap_surgery", loss_fn=autoencoder_loss, optimizer=optax.sgd(0.1), forget_only=None, unmatched_weight=0.5
    )
    with pytest.raises(ValueError, match=r"unmatched_weight=0.5 needs forget_only"):
        method.step(params, method.init(params), forget, retain, jax.random.key(0))


def test_unmatched_options_agree_on_the_parameter_tree_and_the_flat_vector(problem):
    params, forget, retain = problem
    for objective in ("surrogate", "ascent"):
        updates = []
        for flat in (True, False):
            method = make_method(
                "remap_surgery",
                loss_fn=autoencoder_loss,
                optimizer=capture_direction(),
                unmatched_weight=0.5,
                unmatched_objective=objective,
                flat_parameters=flat,
            )
            _, state, _ = method.step(params, method.init(params), forget, retain, jax.random.key(1))
            updates.append(_flat(state.optimizer))
        np.testing.assert_allclose(updates[0], updates[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("one_at_a_time", [True, False])
def test_retain_fisher_diagonal_one_at_a_time_or_vmapped_equals_the_mean_squared_example_gradient(
    problem, one_at_a_time
):
    """Both ways of taking the per-example gradients (the CPU's lax.scan, the accelerators' vmap, here with chunks
    of 4 of the 9 examples) give ``mean_i (grad l(x_i))^2``, each gradient computed alone in float64."""
    params, _, retain = problem
    keys = jax.random.split(jax.random.key(1), RETAIN_SIZE)
    fisher = retain_fisher_diagonal(autoencoder_loss, params, retain, keys, 4, one_at_a_time=one_at_a_time)
    grads = np.asarray([_example_grad(params, image, image)[1] for image in np.asarray(retain["image"])])
    np.testing.assert_allclose(_flat(fisher), np.mean(grads**2, axis=0), rtol=1e-5, atol=1e-7)
