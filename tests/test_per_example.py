"""Tests for the per-example gradient engine (gsu_jax.per_example).

Two models, both written here: a one-layer tanh regression whose per-example
gradients have a closed form (the float64 NumPy reference), and a tiny VAE (the
method's setting) for the jvp/vjp-versus-materialised comparison and the
first-order guarantee.
"""

from __future__ import annotations

import doctest
import functools

import chex
import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import strategies as st

import gsu_jax
from gsu_jax import per_example, projections

BATCH = 7
FEATURES, OUTPUTS = 5, 3
# The test models' matmuls ask for full float32: on GPUs the default is TF32,
# whose rounding differs between batch shapes and would swamp the comparisons.
HIGHEST = jax.lax.Precision.HIGHEST


def flat(tree):
    """All leaves raveled in tree order and concatenated, as float64 NumPy."""
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def reference_normal_plane(u, d, *, only_on_conflict=False):
    inner, squared = u @ d, d @ d
    if squared == 0 or (only_on_conflict and inner >= 0):
        return u.copy()
    return u - inner / squared * d


# --------------------------------------------------------------------------
# Closed-form model: loss = 1/2 ||tanh(x W + b) - y - 0.1 n(key)||^2.


def tanh_loss(params, example, key):
    noise = 0.1 * jax.random.normal(key, (OUTPUTS,))
    prediction = jnp.tanh(jnp.matmul(example["x"], params["w"], precision=HIGHEST) + params["b"])
    return 0.5 * jnp.sum((prediction - example["y"] - noise) ** 2)


def tanh_problem(seed, batch=BATCH):
    rng = np.random.default_rng(seed)
    params = {
        "w": rng.standard_normal((FEATURES, OUTPUTS)).astype(np.float32),
        "b": rng.standard_normal(OUTPUTS).astype(np.float32),
    }
    data = {
        "x": rng.standard_normal((batch, FEATURES)).astype(np.float32),
        "y": rng.standard_normal((batch, OUTPUTS)).astype(np.float32),
    }
    keys = jax.random.split(jax.random.key(seed), batch)
    return params, data, keys


def numpy_losses_and_grads(params, data, keys):
    """float64 per-example losses and gradients ({"w": [B, F, O], "b": [B, O]})."""
    noise = 0.1 * np.asarray(jax.vmap(lambda k: jax.random.normal(k, (OUTPUTS,)))(keys), np.float64)
    w, b = (np.asarray(params[k], np.float64) for k in ("w", "b"))
    x, y = (np.asarray(data[k], np.float64) for k in ("x", "y"))
    t = np.tanh(x @ w + b)
    residual = t - y - noise
    delta = residual * (1 - t**2)
    losses = 0.5 * np.sum(residual**2, axis=1)
    return losses, {"w": np.einsum("bf,bo->bfo", x, delta), "b": delta}


def per_example_rows(grads):
    # Leaf order of {"b", "w"} (sorted keys) as flat() uses.
    return np.concatenate([grads["b"], grads["w"].reshape(len(grads["b"]), -1)], axis=1)


LOSSES = jax.jit(functools.partial(per_example.per_example_losses, tanh_loss))
GRADS = jax.jit(functools.partial(per_example.per_example_grads, tanh_loss), static_argnames="chunk_size")
DERIVATIVES = jax.jit(functools.partial(per_example.per_example_directional_derivatives, tanh_loss))
WEIGHTED = jax.jit(functools.partial(per_example.weighted_grad_sum, tanh_loss))
PROJECTED = jax.jit(
    functools.partial(per_example.per_example_projected_mean, tanh_loss), static_argnames="only_on_conflict"
)


@hypothesis.settings(max_examples=15)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), chunk_size=st.sampled_from([None, 3, 10]))
def test_losses_and_grads_match_numpy(seed, chunk_size):
    params, data, keys = tanh_problem(seed)
    losses, grads = numpy_losses_and_grads(params, data, keys)
    np.testing.assert_allclose(np.asarray(LOSSES(params, data, keys)), losses, rtol=1e-5, atol=1e-6)
    got = GRADS(params, data, keys, chunk_size=chunk_size)
    for name in ("w", "b"):
        assert got[name].shape == (BATCH,) + params[name].shape
        np.testing.assert_allclose(np.asarray(got[name]), grads[name], rtol=1e-4, atol=1e-5)


