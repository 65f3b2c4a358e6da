"""Variational autoencoders with a Bernoulli decoder on logits, written for ONE example.

Both VAEs share one interface, the one the losses and the unlearning code are written against:

* ``encode(image f32[H, W, C]) -> (mean f32[L], logvar f32[L])``: the Gaussian posterior
  ``q(z | x) = N(mean, diag(exp(logvar)))``;
* ``decode(z f32[L]) -> logits f32[H, W, C]``: ``p(x | z) = Bernoulli(sigmoid(logits))`` per pixel;
* attributes ``latent_dim`` (``L``) and ``image_shape`` (``(H, W, C)``).

Neither holds BatchNorm or any other statistic across examples, nor any RNG state: sampling takes an explicit key
(:func:`reparameterize`). Batch with ``jax.vmap`` or the helpers in :mod:`gsu_jax.models.batched`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gsu_jax.models.conv import conv
from gsu_jax.models.layers import (
    CONV_DOWNSAMPLINGS,
    DownBlock,
    UpBlock,
    check_conv_image_shape,
    check_image_shape,
    check_num_groups,
    check_one_example,
    check_positive_int,
    num_pixels,
)


def reparameterize(mean: jax.Array, logvar: jax.Array, *, key: jax.Array) -> jax.Array:
    """One sample ``z ~ N(mean, diag(exp(logvar)))``, differentiable in ``mean`` and ``logvar``.

    ``z = mean + exp(logvar / 2) * eps`` with ``eps = jax.random.normal(key, mean.shape, mean.dtype)``: the same
    key always gives the same ``eps``, so a test can recompute the sample independently.

    Args:
      mean: ``f32[L]`` posterior mean.
      logvar: ``f32[L]`` posterior log-variance.
      key: PRNG key for this one example.

    Returns:
      ``f32[L]``.

    Example:
      >>> z = reparameterize(jnp.zeros(2), jnp.zeros(2), key=jax.random.key(0))
      >>> z.shape
      (2,)
    """
    eps = jax.random.normal(key, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


class MLPVAE(nnx.Module):
    """The protocol VAE: encoder ``D-hidden-(mean, logvar)``, decoder ``latent-hidden-D`` logits, ReLU.

    ``D = H * W * C`` (784 for MNIST). With the defaults this is the published protocol model (784-400-2) without
    its BatchNorm; ``layer_norm=True`` adds a LayerNorm (per example) after each hidden linear layer.

    Parameters (weights + biases): ``(D*h + h) + 2*(h*L + L) + (L*h + h) + (h*D + D)``; 631,188 for 784-400-2 and
    652,824 for 784-400-20 (plus ``4*h`` with ``layer_norm``).

    Example:
      >>> vae = MLPVAE(latent_dim=2, rngs=nnx.Rngs(0))
      >>> mean, logvar = vae.encode(jnp.zeros((28, 28, 1)))
      >>> vae.decode(mean).shape
      (28, 28, 1)
    """

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int] = (28, 28, 1),
        hidden: int = 400,
        latent_dim: int = 2,
        layer_norm: bool = False,
        rngs: nnx.Rngs,
    ):
        self.image_shape = check_image_shape(image_shape)
        hidden = check_positive_int(hidden, name="hidden")
        self.latent_dim = check_positive_int(latent_dim, name="latent_dim")
        if not isinstance(layer_norm, bool):
            raise TypeError(f"layer_norm must be a bool, got {layer_norm!r}")
        pixels = num_pixels(self.image_shape)
        self.encoder_hidden = nnx.Linear(pixels, hidden, rngs=rngs)
        self.encoder_norm = nnx.LayerNorm(hidden, rngs=rngs) if layer_norm else None
        self.mean_head = nnx.Linear(hidden, self.latent_dim, rngs=rngs)
        self.logvar_head = nnx.Linear(hidden, self.latent_dim, rngs=rngs)
        self.decoder_hidden = nnx.Linear(self.latent_dim, hidden, rngs=rngs)
        self.decoder_norm = nnx.LayerNorm(hidden, rngs=rngs) if layer_norm else None
        self.decoder_output = nnx.Linear(hidden, pixels, rngs=rngs)

    def encode(self, image: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``image f32[H, W, C] -> (mean f32[L], logvar f32[L])``."""
        check_one_example(image, self.image_shape, what="MLPVAE.encode's image")
        h = self.encoder_hidden(image.reshape(-1))
        if self.encoder_norm is not None:
            h = self.encoder_norm(h)
        h = jax.nn.relu(h)
        return self.mean_head(h), self.logvar_head(h)

    def decode(self, z: jax.Array) -> jax.Array:
        """``z f32[L] -> logits f32[H, W, C]`` of the per-pixel Bernoulli."""
        check_one_example(z, (self.latent_dim,), what="MLPVAE.decode's z")
        h = self.decoder_hidden(z)
        if self.decoder_norm is not None:
            h = self.decoder_norm(h)
        h = jax.nn.relu(h)
        return self.decoder_output(h).reshape(self.image_shape)


