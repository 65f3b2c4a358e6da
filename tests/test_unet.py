"""The DDPM U-Net: shapes, per-example exactness (no cross-example statistics), conditioning, registry, refusals."""

from __future__ import annotations

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsu_jax.models import DIFFUSION_MODELS, MODELS, VAE_MODELS, UNet, build_model, model_hyperparameters
from gsu_jax.models import unet as unet_module
from gsu_jax.models.unet import sinusoidal_embedding

# The tiny layout the tests use everywhere: same structure as the default, ~24k parameters.
TINY = {"channels": 8, "channel_mults": (1, 2), "num_groups": 4, "time_embed_dim": 16}
NUM_CLASSES = 10


@pytest.fixture(scope="module")
def unconditional():
    graphdef, params = nnx.split(UNet(**TINY, rngs=nnx.Rngs(0)))
    apply = jax.jit(jax.vmap(lambda p, x, t: nnx.merge(graphdef, p)(x, t), in_axes=(None, 0, 0)))
    return graphdef, params, apply


def _apply_one(graphdef, params, *args):
    """One example through the module, jitted (eager calls would compile every operation on its own)."""
    return jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))(params, *args)


@pytest.fixture(scope="module")
def conditional():
    graphdef, params = nnx.split(UNet(**TINY, num_classes=NUM_CLASSES, rngs=nnx.Rngs(1)))
    apply = jax.jit(jax.vmap(lambda p, x, t, y: nnx.merge(graphdef, p)(x, t, y), in_axes=(None, 0, 0, 0)))
    return graphdef, params, apply


def _inputs(seed: int, batch: int, shape=(28, 28, 1)):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, *shape)).astype(np.float32), rng.uniform(size=batch).astype(np.float32))