@hypothesis.settings(max_examples=15)
@hypothesis.given(seed=st.integers(0, 2**31 - 1))
def test_jvp_and_vjp_products_match_numpy(seed):
    params, data, keys = tanh_problem(seed)
    _, grads = numpy_losses_and_grads(params, data, keys)
    rows = per_example_rows(grads)
    rng = np.random.default_rng(seed + 1)
    tangent = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    weights = rng.standard_normal(BATCH).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(DERIVATIVES(params, data, keys, tangent)), rows @ flat(tangent), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(
        flat(WEIGHTED(params, data, keys, weights)), weights.astype(np.float64) @ rows, rtol=1e-4, atol=1e-5
    )


@hypothesis.settings(max_examples=20)
@hypothesis.given(
    seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1.0, -1.0, 0.25]), only_on_conflict=st.booleans()
)
def test_projected_mean_matches_numpy(seed, scale, only_on_conflict):
    params, data, keys = tanh_problem(seed)
    _, grads = numpy_losses_and_grads(params, data, keys)
    rows = scale * per_example_rows(grads)
    rng = np.random.default_rng(seed + 2)
    direction = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
    d = flat(direction)
    expected = np.mean([reference_normal_plane(row, d, only_on_conflict=only_on_conflict) for row in rows], axis=0)
    got = PROJECTED(params, data, keys, direction, scale=scale, only_on_conflict=only_on_conflict)
    error = np.linalg.norm(flat(got) - expected)
    assert error <= 1e-5 * np.linalg.norm(rows, axis=1).max()
    if not only_on_conflict:
        assert abs(flat(got) @ d) <= 1e-5 * np.linalg.norm(rows) * np.linalg.norm(d)


def test_zero_direction_gives_the_scaled_mean_gradient():
    params, data, keys = tanh_problem(0)
    _, grads = numpy_losses_and_grads(params, data, keys)
    zero = jax.tree.map(np.zeros_like, params)
    got = PROJECTED(params, data, keys, zero, scale=-1.0, only_on_conflict=False)
    chex.assert_tree_all_finite(got)
    np.testing.assert_allclose(flat(got), -per_example_rows(grads).mean(0), rtol=1e-5, atol=1e-6)


def test_bfloat16_params_keep_their_dtype():
    params, data, keys = tanh_problem(1)
    params16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    direction = jax.tree.map(lambda x: x + 1.0, params)  # float32 direction
    got = PROJECTED(params16, data, keys, direction, scale=-1.0, only_on_conflict=False)
    chex.assert_trees_all_equal_dtypes(got, params16)
    reference = PROJECTED(
        jax.tree.map(lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), params),
        data,
        keys,
        direction,
        scale=-1.0,
        only_on_conflict=False,
    )
    error = np.linalg.norm(flat(got) - flat(reference))
    assert error <= 3e-2 * np.linalg.norm(flat(reference))


class JitAndNoJitAgreeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_per_example_functions(self):
        params, data, keys = tanh_problem(3)
        direction = jax.tree.map(lambda x: -x, params)
        got = self.variant(
            functools.partial(per_example.per_example_projected_mean, tanh_loss, scale=-1.0, only_on_conflict=True)
        )(params, data, keys, direction)
        want = PROJECTED(params, data, keys, direction, scale=-1.0, only_on_conflict=True)
        chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------
# Tiny VAE: 12 pixels, 6 hidden units, 2 latent dimensions.

PIXELS, HIDDEN, LATENT = 12, 6, 2


