"""A small DDPM U-Net (epsilon prediction), written for ONE example.

Interface (what :mod:`gsu_jax.diffusion` is written against):

* ``__call__(x f32[H, W, C], t f32[], label i32[] | None = None) -> f32[H, W, C]``: the predicted noise
  ``eps_theta(x_t, t, y)`` at continuous time ``t`` in [0, 1] (timestep index / number of training steps);
* attributes ``image_shape`` (``(H, W, C)``) and ``num_classes`` (``K``; 0 for an unconditional model).

Layout, for ``channel_mults = (m_0, ..., m_{n-1})`` and ``c = channels``::

    x -> conv3x3 -> [ResBlock(c*m_i) -> skip_i -> Downsample] for i = 0..n-1     (side / 2**n at the bottom)
      -> ResBlock(c*m_{n-1})                                                     (middle)
      -> [Upsample -> concat(skip_i) -> ResBlock(c*m_i)] for i = n-1..0
      -> GroupNorm -> SiLU -> conv3x3 -> eps

Every :class:`ResBlock` is conditioned on ``emb = MLP(sinusoidal(1000 t)) (+ Embed(label))`` through a per-channel
bias. Normalisation is GroupNorm over the one example only (:class:`~gsu_jax.models.layers.ExampleGroupNorm`),
never BatchNorm, so ``jax.vmap`` over a batch is exact per example and per-example gradients carry no
cross-example terms. The module holds no RNG state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gsu_jax.models.conv import conv
from gsu_jax.models.layers import (
    ExampleGroupNorm,
    check_image_shape,
    check_num_groups,
    check_one_example,
    check_positive_int,
)

# Sinusoidal features are taken of 1000 * t, so the continuous time t = index / T spans the same frequency range
# as the integer timesteps 0..999 of the original DDPM embedding, whatever T is.
TIME_SCALE = 1000.0


def sinusoidal_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Transformer-style sinusoidal features of a scalar time.

    .. math::

       \\mathrm{emb}(t) = [\\sin(s t \\omega_k)]_{k < d/2} \\,\\Vert\\, [\\cos(s t \\omega_k)]_{k < d/2},
       \\quad \\omega_k = 10000^{-k / (d/2)}, \\ s = 1000.

    Args:
      t: ``f32[]`` continuous time in [0, 1].
      dim: ``d``, even.

    Returns:
      ``f32[d]``.

    Example:
      >>> sinusoidal_embedding(jnp.float32(0.0), 4).tolist()
      [0.0, 0.0, 1.0, 1.0]
    """
    if dim % 2:
        raise ValueError(f"the sinusoidal embedding dimension must be even, got {dim}")
    half = dim // 2
    frequencies = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = TIME_SCALE * jnp.asarray(t, jnp.float32) * frequencies
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)])


