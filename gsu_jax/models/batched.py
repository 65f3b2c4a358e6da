"""Batched, pure helpers on ``(graphdef, params)``.

Each helper merges the module with ``nnx.merge(graphdef, params)`` inside and ``jax.vmap``-s its single-example
method over the leading axis, so it is a pure function of ``params`` (an ``nnx.State``) that can be called under
``jax.jit`` with ``graphdef`` closed over or marked static. Shapes are checked at trace time.
"""

from __future__ import annotations

import jax
from flax import nnx

from gsu_jax.models.vae import reparameterize


def _check_batch(array: jax.Array, example_shape: tuple[int, ...], *, what: str) -> None:
    if array.ndim != len(example_shape) + 1 or tuple(array.shape[1:]) != tuple(example_shape):
        raise ValueError(f"{what} must have shape (N, *{tuple(example_shape)}), got {tuple(array.shape)}")


def generate_images(graphdef: nnx.GraphDef, params: nnx.State, z: jax.Array) -> jax.Array:
    """Decodes latents into images: ``sigmoid(decode(z_n))`` for each row of ``z``.

    Args:
      graphdef: graph definition of a VAE (``MLPVAE`` or ``ConvVAE``).
      params: its parameters.
      z: ``f32[N, L]`` latents (typically ``jax.random.normal(key, (N, L))``).

    Returns:
      ``f32[N, H, W, C]`` Bernoulli means, in [0, 1].

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from gsu_jax.models import MLPVAE, generate_images
      >>> graphdef, params = nnx.split(MLPVAE(rngs=nnx.Rngs(0)))
      >>> generate_images(graphdef, params, jax.random.normal(jax.random.key(1), (5, 2))).shape
      (5, 28, 28, 1)
    """
    model = nnx.merge(graphdef, params)
    _check_batch(z, (model.latent_dim,), what="z")
    return jax.nn.sigmoid(jax.vmap(model.decode)(z))


def reconstruct(
    graphdef: nnx.GraphDef, params: nnx.State, images: jax.Array, *, key: jax.Array | None = None
) -> jax.Array:
    """Encodes and decodes images: ``sigmoid(decode(z_n))`` with ``z_n`` from ``q(z | x_n)``.

    Args:
      graphdef: graph definition of a VAE.
      params: its parameters.
      images: ``f32[N, H, W, C]`` in [0, 1].
      key: ``None`` decodes the posterior mean (deterministic, what a reconstruction grid shows); a PRNG key draws
        one sample per example with ``jax.random.split(key, N)``.

    Returns:
      ``f32[N, H, W, C]`` Bernoulli means, in [0, 1].
    """
    model = nnx.merge(graphdef, params)
    _check_batch(images, model.image_shape, what="images")

    def reconstruct_one(image: jax.Array, example_key: jax.Array | None) -> jax.Array:
        mean, logvar = model.encode(image)
        z = mean if example_key is None else reparameterize(mean, logvar, key=example_key)
        return jax.nn.sigmoid(model.decode(z))

    if key is None:
        return jax.vmap(lambda image: reconstruct_one(image, None))(images)
    return jax.vmap(reconstruct_one)(images, jax.random.split(key, images.shape[0]))


def classifier_logits(graphdef: nnx.GraphDef, params: nnx.State, images: jax.Array) -> jax.Array:
    """``images f32[N, H, W, C] -> logits f32[N, K]`` of a classifier (``MLPClassifier`` or ``CNNClassifier``)."""
    model = nnx.merge(graphdef, params)
    _check_batch(images, model.image_shape, what="images")
    return jax.vmap(model)(images)


def classifier_features(graphdef: nnx.GraphDef, params: nnx.State, images: jax.Array) -> jax.Array:
    """``images f32[N, H, W, C] -> f32[N, F]``: a classifier's post-ReLU hidden features (classifier-FID)."""
    model = nnx.merge(graphdef, params)
    _check_batch(images, model.image_shape, what="images")
    return jax.vmap(model.features)(images)