def init_vae(seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    shapes = {
        "encoder": (PIXELS, HIDDEN),
        "mean": (HIDDEN, LATENT),
        "logvar": (HIDDEN, LATENT),
        "decoder": (LATENT, HIDDEN),
        "output": (HIDDEN, PIXELS),
    }
    return {
        name: {
            "kernel": (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(dtype),
            "bias": (0.1 * rng.standard_normal(shape[1])).astype(dtype),
        }
        for name, shape in shapes.items()
    }


def vae_loss(params, example, key):
    """Negative ELBO of one image f[3, 4, 1]: Bernoulli BCE + Gaussian KL."""

    def dense(name, x):
        return jnp.matmul(x, params[name]["kernel"], precision=HIGHEST) + params[name]["bias"]

    image = example["image"].reshape(-1)
    hidden = jax.nn.relu(dense("encoder", image))
    mean, logvar = dense("mean", hidden), dense("logvar", hidden)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    logits = dense("output", jax.nn.relu(dense("decoder", z)))
    bce = jnp.sum(jnp.logaddexp(0, logits) - image * logits)
    kl = -0.5 * jnp.sum(1 + logvar - mean**2 - jnp.exp(logvar))
    return bce + kl


def vae_batch(seed, size, dtype=np.float32):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, (size, 3, 4, 1)) ** (1 + seed % 3)
    return {"image": images.astype(dtype)}, jax.random.split(jax.random.key(seed), size)


def mean_loss(params, batch, keys):
    return jnp.mean(per_example.per_example_losses(vae_loss, params, batch, keys))


VAE_PROJECTED = jax.jit(
    functools.partial(per_example.per_example_projected_mean, vae_loss), static_argnames="only_on_conflict"
)


@pytest.fixture(scope="module")
def vae():
    params = init_vae(0)
    forget, forget_keys = vae_batch(1, BATCH)
    retain, retain_keys = vae_batch(2, 16)
    direction = jax.jit(jax.grad(mean_loss))(params, retain, retain_keys)
    return params, forget, forget_keys, direction


def test_vae_chunked_grads_equal_unchunked(vae):
    params, forget, keys, _ = vae
    grads = jax.jit(functools.partial(per_example.per_example_grads, vae_loss), static_argnames="chunk_size")
    unchunked = grads(params, forget, keys)
    for chunk_size in (3, 64):
        chex.assert_trees_all_close(grads(params, forget, keys, chunk_size=chunk_size), unchunked, rtol=1e-6, atol=1e-7)
    # Every per-example gradient equals a separate jax.grad call.
    single = jax.jit(jax.grad(vae_loss))
    for i in (0, BATCH - 1):
        chex.assert_trees_all_close(
            single(params, jax.tree.map(lambda x: x[i], forget), keys[i]),
            jax.tree.map(lambda x: x[i], unchunked),
            rtol=1e-5,
            atol=1e-6,
        )


@functools.partial(jax.jit, static_argnames="only_on_conflict")
def materialised_projected_mean(params, batch, keys, direction, scale, only_on_conflict):
    grads = per_example.per_example_grads(vae_loss, params, batch, keys)
    updates = jax.tree.map(lambda g: scale * g, grads)
    return projections.mean_normal_plane_projection(updates, direction, only_on_conflict=only_on_conflict)


@pytest.mark.parametrize("scale, only_on_conflict", [(-1.0, False), (-1.0, True), (0.5, True)])
def test_vae_jvp_vjp_route_equals_materialised_route(vae, scale, only_on_conflict):
    params, forget, keys, direction = vae
    want = materialised_projected_mean(params, forget, keys, direction, scale, only_on_conflict=only_on_conflict)
    got = VAE_PROJECTED(params, forget, keys, direction, scale=scale, only_on_conflict=only_on_conflict)
    norm = np.linalg.norm(flat(want))
    assert np.linalg.norm(flat(got) - flat(want)) <= 1e-5 * norm


def test_first_order_guarantee_on_a_tiny_vae():
    """A step eta along the projected update changes the retain loss by
    O(eta^2); along the raw ascent update by O(eta) (log-log slopes)."""
    with jax.enable_x64(True):
        params = init_vae(4, np.float64)
        forget, forget_keys = vae_batch(5, 8, np.float64)
        retain, retain_keys = vae_batch(6, 8, np.float64)
        retain_loss = jax.jit(lambda p: mean_loss(p, retain, retain_keys))

        @jax.jit
        def updates(params):
            direction = jax.grad(mean_loss)(params, retain, retain_keys)
            ascent = jax.tree.map(jnp.negative, jax.grad(mean_loss)(params, forget, forget_keys))
            transform = gsu_jax.project_normal_plane()
            projected, _ = transform.update(ascent, transform.init(params), direction=direction)
            per_sample = per_example.per_example_projected_mean(
                vae_loss, params, forget, forget_keys, direction, scale=-1.0
            )
            per_sample_pcgrad = per_example.per_example_projected_mean(
                vae_loss, params, forget, forget_keys, direction, scale=-1.0, only_on_conflict=True
            )
            return ascent, projected, per_sample, per_sample_pcgrad

        ascent, projected, per_sample, per_sample_pcgrad = updates(params)
        base = float(retain_loss(params))

        def change(update, eta):
            """L_r(theta - eta * update / ||update||) - L_r(theta)."""
            norm = np.linalg.norm(flat(update))
            return float(retain_loss(jax.tree.map(lambda p, u: p - eta / norm * np.asarray(u), params, update))) - base

        etas = np.geomspace(1e-5, 1e-3, 5)

        def slope(update):
            changes = [abs(change(update, eta)) for eta in etas]
            return np.polyfit(np.log(etas), np.log(changes), 1)[0]

        assert 0.95 < slope(ascent) < 1.05
        assert slope(projected) > 1.9
        # Projection is linear: the mean of per-sample projections is the
        # projection of the mean, and so has the same guarantee.
        assert slope(per_sample) > 1.9
        chex.assert_trees_all_close(per_sample, projected, rtol=1e-10, atol=1e-12)
        # The raw ascent step raises the retain loss to first order; the
        # per-sample PCGrad step does not (its first-order change is <= 0).
        eta = 1e-5
        assert change(ascent, eta) - change(ascent, -eta) > 1e3 * eta**2
        assert change(per_sample_pcgrad, eta) - change(per_sample_pcgrad, -eta) <= 1e-12


def test_nnx_state_params():
    model = nnx.Linear(FEATURES, OUTPUTS, precision=HIGHEST, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(params, example, key):
        prediction = nnx.merge(graphdef, params)(example["x"])
        noise = 0.1 * jax.random.normal(key, (OUTPUTS,))
        return 0.5 * jnp.sum((jnp.tanh(prediction) - example["y"] - noise) ** 2)

    _, data, keys = tanh_problem(0)
    direction = jax.tree.map(lambda x: x + 0.5, params)
    grads = jax.jit(functools.partial(per_example.per_example_grads, loss))(params, data, keys)
    assert isinstance(grads, nnx.State)
    want = jax.jit(projections.mean_normal_plane_projection)(grads, direction)
    got = jax.jit(functools.partial(per_example.per_example_projected_mean, loss))(params, data, keys, direction)
    assert isinstance(got, nnx.State)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# Bad inputs.


def test_bad_inputs_raise_clear_errors():
    params, data, keys = tanh_problem(0)
    short = {"x": data["x"], "y": data["y"][:3]}
    cases = [
        (lambda: per_example.per_example_losses("loss", params, data, keys), TypeError, "loss_fn must be a callable"),
        (
            lambda: per_example.per_example_losses(tanh_loss, params, short, keys),
            ValueError,
            r"batch\['x'\] has 7, batch\['y'\] has 3",
        ),
        (
            lambda: per_example.per_example_losses(tanh_loss, params, data, keys[:4]),
            ValueError,
            "keys must hold one PRNG key per example",
        ),
        (
            lambda: per_example.per_example_losses(
                tanh_loss, params, {"x": data["x"][:0], "y": data["y"][:0]}, keys[:0]
            ),
            ValueError,
            "at least one example",
        ),
        (
            lambda: per_example.per_example_losses(lambda p, e, k: e["y"], params, data, keys),
            ValueError,
            "must return a scalar",
        ),
        (
            lambda: per_example.per_example_grads(tanh_loss, params, data, keys, chunk_size=0),
            ValueError,
            r"chunk_size=0 is invalid: allowed: None or an integer >= 1",
        ),
        (
            lambda: per_example.per_example_grads(tanh_loss, params, data, keys, chunk_size=2.0),
            TypeError,
            r"chunk_size=2.0 is invalid: allowed: None or an integer >= 1",
        ),
        (
            lambda: per_example.weighted_grad_sum(tanh_loss, params, data, keys, np.ones(3)),
            ValueError,
            r"weights must have shape \(7,\)",
        ),
        (
            lambda: per_example.per_example_directional_derivatives(tanh_loss, params, data, keys, {"w": params["w"]}),
            ValueError,
            r"tangent has no leaf params\['b'\]",
        ),
        (
            lambda: per_example.per_example_projected_mean(
                tanh_loss, params, data, keys, {"w": params["w"], "b": np.zeros(4, np.float32)}
            ),
            ValueError,
            r"direction\['b'\] has shape \(4,\)",
        ),
        (
            lambda: per_example.per_example_projected_mean(tanh_loss, params, data, keys, params, scale=np.ones(2)),
            TypeError,
            "scale must be a real scalar",
        ),
        (
            lambda: per_example.per_example_projected_mean(tanh_loss, params, data, keys, params, eps=-1.0),
            ValueError,
            "eps must be",
        ),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()


def test_docstring_examples_run():
    assert doctest.testmod(per_example, raise_on_error=True).attempted > 0
