"""The compiled programs of a role: initialisation, the training epoch, held-out evaluation and sampling.

A :class:`ProgramSpec` holds everything those programs depend on (model, hyperparameters, shapes, the optimizer
recipe); :func:`compiled_programs` builds them from it, lazily compiled on first call and cached per spec and mesh,
so that the evaluator and the guidance classifier, and repeated runs in one process, share one compilation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gsu_jax import generative as families
from gsu_jax import losses, models, parallel
from gsu_jax.training.epoch import make_train_epoch

__all__ = ["ProgramSpec", "Programs", "compiled_programs", "state_shardings_on"]

# Held-out examples per vmapped chunk of the evaluation (bounds activation memory of the conv models). Not only a
# memory bound: XLA picks kernels per batch shape, so another size changes the metrics in their last float32 bits
# (measured on CPU: chunks of 1000 change the per-example loss terms of both VAEs and the CNN's logits). Kept at
# 500, the size every metrics.json so far was computed with; gsu_jax.unlearning keeps its own 1000 for the same
# reason (and because its FID latents are drawn in chunks of that size).
_HELDOUT_EVAL_CHUNK = 500
# Models whose epochs run step by step on CPU (convolution gradients are slow inside XLA:CPU loops).
_CONV_MODELS = frozenset({"conv_vae", "cnn_classifier", "ddpm_unet"})


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """Everything a role's compiled programs depend on; hashable, so equal specs share one compilation.

    The evaluator and the guidance classifier (same recipe, same split sizes) and repeated runs in one process
    (tests, the unlearning side training what is missing) reuse the programs instead of recompiling them.
    """

    model_name: str
    model_kwargs: tuple[tuple[str, Any], ...]  # complete: includes image_shape and latent_dim / num_classes
    generative: bool
    family_settings: tuple[tuple[str, Any], ...]  # the generative family's own fields (kl_weight, DDPM schedule...)
    learning_rate: float
    weight_decay: float
    num_epochs: int
    num_batches: int
    batch_size: int
    augment_shift: int

    def build(self, key: jax.Array) -> nnx.Module:
        return models.build_model(self.model_name, rngs=nnx.Rngs(key), **dict(self.model_kwargs))

    def optimizer(self) -> optax.GradientTransformation:
        """Adam (the protocol) for the generative model; AdamW with cosine decay for the classifiers; non-finite
        steps skipped."""
        if self.generative:
            inner = optax.adam(self.learning_rate)
        else:
            schedule = optax.cosine_decay_schedule(self.learning_rate, self.num_epochs * self.num_batches)
            inner = optax.adamw(schedule, weight_decay=self.weight_decay)
        # Never apply a non-finite update; when to give up is decided by the role runner
        # (gsu_jax.training.role.MAX_CONSECUTIVE_NONFINITE).
        return optax.apply_if_finite(inner, max_consecutive_errors=int(np.iinfo(np.int32).max))


class Programs(NamedTuple):
    """The jitted programs of one role (:func:`compiled_programs`) and the shapes they were built from."""

    graphdef: nnx.GraphDef
    abstract_params: nnx.State
    optimizer: optax.GradientTransformation
    init_state: Callable[[jax.Array], tuple[nnx.State, Any]]
    train_epoch: Callable[..., tuple[Any, Any, jax.Array, jax.Array]]
    evaluate: Callable[..., jax.Array]
    draw: Callable[..., tuple[jax.Array, jax.Array]] | None


def state_shardings_on(
    abstract_params: nnx.State, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> tuple[Any, Any]:
    """Shardings of (params, opt_state) on ``mesh`` (:func:`gsu_jax.parallel.param_shardings`)."""
    return (
        parallel.param_shardings(abstract_params, mesh),
        parallel.param_shardings(jax.eval_shape(optimizer.init, abstract_params), mesh),
    )


def _scan_epochs(model_name: str) -> bool:
    """Whole-epoch ``lax.scan`` except for convolutional models on CPU (see :func:`make_train_epoch`)."""
    return model_name not in _CONV_MODELS or jax.default_backend() != "cpu"


@functools.lru_cache(maxsize=16)
def compiled_programs(spec: ProgramSpec, mesh: jax.sharding.Mesh | None = None) -> Programs:
    """The jitted programs of one role, compiled lazily on first call and cached per spec (and mesh).

    With a mesh only the training epoch runs sharded; evaluation and sampling take single-device parameters
    (:func:`gsu_jax.parallel.localize`), so every process computes the same numbers as a one-device run.
    """
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: spec.build(jax.random.key(0))))
    optimizer = spec.optimizer()
    state_shardings = None if mesh is None else state_shardings_on(abstract_params, optimizer, mesh)

    @jax.jit
    def init_state(key):
        # One program for all initialisers (op-by-op initialisation compiles each random draw separately).
        params = nnx.state(spec.build(key))
        return params, optimizer.init(params)

    if spec.generative:
        family = families.family_of(spec.model_name)
        settings, model_kwargs = dict(spec.family_settings), dict(spec.model_kwargs)
        loss_fn = family.loss(graphdef, settings)
        terms_fn = family.terms(graphdef, settings)
        generate = family.generator(graphdef, settings, num_steps=settings.get("sample_steps", 1))
        noise_shape = family.noise_shape(model_kwargs)
        conditional = family.is_conditional(model_kwargs)

        @jax.jit
        def evaluate(params, images, labels, key):
            """``f32[N, T]``: the family's loss terms of each example (VAE: reconstruction, KL; DDPM: the
            epsilon loss), one draw (posterior sample / timestep and noise) with its own key."""

            def one(inputs):
                image, label, example_key = inputs
                return terms_fn(params, {"image": image, "label": label}, example_key)

            keys = jax.random.split(key, images.shape[0])
            return jax.lax.map(one, (images, labels, keys), batch_size=_HELDOUT_EVAL_CHUNK)

        @functools.partial(jax.jit, static_argnames="num_samples")
        def draw(params, key, originals, *, num_samples):
            """Samples from fixed noise (VAE ``z``, DDPM ``x_T``; class-conditional: labels 0, 1, ... in turn) and,
            for a VAE, posterior-mean reconstructions of ``originals`` (``None`` for a DDPM)."""
            noise = jax.random.normal(key, (num_samples, *noise_shape))
            labels = jnp.arange(num_samples) % model_kwargs["num_classes"] if conditional else None
            samples = generate(params, noise, labels)
            if spec.model_name in models.VAE_MODELS:
                return samples, models.reconstruct(graphdef, params, originals)
            return samples, None
    else:
        loss_fn = losses.cross_entropy(graphdef)
        draw = None

        @jax.jit
        def evaluate(params, images, key):
            """``f32[N, K]`` logits."""
            del key  # classifiers are deterministic; the argument keeps one signature
            return jax.lax.map(
                lambda image: models.classifier_logits(graphdef, params, image[None])[0],
                images,
                batch_size=_HELDOUT_EVAL_CHUNK,
            )

    train_epoch = make_train_epoch(
        loss_fn,
        optimizer,
        num_batches=spec.num_batches,
        batch_size=spec.batch_size,
        augment_shift=spec.augment_shift,
        scan=_scan_epochs(spec.model_name),
        mesh=mesh,
        state_shardings=state_shardings,
    )
    return Programs(graphdef, abstract_params, optimizer, init_state, train_epoch, evaluate, draw)
