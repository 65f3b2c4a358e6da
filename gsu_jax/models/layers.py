"""Building blocks and argument checks shared by the VAEs and the classifiers.

Every block here is written for ONE example (a feature map ``f32[H, W, C]``) and is exact per example:
no statistic is ever shared between examples, so ``jax.vmap`` over a batch gives the same numbers as a
python loop, and per-example gradients carry no cross-example leakage.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gsu_jax.models.conv import conv

# Spatial size of a square convolutional input -> number of stride-2 stages that bring it to 7 or 8 pixels.
CONV_DOWNSAMPLINGS: dict[int, int] = {28: 2, 32: 2, 64: 3}
# Channel counts the convolutional models accept: grayscale and RGB.
CONV_IMAGE_CHANNELS: tuple[int, ...] = (1, 3)


def check_positive_int(value: object, *, name: str) -> int:
    """Returns ``value`` as an ``int`` if it is an integer >= 1, else raises.

    Raises:
        TypeError: ``value`` is not an integer (``bool`` is refused too).
        ValueError: ``value`` < 1.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer >= 1, got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value}")
    return int(value)


def check_image_shape(image_shape: object) -> tuple[int, int, int]:
    """Returns ``image_shape`` as a ``(H, W, C)`` tuple of positive ints, else raises a clear error."""
    if isinstance(image_shape, (str, bytes)) or not isinstance(image_shape, Sequence) or len(image_shape) != 3:
        raise ValueError(f"image_shape must be a 3-tuple (H, W, C) of positive ints, got {image_shape!r}")
    height, width, channels = (check_positive_int(size, name="image_shape entry") for size in image_shape)
    return (height, width, channels)


def check_conv_image_shape(image_shape: object) -> tuple[int, int, int]:
    """Like :func:`check_image_shape`, restricted to the shapes the convolutional models are built for.

    Allowed: square images of side 28, 32 or 64 with 1 or 3 channels (e.g. ``(28, 28, 1)`` MNIST,
    ``(32, 32, 3)`` CIFAR/SVHN, ``(64, 64, 3)`` down-sized CelebA).
    """
    height, width, channels = check_image_shape(image_shape)
    if height != width or height not in CONV_DOWNSAMPLINGS or channels not in CONV_IMAGE_CHANNELS:
        raise ValueError(
            f"image_shape {(height, width, channels)} is not supported by the convolutional models; allowed: "
            f"(S, S, C) with S in {sorted(CONV_DOWNSAMPLINGS)} and C in {list(CONV_IMAGE_CHANNELS)}"
        )
    return (height, width, channels)


def check_num_groups(num_groups: object, *, channels: int) -> int:
    """Returns ``num_groups`` if it is a positive int dividing ``channels`` (the GroupNorm requirement)."""
    num_groups = check_positive_int(num_groups, name="num_groups")
    if channels % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide channels={channels}")
    return num_groups


def check_one_example(array: jax.Array, expected_shape: tuple[int, ...], *, what: str) -> None:
    """Raises at trace time if ``array`` is not ONE example of ``expected_shape``.

    The modules are written for a single example; a batch must go through ``jax.vmap`` (or the batched helpers).
    """
    if tuple(array.shape) != tuple(expected_shape):
        raise ValueError(
            f"{what} must be one example of shape {tuple(expected_shape)}, got shape {tuple(array.shape)}; "
            "batch it with jax.vmap or the batched helpers in gsu_jax.models"
        )


def num_pixels(image_shape: tuple[int, int, int]) -> int:
    """``H * W * C``."""
    return math.prod(image_shape)


class ExampleGroupNorm(nnx.GroupNorm):
    """``nnx.GroupNorm`` applied to ONE feature map ``f32[H, W, C]``.

    ``nnx.GroupNorm`` reads axis 0 as the batch axis and reduces over the others. Given a single example it would
    normalise each row separately, so a leading axis of size 1 is added and removed here: the statistics are taken
    over (H, W, channels of the group) of this example only, exactly what GroupNorm means per example.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        """``f32[H, W, C] -> f32[H, W, C]``."""
        return super().__call__(x[None])[0]


class DownBlock(nnx.Module):
    """3x3 convolution with stride 2 (halves H and W, SAME padding), GroupNorm, ReLU; one example."""

    def __init__(self, in_channels: int, out_channels: int, *, num_groups: int, rngs: nnx.Rngs):
        self.conv = conv(in_channels, out_channels, kernel_size=(3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
        self.norm = ExampleGroupNorm(out_channels, num_groups=num_groups, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``f32[H, W, C_in] -> f32[ceil(H/2), ceil(W/2), C_out]``."""
        return jax.nn.relu(self.norm(self.conv(x)))


class UpBlock(nnx.Module):
    """Nearest-neighbour 2x upsampling, 3x3 convolution, GroupNorm, ReLU; one example.

    Resize-then-convolve instead of a strided transposed convolution: it avoids checkerboard artefacts.
    """

    def __init__(self, in_channels: int, out_channels: int, *, num_groups: int, rngs: nnx.Rngs):
        self.conv = conv(in_channels, out_channels, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.norm = ExampleGroupNorm(out_channels, num_groups=num_groups, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``f32[H, W, C_in] -> f32[2H, 2W, C_out]``."""
        x = jnp.repeat(jnp.repeat(x, 2, axis=0), 2, axis=1)
        return jax.nn.relu(self.norm(self.conv(x)))
