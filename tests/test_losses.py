"""Losses: equality to independent float64 references, purity, batching, per-example gradients, guidance term.

Inputs come from NumPy generators and multi-op computations run under one ``jax.jit`` each: on this 2-core machine
compiling one small program is much cheaper than compiling every eager op of a new shape.
"""

from __future__ import annotations

import doctest

import chex
import hypothesis
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import strategies as st

from gsu_jax import losses
from gsu_jax.losses import (
    batch_mean,
    bernoulli_nll,
    cross_entropy,
    elbo_terms,
    example_keys,
    kl_to_standard_normal,
    negative_elbo,
    uniformity_guidance_loss,
)
from gsu_jax.models import MLPVAE, ConvVAE, MLPClassifier

IMAGE_SHAPE = (4, 4, 1)  # tiny images: every property below is about the maths, not the size
LATENT_DIM = 3
KL_WEIGHTS = (0.0, 0.3, 1.0, 2.0)


def np64(tree):
    return jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), tree)


def numpy_dense(p, name, x):
    return x @ p[name]["kernel"] + p[name]["bias"]


def numpy_mlp_vae_terms(params, image, eps):
    """The MLPVAE negative-ELBO terms in float64 NumPy, from the raw weights and a given eps."""
    p = np64(nnx.to_pure_dict(params))
    x = np.asarray(image, np.float64).reshape(-1)
    hidden = np.maximum(numpy_dense(p, "encoder_hidden", x), 0.0)
    mean, logvar = numpy_dense(p, "mean_head", hidden), numpy_dense(p, "logvar_head", hidden)
    z = mean + np.exp(0.5 * logvar) * np.asarray(eps, np.float64)
    logits = numpy_dense(p, "decoder_output", np.maximum(numpy_dense(p, "decoder_hidden", z), 0.0))
    probs = 1.0 / (1.0 + np.exp(-logits))
    reconstruction = -np.sum(x * np.log(probs) + (1.0 - x) * np.log1p(-probs))
    kl = -0.5 * np.sum(1.0 + logvar - mean**2 - np.exp(logvar))  # the reference code's form
    return reconstruction, kl


def numpy_mlp_decode_probs(params, z):
    p = np64(nnx.to_pure_dict(params))
    logits = numpy_dense(p, "decoder_output", np.maximum(numpy_dense(p, "decoder_hidden", z), 0.0))
    return 1.0 / (1.0 + np.exp(-logits))


def numpy_mlp_classifier_logits(params, images):
    p = np64(nnx.to_pure_dict(params))
    return numpy_dense(
        p, "output_layer", np.maximum(numpy_dense(p, "hidden_layer", images.reshape(len(images), -1)), 0.0)
    )


