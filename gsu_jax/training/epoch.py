"""One epoch of minibatch training, jitted: the data order, the per-step keys, augmentation and the optimizer step.

:func:`make_train_epoch` builds the epoch either as ONE ``lax.scan`` over the batches or, for the convolutional
models on CPU, as the same jitted step called once per batch; both draw the same batches and keys, so an epoch is a
deterministic function of its inputs. Skipping non-finite steps (``optax.apply_if_finite``) is the optimizer's
business (:mod:`gsu_jax.training.programs`); the epoch reports which steps were finite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gsu_jax import losses, parallel

__all__ = ["make_train_epoch", "random_translate"]


def random_translate(image: jax.Array, *, max_shift: int, key: jax.Array) -> jax.Array:
    """Shifts ONE image by a uniform random offset in ``[-max_shift, max_shift]`` on each axis, filling with 0.

    Args:
        image: ``f32[H, W, C]``.
        max_shift: the largest shift in pixels (>= 0; 0 returns the image unchanged).
        key: the example's PRNG key.

    Returns:
        ``f32[H, W, C]``: ``out[i, j] = image[i - dy, j - dx]`` where in range, else 0.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> images = jnp.ones((4, 28, 28, 1))
        >>> keys = jax.random.split(jax.random.key(0), 4)
        >>> jax.vmap(lambda x, k: random_translate(x, max_shift=2, key=k))(images, keys).shape
        (4, 28, 28, 1)
    """
    if max_shift == 0:
        return image
    height, width, _ = image.shape
    offsets = jax.random.randint(key, (2,), 0, 2 * max_shift + 1)
    padded = jnp.pad(image, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    return jax.lax.dynamic_slice(padded, (offsets[0], offsets[1], 0), image.shape[:2] + image.shape[2:])


# ------------------------------------------------------------------------------------------- the epoch


def make_train_epoch(
    loss_fn: losses.LossFn,
    optimizer: optax.GradientTransformation,
    *,
    num_batches: int,
    batch_size: int,
    augment_shift: int = 0,
    scan: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    state_shardings: tuple[Any, Any] | None = None,
) -> Callable[..., tuple[Any, Any, jax.Array, jax.Array]]:
    """One epoch of minibatch training: ONE jitted ``lax.scan`` over the batches (or one jitted step per batch).

    ``train_epoch(params, opt_state, images f32[N, H, W, C], labels i32[N], key) -> (params, opt_state,
    losses f32[num_batches], finite bool[num_batches])``: the ``key`` fixes the epoch's data order (a permutation of
    the N examples cut into ``num_batches`` batches of ``batch_size``, the rest dropped) and every per-example key
    (augmentation, reparameterisation), so the epoch is a deterministic function of its inputs.

    Args:
        loss_fn: per-example loss ``(params, example, key) -> f32[]`` (batched with :func:`gsu_jax.losses.batch_mean`).
        optimizer: the optax transformation (wrapped in ``optax.apply_if_finite`` by the caller).
        num_batches: batches per epoch, ``<= N // batch_size``.
        batch_size: examples per batch.
        augment_shift: random translation of each example by up to this many pixels (0: none).
        scan: ``True`` compiles the whole epoch as one ``lax.scan`` (fastest for the MLPs: no per-step dispatch).
            ``False`` runs the same step, jitted, once per batch from Python: XLA:CPU runs convolution gradients
            inside a loop body about 25x slower than the same step on its own (measured on the ConvVAE: 17 s vs
            0.65 s per step), so the convolutional models train this way on CPU. Both draw the same batches and keys.
        mesh: ``None`` (one device) or a :func:`gsu_jax.parallel.make_mesh` mesh: each batch is split over its
            ``data`` axis (so is every per-example computation), the data and keys are replicated, and the state
            is placed as ``state_shardings``; ``batch_size`` must be a multiple of the data axis.
        state_shardings: ``(params shardings, opt_state shardings)`` on ``mesh`` (default: replicated).

    Returns:
        ``train_epoch``; ``params`` and ``opt_state`` are donated (do not reuse them after the call).
    """
    batch_loss = losses.batch_mean(loss_fn)
    translate = jax.vmap(lambda image, key: random_translate(image, max_shift=augment_shift, key=key))
    rep = state_in = None
    if mesh is not None:
        parallel.check_batch_size(batch_size, mesh)
        rep = parallel.replicated(mesh)
        params_sharding, opt_sharding = state_shardings or (rep, rep)
        state_in = (params_sharding, opt_sharding)

    def epoch_plan(key, num_examples):
        order_key, steps_key = jax.random.split(key)
        order = jax.random.permutation(order_key, num_examples)[: num_batches * batch_size]
        return order.reshape(num_batches, batch_size), jax.random.split(steps_key, num_batches)

    def train_step(params, opt_state, images, labels, indices, step_key):
        augment_key, loss_key = jax.random.split(step_key)
        batch = {"image": images[indices], "label": labels[indices]}
        if mesh is not None:
            # The gather from the replicated data leaves the batch replicated: split it over the data axis here,
            # and with it every per-example computation downstream.
            batch = jax.lax.with_sharding_constraint(batch, parallel.batch_sharding(mesh))
        if augment_shift:
            batch["image"] = translate(batch["image"], jax.random.split(augment_key, batch_size))
        loss, grads = jax.value_and_grad(batch_loss)(params, batch, loss_key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        return optax.apply_updates(params, updates), opt_state, loss, finite

    if scan:
        return _scanned_epoch(train_step, epoch_plan, mesh=mesh, state_in=state_in, rep=rep)
    return _stepwise_epoch(train_step, epoch_plan, num_batches=num_batches, mesh=mesh, state_in=state_in, rep=rep)


def _scanned_epoch(
    train_step: Callable[..., Any],
    epoch_plan: Callable[..., Any],
    *,
    mesh: jax.sharding.Mesh | None,
    state_in: tuple[Any, Any] | None,
    rep: Any,
) -> Callable[..., tuple[Any, Any, jax.Array, jax.Array]]:
    """The epoch as ONE jitted ``lax.scan`` of ``train_step`` over ``epoch_plan``'s batches and keys."""

    def train_epoch(params, opt_state, images, labels, key):
        def body(carry, inputs):
            params, opt_state, loss, finite = train_step(*carry, images, labels, *inputs)
            return (params, opt_state), (loss, finite)

        (params, opt_state), (batch_losses, finite) = jax.lax.scan(
            body, (params, opt_state), epoch_plan(key, images.shape[0])
        )
        return params, opt_state, batch_losses, finite

    if mesh is None:
        return jax.jit(train_epoch, donate_argnums=(0, 1))
    return parallel.jit_sharded(
        train_epoch,
        in_shardings=(*state_in, rep, rep, rep),
        out_shardings=(*state_in, rep, rep),
        donate_argnums=(0, 1),
    )


