"""Models: layouts (parameter counts), shapes, per-example exactness of GroupNorm, batched helpers, refusals."""

from __future__ import annotations

import contextlib
import doctest
import functools
import math
import re

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gsu_jax.models
from gsu_jax.models import (
    MLPVAE,
    CNNClassifier,
    ConvVAE,
    MLPClassifier,
    UNet,
    batched,
    build_model,
    classifier,
    classifier_features,
    classifier_logits,
    generate_images,
    model_hyperparameters,
    reconstruct,
    vae,
)
from gsu_jax.models.layers import ExampleGroupNorm

# Tiny convolutional widths keep every compile and run cheap; the layout is the same as with the defaults.
TINY_CONV = {"channels": 4, "num_groups": 2}


def param_count(build) -> int:
    """Number of parameters of the model ``build()`` makes, without running its initialisers."""
    abstract = nnx.eval_shape(build)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(abstract)))


def linear_params(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


# ---------------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("latent_dim", [2, 20])
def test_mlp_vae_param_count_matches_hand_count(latent_dim):
    expected = (
        linear_params(784, 400)  # encoder hidden
        + 2 * linear_params(400, latent_dim)  # mean and logvar heads
        + linear_params(latent_dim, 400)  # decoder hidden
        + linear_params(400, 784)  # decoder output logits
    )
    assert param_count(lambda: MLPVAE(latent_dim=latent_dim, rngs=nnx.Rngs(0))) == expected


def test_mlp_vae_param_counts_match_reference_numbers():
    # 784-400-20 = 652,824 is the count docs/protocol.md §3 quotes; 784-400-2 is the protocol model.
    assert param_count(lambda: MLPVAE(latent_dim=20, rngs=nnx.Rngs(0))) == 652_824
    assert param_count(lambda: MLPVAE(rngs=nnx.Rngs(0))) == 631_188
    # LayerNorm adds a scale and a bias per hidden unit, in the encoder and in the decoder.
    assert param_count(lambda: MLPVAE(layer_norm=True, rngs=nnx.Rngs(0))) == 631_188 + 4 * 400


def test_mlp_classifier_param_count_is_784_200_10():
    assert param_count(lambda: MLPClassifier(rngs=nnx.Rngs(0))) == linear_params(784, 200) + linear_params(200, 10)
    assert param_count(lambda: MLPClassifier(rngs=nnx.Rngs(0))) == 159_010


def test_models_hold_only_params_and_no_rng_state():
    # Everything stochastic takes an explicit key: after construction a model is parameters only.
    for name in gsu_jax.models.MODELS:
        model = nnx.eval_shape(lambda: build_model(name, rngs=nnx.Rngs(0)))
        everything = nnx.state(model)
        params = nnx.state(model, nnx.Param)
        assert len(jax.tree.leaves(everything)) == len(jax.tree.leaves(params)) > 0, name


# ----------------------------------------------------------------------------------------------- shapes


VAE_CASES = [
    ("mlp_vae", {"hidden": 16, "latent_dim": 3}, (28, 28, 1)),
    ("mlp_vae", {"hidden": 16, "latent_dim": 1, "layer_norm": True, "image_shape": (32, 32, 3)}, (32, 32, 3)),
    ("conv_vae", {"latent_dim": 5, **TINY_CONV}, (28, 28, 1)),
    ("conv_vae", {"latent_dim": 5, "image_shape": (32, 32, 3), **TINY_CONV}, (32, 32, 3)),
    ("conv_vae", {"latent_dim": 5, "image_shape": (64, 64, 3), **TINY_CONV}, (64, 64, 3)),
]


@pytest.mark.parametrize("name,kwargs,image_shape", VAE_CASES)
def test_vae_shapes(name, kwargs, image_shape):
    # Abstract evaluation (jax.eval_shape): every layer is traced with its real shapes, nothing is compiled.
    model = nnx.eval_shape(lambda: build_model(name, rngs=nnx.Rngs(0), **kwargs))
    latent_dim = kwargs["latent_dim"]
    assert model.latent_dim == latent_dim and model.image_shape == image_shape
    graphdef, params = nnx.split(model)

    def forward(params, images, z):
        model = nnx.merge(graphdef, params)
        mean, logvar = model.encode(images[0])
        return (
            mean,
            logvar,
            model.decode(mean),
            generate_images(graphdef, params, z),
            reconstruct(graphdef, params, images),
            reconstruct(graphdef, params, images, key=jax.random.key(0)),
        )

    images = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
    z = jax.ShapeDtypeStruct((3, latent_dim), jnp.float32)
    mean, logvar, logits, generated, reconstructed, sampled = jax.eval_shape(forward, params, images, z)
    assert mean.shape == logvar.shape == (latent_dim,)
    assert logits.shape == image_shape
    assert generated.shape == (3, *image_shape) and generated.dtype == jnp.float32
    assert reconstructed.shape == sampled.shape == (2, *image_shape)


CLASSIFIER_CASES = [
    ("mlp_classifier", {"hidden": 12, "num_classes": 4}, (28, 28, 1)),
    ("mlp_classifier", {"hidden": 12, "image_shape": (32, 32, 3)}, (32, 32, 3)),
    ("cnn_classifier", {"hidden": 12, **TINY_CONV}, (28, 28, 1)),
    ("cnn_classifier", {"hidden": 12, "image_shape": (32, 32, 3), **TINY_CONV}, (32, 32, 3)),
    ("cnn_classifier", {"hidden": 12, "num_classes": 3, "image_shape": (64, 64, 3), **TINY_CONV}, (64, 64, 3)),
]


@pytest.mark.parametrize("name,kwargs,image_shape", CLASSIFIER_CASES)
def test_classifier_shapes(name, kwargs, image_shape):
    model = nnx.eval_shape(lambda: build_model(name, rngs=nnx.Rngs(0), **kwargs))
    num_classes = kwargs.get("num_classes", 10)
    assert model.num_classes == num_classes and model.num_features == 12 and model.image_shape == image_shape
    graphdef, params = nnx.split(model)
    images = jax.ShapeDtypeStruct((3, *image_shape), jnp.float32)
    logits = jax.eval_shape(functools.partial(classifier_logits, graphdef), params, images)
    features = jax.eval_shape(functools.partial(classifier_features, graphdef), params, images)
    assert logits.shape == (3, num_classes) and features.shape == (3, 12)


def test_default_protocol_evaluator_has_200_features():
    graphdef, params = nnx.split(nnx.eval_shape(lambda: MLPClassifier(rngs=nnx.Rngs(0))))
    image = jax.ShapeDtypeStruct((28, 28, 1), jnp.float32)
    features = jax.eval_shape(lambda params, image: nnx.merge(graphdef, params).features(image), params, image)
    assert features.shape == (200,)


# ------------------------------------------------------------------------------- exactness per example


def test_example_group_norm_normalises_over_one_example_and_its_group():
    num_groups, channels = 2, 6
    norm = ExampleGroupNorm(channels, num_groups=num_groups, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(1.0, 3.0, size=(5, 4, channels))
    grouped = x.reshape(5, 4, num_groups, channels // num_groups)
    mean = grouped.mean(axis=(0, 1, 3), keepdims=True)
    var = grouped.var(axis=(0, 1, 3), keepdims=True)
    expected = ((grouped - mean) / np.sqrt(var + norm.epsilon)).reshape(x.shape)  # scale 1, bias 0 at init
    value = jax.jit(lambda x: norm(x))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_conv_vae():
    # The same tiny configuration as in test_losses.py: compiled initialisers are shared within one pytest run.
    return nnx.split(ConvVAE(latent_dim=3, **TINY_CONV, rngs=nnx.Rngs(1)))


@pytest.fixture(scope="module")
def tiny_cnn():
    return nnx.split(CNNClassifier(hidden=4, num_classes=5, **TINY_CONV, rngs=nnx.Rngs(3)))


def test_conv_vae_vmap_equals_python_loop_and_examples_do_not_interact(tiny_conv_vae):
    graphdef, params = tiny_conv_vae

    @jax.jit
    def batched(params, images, z):
        model = nnx.merge(graphdef, params)
        mean, logvar = jax.vmap(model.encode)(images)
        return mean, logvar, jax.vmap(model.decode)(mean), generate_images(graphdef, params, z)

    @jax.jit
    def one(params, image, z):
        model = nnx.merge(graphdef, params)
        mean, logvar = model.encode(image)
        return mean, logvar, model.decode(mean), jax.nn.sigmoid(model.decode(z))

    rng = np.random.default_rng(4)
    images = rng.uniform(size=(4, 28, 28, 1)).astype(np.float32)
    z = (3.0 * rng.normal(size=(4, 3))).astype(np.float32)
    outputs = batched(params, images, z)
    for index in range(4):
        chex.assert_trees_all_close(
            one(params, images[index], z[index]),
            jax.tree.map(lambda leaf: leaf[index], outputs),
            rtol=1e-5,
            atol=1e-5,
        )
    generated = outputs[-1]
    assert generated.shape == (4, 28, 28, 1) and bool(jnp.all((generated >= 0.0) & (generated <= 1.0)))
    # With BatchNorm-like cross-example statistics, changing examples 1..3 would move example 0's outputs.
    perturbed = images.copy()
    perturbed[1:] = 5.0 * rng.uniform(size=(3, 28, 28, 1))
    chex.assert_trees_all_close(
        jax.tree.map(lambda leaf: leaf[0], batched(params, perturbed, z)),
        jax.tree.map(lambda leaf: leaf[0], outputs),
        rtol=1e-5,
        atol=1e-6,
    )


def test_cnn_classifier_vmap_equals_python_loop(tiny_cnn):
    graphdef, params = tiny_cnn

    @jax.jit
    def batched(params, images):
        return classifier_logits(graphdef, params, images), classifier_features(graphdef, params, images)

    @jax.jit
    def one(params, image):
        model = nnx.merge(graphdef, params)
        return model(image), model.features(image), model.output_layer(model.features(image))

    images = np.random.default_rng(7).uniform(size=(3, 28, 28, 1)).astype(np.float32)
    logits, features = batched(params, images)
    assert logits.shape == (3, 5) and features.shape == (3, 4)
    assert bool(jnp.all(features >= 0.0))  # post-ReLU features
    for index in range(3):
        logits_i, features_i, head_of_features_i = one(params, images[index])
        chex.assert_trees_all_close(logits_i, logits[index], rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(features_i, features[index], rtol=1e-5, atol=1e-5)
        # The logits are the output layer applied to the features.
        chex.assert_trees_all_close(head_of_features_i, logits_i, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------- batched helpers


@pytest.fixture(scope="module")
def tiny_vae():
    # The same tiny configuration as in test_losses.py: compiled initialisers are shared within one pytest run.
    return nnx.split(MLPVAE(image_shape=(4, 4, 1), hidden=8, latent_dim=3, rngs=nnx.Rngs(0)))


def numpy_mlp_vae(params):
    """Float64 NumPy encode/decode of an MLPVAE from its raw weights (an independent reference)."""
    p = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), nnx.to_pure_dict(params))
    dense = lambda name, x: x @ p[name]["kernel"] + p[name]["bias"]  # noqa: E731

    def encode(image):
        hidden = np.maximum(dense("encoder_hidden", image.reshape(-1)), 0.0)
        return dense("mean_head", hidden), dense("logvar_head", hidden)

    def decode_probs(z):
        logits = dense("decoder_output", np.maximum(dense("decoder_hidden", z), 0.0))
        return (1.0 / (1.0 + np.exp(-logits))).reshape(4, 4, 1)

    return encode, decode_probs


def test_helpers_are_pure_jittable_and_match_numpy(tiny_vae):
    graphdef, params = tiny_vae

    @jax.jit
    def helpers(params, z, images, key):
        return (
            generate_images(graphdef, params, z),
            reconstruct(graphdef, params, images),
            reconstruct(graphdef, params, images, key=key),
        )

    rng = np.random.default_rng(1)
    z = rng.normal(size=(5, 3)).astype(np.float32)
    images = rng.uniform(size=(3, 4, 4, 1)).astype(np.float32)
    key = jax.random.key(2)
    generated, reconstructed, sampled = helpers(params, z, images, key)

    encode, decode_probs = numpy_mlp_vae(params)
    np.testing.assert_allclose(generated, np.stack([decode_probs(row) for row in z]), rtol=1e-5, atol=1e-6)
    # Without a key, reconstruct decodes the posterior mean; with one, a sample: different, and keyed.
    means = [encode(image)[0] for image in images]
    np.testing.assert_allclose(reconstructed, np.stack([decode_probs(m) for m in means]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(sampled, reconstructed)
    chex.assert_trees_all_equal(sampled, helpers(params, z, images, key)[2])
    # The same compiled function, given other params, gives another result: params are an input, not a constant.
    shifted = jax.tree.map(lambda leaf: leaf + 0.1, params)
    assert not np.allclose(generated, helpers(shifted, z, images, key)[0])


def test_helpers_refuse_wrong_shapes():
    graphdef, params = nnx.split(nnx.eval_shape(lambda: MLPVAE(latent_dim=3, rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match=r"z must have shape \(N, \*\(3,\)\), got \(3, 5\)"):
        generate_images(graphdef, params, jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match="images must have shape"):
        reconstruct(graphdef, params, jnp.zeros((28, 28, 1)))
    clf_graphdef, clf_params = nnx.split(nnx.eval_shape(lambda: MLPClassifier(rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match="images must have shape"):
        classifier_logits(clf_graphdef, clf_params, jnp.zeros((2, 32, 32, 1)))
    with pytest.raises(ValueError, match="images must have shape"):
        classifier_features(clf_graphdef, clf_params, jnp.zeros((2, 28, 28, 3)))


def test_single_example_methods_refuse_a_batch():
    model = nnx.eval_shape(lambda: MLPVAE(latent_dim=3, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"must be one example of shape \(28, 28, 1\), got shape \(2, 28, 28, 1\)"):
        model.encode(jnp.zeros((2, 28, 28, 1)))
    with pytest.raises(ValueError, match="one example of shape"):
        model.decode(jnp.zeros((2, 3)))


# ----------------------------------------------------------------------------------------- registry


def test_registry_builds_every_model_with_its_defaults():
    expected = {
        "mlp_vae": MLPVAE,
        "conv_vae": ConvVAE,
        "mlp_classifier": MLPClassifier,
        "cnn_classifier": CNNClassifier,
        "ddpm_unet": UNet,
    }
    assert {name: cls for name, cls in gsu_jax.models.MODELS.items()} == expected
    families = (gsu_jax.models.VAE_MODELS, gsu_jax.models.CLASSIFIER_MODELS, gsu_jax.models.DIFFUSION_MODELS)
    assert set().union(*families) == set(expected)
    assert sum(len(family) for family in families) == len(expected)  # each model in exactly one family
    assert model_hyperparameters("mlp_vae") == {
        "image_shape": (28, 28, 1),
        "hidden": 400,
        "latent_dim": 2,
        "layer_norm": False,
    }
    model = nnx.eval_shape(lambda: build_model("mlp_vae", latent_dim=20, rngs=nnx.Rngs(0)))
    assert isinstance(model, MLPVAE) and model.latent_dim == 20


@pytest.mark.parametrize(
    "name,kwargs,error,match",
    [
        (
            "vae",
            {},
            ValueError,
            r"unknown model 'vae'; allowed: \['cnn_classifier', 'conv_vae', 'ddpm_unet', 'mlp_classifier', 'mlp_vae'\]",
        ),
        (None, {}, ValueError, "unknown model None"),
        (
            "mlp_vae",
            {"latent": 3},
            ValueError,
            r"unknown hyperparameter\(s\) \['latent'\] for model 'mlp_vae'; allowed",
        ),
        ("mlp_vae", {"latent_dim": 0}, ValueError, "latent_dim must be an integer >= 1, got 0"),
        ("mlp_vae", {"latent_dim": "2"}, TypeError, "latent_dim must be an integer"),
        ("mlp_vae", {"latent_dim": True}, TypeError, "latent_dim must be an integer"),
        ("mlp_vae", {"hidden": -1}, ValueError, "hidden must be an integer >= 1"),
        ("mlp_vae", {"layer_norm": 1}, TypeError, "layer_norm must be a bool"),
        ("mlp_vae", {"image_shape": (28, 28)}, ValueError, "image_shape must be a 3-tuple"),
        ("mlp_vae", {"image_shape": (28, 0, 1)}, ValueError, "image_shape entry must be an integer >= 1, got 0"),
        ("conv_vae", {"image_shape": (30, 30, 1)}, ValueError, r"image_shape \(30, 30, 1\) is not supported"),
        ("conv_vae", {"image_shape": (28, 32, 1)}, ValueError, "is not supported"),
        ("conv_vae", {"image_shape": (32, 32, 2)}, ValueError, "is not supported"),
        ("conv_vae", {"channels": 6, "num_groups": 4}, ValueError, "num_groups=4 must divide channels=6"),
        ("cnn_classifier", {"image_shape": (16, 16, 1)}, ValueError, "is not supported"),
        ("mlp_classifier", {"num_classes": 1}, ValueError, "num_classes must be >= 2"),
    ],
)
def test_build_model_refusals(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        build_model(name, rngs=nnx.Rngs(0), **kwargs)


def test_build_model_refuses_a_missing_or_wrong_rngs():
    with pytest.raises(TypeError, match="rngs must be a flax.nnx.Rngs"):
        build_model("mlp_vae", rngs=0)


def test_config_style_image_shape_list_is_accepted():
    # ml_collections / command-line overrides may hand a list; it is normalised to a tuple.
    model = nnx.eval_shape(lambda: build_model("mlp_vae", image_shape=[4, 4, 1], hidden=4, rngs=nnx.Rngs(0)))
    assert model.image_shape == (4, 4, 1)


# ----------------------------------------------------------------------------------------- docstrings


@pytest.mark.parametrize("module", [gsu_jax.models, batched, classifier, vae], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


# ------------------------------------------------------------------------- convolutions inside loop bodies


@pytest.mark.parametrize(
    "input_shape, kernel_shape, stride, padding",
    [
        ((3, 28, 28, 1), (3, 3, 1, 4), 2, "SAME"),
        ((3, 14, 14, 4), (3, 3, 4, 2), 1, "SAME"),
        ((2, 9, 7, 3), (3, 2, 3, 5), 2, "VALID"),
        ((2, 11, 8, 3), (3, 3, 3, 2), 2, ((2, 0), (1, 3))),
    ],
)
def test_the_loop_body_convolution_is_lax_convolution(input_shape, kernel_shape, stride, padding):
    """Inside ``reverse_mode_loop_body`` the convolution has a hand-written derivative (fast in XLA:CPU loops) and
    folds a ``vmap`` over examples into its batch: the mean gradient of per-example losses, in a ``lax.scan`` over
    two chunks as the chunked step runs it, equals the one through ``lax.conv_general_dilated`` to float32
    rounding. Outside the context it is ``lax.conv_general_dilated`` itself, bit for bit."""
    from gsu_jax.models.conv import conv_general_dilated, reverse_mode_loop_body

    numbers = ("NHWC", "HWIO", "NHWC")
    images = jax.random.normal(jax.random.key(0), (4,) + input_shape[1:])
    kernel = jax.random.normal(jax.random.key(1), kernel_shape)

    def reference(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=numbers)

    def ours(x, kernel):
        return conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=numbers)

    chex.assert_trees_all_equal(jax.jit(ours)(images, kernel), jax.jit(reference)(images, kernel))

    def chunked_mean_gradient(convolve, *, loop_friendly):
        def chunk_gradient(total, chunk):
            def summed(kernel, chunk):  # one example at a time, as the models see it, vmapped over the chunk
                return jnp.sum(jax.vmap(lambda x: jnp.sum(jnp.tanh(convolve(x[None], kernel))))(chunk))

            kernel_grad, chunk_grad = jax.grad(summed, argnums=(0, 1))(kernel, chunk)
            return total + kernel_grad, chunk_grad

        with reverse_mode_loop_body() if loop_friendly else contextlib.nullcontext():
            return jax.lax.scan(chunk_gradient, jnp.zeros_like(kernel), images.reshape((2, 2) + images.shape[1:]))

    def primitives(convolve, *, loop_friendly):
        jaxpr = str(jax.make_jaxpr(lambda: chunked_mean_gradient(convolve, loop_friendly=loop_friendly))())
        return set(re.findall(r"= (\w+)\[", jaxpr))

    # The hand-written derivative ran: its explicit transposes are absent from lax's own derivative.
    assert "transpose" in primitives(ours, loop_friendly=True) - primitives(reference, loop_friendly=False)
    got = jax.jit(lambda: chunked_mean_gradient(ours, loop_friendly=True))()
    want = jax.jit(lambda: chunked_mean_gradient(reference, loop_friendly=False))()
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sa", "sa_per_example"])
def test_a_chunked_conv_vae_step_equals_the_unchunked_one(name):
    """A chunked step's mean-gradient pass runs the convolutions' hand-written derivative inside its loop (and
    ``sa_per_example``'s jvp pass lax's own): a chunked step of a tiny conv VAE moves the parameters as the unchunked
    step does, to float32 rounding (6 examples per batch, chunks of 4: one loop iteration and a remainder)."""
    from gsu_jax.losses import negative_elbo
    from gsu_jax.methods import make_method

    graphdef, params = nnx.split(ConvVAE(latent_dim=3, **TINY_CONV, rngs=nnx.Rngs(0)))
    images = jax.random.uniform(jax.random.key(1), (12, 28, 28, 1))
    labels = jnp.zeros((6,), jnp.int32)
    forget, retain = {"image": images[:6], "label": labels}, {"image": images[6:], "label": labels}

    def update(chunk_size):
        method = make_method(name, loss_fn=negative_elbo(graphdef), optimizer=optax.sgd(1.0), chunk_size=chunk_size)
        moved, _, _ = jax.jit(method.step)(params, method.init(params), forget, retain, jax.random.key(2))
        return jax.tree.map(jnp.subtract, params, moved)

    chunked, whole = (jax.flatten_util.ravel_pytree(update(size))[0] for size in (4, None))
    # Relative to the whole update: some coordinates are rounding noise around zero (a conv bias before
    # GroupNorm has a zero gradient in exact arithmetic).
    assert float(jnp.linalg.norm(chunked - whole) / jnp.linalg.norm(whole)) < 1e-5


def test_a_chunked_step_of_a_loss_that_differentiates_inside_itself_falls_back_to_lax():
    """A per-example loss with a jvp around the model cannot use the hand-written derivative (no forward mode): the
    chunked pass retraces with lax's convolution, and the step equals the unchunked one."""
    from gsu_jax.losses import negative_elbo
    from gsu_jax.methods import make_method

    graphdef, params = nnx.split(ConvVAE(latent_dim=3, **TINY_CONV, rngs=nnx.Rngs(0)))
    elbo = negative_elbo(graphdef)

    def input_sensitivity(params, example, key):  # the loss's derivative along the image, by forward mode
        image = example["image"]
        return jax.jvp(lambda x: elbo(params, {"image": x}, key), (image,), (jnp.ones_like(image),))[1]

    images = jax.random.uniform(jax.random.key(1), (6, 28, 28, 1))
    forget, retain = {"image": images[:3]}, {"image": images[3:]}

    def update(chunk_size):
        method = make_method("sa", loss_fn=input_sensitivity, optimizer=optax.sgd(1.0), chunk_size=chunk_size)
        moved, _, _ = jax.jit(method.step)(params, method.init(params), forget, retain, jax.random.key(2))
        return jax.flatten_util.ravel_pytree(jax.tree.map(jnp.subtract, params, moved))[0]

    chunked, whole = update(2), update(None)
    assert float(jnp.linalg.norm(chunked - whole) / jnp.linalg.norm(whole)) < 1e-5
