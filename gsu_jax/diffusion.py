"""Denoising diffusion (DDPM) as pure functions of the parameters: noise schedules, the per-example epsilon loss
and the DDIM / DDPM samplers.

The forward process of Ho et al. (2020) with ``T`` training steps, ``beta_t`` the schedule and
``abar_t = prod_{s <= t} (1 - beta_s)`` (``t = 0..T-1``)::

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I),   x_0 = 2 * image - 1 in [-1, 1].

A model ``eps_theta(x_t, t / T[, y])`` (:class:`gsu_jax.models.UNet`) learns to predict ``eps``; its loss is a
:data:`gsu_jax.losses.LossFn` (:func:`epsilon_loss`), so every unlearning method of :mod:`gsu_jax.methods` and
every per-example route of :mod:`gsu_jax.per_example` applies to it unchanged. Sampling (:func:`sample` for one
example, :func:`generate` for a batch) runs the reverse process from ``x_T = noise`` as one ``lax.scan``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> from gsu_jax.models import UNet
  >>> graphdef, params = nnx.split(UNet(channels=8, num_groups=4, time_embed_dim=16, rngs=nnx.Rngs(0)))
  >>> schedule = make_schedule("cosine", 100)
  >>> loss_fn = epsilon_loss(graphdef, schedule=schedule)
  >>> example = {"image": jnp.full((28, 28, 1), 0.5), "label": jnp.int32(3)}
  >>> jax.jit(loss_fn)(params, example, jax.random.key(0)).shape
  ()
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gsu_jax.losses import LossFn
from gsu_jax.models.layers import check_positive_int

Params = Any  # an nnx.State
Example = Mapping[str, jax.Array]  # {"image": f32[H, W, C] in [0, 1], "label": i32[]}

SCHEDULES: tuple[str, ...] = ("cosine", "linear")
SAMPLERS: tuple[str, ...] = ("ddim", "ddpm")
# Nichol & Dhariwal (2021): offset s of the cosine schedule and the clip of its betas near t = T.
COSINE_OFFSET = 0.008
MAX_BETA = 0.999
# Ho et al. (2020): the linear schedule's endpoints for T = 1000 steps (rescaled by 1000 / T for other T).
LINEAR_BETA_START = 1e-4
LINEAR_BETA_END = 0.02
LINEAR_REFERENCE_STEPS = 1000


class NoiseSchedule(NamedTuple):
    """The variance schedule of the forward process (a pytree of arrays; pass it through ``jax.jit``).

    Attributes:
      betas: ``f32[T]`` per-step noise variances ``beta_t`` in (0, 1), ``t = 0..T-1``.
      alphas_cumprod: ``f32[T]`` ``abar_t = prod_{s <= t} (1 - beta_s)``, strictly decreasing in (0, 1).
    """

    betas: jax.Array
    alphas_cumprod: jax.Array

    @property
    def num_train_steps(self) -> int:
        """``T``."""
        return int(self.betas.shape[0])


def make_schedule(name: str, num_train_steps: int) -> NoiseSchedule:
    """Builds a noise schedule of ``T = num_train_steps`` steps (computed in float64, stored as float32).

    ``"cosine"`` (Nichol & Dhariwal, 2021), with ``f(u) = cos((u / T + s) / (1 + s) * pi / 2)^2`` and ``s = 0.008``:

    .. math::

       \\beta_t = \\min\\Big(1 - \\frac{f(t + 1)}{f(t)},\\ 0.999\\Big), \\qquad
       \\bar\\alpha_t = \\prod_{s \\le t} (1 - \\beta_s) = \\frac{f(t + 1)}{f(0)} \\text{ wherever no clip applied.}

    ``"linear"`` (Ho et al., 2020): ``beta_t`` evenly spaced from ``1e-4 * 1000 / T`` to ``0.02 * 1000 / T``
    (the published 1000-step endpoints rescaled so the total noise is about the same for any ``T``; needs
    ``T >= 21`` so that every ``beta_t < 1``).

    Args:
      name: ``"cosine"`` or ``"linear"``.
      num_train_steps: ``T >= 1`` (``>= 21`` for ``"linear"``).

    Returns:
      A :class:`NoiseSchedule`.

    Raises:
      ValueError: unknown ``name``, ``num_train_steps < 1``, or a linear schedule too short.
      TypeError: ``num_train_steps`` is not an integer.

    Example:
      >>> schedule = make_schedule("cosine", 1000)
      >>> schedule.betas.shape, bool(schedule.alphas_cumprod[-1] < 1e-4)
      ((1000,), True)
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; allowed: {list(SCHEDULES)}")
    steps = check_positive_int(num_train_steps, name="num_train_steps")
    if name == "cosine":
        u = np.arange(steps + 1, dtype=np.float64) / steps
        f = np.cos((u + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * math.pi / 2.0) ** 2
        betas = np.minimum(1.0 - f[1:] / f[:-1], MAX_BETA)
    else:
        scale = LINEAR_REFERENCE_STEPS / steps
        if LINEAR_BETA_END * scale >= 1.0:
            raise ValueError(
                f"the linear schedule needs num_train_steps >= 21 (its last beta 0.02 * 1000 / T must be < 1), "
                f"got {steps}; use the 'cosine' schedule for fewer steps"
            )
        betas = np.linspace(LINEAR_BETA_START * scale, LINEAR_BETA_END * scale, steps, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)
    return NoiseSchedule(jnp.asarray(betas, jnp.float32), jnp.asarray(alphas_cumprod, jnp.float32))


def add_noise(schedule: NoiseSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise`` for one example (``t`` an integer index in [0, T)).

    Example:
      >>> schedule = make_schedule("linear", 1000)
      >>> add_noise(schedule, jnp.ones(3), jnp.int32(0), jnp.zeros(3)).round(4).tolist()
      [1.0, 1.0, 1.0]
    """
    abar = schedule.alphas_cumprod[t]
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def epsilon_loss(graphdef: nnx.GraphDef, *, schedule: NoiseSchedule, class_dropout: float = 0.0) -> LossFn:
    """The DDPM "simple" loss of ONE example: noise it at a random step, score the predicted noise.

    With ``(k_t, k_eps, k_drop) = jax.random.split(key, 3)`` from the example's own key:

    .. math::

       t \\sim \\mathcal U\\{0, \\dots, T-1\\}, \\quad \\epsilon \\sim \\mathcal N(0, I), \\quad
       x_t = \\sqrt{\\bar\\alpha_t}\\,(2\\,\\mathrm{image} - 1) + \\sqrt{1 - \\bar\\alpha_t}\\,\\epsilon, \\quad
       \\ell(\\theta) = \\frac{1}{HWC} \\big\\lVert \\epsilon_\\theta(x_t, t / T, \\tilde y) - \\epsilon \\big\\rVert^2,

    so the loss is a deterministic function of ``(params, example, key)``. For a conditional model
    (``num_classes = K > 0``) ``y~`` is the example's label, replaced by the null label ``K`` with probability
    ``class_dropout`` (``k_drop``; classifier-free guidance training); an unconditional model ignores the label.

    Two optional fields turn it into a surrogate loss of an unlearning rule: ``"target"`` (an image in [0, 1])
    replaces ``image`` as ``x_0`` (remap_surgery's retained partner image, Selective Amnesia's noise image), and
    ``"pseudo_label"`` (``i32[]``, conditional models only) replaces ``epsilon`` by the model's own stopped
    prediction ``sg[eps_theta(x_t, t / T, c')]`` under that label (SalUn's random-label loss; ``c'`` is dropped to
    the null label with probability ``class_dropout`` on its own draw, ``fold_in(k_drop, 1)``).

    Args:
      graphdef: graph definition of a :class:`gsu_jax.models.UNet` (any module with that call signature and
        ``num_classes``).
      schedule: the noise schedule (``T`` = its length).
      class_dropout: probability in [0, 1] of training a conditional model on the null label.

    Returns:
      ``loss_fn(params, example, key) -> f32[]`` for ONE example ``{"image": f32[H, W, C] in [0, 1],
      "label": i32[]}``; batch it with ``jax.vmap(loss_fn, in_axes=(None, 0, 0))`` or
      :func:`gsu_jax.losses.batch_mean`.

    Raises:
      ValueError: ``class_dropout`` outside [0, 1] or a malformed ``schedule``; at trace time, an example without
        ``"image"`` (or without ``"label"`` for a conditional model).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from gsu_jax.losses import batch_mean
      >>> from gsu_jax.models import UNet
      >>> unet = UNet(channels=8, num_groups=4, time_embed_dim=16, num_classes=10, rngs=nnx.Rngs(0))
      >>> graphdef, params = nnx.split(unet)
      >>> loss_fn = epsilon_loss(graphdef, schedule=make_schedule("cosine", 50), class_dropout=0.1)
      >>> batch = {"image": jnp.zeros((4, 28, 28, 1)), "label": jnp.arange(4)}
      >>> jax.jit(batch_mean(loss_fn))(params, batch, jax.random.key(0)).shape
      ()
    """
    num_train_steps = _check_schedule(schedule)
    class_dropout = _check_probability(class_dropout, name="class_dropout")

    def loss_fn(params: Params, example: Example, key: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        num_classes = _num_classes(model)
        # A "target" image (remap_surgery's surrogate) is denoised under this example's label instead of its image.
        image = example.get("target", _example_field(example, "image"))
        t_key, noise_key, dropout_key = jax.random.split(key, 3)
        t = jax.random.randint(t_key, (), 0, num_train_steps)
        noise = jax.random.normal(noise_key, image.shape, jnp.float32)
        x_t = add_noise(schedule, 2.0 * image - 1.0, t, noise)
        time = t.astype(jnp.float32) / num_train_steps
        if num_classes:
            label = jnp.asarray(_example_field(example, "label"))
            if label.shape != ():
                raise ValueError(f"epsilon_loss's label must be a scalar (one example), got shape {label.shape}")
            dropped = jax.random.bernoulli(dropout_key, class_dropout)
            label = jnp.where(dropped, num_classes, label.astype(jnp.int32))
            predicted = model(x_t, time, label)
            if "pseudo_label" in example:
                # SalUn's random-label objective: the prediction under the example's label is pulled to the model's
                # own (constant) prediction under another label, on the same x_t; that label is dropped on its own
                # draw, as the reference's two calls drop theirs independently.
                pseudo = jnp.asarray(example["pseudo_label"])
                if pseudo.shape != ():
                    raise ValueError(f"epsilon_loss's pseudo_label must be a scalar (one example), got {pseudo.shape}")
                pseudo_dropped = jax.random.bernoulli(jax.random.fold_in(dropout_key, 1), class_dropout)
                pseudo = jnp.where(pseudo_dropped, num_classes, pseudo.astype(jnp.int32))
                noise = jax.lax.stop_gradient(model(x_t, time, pseudo))
        elif "pseudo_label" in example:
            raise ValueError(
                "epsilon_loss: an example with a 'pseudo_label' (SalUn's random-label loss) needs a class-conditional "
                "model (num_classes > 0); allowed for an unconditional model: examples without it"
            )
        else:
            predicted = model(x_t, time)
        return jnp.mean(jnp.square(predicted - noise))

    return loss_fn


def sampling_timesteps(num_train_steps: int, num_steps: int) -> np.ndarray:
    """The ``num_steps`` training timesteps a sampler visits, descending: ``round(linspace(T-1, 0, num_steps))``.

    ``num_steps = T`` visits every step; fewer steps stride evenly and always end at ``t = 0``.

    Example:
      >>> sampling_timesteps(1000, 4).tolist()
      [999, 666, 333, 0]
    """
    num_steps = check_positive_int(num_steps, name="num_steps")
    if num_steps > num_train_steps:
        raise ValueError(f"num_steps must be in [1, {num_train_steps}] (the schedule's T), got {num_steps}")
    if num_steps == 1:
        return np.array([num_train_steps - 1], np.int32)
    return np.round(np.linspace(num_train_steps - 1, 0, num_steps)).astype(np.int32)


def predict_epsilon(
    graphdef: nnx.GraphDef,
    params: Params,
    x: jax.Array,
    t: jax.Array,
    *,
    label: jax.Array | None = None,
    guidance_scale: jax.Array | float = 0.0,
) -> jax.Array:
    """The (classifier-free guided) noise prediction for ONE example.

    .. math::

       \\hat\\epsilon = (1 + w)\\, \\epsilon_\\theta(x, t, y) - w\\, \\epsilon_\\theta(x, t, \\varnothing)

    with ``w = guidance_scale``; ``label=None`` (or an unconditional model) gives ``eps_theta(x, t[, null])`` and
    the guidance term is skipped. A ``guidance_scale`` of the Python value 0 also skips the second model call.

    Args:
      graphdef: graph definition of a :class:`gsu_jax.models.UNet`.
      params: its parameters.
      x: ``f32[H, W, C]`` noisy image ``x_t``.
      t: ``f32[]`` continuous time (index / T).
      label: ``i32[]`` class, or ``None``.
      guidance_scale: ``w >= 0`` (may be traced).

    Returns:
      ``f32[H, W, C]``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from gsu_jax.models import UNet
      >>> unet = UNet(channels=8, num_groups=4, time_embed_dim=16, num_classes=10, rngs=nnx.Rngs(0))
      >>> graphdef, params = nnx.split(unet)
      >>> guided = jax.jit(lambda x, w: predict_epsilon(graphdef, params, x, jnp.float32(0.5), label=jnp.int32(2),
      ...                                               guidance_scale=w))
      >>> guided(jnp.zeros((28, 28, 1)), 3.0).shape
      (28, 28, 1)
    """
    model = nnx.merge(graphdef, params)
    if label is None:
        return model(x, t)
    conditional = model(x, t, label)
    if isinstance(guidance_scale, (int, float)) and guidance_scale == 0:
        return conditional
    unconditional = model(x, t, jnp.asarray(model.num_classes, jnp.int32))
    return (1.0 + guidance_scale) * conditional - guidance_scale * unconditional


def sample(
    graphdef: nnx.GraphDef,
    params: Params,
    noise: jax.Array,
    *,
    schedule: NoiseSchedule,
    num_steps: int,
    sampler: str = "ddim",
    label: jax.Array | int | None = None,
    guidance_scale: float = 0.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """Draws ONE image by running the reverse process from ``x_T = noise`` (one jitted ``lax.scan``).

    The sampler visits ``tau_{S-1} > ... > tau_0`` = :func:`sampling_timesteps` ``(T, S)``; at each step, with
    ``a = abar_{tau_i}``, ``a' = abar_{tau_{i-1}}`` (``a' = 1`` after the last step) and ``eps`` from
    :func:`predict_epsilon`, the clean image is estimated as ``x0 = clip((x - sqrt(1 - a) eps) / sqrt(a), -1, 1)``
    and

    * ``"ddim"`` (Song et al., 2021, eta = 0; deterministic given ``noise``):
      ``x' = sqrt(a') x0 + sqrt(1 - a') (x - sqrt(a) x0) / sqrt(1 - a)``;
    * ``"ddpm"`` (ancestral; the DDPM posterior of the strided chain, exact DDPM for ``S = T``), with
      ``b = 1 - a / a'``: ``x' = sqrt(a') b / (1 - a) x0 + sqrt(1 - b) (1 - a') / (1 - a) x + sigma z``,
      ``sigma^2 = b (1 - a') / (1 - a)``, ``z ~ N(0, I)`` drawn with the i-th of ``jax.random.split(key, S)``.

    Args:
      graphdef: graph definition of a :class:`gsu_jax.models.UNet`.
      params: its parameters.
      noise: ``f32[H, W, C]`` the starting point ``x_T`` (standard normal).
      schedule: the noise schedule the model was trained with.
      num_steps: ``S`` in [1, T] (static: a new value compiles a new scan).
      sampler: ``"ddim"`` or ``"ddpm"``.
      label: the class to generate (conditional models only), or ``None`` for the null label.
      guidance_scale: ``w >= 0``; ``w > 0`` needs a conditional model and a ``label``.
      key: PRNG key; required by ``"ddpm"``, ignored by ``"ddim"``.

    Returns:
      ``f32[H, W, C]`` image in [0, 1]: ``clip((x_0 + 1) / 2, 0, 1)``.

    Raises:
      ValueError: bad ``num_steps``, ``sampler``, ``noise`` shape, ``label``, ``guidance_scale``, missing ``key``
        for ``"ddpm"``, or a label / guidance for an unconditional model (all before any work).

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from gsu_jax.models import UNet
      >>> unet = UNet(channels=8, num_groups=4, time_embed_dim=16, num_classes=10, rngs=nnx.Rngs(0))
      >>> graphdef, params = nnx.split(unet)
      >>> image = sample(graphdef, params, jax.random.normal(jax.random.key(0), (28, 28, 1)),
      ...                schedule=make_schedule("cosine", 100), num_steps=4, label=3, guidance_scale=2.0)
      >>> image.shape, bool(image.min() >= 0) and bool(image.max() <= 1)
      ((28, 28, 1), True)
    """
    model = nnx.merge(graphdef, params)
    spec = _check_sampling(model, schedule, num_steps, sampler, guidance_scale, key)
    if jnp.shape(noise) != tuple(model.image_shape):
        raise ValueError(f"noise must be ONE example of shape {tuple(model.image_shape)}, got {jnp.shape(noise)}")
    labels = _check_labels(model, label, batch=None, guidance_scale=guidance_scale)
    key = _sampling_key(spec, key)
    return _sample_one(
        graphdef, spec, params, schedule, jnp.asarray(noise, jnp.float32), labels, key, jnp.float32(guidance_scale)
    )


def generate(
    graphdef: nnx.GraphDef,
    params: Params,
    noise: jax.Array,
    *,
    schedule: NoiseSchedule,
    num_steps: int,
    sampler: str = "ddim",
    labels: jax.Array | None = None,
    guidance_scale: float = 0.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """Draws a batch of images: :func:`sample` vmapped over ``noise`` (and ``labels``), jitted once.

    Args:
      graphdef: graph definition of a :class:`gsu_jax.models.UNet`.
      params: its parameters.
      noise: ``f32[B, H, W, C]`` starting points ``x_T``.
      schedule: the noise schedule the model was trained with.
      num_steps: ``S`` in [1, T].
      sampler: ``"ddim"`` or ``"ddpm"``.
      labels: ``i32[B]`` classes in [0, K) for a conditional model, or ``None`` (null label / unconditional).
      guidance_scale: ``w >= 0``; ``w > 0`` needs a conditional model and ``labels``.
      key: PRNG key for ``"ddpm"`` (one key per example: ``jax.random.split(key, B)``); ignored by ``"ddim"``.

    Returns:
      ``f32[B, H, W, C]`` images in [0, 1]; example ``b`` equals ``sample(..., noise[b], label=labels[b],
      key=keys[b])``.

    Raises:
      ValueError: as :func:`sample`, plus ``labels`` not of shape ``(B,)``.

    Example:
      >>> import jax
      >>> from flax import nnx
      >>> from gsu_jax.models import UNet
      >>> graphdef, params = nnx.split(UNet(channels=8, num_groups=4, time_embed_dim=16, rngs=nnx.Rngs(0)))
      >>> noise = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
      >>> generate(graphdef, params, noise, schedule=make_schedule("cosine", 100), num_steps=10,
      ...          sampler="ddpm", key=jax.random.key(1)).shape
      (3, 28, 28, 1)
    """
    model = nnx.merge(graphdef, params)
    spec = _check_sampling(model, schedule, num_steps, sampler, guidance_scale, key)
    shape = jnp.shape(noise)
    if len(shape) != 4 or tuple(shape[1:]) != tuple(model.image_shape) or shape[0] < 1:
        raise ValueError(f"noise must have shape (B, *{tuple(model.image_shape)}) with B >= 1, got {shape}")
    labels = _check_labels(model, labels, batch=shape[0], guidance_scale=guidance_scale)
    keys = jax.random.split(_sampling_key(spec, key), shape[0])
    return _generate(
        graphdef, spec, params, schedule, jnp.asarray(noise, jnp.float32), labels, keys, jnp.float32(guidance_scale)
    )


class _SamplerSpec(NamedTuple):
    """The static (hashable) part of a sampling call: it selects the compiled scan."""

    sampler: str
    num_steps: int
    guided: bool
    conditional: bool


def _reverse_process(
    graphdef: nnx.GraphDef,
    spec: _SamplerSpec,
    params: Params,
    schedule: NoiseSchedule,
    noise: jax.Array,
    label: jax.Array | None,
    key: jax.Array,
    guidance_scale: jax.Array,
) -> jax.Array:
    """One example's reverse chain as a ``lax.scan`` over the ``S`` sampling steps (see :func:`sample`)."""
    num_train_steps = schedule.num_train_steps
    timesteps = sampling_timesteps(num_train_steps, spec.num_steps)
    abar = schedule.alphas_cumprod[timesteps]
    abar_prev = jnp.concatenate([abar[1:], jnp.ones((1,), abar.dtype)])
    times = jnp.asarray(timesteps, jnp.float32) / num_train_steps
    step_keys = jax.random.split(key, spec.num_steps)
    scale = guidance_scale if spec.guided else 0.0

    def step(x: jax.Array, inputs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        time, a, a_prev, step_key = inputs
        eps = predict_epsilon(graphdef, params, x, time, label=label, guidance_scale=scale)
        x0 = jnp.clip((x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a), -1.0, 1.0)
        if spec.sampler == "ddim":
            eps_implied = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
            return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps_implied, None
        beta = 1.0 - a / a_prev
        mean = (jnp.sqrt(a_prev) * beta / (1.0 - a)) * x0 + (jnp.sqrt(1.0 - beta) * (1.0 - a_prev) / (1.0 - a)) * x
        sigma = jnp.sqrt(beta * (1.0 - a_prev) / (1.0 - a))
        return mean + sigma * jax.random.normal(step_key, x.shape, x.dtype), None

    x0, _ = jax.lax.scan(step, noise, (times, abar, abar_prev, step_keys))
    return jnp.clip((x0 + 1.0) / 2.0, 0.0, 1.0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _sample_one(graphdef, spec, params, schedule, noise, label, key, guidance_scale):
    return _reverse_process(graphdef, spec, params, schedule, noise, label, key, guidance_scale)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(graphdef, spec, params, schedule, noise, labels, keys, guidance_scale):
    label_axis = None if labels is None else 0
    return jax.vmap(
        lambda n, y, k: _reverse_process(graphdef, spec, params, schedule, n, y, k, guidance_scale),
        in_axes=(0, label_axis, 0),
    )(noise, labels, keys)


def _check_sampling(
    model: nnx.Module, schedule: object, num_steps: object, sampler: object, guidance_scale: object, key: object
) -> _SamplerSpec:
    num_train_steps = _check_schedule(schedule)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {list(SAMPLERS)}")
    num_steps = check_positive_int(num_steps, name="num_steps")
    if num_steps > num_train_steps:
        raise ValueError(f"num_steps must be in [1, {num_train_steps}] (the schedule's T), got {num_steps}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"guidance_scale must be a real number >= 0, got {guidance_scale!r}")
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")
    if sampler == "ddpm" and key is None:
        raise ValueError("sampler='ddpm' draws fresh noise at every step and needs a key; pass key=...")
    num_classes = _num_classes(model)
    if guidance_scale > 0 and not num_classes:
        raise ValueError(
            f"guidance_scale={guidance_scale} needs a class-conditional model (num_classes > 0); this one is "
            "unconditional: use guidance_scale=0"
        )
    return _SamplerSpec(sampler, num_steps, guided=guidance_scale > 0, conditional=bool(num_classes))


def _check_labels(model: nnx.Module, labels: object, *, batch: int | None, guidance_scale: float) -> jax.Array | None:
    """Labels as ``i32[]`` (``batch=None``) or ``i32[B]``, or ``None``; refuses what the model cannot use."""
    what = "label" if batch is None else "labels"
    if labels is None:
        if guidance_scale > 0:
            raise ValueError(f"guidance_scale={guidance_scale} needs the {what} to guide towards; pass {what}=...")
        return None
    num_classes = model.num_classes
    if not num_classes:
        raise ValueError(f"this model is unconditional (num_classes=0); sample it with {what}=None")
    array = jnp.asarray(labels)
    expected = () if batch is None else (batch,)
    if array.shape != expected or not jnp.issubdtype(array.dtype, jnp.integer):
        raise ValueError(f"{what} must be integers of shape {expected}, got {array.dtype} of shape {array.shape}")
    if not isinstance(array, jax.core.Tracer):
        values = np.asarray(array)
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"{what} must be classes in [0, {num_classes}), got values in [{values.min()}, {values.max()}]"
            )
    return array.astype(jnp.int32)


def _sampling_key(spec: _SamplerSpec, key: jax.Array | None) -> jax.Array:
    # DDIM is deterministic: a fixed key keeps one compiled function for key=None and key=...
    return jax.random.key(0) if spec.sampler == "ddim" or key is None else key


def _num_classes(model: nnx.Module) -> int:
    num_classes = getattr(model, "num_classes", None)
    if not isinstance(num_classes, int) or not hasattr(model, "image_shape"):
        raise TypeError(
            f"expected a diffusion model graphdef (a UNet with num_classes and image_shape), got {type(model).__name__}"
        )
    return num_classes


def _example_field(example: Example, field: str) -> jax.Array:
    if not isinstance(example, Mapping) or field not in example:
        got = sorted(example) if isinstance(example, Mapping) else type(example).__name__
        raise ValueError(f"epsilon_loss needs an example mapping with key {field!r}, got {got}")
    return example[field]


def _check_schedule(schedule: object) -> int:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a NoiseSchedule (see make_schedule), got {type(schedule).__name__}")
    betas_shape, abar_shape = jnp.shape(schedule.betas), jnp.shape(schedule.alphas_cumprod)
    if len(betas_shape) != 1 or betas_shape != abar_shape or betas_shape[0] < 1:
        raise ValueError(
            f"a NoiseSchedule needs betas and alphas_cumprod of one shape (T,), T >= 1; got {betas_shape} and "
            f"{abar_shape}"
        )
    return int(betas_shape[0])


def _check_probability(value: object, *, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a probability in [0, 1], got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return value