@pytest.fixture(scope="module")
def tiny_vae():
    # The same tiny configuration as in test_models.py: compiled initialisers are shared within one pytest run.
    return nnx.split(MLPVAE(image_shape=IMAGE_SHAPE, hidden=8, latent_dim=LATENT_DIM, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def tiny_conv_vae():
    return nnx.split(ConvVAE(latent_dim=LATENT_DIM, channels=4, num_groups=2, rngs=nnx.Rngs(1)))


@pytest.fixture(scope="module")
def tiny_classifier():
    return nnx.split(MLPClassifier(image_shape=IMAGE_SHAPE, hidden=6, num_classes=5, rngs=nnx.Rngs(2)))


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(10).uniform(size=(5, *IMAGE_SHAPE)).astype(np.float32)


@pytest.fixture(scope="module")
def elbo_pieces(tiny_vae):
    """One compiled function of (params, image, key): the ELBO terms, the loss for each KL weight, and eps."""
    graphdef, _ = tiny_vae
    terms_fn = elbo_terms(graphdef)
    loss_fns = [negative_elbo(graphdef, kl_weight=weight) for weight in KL_WEIGHTS]

    @jax.jit
    def pieces(params, image, key):
        example = {"image": image, "label": jnp.int32(0)}
        # eps as documented in gsu_jax.models.reparameterize: normal(key, (L,)).
        eps = jax.random.normal(key, (LATENT_DIM,))
        return terms_fn(params, example, key), jnp.stack([f(params, example, key) for f in loss_fns]), eps

    return pieces


# ------------------------------------------------------------------------------------- negative ELBO


def test_negative_elbo_equals_float64_numpy_with_the_same_eps(tiny_vae, images, elbo_pieces):
    _, params = tiny_vae
    for index, key in enumerate(jax.random.split(jax.random.key(0), 3)):
        terms, values, eps = elbo_pieces(params, images[index], key)
        reconstruction, kl = numpy_mlp_vae_terms(params, images[index], eps)
        np.testing.assert_allclose(terms.reconstruction, reconstruction, rtol=2e-5)
        np.testing.assert_allclose(terms.kl, kl, rtol=2e-5)
        np.testing.assert_allclose(values, [reconstruction + w * kl for w in KL_WEIGHTS], rtol=2e-5)


def test_kl_weight_scales_only_the_kl_term(tiny_vae, images, elbo_pieces):
    _, params = tiny_vae
    terms, values, _ = elbo_pieces(params, images[0], jax.random.key(3))
    assert float(terms.kl) > 0.0 and float(terms.reconstruction) > 0.0
    np.testing.assert_allclose(values[0], terms.reconstruction, rtol=1e-6)  # kl_weight=0: reconstruction only
    np.testing.assert_allclose(values, [terms.reconstruction + w * terms.kl for w in KL_WEIGHTS], rtol=1e-6)


def test_kl_is_zero_for_the_prior_and_matches_numpy():
    kl = jax.jit(kl_to_standard_normal)
    assert float(kl(np.zeros(4, np.float32), np.zeros(4, np.float32))) == 0.0
    mean, logvar = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    expected = 0.5 * np.sum(np.exp(np64(logvar)) + np64(mean) ** 2 - 1.0 - np64(logvar))
    np.testing.assert_allclose(kl(mean, logvar), expected, rtol=1e-6)


def test_elbo_kl_term_is_zero_when_the_encoder_outputs_the_prior(tiny_vae, images, elbo_pieces):
    _, params = tiny_vae
    prior_params = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.zeros_like(leaf) if "mean_head" in str(path) or "logvar_head" in str(path) else leaf,
        params,
    )
    terms, values, _ = elbo_pieces(prior_params, images[0], jax.random.key(0))
    assert float(terms.kl) == 0.0
    assert np.all(values == values[0])  # every KL weight gives the same loss when the KL is zero


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    logits=hnp.arrays(np.float32, (6,), elements=st.floats(-80.0, 80.0, width=32)),
    targets=hnp.arrays(np.float32, (6,), elements=st.floats(0.0, 1.0, width=32)),
)
def test_bernoulli_nll_is_stable_and_equals_float64_log_sigmoid_form(logits, targets):
    logits64, targets64 = logits.astype(np.float64), targets.astype(np.float64)
    # -x log sigmoid(l) - (1 - x) log sigmoid(-l), with log sigmoid(l) = -log(1 + exp(-l)) written stably.
    log_sigmoid = lambda logit: -np.logaddexp(0.0, -logit)
    expected = np.sum(-targets64 * log_sigmoid(logits64) - (1.0 - targets64) * log_sigmoid(-logits64))
    value = _jitted_bernoulli_nll(logits, targets)
    assert np.isfinite(value)
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)


_jitted_bernoulli_nll = jax.jit(bernoulli_nll)


def test_bernoulli_nll_on_images_is_bit_identical_to_the_unflattened_sum():
    """The flattening that makes XLA:CPU's loops fast changes no bit of the batched values or their gradient."""
    import optax

    rng = np.random.default_rng(0)
    logits = jnp.asarray(4.0 * rng.standard_normal((16, 28, 28, 1)), jnp.float32)
    images = jnp.asarray(rng.random((16, 28, 28, 1)), jnp.float32)

    def unflattened(logit, image):
        return jnp.sum(optax.sigmoid_binary_cross_entropy(logit, image))

    values = jax.jit(jax.vmap(bernoulli_nll))(logits, images)
    expected = jax.jit(jax.vmap(unflattened))(logits, images)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(expected))
    grad = jax.jit(jax.grad(lambda logit: jnp.mean(jax.vmap(bernoulli_nll)(logit, images))))(logits)
    expected_grad = jax.jit(jax.grad(lambda logit: jnp.mean(jax.vmap(unflattened)(logit, images))))(logits)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(expected_grad))


