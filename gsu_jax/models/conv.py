"""2-D convolutions whose gradients stay fast inside the chunk loops on XLA:CPU.

Why: inside a ``jax.lax.scan`` body (the chunked gradient passes of :func:`gsu_jax.methods.make_method`), XLA:CPU
emits the convolutions that reverse-mode differentiation of ``lax.conv_general_dilated`` produces (the kernel
gradient, dimension labels ``f01b_i01o->01bf``, and the input gradient of a stride-1 convolution) as generic loops
instead of its NHWC/HWIO library convolution, which it uses outside loops (JAX issue #12868 reports the same
effect). Measured on the 2-core CPU: the kernel gradient of a 64 -> 32 channel 3x3 convolution over 64 examples took
3,217 ms in a 4-iteration ``fori_loop`` against 31 ms unrolled, and a chunked (64) conv-VAE ``sa`` step at 256 + 256
examples 20.2 s against 0.88 s unchunked.

:func:`conv_general_dilated` is a drop-in for ``lax.conv_general_dilated`` (``nnx.Conv`` takes it as its
``conv_general_dilated``; :func:`conv` builds one). Traced inside :func:`reverse_mode_loop_body` (which the chunked
mean-gradient pass, :func:`gsu_jax.update_rules.losses_and_mean_grad`, enters), a plain 2-D NHWC/HWIO convolution
gets a hand-written derivative (``jax.custom_vjp``): the input gradient as one NHWC/HWIO convolution of the dilated
output gradient with the reversed, channel-swapped kernel, the kernel gradient as one NHWC/HWIO convolution of the
transposed input with the transposed output gradient, forms XLA:CPU runs as library calls in loops. Under ``vmap``
over examples (a per-example loss) a ``custom_vmap`` rule folds the examples into the convolution's batch, so the
kernel gradient is summed over the chunk by that one convolution rather than formed per example. Values equal the
derivative of ``lax.conv_general_dilated`` to float32 rounding (the tests compare them).

Only reverse mode of a ``vmap`` inside ``grad`` is supported there (``jax.custom_vjp`` has no forward mode and
``custom_vmap`` no reverse mode under an outer ``vmap``): hence the context is entered by that one pass, and
everywhere else (forward-mode passes, per-example gradients, every unchunked step, training) and for other cases
(dilation, feature groups, other layouts, ``preferred_element_type``) this is ``lax.conv_general_dilated`` itself.
A per-example loss that differentiates inside itself (a ``jax.jvp`` or ``jax.grad`` around the model) fails to
trace with it, and the pass then retraces without it (tested). One case is not caught: a loss that wraps the model
in its own ``jax.jit`` and is first traced inside the pass would keep the custom derivative in jit's cache for
later forward-mode passes (jit's cache key does not see the context); our losses do not ``jit`` inside.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.custom_batching import custom_vmap

_NHWC = ("NHWC", "HWIO", "NHWC")
_NHWC_NUMBERS = lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)

Padding = tuple[tuple[int, int], tuple[int, int]]

_REVERSE_MODE_LOOP = contextvars.ContextVar("gsu_jax_conv_reverse_mode_loop", default=False)


@contextlib.contextmanager
def reverse_mode_loop_body():
    """Convolutions traced inside this context get the loop-friendly derivative. For tracing a loop body that only
    differentiates ``vmap``-ped per-example losses in reverse mode (``grad`` of a ``vmap``), nothing else."""
    token = _REVERSE_MODE_LOOP.set(True)
    try:
        yield
    finally:
        _REVERSE_MODE_LOOP.reset(token)


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """``lax.conv_general_dilated`` with a loop-friendly derivative for plain 2-D NHWC/HWIO convolutions.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x, w = jnp.ones((2, 5, 5, 3)), jnp.ones((3, 3, 3, 4))
      >>> conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")).shape
      (2, 3, 3, 4)
    """
    loop_friendly = (
        _REVERSE_MODE_LOOP.get()
        and lhs.ndim == 4
        and rhs.ndim == 4
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and feature_group_count == 1
        and all(value is None for value in kwargs.values())
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC_NUMBERS
    )
    if not loop_friendly:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            **kwargs,
        )
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _batch_folding_conv(strides, pads, precision)(lhs, rhs)


def conv(
    in_features: int,
    out_features: int,
    *,
    kernel_size: tuple[int, int],
    strides: tuple[int, int] = (1, 1),
    padding: str = "SAME",
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """``nnx.Conv`` (same parameters, initialisation and values) using :func:`conv_general_dilated`."""
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        conv_general_dilated=conv_general_dilated,
        rngs=rngs,
    )


@functools.cache
def _batch_folding_conv(strides: tuple[int, int], pads: Padding, precision: Any) -> Callable:
    """``(x, kernel) -> conv`` with :func:`_conv`'s derivative, whose ``vmap`` over ``x`` alone folds the mapped
    axis into the batch (one convolution, so reverse mode sums the kernel gradient over it directly)."""

    @custom_vmap
    def convolve(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return _conv(x, kernel, strides, pads, precision)

    @convolve.def_vmap
    def folded(axis_size: int, in_batched: Sequence[bool], x: jax.Array, kernel: jax.Array):
        x_batched, kernel_batched = in_batched
        if kernel_batched:  # a kernel per mapped index: nothing to fold
            mapped = jax.vmap(lambda x, k: _conv(x, k, strides, pads, precision), in_axes=(0 if x_batched else None, 0))
            return mapped(x, kernel), True
        if not x_batched:
            return _conv(x, kernel, strides, pads, precision), False
        y = _conv(x.reshape((-1,) + x.shape[2:]), kernel, strides, pads, precision)
        return y.reshape((axis_size, -1) + y.shape[1:]), True

    return convolve


def _forward(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: Padding, precision: Any) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: Padding, precision: Any) -> jax.Array:
    return _forward(x, kernel, strides, pads, precision)


def _conv_fwd(x, kernel, strides, pads, precision):
    return _forward(x, kernel, strides, pads, precision), (x, kernel)


def _conv_bwd(strides, pads, precision, residuals, output_grad):
    x, kernel = residuals
    input_grad = _input_grad(output_grad, kernel, x.shape, strides, pads, precision)
    return input_grad, _kernel_grad(x, output_grad, kernel.shape, strides, pads, precision)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _input_grad(output_grad, kernel, input_shape, strides, pads, precision):
    """``dL/dx``: the output gradient dilated by the stride, convolved with the spatially reversed kernel whose
    input and output channels are swapped (a transposed convolution, with the reversal and dilation explicit)."""
    flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
    padding = []
    for size, k, stride, (low, _), out in zip(
        input_shape[1:3], kernel.shape[:2], strides, pads, output_grad.shape[1:3]
    ):
        before = k - 1 - low
        padding.append((before, size + k - 1 - ((out - 1) * stride + 1) - before))
    return lax.conv_general_dilated(
        output_grad, flipped, (1, 1), padding, lhs_dilation=strides, dimension_numbers=_NHWC, precision=precision
    ).astype(output_grad.dtype)


def _kernel_grad(x, output_grad, kernel_shape, strides, pads, precision):
    """``dL/dkernel``: the input with its channels as the batch and its examples as the features, convolved with the
    output gradient (examples as its input channels) dilated by the stride, transposed back to HWIO."""
    padding = []
    for size, k, stride, (low, _), out in zip(x.shape[1:3], kernel_shape[:2], strides, pads, output_grad.shape[1:3]):
        padding.append((low, k + (out - 1) * stride - size - low))
    grad = lax.conv_general_dilated(
        jnp.transpose(x, (3, 1, 2, 0)),
        jnp.transpose(output_grad, (1, 2, 0, 3)),
        (1, 1),
        padding,
        rhs_dilation=strides,
        dimension_numbers=_NHWC,
        precision=precision,
    )
    return jnp.transpose(grad, (1, 2, 0, 3)).astype(x.dtype)