class ResBlock(nnx.Module):
    """Pre-activation residual block with an additive conditioning bias; one example.

    ``h = conv(SiLU(GN(x))) + Linear(SiLU(emb))``, ``h = conv(SiLU(GN(h)))``, output ``h + skip(x)`` with
    ``skip`` a 1x1 convolution when the channel count changes (identity otherwise).
    """

    def __init__(self, in_channels: int, out_channels: int, *, embed_dim: int, num_groups: int, rngs: nnx.Rngs):
        self.norm1 = ExampleGroupNorm(in_channels, num_groups=num_groups, rngs=rngs)
        self.conv1 = conv(in_channels, out_channels, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.embed_projection = nnx.Linear(embed_dim, out_channels, rngs=rngs)
        self.norm2 = ExampleGroupNorm(out_channels, num_groups=num_groups, rngs=rngs)
        self.conv2 = conv(out_channels, out_channels, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.skip = (
            conv(in_channels, out_channels, kernel_size=(1, 1), rngs=rngs) if in_channels != out_channels else None
        )

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        """``(x f32[H, W, C_in], emb f32[E]) -> f32[H, W, C_out]``."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.embed_projection(jax.nn.silu(emb))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return h + (x if self.skip is None else self.skip(x))


class UNet(nnx.Module):
    """DDPM noise predictor ``eps_theta(x_t, t[, y])`` for images whose sides ``2**len(channel_mults)`` divides.

    ``28x28`` with the default two levels runs at 28 -> 14 -> 7; ``32x32`` at 32 -> 16 -> 8. Downsampling is a
    stride-2 3x3 convolution, upsampling nearest-neighbour (the following ResBlock's convolutions smooth it).
    With ``num_classes = K > 0`` the model is class-conditional: a label embedding with ``K + 1`` rows is added to
    the time embedding, row ``K`` being the *null* label of classifier-free guidance (``label=None`` means null).

    Example:
      >>> unet = UNet(channels=8, num_groups=4, time_embed_dim=16, num_classes=10, rngs=nnx.Rngs(0))  # tiny
      >>> unet(jnp.zeros((28, 28, 1)), jnp.float32(0.5), jnp.int32(3)).shape
      (28, 28, 1)
      >>> unet(jnp.zeros((28, 28, 1)), jnp.float32(0.5)).shape  # the null label
      (28, 28, 1)
    """

    def __init__(
        self,
        *,
        image_shape: tuple[int, int, int] = (28, 28, 1),
        channels: int = 32,
        channel_mults: Sequence[int] = (1, 2),
        num_groups: int = 8,
        time_embed_dim: int = 128,
        num_classes: int = 0,
        rngs: nnx.Rngs,
    ):
        self.image_shape = check_image_shape(image_shape)
        channels = check_positive_int(channels, name="channels")
        channel_mults = _check_channel_mults(channel_mults)
        num_groups = check_num_groups(num_groups, channels=channels)
        time_embed_dim = check_positive_int(time_embed_dim, name="time_embed_dim")
        if time_embed_dim % 2:
            raise ValueError(f"time_embed_dim must be even (sin and cos halves), got {time_embed_dim}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: unconditional), got {num_classes!r}")
        self.num_classes = int(num_classes)
        height, width, image_channels = self.image_shape
        factor = 2 ** len(channel_mults)
        if height % factor or width % factor:
            raise ValueError(
                f"image_shape {self.image_shape} cannot be downsampled {len(channel_mults)} times by 2 "
                f"(channel_mults={channel_mults}); allowed: H and W multiples of {factor}, "
                f"e.g. (28, 28, C) or (32, 32, C) for two levels"
            )
        self.time_embed_dim = time_embed_dim
        self.time_mlp = nnx.Sequential(
            nnx.Linear(time_embed_dim, time_embed_dim, rngs=rngs),
            jax.nn.silu,
            nnx.Linear(time_embed_dim, time_embed_dim, rngs=rngs),
        )
        self.label_embedding = nnx.Embed(self.num_classes + 1, time_embed_dim, rngs=rngs) if self.num_classes else None
        widths = [channels * mult for mult in channel_mults]
        block = dict(embed_dim=time_embed_dim, num_groups=num_groups, rngs=rngs)
        self.input_conv = conv(image_channels, channels, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.down_blocks = nnx.List(
            [ResBlock(w_in, w_out, **block) for w_in, w_out in zip([channels] + widths[:-1], widths)]
        )
        self.downsamplers = nnx.List(
            [conv(w, w, kernel_size=(3, 3), strides=(2, 2), padding="SAME", rngs=rngs) for w in widths]
        )
        self.middle_block = ResBlock(widths[-1], widths[-1], **block)
        # Up level i sees the upsampled output of level i + 1 (or the middle) concatenated with skip i.
        below = widths[1:] + [widths[-1]]
        self.up_blocks = nnx.List([ResBlock(w_below + w, w, **block) for w_below, w in zip(below, widths)])
        self.output_norm = ExampleGroupNorm(widths[0], num_groups=num_groups, rngs=rngs)
        self.output_conv = conv(widths[0], image_channels, kernel_size=(3, 3), padding="SAME", rngs=rngs)

    @property
    def null_label(self) -> int:
        """The label row used for "no label" (classifier-free guidance): ``num_classes``."""
        return self.num_classes

    def embed(self, t: jax.Array, label: jax.Array | None = None) -> jax.Array:
        """The conditioning vector ``f32[E]`` of time ``t`` (and ``label`` for a conditional model)."""
        t = jnp.asarray(t, jnp.float32)
        if t.shape != ():
            raise ValueError(f"UNet's t must be a scalar (one example), got shape {t.shape}; batch with jax.vmap")
        emb = self.time_mlp(sinusoidal_embedding(t, self.time_embed_dim))
        if self.label_embedding is None:
            if label is not None:
                raise ValueError("this UNet is unconditional (num_classes=0); call it without a label")
            return emb
        label = jnp.asarray(self.null_label if label is None else label)
        if label.shape != () or not jnp.issubdtype(label.dtype, jnp.integer):
            raise ValueError(
                f"UNet's label must be an integer scalar (one example), got {label.dtype} of shape {label.shape}"
            )
        return emb + self.label_embedding(label)

    def __call__(self, x: jax.Array, t: jax.Array, label: jax.Array | None = None) -> jax.Array:
        """``(x f32[H, W, C], t f32[], label i32[] | None) -> eps f32[H, W, C]``.

        ``label`` in ``[0, num_classes]`` (``num_classes`` or ``None``: the null label) for a conditional model;
        must be ``None`` for an unconditional one.
        """
        check_one_example(x, self.image_shape, what="UNet's x")
        emb = self.embed(t, label)
        h = self.input_conv(x)
        skips = []
        for block, downsample in zip(self.down_blocks, self.downsamplers):
            h = block(h, emb)
            skips.append(h)
            h = downsample(h)
        h = self.middle_block(h, emb)
        for block, skip in zip(reversed(self.up_blocks), reversed(skips)):
            h = jnp.repeat(jnp.repeat(h, 2, axis=0), 2, axis=1)
            h = block(jnp.concatenate([h, skip], axis=-1), emb)
        return self.output_conv(jax.nn.silu(self.output_norm(h)))


def _check_channel_mults(channel_mults: object) -> tuple[int, ...]:
    if isinstance(channel_mults, (str, bytes)) or not isinstance(channel_mults, Sequence) or not channel_mults:
        raise ValueError(f"channel_mults must be a non-empty sequence of positive ints, got {channel_mults!r}")
    return tuple(check_positive_int(mult, name="channel_mults entry") for mult in channel_mults)