def test_same_key_same_value_different_key_different_sample(tiny_vae, images, elbo_pieces):
    graphdef, params = tiny_vae
    first = elbo_pieces(params, images[0], jax.random.key(7))[1]
    chex.assert_trees_all_equal(first, elbo_pieces(params, images[0], jax.random.key(7))[1])
    assert not np.any(first[1:] == elbo_pieces(params, images[0], jax.random.key(8))[1][1:])
    # Outside jit the loss is the same function.
    eager = negative_elbo(graphdef, kl_weight=KL_WEIGHTS[2])(params, {"image": images[0]}, jax.random.key(7))
    np.testing.assert_allclose(eager, first[2], rtol=1e-6)


# -------------------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_cross_entropy_equals_numpy_log_softmax(tiny_classifier, images, label_smoothing):
    graphdef, params = tiny_classifier
    loss_fn = jax.jit(cross_entropy(graphdef, label_smoothing=label_smoothing))
    logits = numpy_mlp_classifier_logits(params, images)
    for index, label in enumerate([0, 3, 4]):
        log_probs = logits[index] - np.logaddexp.reduce(logits[index])
        targets = (1.0 - label_smoothing) * np.eye(5)[label] + label_smoothing / 5
        value = loss_fn(params, {"image": images[index], "label": np.int32(label)}, jax.random.key(0))
        np.testing.assert_allclose(value, -np.sum(targets * log_probs), rtol=1e-5)
        # The key is accepted and unused.
        assert float(value) == float(
            loss_fn(params, {"image": images[index], "label": np.int32(label)}, jax.random.key(1))
        )


@pytest.mark.parametrize(
    "factory,kwargs,error,match",
    [
        (negative_elbo, {"kl_weight": -1.0}, ValueError, "kl_weight must be a finite number >= 0, got -1.0"),
        (negative_elbo, {"kl_weight": float("nan")}, ValueError, "kl_weight must be a finite number"),
        (negative_elbo, {"kl_weight": "1"}, TypeError, "kl_weight must be a real number"),
        (cross_entropy, {"label_smoothing": 1.0}, ValueError, r"label_smoothing must be in \[0, 1\), got 1.0"),
        (cross_entropy, {"label_smoothing": -0.1}, ValueError, "label_smoothing must be a finite number >= 0"),
    ],
)
def test_loss_factories_refuse_bad_hyperparameters(tiny_vae, factory, kwargs, error, match):
    graphdef, _ = tiny_vae
    with pytest.raises(error, match=match):
        factory(graphdef, **kwargs)


def test_losses_refuse_a_batch_where_one_example_is_expected(tiny_vae, tiny_classifier, images):
    # Refused while tracing, before any computation.
    graphdef, params = tiny_vae
    with pytest.raises(ValueError, match="one example of shape"):
        jax.eval_shape(negative_elbo(graphdef), params, {"image": images}, jax.random.key(0))
    clf_graphdef, clf_params = tiny_classifier
    with pytest.raises(ValueError, match="label must be a scalar"):
        cross_entropy(clf_graphdef)(clf_params, {"image": images[0], "label": np.zeros(2, np.int32)}, None)
    with pytest.raises(ValueError, match="with key 'label'"):
        cross_entropy(clf_graphdef)(clf_params, {"image": images[0]}, None)
    with pytest.raises(TypeError, match="expected a VAE graphdef"):
        negative_elbo(clf_graphdef)(clf_params, {"image": images[0]}, jax.random.key(0))


# ------------------------------------------------------------------------------------------ batching