def test_output_shape_28x28x1_and_32x32x3(unconditional):
    _, params, apply = unconditional
    x, t = _inputs(0, 2)
    out = apply(params, x, t)
    assert out.shape == (2, 28, 28, 1) and np.all(np.isfinite(out))
    rgb = nnx.eval_shape(lambda: UNet(**TINY, image_shape=(32, 32, 3), rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(rgb)
    out = jax.eval_shape(lambda p, x, t: nnx.merge(graphdef, p)(x, t), abstract_params, jnp.zeros((32, 32, 3)), 0.3)
    assert out.shape == (32, 32, 3) and rgb.image_shape == (32, 32, 3) and rgb.num_classes == 0


def test_vmapped_output_of_one_example_ignores_the_others(unconditional):
    # GroupNorm statistics are per example: changing examples 1..3 must leave example 0's output unchanged, and the
    # batched output equals the single-example call.
    graphdef, params, apply = unconditional
    x, t = _inputs(1, 4)
    x_other, t_other = _inputs(2, 4)
    x_other[0], t_other[0] = x[0], t[0]
    first, second = apply(params, x, t), apply(params, x_other, t_other)
    chex.assert_trees_all_close(first[0], second[0], atol=1e-6, rtol=1e-6)
    assert not np.allclose(first[1], second[1])
    single = _apply_one(graphdef, params, x[2], t[2])
    chex.assert_trees_all_close(first[2], single, atol=1e-5, rtol=1e-5)


def test_time_changes_the_prediction(unconditional):
    _, params, apply = unconditional
    x, _ = _inputs(3, 2)
    x[1] = x[0]
    out = apply(params, x, np.array([0.1, 0.9], np.float32))
    assert not np.allclose(out[0], out[1], atol=1e-4)


def test_conditional_model_uses_the_label_and_none_is_the_null_label(conditional):
    graphdef, params, apply = conditional
    x, t = _inputs(4, 3)
    x[:] = x[0]
    t[:] = t[0]
    out = apply(params, x, t, np.array([0, 7, NUM_CLASSES], np.int32))
    assert not np.allclose(out[0], out[1], atol=1e-4)
    model = nnx.merge(graphdef, params)
    assert model.num_classes == NUM_CLASSES and model.null_label == NUM_CLASSES
    # The null-label row has parameters of its own: K + 1 rows.
    assert model.label_embedding.embedding[...].shape == (NUM_CLASSES + 1, TINY["time_embed_dim"])
    chex.assert_trees_all_close(_apply_one(graphdef, params, x[2], t[2]), out[2], atol=1e-5, rtol=1e-5)


def test_unconditional_model_has_no_label_embedding_and_refuses_a_label(unconditional):
    graphdef, params, _ = unconditional
    model = nnx.merge(graphdef, params)
    assert model.label_embedding is None and model.num_classes == 0
    with pytest.raises(ValueError, match=r"unconditional \(num_classes=0\); call it without a label"):
        model(jnp.zeros((28, 28, 1)), jnp.float32(0.5), jnp.int32(1))


def test_sinusoidal_embedding_matches_its_closed_form():
    t, dim = 0.37, 8
    k = np.arange(dim // 2)
    angles = 1000.0 * t * 10000.0 ** (-k / (dim // 2))
    expected = np.concatenate([np.sin(angles), np.cos(angles)])
    np.testing.assert_allclose(sinusoidal_embedding(jnp.float32(t), dim), expected, rtol=1e-4, atol=1e-4)


def test_registry_builds_the_unet_and_lists_it_as_a_diffusion_model():
    assert MODELS["ddpm_unet"] is UNet
    assert DIFFUSION_MODELS == frozenset({"ddpm_unet"}) and not DIFFUSION_MODELS & VAE_MODELS
    assert model_hyperparameters("ddpm_unet") == {
        "image_shape": (28, 28, 1),
        "channels": 32,
        "channel_mults": (1, 2),
        "num_groups": 8,
        "time_embed_dim": 128,
        "num_classes": 0,
    }
    model = nnx.eval_shape(
        lambda: build_model(
            "ddpm_unet", num_classes=10, channel_mults=[1, 2, 2], image_shape=[32, 32, 3], rngs=nnx.Rngs(0)
        )
    )
    assert isinstance(model, UNet) and model.num_classes == 10 and model.image_shape == (32, 32, 3)
    # Parameters only, no RNG or other state after construction.
    assert len(jax.tree.leaves(nnx.state(model))) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            {"image_shape": (30, 30, 1)},
            ValueError,
            r"image_shape \(30, 30, 1\) cannot be downsampled 2 times by 2 .*allowed: H and W multiples of 4",
        ),
        ({"channel_mults": (1, 2, 2)}, ValueError, r"image_shape \(28, 28, 1\) cannot be downsampled 3 times"),
        ({"channel_mults": ()}, ValueError, "channel_mults must be a non-empty sequence"),
        ({"channel_mults": (1, 0)}, ValueError, "channel_mults entry must be an integer >= 1, got 0"),
        ({"channels": 6, "num_groups": 4}, ValueError, "num_groups=4 must divide channels=6"),
        ({"time_embed_dim": 15}, ValueError, "time_embed_dim must be even"),
        ({"num_classes": -1}, ValueError, r"num_classes must be an integer >= 0 \(0: unconditional\), got -1"),
        ({"num_classes": True}, ValueError, "num_classes must be an integer >= 0"),
        ({"image_shape": (28, 28)}, ValueError, "image_shape must be a 3-tuple"),
    ],
)
def test_unet_refusals(kwargs, error, match):
    with pytest.raises(error, match=match):
        nnx.eval_shape(lambda: UNet(**{**TINY, **kwargs}, rngs=nnx.Rngs(0)))


def test_call_refuses_a_batch_a_vector_time_and_a_bad_label(conditional):
    graphdef, params, _ = conditional
    model = nnx.merge(graphdef, params)
    with pytest.raises(ValueError, match=r"UNet's x must be one example of shape \(28, 28, 1\)"):
        model(jnp.zeros((2, 28, 28, 1)), jnp.float32(0.5))
    with pytest.raises(ValueError, match="UNet's t must be a scalar"):
        model(jnp.zeros((28, 28, 1)), jnp.zeros(2))
    with pytest.raises(ValueError, match="UNet's label must be an integer scalar"):
        model(jnp.zeros((28, 28, 1)), jnp.float32(0.5), jnp.float32(1.0))


def test_docstring_examples_run():
    result = doctest.testmod(unet_module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
