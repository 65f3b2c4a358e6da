"""Image classifiers (the evaluator and the guidance classifier), written for ONE example.

Interface: ``features(image f32[H, W, C]) -> f32[F]`` (the post-ReLU hidden layer, the features of the
classifier-FID) and ``__call__(image) -> logits f32[K]``; attributes ``image_shape``, ``num_classes`` (``K``) and
``num_features`` (``F``). No BatchNorm, no dropout, no RNG state.
"""

from __future__ import annotations

import jax
from flax import nnx

from gsu_jax.models.layers import (
    CONV_DOWNSAMPLINGS,
    DownBlock,
    check_conv_image_shape,
    check_image_shape,
    check_num_groups,
    check_one_example,
    check_positive_int,
    num_pixels,
)


def _check_num_classes(num_classes: object) -> int:
    num_classes = check_positive_int(num_classes, name="num_classes")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return num_classes


class MLPClassifier(nnx.Module):
    """The protocol evaluator: ``D-hidden-K`` with a ReLU hidden layer (784-200-10 by default).

    Parameters: ``(D*h + h) + (h*K + K)`` = 159,010 for 784-200-10. ``features`` is the 200-d ReLU layer.

    Example:
      >>> import jax.numpy as jnp
      >>> clf = MLPClassifier(rngs=nnx.Rngs(0))
      >>> clf(jnp.zeros((28, 28, 1))).shape, clf.features(jnp.zeros((28, 28, 1))).shape
      ((10,), (200,))
    """

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int] = (28, 28, 1),
        hidden: int = 200,
        num_classes: int = 10,
        rngs: nnx.Rngs,
    ):
        self.image_shape = check_image_shape(image_shape)
        self.num_features = check_positive_int(hidden, name="hidden")
        self.num_classes = _check_num_classes(num_classes)
        self.hidden_layer = nnx.Linear(num_pixels(self.image_shape), self.num_features, rngs=rngs)
        self.output_layer = nnx.Linear(self.num_features, self.num_classes, rngs=rngs)

    def features(self, image: jax.Array) -> jax.Array:
        """``image f32[H, W, C] -> f32[hidden]`` post-ReLU features."""
        check_one_example(image, self.image_shape, what="MLPClassifier's image")
        return jax.nn.relu(self.hidden_layer(image.reshape(-1)))

    def __call__(self, image: jax.Array) -> jax.Array:
        """``image f32[H, W, C] -> logits f32[K]``."""
        return self.output_layer(self.features(image))


class CNNClassifier(nnx.Module):
    """Small CNN: stride-2 conv blocks (3x3 conv, GroupNorm, ReLU), a ReLU dense layer (the features), logits.

    The conv stages are those of the :class:`~gsu_jax.models.vae.ConvVAE` encoder (2 for side 28/32, 3 for 64,
    ``channels * 2**i`` channels), flattened into a ``hidden``-unit ReLU layer.

    Example:
      >>> import jax.numpy as jnp
      >>> clf = CNNClassifier(channels=4, num_groups=2, hidden=4, num_classes=5, rngs=nnx.Rngs(0))  # a tiny one
      >>> clf(jnp.zeros((28, 28, 1))).shape, clf.features(jnp.zeros((28, 28, 1))).shape
      ((5,), (4,))
    """

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int] = (28, 28, 1),
        channels: int = 32,
        hidden: int = 128,
        num_classes: int = 10,
        num_groups: int = 8,
        rngs: nnx.Rngs,
    ):
        self.image_shape = check_conv_image_shape(image_shape)
        channels = check_positive_int(channels, name="channels")
        num_groups = check_num_groups(num_groups, channels=channels)
        self.num_features = check_positive_int(hidden, name="hidden")
        self.num_classes = _check_num_classes(num_classes)
        side, _, image_channels = self.image_shape
        stages = CONV_DOWNSAMPLINGS[side]
        widths = [channels * 2**stage for stage in range(stages)]
        bottom_side = side // 2**stages
        self.down = nnx.List(
            [
                DownBlock(in_width, out_width, num_groups=num_groups, rngs=rngs)
                for in_width, out_width in zip([image_channels] + widths[:-1], widths)
            ]
        )
        self.hidden_layer = nnx.Linear(bottom_side * bottom_side * widths[-1], self.num_features, rngs=rngs)
        self.output_layer = nnx.Linear(self.num_features, self.num_classes, rngs=rngs)

    def features(self, image: jax.Array) -> jax.Array:
        """``image f32[H, W, C] -> f32[hidden]`` post-ReLU features."""
        check_one_example(image, self.image_shape, what="CNNClassifier's image")
        h = image
        for block in self.down:
            h = block(h)
        return jax.nn.relu(self.hidden_layer(h.reshape(-1)))

    def __call__(self, image: jax.Array) -> jax.Array:
        """``image f32[H, W, C] -> logits f32[K]``."""
        return self.output_layer(self.features(image))