def test_batch_mean_equals_a_python_loop_with_split_keys(tiny_vae, images, elbo_pieces):
    graphdef, params = tiny_vae
    key = jax.random.key(5)
    keys = jax.random.split(key, len(images))
    chex.assert_trees_all_equal(example_keys(key, {"image": images}), keys)
    looped = np.mean([elbo_pieces(params, image, example_key)[1][2] for image, example_key in zip(images, keys)])
    batch_loss = jax.jit(batch_mean(negative_elbo(graphdef, kl_weight=KL_WEIGHTS[2])))
    value = batch_loss(params, {"image": images, "label": np.zeros(5, np.int32)}, key)
    np.testing.assert_allclose(value, looped, rtol=1e-5)
    # Legacy raw uint32 keys work too (split and normal accept both kinds).
    assert np.isfinite(batch_loss(params, {"image": images, "label": np.zeros(5, np.int32)}, jax.random.PRNGKey(0)))


def test_batch_mean_refuses_ragged_or_empty_batches(tiny_vae, images):
    graphdef, params = tiny_vae
    batch_loss = batch_mean(negative_elbo(graphdef))
    with pytest.raises(ValueError, match="one common leading dimension"):
        batch_loss(params, {"image": images, "label": np.zeros(3, np.int32)}, jax.random.key(0))
    with pytest.raises(ValueError, match="at least one example"):
        batch_loss(params, {"image": images[:0]}, jax.random.key(0))
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        batch_mean(None)


@pytest.mark.parametrize(
    "model_fixture,make_loss,image_shape",
    [
        ("tiny_vae", negative_elbo, IMAGE_SHAPE),
        ("tiny_conv_vae", negative_elbo, (28, 28, 1)),  # GroupNorm: statistics must stay within each example
        ("tiny_classifier", cross_entropy, IMAGE_SHAPE),
    ],
)
def test_per_example_grads_by_vmap_equal_grads_one_example_at_a_time(request, model_fixture, make_loss, image_shape):
    graphdef, params = request.getfixturevalue(model_fixture)
    loss_fn = make_loss(graphdef)
    batch = {
        "image": np.random.default_rng(11).uniform(size=(3, *image_shape)).astype(np.float32),
        "label": np.array([0, 4, 2], np.int32),
    }
    keys = example_keys(jax.random.key(12), batch)
    losses_b, grads_b = jax.jit(jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0, 0)))(params, batch, keys)
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    for index in range(3):
        example = jax.tree.map(lambda leaf: leaf[index], batch)
        loss_i, grads_i = value_and_grad(params, example, keys[index])
        np.testing.assert_allclose(losses_b[index], loss_i, rtol=1e-5)
        scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(grads_i))
        chex.assert_trees_all_close(
            jax.tree.map(lambda leaf: leaf[index], grads_b), grads_i, rtol=1e-4, atol=1e-5 * scale
        )


# ------------------------------------------------------------------------------------ guidance term


def guidance_classifier(bias):
    """A classifier on (4, 4, 1) images whose logits are ``bias`` whatever the image (output kernel zero)."""
    graphdef, params = nnx.split(MLPClassifier(image_shape=IMAGE_SHAPE, hidden=6, num_classes=4, rngs=nnx.Rngs(0)))
    pure = nnx.to_pure_dict(params)
    pure["output_layer"]["kernel"] = np.zeros(pure["output_layer"]["kernel"].shape, np.float32)
    pure["output_layer"]["bias"] = np.asarray(bias, np.float32)
    nnx.replace_by_pure_dict(params, pure)
    return graphdef, params


def test_guidance_loss_is_zero_for_uniform_retained_distribution(tiny_vae):
    gen_graphdef, gen_params = tiny_vae
    clf_graphdef, clf_params = guidance_classifier([0.0, -1e4, 0.0, 0.0])  # uniform over {0, 2, 3}, nothing on 1
    guidance = uniformity_guidance_loss(
        gen_graphdef, clf_graphdef, clf_params, retained_classes=[0, 2, 3], num_samples=8, latent_dim=LATENT_DIM
    )
    assert abs(float(jax.jit(guidance)(gen_params, jax.random.key(0)))) < 1e-6