def _stepwise_epoch(
    train_step: Callable[..., Any],
    epoch_plan: Callable[..., Any],
    *,
    num_batches: int,
    mesh: jax.sharding.Mesh | None,
    state_in: tuple[Any, Any] | None,
    rep: Any,
) -> Callable[..., tuple[Any, Any, jax.Array, jax.Array]]:
    """The same epoch as a Python loop over ONE jitted ``train_step`` (the batches and keys of the scanned one)."""

    def indexed_step(params, opt_state, images, labels, order, step_keys, index):
        return train_step(params, opt_state, images, labels, order[index], step_keys[index])

    if mesh is None:
        plan_fn = jax.jit(epoch_plan, static_argnums=1)
        indexed_step = jax.jit(indexed_step, donate_argnums=(0, 1))
    else:
        plan_fn = jax.jit(epoch_plan, static_argnums=1, in_shardings=rep, out_shardings=rep)
        indexed_step = parallel.jit_sharded(
            indexed_step,
            in_shardings=(*state_in, rep, rep, rep, rep, rep),
            out_shardings=(*state_in, rep, rep),
            donate_argnums=(0, 1),
        )

    def train_epoch_stepwise(params, opt_state, images, labels, key):
        order, step_keys = plan_fn(key, images.shape[0])
        batch_losses, finite = [], []
        for index in range(num_batches):
            index = np.int32(index) if mesh is None else parallel.put(np.int32(index), rep)
            params, opt_state, loss, step_finite = indexed_step(
                params, opt_state, images, labels, order, step_keys, index
            )
            batch_losses.append(loss)
            finite.append(step_finite)
        return params, opt_state, jnp.stack(batch_losses), jnp.stack(finite)

    return train_epoch_stepwise