class ConvVAE(nnx.Module):
    """Convolutional VAE for square grayscale or RGB images (side 28, 32 or 64).

    Encoder: ``n`` stride-2 :class:`~gsu_jax.models.layers.DownBlock` (3x3 conv, GroupNorm, ReLU) with
    ``channels * 2**i`` channels, ``n = 2`` for side 28/32 and 3 for 64 (down to 7x7 or 8x8), flattened into two
    linear heads (mean, logvar). Decoder: a linear layer back to the bottom feature map (ReLU), ``n``
    :class:`~gsu_jax.models.layers.UpBlock` (nearest 2x upsampling, 3x3 conv, GroupNorm, ReLU) mirroring the
    encoder widths, and a 3x3 convolution to ``C`` logits. GroupNorm statistics are those of the one example.

    Example:
      >>> vae = ConvVAE(latent_dim=3, channels=4, num_groups=2, rngs=nnx.Rngs(0))  # a tiny one
      >>> mean, logvar = vae.encode(jnp.zeros((28, 28, 1)))
      >>> vae.decode(mean).shape
      (28, 28, 1)
    """

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int] = (28, 28, 1),
        latent_dim: int = 16,
        channels: int = 32,
        num_groups: int = 8,
        rngs: nnx.Rngs,
    ):
        self.image_shape = check_conv_image_shape(image_shape)
        self.latent_dim = check_positive_int(latent_dim, name="latent_dim")
        channels = check_positive_int(channels, name="channels")
        num_groups = check_num_groups(num_groups, channels=channels)
        side, _, image_channels = self.image_shape
        stages = CONV_DOWNSAMPLINGS[side]
        widths = [channels * 2**stage for stage in range(stages)]
        bottom_side = side // 2**stages
        self.bottom_shape = (bottom_side, bottom_side, widths[-1])
        bottom_size = num_pixels(self.bottom_shape)

        self.down = nnx.List(
            [
                DownBlock(in_width, out_width, num_groups=num_groups, rngs=rngs)
                for in_width, out_width in zip([image_channels] + widths[:-1], widths)
            ]
        )
        self.mean_head = nnx.Linear(bottom_size, self.latent_dim, rngs=rngs)
        self.logvar_head = nnx.Linear(bottom_size, self.latent_dim, rngs=rngs)

        self.decoder_input = nnx.Linear(self.latent_dim, bottom_size, rngs=rngs)
        # Mirror of the encoder: widths[-1] -> widths[-2] -> ... -> widths[0] -> widths[0].
        up_widths = widths[::-1] + [widths[0]]
        self.up = nnx.List(
            [
                UpBlock(in_width, out_width, num_groups=num_groups, rngs=rngs)
                for in_width, out_width in zip(up_widths[:-1], up_widths[1:])
            ]
        )
        self.decoder_output = conv(widths[0], image_channels, kernel_size=(3, 3), padding="SAME", rngs=rngs)

    def encode(self, image: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``image f32[H, W, C] -> (mean f32[L], logvar f32[L])``."""
        check_one_example(image, self.image_shape, what="ConvVAE.encode's image")
        h = image
        for block in self.down:
            h = block(h)
        h = h.reshape(-1)
        return self.mean_head(h), self.logvar_head(h)

    def decode(self, z: jax.Array) -> jax.Array:
        """``z f32[L] -> logits f32[H, W, C]`` of the per-pixel Bernoulli."""
        check_one_example(z, (self.latent_dim,), what="ConvVAE.decode's z")
        h = jax.nn.relu(self.decoder_input(z)).reshape(self.bottom_shape)
        for block in self.up:
            h = block(h)
        return self.decoder_output(h)