def test_guidance_loss_is_positive_and_matches_the_closed_form_otherwise(tiny_vae):
    gen_graphdef, gen_params = tiny_vae
    clf_graphdef, clf_params = guidance_classifier([0.0, 0.0, 0.0, 0.0])  # uniform over all four classes
    guidance = uniformity_guidance_loss(
        gen_graphdef, clf_graphdef, clf_params, retained_classes=(0, 2, 3), num_samples=8, latent_dim=LATENT_DIM
    )
    eps = 1e-8
    expected = 0.25 * (np.log(0.25 + eps) - np.log(eps)) + 3 * 0.25 * (np.log(0.25 + eps) - np.log(1 / 3 + eps))
    value = jax.jit(guidance)(gen_params, jax.random.key(0))
    assert float(value) > 0.0
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_guidance_loss_equals_numpy_and_differentiates_the_generator(tiny_vae):
    gen_graphdef, gen_params = tiny_vae
    clf_graphdef, clf_params = nnx.split(
        MLPClassifier(image_shape=IMAGE_SHAPE, hidden=6, num_classes=4, rngs=nnx.Rngs(4))
    )
    guidance = uniformity_guidance_loss(
        gen_graphdef, clf_graphdef, clf_params, retained_classes=np.array([1, 2]), num_samples=16, latent_dim=3
    )
    value_and_grad = jax.jit(jax.value_and_grad(guidance))
    key = jax.random.key(9)
    value, grads = value_and_grad(gen_params, key)
    # The documented draw, z = normal(key, (num_samples, latent_dim)), then a float64 NumPy forward pass.
    z = np64(jax.random.normal(key, (16, 3)))
    logits = numpy_mlp_classifier_logits(clf_params, numpy_mlp_decode_probs(gen_params, z))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    mean_probs = (probs / probs.sum(1, keepdims=True)).mean(0)
    target = np.array([0.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(
        value, np.sum(mean_probs * (np.log(mean_probs + 1e-8) - np.log(target + 1e-8))), rtol=1e-4
    )
    assert float(value) == float(value_and_grad(gen_params, key)[0])  # same key, same z, same value
    assert float(value) != float(value_and_grad(gen_params, jax.random.key(10))[0])
    decoder_grad = grads["decoder_output"]["kernel"][...]
    assert bool(jnp.all(jnp.isfinite(decoder_grad))) and float(jnp.max(jnp.abs(decoder_grad))) > 0.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"retained_classes": []}, "retained_classes must not be empty"),
        ({"retained_classes": [0, 0]}, "repeated classes"),
        ({"retained_classes": [4]}, r"retained class 4 is not a class index in \[0, 4\)"),
        ({"retained_classes": "012"}, "must be a sequence of class indices"),
        ({"num_samples": 0}, "num_samples must be an integer >= 1"),
        ({"eps": 0.0}, "eps must be > 0"),
    ],
)
def test_guidance_loss_refusals(tiny_vae, kwargs, match):
    gen_graphdef, _ = tiny_vae
    clf_graphdef, clf_params = nnx.split(nnx.eval_shape(lambda: MLPClassifier(num_classes=4, rngs=nnx.Rngs(0))))
    arguments = {"retained_classes": [0, 2], "num_samples": 4, "latent_dim": LATENT_DIM, **kwargs}
    with pytest.raises(ValueError, match=match):
        uniformity_guidance_loss(gen_graphdef, clf_graphdef, clf_params, **arguments)


def test_guidance_loss_refuses_a_generator_that_does_not_fit(tiny_vae):
    gen_graphdef, gen_params = tiny_vae
    clf_graphdef, clf_params = nnx.split(nnx.eval_shape(lambda: MLPClassifier(num_classes=4, rngs=nnx.Rngs(0))))
    wrong_latent = uniformity_guidance_loss(
        gen_graphdef, clf_graphdef, clf_params, retained_classes=[0], num_samples=4, latent_dim=2
    )
    with pytest.raises(ValueError, match="latent_dim=2 does not match the generator's 3"):
        jax.eval_shape(wrong_latent, gen_params, jax.random.key(0))
    wrong_images = uniformity_guidance_loss(
        gen_graphdef, clf_graphdef, clf_params, retained_classes=[0], num_samples=4, latent_dim=LATENT_DIM
    )
    with pytest.raises(ValueError, match=r"generator images \(4, 4, 1\) do not fit the classifier's \(28, 28, 1\)"):
        jax.eval_shape(wrong_images, gen_params, jax.random.key(0))


def test_docstring_examples_run():
    result = doctest.testmod(losses, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
