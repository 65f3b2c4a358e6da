"""Training of the generative model, the evaluator and the guidance classifier: resumable, checkpointed, exact.

``train_and_evaluate(config, workdir)`` trains each *role* named by ``config.roles`` in its own subdirectory of the
workdir, evaluates it on held-out data, and returns the metrics. ``load_trained(workdir, role)`` loads one role for
the unlearning side.

Roles and their data (``config.exclude_classes`` only ever changes the generative role):

=============  ======================================================  =============================================
role           trains                                                  on
=============  ======================================================  =============================================
``generative`` ``config.model`` (VAE or DDPM), Adam, the family's      the training data, minus ``exclude_classes``
               loss (negative ELBO / epsilon MSE)
``evaluator``  ``config.classifier``, AdamW + cosine, cross-entropy,   ``evaluator_fraction`` of each class of the
               random translations                                     training data (or ``config.evaluator_data``)
``guidance``   same recipe, different seed                             the rest of the training data (all of it when
                                                                       ``evaluator_data`` is given)
=============  ======================================================  =============================================

*Training data* is all of ``config.data`` when ``config.eval_data`` names held-out data (e.g. the real MNIST test
set, ``idx:../shared/data/mnist``), else ``config.data`` minus a seeded stratified holdout of
``holdout_fraction`` of each class, which is then the held-out data. The evaluator and the guidance classifier are
separate models from separate runs: different keys (each role folds its index into the seed) and disjoint
training examples, so that the classifier that scores an unlearning run has never seen the data or the
randomness of the one that may guide it (issue 4, "evaluation integrity").

Exactness and resumption: every epoch is ONE jitted ``lax.scan`` over the shuffled batches (the last partial
batch dropped; it differs every epoch), compiled once per role with the parameter and optimizer buffers donated
(on CPU the convolutional models run the same jitted step once per batch instead; see :func:`make_train_epoch`).
Compiled programs are cached per model/hyperparameter/shape, so the evaluator and the guidance classifier, and
repeated runs in one process, share them. An epoch's data order and all its keys are derived from
``(seed, role, epoch)`` alone, so a run interrupted after any checkpoint and re-run with the same workdir continues
with exactly the batches and keys the uninterrupted run would have used and ends with bit-identical parameters (on
the same device and software). Checkpoints are taken at epoch ends: the first epoch end crossing each multiple of
``checkpoint_every_steps`` steps, and the last.

Devices: ``config.mesh`` runs the epochs on a :mod:`gsu_jax.parallel` mesh (batches split over the ``data``
devices, parameters and optimizer state replicated or split over ``model``; the same parameters as one device up
to float32 summation order); ``config.distributed`` joins several hosts first. Checkpoints restore onto whatever
mesh the resuming run has; evaluation runs on each process's own copy of the parameters, and only process 0
writes metrics, history, PNGs and the summary. The default mesh (one device) runs the single-device programs.

Non-finite steps: the optimizer is wrapped in ``optax.apply_if_finite``, so a step whose gradient is not finite is
skipped (and counted in the metrics); a run that ends an epoch with its last :data:`MAX_CONSECUTIVE_NONFINITE`
steps (or its whole epoch, if shorter) all skipped stops with :class:`TrainingDivergedError` before writing
anything of that epoch.

Workdir layout (the JSON, CSV and PNG files written atomically by :mod:`gsu_jax.io`: a run killed while writing
leaves the previous complete file or none)::

    <workdir>/
      summary.json                    metrics of every role trained by the last run, with wall times
      <role>/checkpoints/<step>/      orbax steps: params, opt_state, metadata (config, data fingerprints, ...)
      <role>/metrics.json             held-out metrics of the final model
      <role>/history.csv              epoch, step, mean training loss, skipped (non-finite) steps
      generative/samples.png          samples from z ~ N(0, I) and reconstructions of held-out images (VAE), or
                                      DDIM samples from x_T ~ N(0, I) with config.sample_steps steps (DDPM)

Generative families (:mod:`gsu_jax.generative`): ``config.model`` picks the family -- a VAE (``mlp_vae``,
``conv_vae``: negative ELBO, metrics ``heldout_neg_elbo`` and its terms) or the DDPM (``ddpm_unet``: epsilon loss at
one random timestep per example, metric ``heldout_eps_loss``; ``diffusion_schedule``, ``diffusion_steps``,
``class_conditional``, ``class_dropout``; samples with ``sample_steps`` DDIM steps and ``guidance_scale``). Each
family reads only its own fields; the other family's fields are left out of the checkpoint identity.

Example:
    >>> from gsu_jax.config_validation import default_train_config
    >>> config = default_train_config()
    >>> config.num_epochs, config.classifier_num_epochs = 1, 1
    >>> metrics = train_and_evaluate(config, "/tmp/gsu_demo")  # doctest: +SKIP
    >>> evaluator = load_trained("/tmp/gsu_demo", "evaluator")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from gsu_jax import data as data_lib
from gsu_jax import generative as families
from gsu_jax import io, losses, models, parallel, provenance
from gsu_jax.checkpointing import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    SkippedStep,
    WorkdirError,
    abstract_like,
    ensure_writable_directory,
)
from gsu_jax.config_validation import (
    ROLES,
    ConfigError,
    fields_in_scope,
    parse_class_list,
    parse_roles,
    validate_train_config,
)

__all__ = [
    "MAX_CONSECUTIVE_NONFINITE",
    "RunData",
    "TrainedModel",
    "TrainingDivergedError",
    "check_resumable",
    "load_trained",
    "make_train_epoch",
    "prepare_data",
    "random_translate",
    "train_and_evaluate",
]

# A run whose last this-many steps were all non-finite (skipped) has diverged.
MAX_CONSECUTIVE_NONFINITE = 20
# Each role folds its index into the seed: distinct keys for distinct roles.
_ROLE_INDEX = {role: index for index, role in enumerate(ROLES)}
# Independent key streams of one role, folded into its key.
_INIT_STREAM, _TRAIN_STREAM, _EVAL_STREAM, _SAMPLE_STREAM = 0, 1, 2, 3
# Held-out examples per vmapped chunk of the evaluation (bounds activation memory of the conv models). Not only a
# memory bound: XLA picks kernels per batch shape, so another size changes the metrics in their last float32 bits
# (measured on CPU: chunks of 1000 change the per-example loss terms of both VAEs and the CNN's logits). Kept at
# 500, the size every metrics.json so far was computed with; gsu_jax.unlearning keeps its own 1000 for the same
# reason (and because its FID latents are drawn in chunks of that size).
_HELDOUT_EVAL_CHUNK = 500
_CHECKPOINTS = "checkpoints"
# Where config.restore_fallback moves the checkpoints it skipped (beside <role>/checkpoints, outside orbax's view).
_CORRUPT_CHECKPOINTS = "corrupt_checkpoints"
# Models whose epochs run step by step on CPU (convolution gradients are slow inside XLA:CPU loops).
_CONV_MODELS = frozenset({"conv_vae", "cnn_classifier", "ddpm_unet"})
# Columns of <role>/history.csv, one row per epoch.
_HISTORY_COLUMNS = ("epoch", "step", "loss", "skipped_steps")


class TrainedModel(NamedTuple):
    """A trained role, loaded by :func:`load_trained`.

    Attributes:
        graphdef: the model's ``nnx.GraphDef``.
        params: its parameters (``nnx.State``); ``nnx.merge(graphdef, params)`` rebuilds the module.
        config: the (validated) config it was trained with, as a ``ConfigDict``.
        metadata: the checkpoint's JSON metadata (role, model, model_kwargs, data fingerprints, step, history,
            package versions, ...).
    """

    graphdef: nnx.GraphDef
    params: nnx.State
    config: ml_collections.ConfigDict
    metadata: dict[str, Any]


class TrainingDivergedError(RuntimeError):
    """Training kept producing non-finite gradients; nothing of the failing epoch was saved."""


@dataclasses.dataclass(frozen=True)
class RunData:
    """The exact examples each role trains and is evaluated on (see the module docstring).

    Attributes:
        train: the training data (every class).
        heldout: the held-out data (every class).
        generative: what the generative role trains on (``train`` minus ``exclude_classes``).
        evaluator: what the evaluator trains on.
        guidance: what the guidance classifier trains on.
        source_fingerprint: fingerprint of ``config.data`` as loaded (before any split).
        excluded_classes: the classes left out of ``generative``.
    """

    train: data_lib.ImageDataset
    heldout: data_lib.ImageDataset
    generative: data_lib.ImageDataset
    evaluator: data_lib.ImageDataset
    guidance: data_lib.ImageDataset
    source_fingerprint: str
    excluded_classes: tuple[int, ...]

    def for_role(self, role: str) -> data_lib.ImageDataset:
        """The training examples of ``role``."""
        return getattr(self, role)


# ------------------------------------------------------------------------------------------- data


def _load(spec: str, field: str, data_dir: str) -> data_lib.ImageDataset:
    try:
        return data_lib.load_dataset(spec, data_dir=data_dir or None)
    except (ValueError, TypeError, ImportError, OSError) as err:
        raise ConfigError(f"config.{field}={spec!r} cannot be loaded: {err}") from err


def _check_compatible(reference: data_lib.ImageDataset, other: data_lib.ImageDataset, field: str) -> None:
    if other.image_shape != reference.image_shape or other.num_classes != reference.num_classes:
        raise ConfigError(
            f"config.{field}={other.name!r} has images {other.image_shape} with {other.num_classes} classes but "
            f"config.data={reference.name!r} has {reference.image_shape} with {reference.num_classes}; "
            "they must match"
        )


def prepare_data(config: Any) -> RunData:
    """Loads and splits the data of a train config exactly as :func:`train_and_evaluate` does.

    The unlearning side uses it to draw forget/retain batches from the very examples a model trained on (compare
    ``fingerprint()`` with the checkpoint's ``train_fingerprint``) and held-out examples it never saw.

    Raises:
        ConfigError: an invalid config, data that cannot be loaded, held-out or evaluator data whose image shape
            or class count differs from ``config.data``, an excluded class absent from the data or excluding
            every class, or a split that leaves a side empty.
    """
    values = validate_train_config(config)
    source = _load(values["data"], "data", values["data_dir"])
    seed = values["seed"]
    if values["eval_data"]:
        heldout = _load(values["eval_data"], "eval_data", values["data_dir"])
        _check_compatible(source, heldout, "eval_data")
        train = source
    else:
        try:
            train, heldout = data_lib.train_test_split(source, test_fraction=values["holdout_fraction"], seed=seed)
        except ValueError as err:
            raise ConfigError(f"config.holdout_fraction={values['holdout_fraction']!r}: {err}") from err

    excluded = parse_class_list(values["exclude_classes"])
    if excluded:
        out_of_range = [c for c in excluded if c >= train.num_classes]
        if out_of_range:
            raise ConfigError(
                f"config.exclude_classes={values['exclude_classes']!r} names class {out_of_range[0]}; "
                f"allowed: classes 0..{train.num_classes - 1}"
            )
        try:
            _, kept = data_lib.select_forget_retain(train.labels, classes=list(excluded))
        except ValueError as err:
            raise ConfigError(f"config.exclude_classes={values['exclude_classes']!r}: {err}") from err
        generative = train.subset(kept)
    else:
        generative = train

    if values["evaluator_data"]:
        evaluator = _load(values["evaluator_data"], "evaluator_data", values["data_dir"])
        _check_compatible(source, evaluator, "evaluator_data")
        guidance = train
    else:
        try:
            guidance_idx, evaluator_idx = data_lib.stratified_split(
                train.labels, test_fraction=values["evaluator_fraction"], seed=seed
            )
        except ValueError as err:
            raise ConfigError(f"config.evaluator_fraction={values['evaluator_fraction']!r}: {err}") from err
        evaluator, guidance = train.subset(evaluator_idx), train.subset(guidance_idx)
    return RunData(
        train=train,
        heldout=heldout,
        generative=generative,
        evaluator=evaluator,
        guidance=guidance,
        source_fingerprint=source.fingerprint(),
        excluded_classes=excluded,
    )


# ------------------------------------------------------------------------------------------- augmentation


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


# ------------------------------------------------------------------------------------------- compiled programs


@dataclasses.dataclass(frozen=True)
class _ProgramSpec:
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
        # Never apply a non-finite update; when to give up is decided by MAX_CONSECUTIVE_NONFINITE.
        return optax.apply_if_finite(inner, max_consecutive_errors=int(np.iinfo(np.int32).max))


class _Programs(NamedTuple):
    graphdef: nnx.GraphDef
    abstract_params: nnx.State
    optimizer: optax.GradientTransformation
    init_state: Callable[[jax.Array], tuple[nnx.State, Any]]
    train_epoch: Callable[..., tuple[Any, Any, jax.Array, jax.Array]]
    evaluate: Callable[..., jax.Array]
    draw: Callable[..., tuple[jax.Array, jax.Array]] | None


def _state_shardings(
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
def _programs(spec: _ProgramSpec, mesh: jax.sharding.Mesh | None = None) -> _Programs:
    """The jitted programs of one role, compiled lazily on first call and cached per spec (and mesh).

    With a mesh only the training epoch runs sharded; evaluation and sampling take single-device parameters
    (:func:`gsu_jax.parallel.localize`), so every process computes the same numbers as a one-device run.
    """
    graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: spec.build(jax.random.key(0))))
    optimizer = spec.optimizer()
    state_shardings = None if mesh is None else _state_shardings(abstract_params, optimizer, mesh)

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
    return _Programs(graphdef, abstract_params, optimizer, init_state, train_epoch, evaluate, draw)


# ------------------------------------------------------------------------------------------- role plans


@dataclasses.dataclass(frozen=True)
class _RolePlan:
    """Everything that determines one role's training run."""

    role: str
    spec: _ProgramSpec
    train: data_lib.ImageDataset
    heldout: data_lib.ImageDataset
    key: jax.Array
    identity: dict[str, Any]
    train_fingerprint: str

    @property
    def generative(self) -> bool:
        return self.spec.generative

    @property
    def model_kwargs(self) -> dict[str, Any]:
        return dict(self.spec.model_kwargs)


def _role_key(seed: int, role: str) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), _ROLE_INDEX[role])


def _plan(role: str, values: Mapping[str, Any], run_data: RunData) -> _RolePlan:
    train = run_data.for_role(role)
    generative = role == "generative"
    family = families.family_of(values["model"])
    if generative:
        model_field, kwargs_field, prefix = "model", "model_kwargs", ""
        kwargs = family.model_kwargs(values, train.image_shape, train.num_classes)
    else:
        model_field, kwargs_field, prefix = "classifier", "classifier_kwargs", "classifier_"
        kwargs = {**values["classifier_kwargs"], "image_shape": train.image_shape, "num_classes": train.num_classes}
    batch_size = values[f"{prefix}batch_size"]
    if batch_size > len(train):
        raise ConfigError(
            f"config.{prefix}batch_size={batch_size} exceeds the {len(train)} training examples of "
            f"the {role} role; allowed: 1..{len(train)}"
        )
    spec = _ProgramSpec(
        model_name=values[model_field],
        model_kwargs=tuple(sorted(kwargs.items())),
        generative=generative,
        family_settings=tuple(sorted(families.settings_of(family, values).items())) if generative else (),
        learning_rate=values[f"{prefix}learning_rate"],
        weight_decay=0.0 if generative else values["classifier_weight_decay"],
        num_epochs=values[f"{prefix}num_epochs"],
        num_batches=len(train) // batch_size,
        batch_size=batch_size,
        augment_shift=0 if generative else values["classifier_augment_shift"],
    )
    try:
        nnx.eval_shape(lambda: spec.build(jax.random.key(0)))
    except (ValueError, TypeError) as err:
        raise ConfigError(
            f"config.{kwargs_field}={values[kwargs_field]!r} with config.{model_field}="
            f"{spec.model_name!r} cannot build a model for images {train.image_shape} (the images of "
            f"{train.name!r}): {err}"
        ) from err
    return _RolePlan(
        role=role,
        spec=spec,
        train=train,
        heldout=run_data.heldout,
        key=_role_key(values["seed"], role),
        # Fields only another family reads never change this model (old workdirs stay resumable).
        identity={
            field: values[field]
            for field in fields_in_scope(role)
            if field not in families.other_families_fields(family)
        },
        train_fingerprint=train.fingerprint(),
    )


def _checkpoint_dir(role_dir: pathlib.Path) -> pathlib.Path:
    return role_dir / _CHECKPOINTS


def _newest_good_checkpoint(plan: _RolePlan, role_dir: pathlib.Path) -> tuple[dict[str, Any] | None, list[SkippedStep]]:
    """``config.restore_fallback``: the metadata of the newest checkpoint that verifies completely (files, arrays,
    digests) and the newer steps passed over; ``(None, [])`` without checkpoints. Refuses like
    :func:`_existing_checkpoint` a checkpoint of another run, and raises :class:`CheckpointCorruptError` when no
    step verifies."""
    directory = _checkpoint_dir(role_dir)
    if not directory.is_dir():
        return None, []
    programs = _programs(plan.spec)
    abstract_params = abstract_like(programs.abstract_params)
    with Checkpointer(directory, create=False) as ckpt:
        steps = ckpt.all_steps()
        if not steps:
            return None, []
        # A checkpoint of another config would fail to restore like a damaged one: refuse it as what it is, from
        # the newest metadata that reads (a directory's steps all come from one run).
        for step in reversed(steps):
            try:
                _existing_checkpoint(plan, role_dir, step=step)
                break
            except CheckpointCorruptError:
                continue
        _, _, good, skipped = ckpt.restore_newest_good(
            abstract_params=abstract_params,
            abstract_opt_state=abstract_like(jax.eval_shape(programs.optimizer.init, abstract_params)),
        )
    return _existing_checkpoint(plan, role_dir, step=good["step"]), skipped


def _set_aside_bad_steps(plan: _RolePlan, role_dir: pathlib.Path, skipped: list[SkippedStep]) -> list[dict[str, Any]]:
    """Moves the steps :func:`_newest_good_checkpoint` passed over to ``<role>/corrupt_checkpoints/`` (the run
    saves those step numbers again) and warns about each; returns what was moved, for the role's metrics."""
    moved = []
    if skipped:
        with Checkpointer(_checkpoint_dir(role_dir), create=False) as ckpt:
            for item in skipped:
                destination = ckpt.set_aside(item.step, role_dir / _CORRUPT_CHECKPOINTS)
                logging.warning(
                    "%s: skipped corrupt checkpoint step %d (%s); moved it to %s",
                    plan.role,
                    item.step,
                    item.reason,
                    destination,
                )
                moved.append({"step": item.step, "reason": item.reason, "moved_to": str(destination)})
    return moved


def _existing_checkpoint(plan: _RolePlan, role_dir: pathlib.Path, *, step: int | None = None) -> dict[str, Any] | None:
    """The latest checkpoint's (or ``step``'s) metadata if it belongs to this plan, ``None`` if there is none; else
    refuses."""
    directory = _checkpoint_dir(role_dir)
    if not directory.is_dir():
        return None
    with Checkpointer(directory, create=False) as ckpt:
        if ckpt.latest_step() is None:
            return None
        saved = ckpt.read_metadata(step)
    differences = []
    if saved.get("role") != plan.role or saved.get("model") != plan.spec.model_name:
        differences.append(
            f"role/model: {saved.get('role')!r}/{saved.get('model')!r} -> {plan.role!r}/{plan.spec.model_name!r}"
        )
    saved_identity = saved.get("identity", {})
    differences += provenance.differences(saved_identity, plan.identity)
    role_key = jax.random.key_data(plan.key).tolist()
    if not saved.get("finished") and saved.get("role_key") != role_key:
        # Resuming must continue with the keys the uninterrupted run would have drawn.
        differences.append(
            f"PRNG key of the role: {saved.get('role_key')} -> {role_key} (same seed, other key "
            "derivation: another JAX version?); resuming would not reproduce the uninterrupted run"
        )
    if saved.get("train_fingerprint") != plan.train_fingerprint:
        differences.append(
            f"training data: fingerprint {str(saved.get('train_fingerprint'))[:12]}... -> "
            f"{plan.train_fingerprint[:12]}... (the examples are selected by data, data_dir, eval_data, "
            "holdout_fraction, exclude_classes, evaluator_data and evaluator_fraction)"
        )
    if differences:
        raise CheckpointMismatchError(
            f"{str(directory)!r} holds a {plan.role} checkpoint (step {saved['step']}) trained with a different "
            f"config or data: {'; '.join(differences)}; pass --overwrite to discard it, or use another --workdir"
        )
    return saved


def _check_free_space(workdir: pathlib.Path, plans: list[_RolePlan], max_to_keep: int) -> None:
    needed = 16 * 2**20  # metrics, PNG, history and orbax's own files
    for plan in plans:
        abstract = nnx.state(nnx.eval_shape(lambda spec=plan.spec: spec.build(jax.random.key(0))))
        param_bytes = sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract))
        # params + two Adam moments, for every kept step plus the one being written
        needed += 3 * param_bytes * (max_to_keep + 1)
    free = shutil.disk_usage(workdir).free
    if free < needed:
        raise WorkdirError(
            f"workdir {str(workdir)!r} has {free / 2**20:.1f} MiB free; the checkpoints of this run "
            f"need about {needed / 2**20:.1f} MiB"
        )


# ------------------------------------------------------------------------------------------- evaluation


def _evaluate(plan: _RolePlan, programs: _Programs, params: nnx.State, excluded: tuple[int, ...]) -> dict[str, Any]:
    """Generative: the family's loss with a fixed key per example on held-out and training data (VAE: negative
    ELBO with KL weight 1 and one posterior sample, ``heldout_neg_elbo`` and its terms; DDPM: the epsilon loss at one
    random timestep, ``heldout_eps_loss``). Classifiers: accuracy and mean cross-entropy on the held-out data."""
    eval_key = jax.random.fold_in(plan.key, _EVAL_STREAM)
    if not plan.generative:
        logits = programs.evaluate(params, jnp.asarray(plan.heldout.images), eval_key)
        labels = jnp.asarray(plan.heldout.labels)
        return {
            "heldout_accuracy": float(jnp.mean(jnp.argmax(logits, axis=-1) == labels)),
            "heldout_cross_entropy": float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))),
        }
    family = families.family_of(plan.spec.model_name)
    # Held-out and training examples in one call (one compilation); every example has its own key.
    both = np.concatenate([plan.heldout.images, plan.train.images])
    labels = np.concatenate([plan.heldout.labels, plan.train.labels])
    terms = np.asarray(programs.evaluate(params, jnp.asarray(both), jnp.asarray(labels), eval_key))
    heldout, train = terms[: len(plan.heldout)], terms[len(plan.heldout) :]
    loss = family.loss_metric
    metrics = {f"heldout_{loss}": float(heldout.sum(axis=1).mean())}
    if len(family.term_names) > 1:
        metrics.update({f"heldout_{term}": float(heldout[:, i].mean()) for i, term in enumerate(family.term_names)})
    metrics[f"train_{loss}"] = float(train.sum(axis=1).mean())
    if excluded:
        is_excluded = np.isin(plan.heldout.labels, excluded)
        for name, mask in (("retained", ~is_excluded), ("excluded", is_excluded)):
            if mask.any():
                metrics[f"heldout_{loss}_{name}_classes"] = float(heldout[mask].sum(axis=1).mean())
    return metrics


def _write_samples_png(
    path: pathlib.Path, plan: _RolePlan, programs: _Programs, params: nnx.State, *, num_images: int, title: str
) -> None:
    """PNG: samples from fixed noise (left); for a VAE, held-out images next to their reconstructions (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Evenly spaced held-out examples: every class shows up even when the data is sorted by label.
    picks = np.linspace(0, len(plan.heldout) - 1, max(1, num_images // 2)).astype(np.int64)
    originals = plan.heldout.images[picks]
    samples, reconstructions = jax.device_get(
        programs.draw(
            params, jax.random.fold_in(plan.key, _SAMPLE_STREAM), jnp.asarray(originals), num_samples=num_images
        )
    )
    columns = max(2, 2 * math.ceil(math.sqrt(num_images) / 2))

    def tile(images: np.ndarray) -> np.ndarray:
        return io.tile_images(images, columns, gap=1, fill=1.0)  # 1-pixel white lines between the images

    if reconstructions is None:  # a DDPM: samples only
        panels = [
            (
                tile(samples),
                "DDIM samples from x_T ~ N(0, I)"
                + (", labels 0, 1, ... row-wise" if families.Family.is_conditional(plan.model_kwargs) else ""),
            )
        ]
    else:
        interleaved = np.stack([originals, reconstructions], axis=1).reshape(-1, *originals.shape[1:])
        panels = [
            (tile(samples), "samples, z ~ N(0, I)"),
            (tile(interleaved), "held-out | reconstruction (posterior mean)"),
        ]
    figure = Figure(figsize=(10 if len(panels) > 1 else 7, 5.4), dpi=100)
    FigureCanvasAgg(figure)
    for axis, (grid, label) in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels):
        gray = grid.shape[-1] == 1
        axis.imshow(
            grid[..., 0] if gray else grid, cmap="gray" if gray else None, vmin=0.0, vmax=1.0, interpolation="nearest"
        )
        axis.set_title(label, fontsize=10)
        axis.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    io.write_png(path, figure)


# ------------------------------------------------------------------------------------------- training a role


def _should_checkpoint(step: int, steps_per_epoch: int, every: int, last_epoch: bool) -> bool:
    return last_epoch or step // every > (step - steps_per_epoch) // every


class _NoProgressBar:
    """Stands in for tqdm when ``progress_bar`` is off, so that tqdm is needed only for the bar (the GPU image
    runs train.py from the source tree with no more than JAX, flax, optax, orbax and absl)."""

    def __enter__(self) -> _NoProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> bool:
        return False

    def set_postfix(self, **kwargs: object) -> None:
        del kwargs

    def update(self) -> None:
        pass


def _progress_bar(enabled: bool, **kwargs: Any) -> Any:
    if not enabled:
        return _NoProgressBar()
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


def _train_role(
    plan: _RolePlan,
    role_dir: pathlib.Path,
    saved: dict[str, Any] | None,
    values: Mapping[str, Any],
    run_data: RunData,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
    spec = plan.spec
    programs = _programs(spec, mesh)
    shardings = None if mesh is None else _state_shardings(programs.abstract_params, programs.optimizer, mesh)
    main_process = parallel.is_main_process()
    started = time.perf_counter()
    with Checkpointer(_checkpoint_dir(role_dir), max_to_keep=values["max_to_keep"]) as ckpt:
        if saved is None:
            # Committed to the device like restored arrays are, so that a fresh and a resumed run hit the same
            # compiled programs (jit keys its cache on whether arguments are committed).
            initial = programs.init_state(jax.random.fold_in(plan.key, _INIT_STREAM))
            if mesh is None:
                params, opt_state = jax.device_put(initial, jax.devices()[0])
            else:
                params, opt_state = parallel.put(initial, shardings)
            start_epoch, history, consecutive_nonfinite = 0, [], 0
        else:
            abstract_params = abstract_like(programs.abstract_params)
            abstract_opt_state = abstract_like(jax.eval_shape(programs.optimizer.init, abstract_params))
            if mesh is not None:
                # Restored straight onto this run's mesh, whatever the device count that saved it.
                abstract_params, abstract_opt_state = _on_shardings((abstract_params, abstract_opt_state), shardings)
            params, opt_state, saved = ckpt.restore(
                saved["step"], abstract_params=abstract_params, abstract_opt_state=abstract_opt_state
            )
            start_epoch, history = saved["epoch"], list(saved["history"])
            consecutive_nonfinite = saved["consecutive_nonfinite"]
            logging.info(
                "%s: resuming from step %d (epoch %d of %d) in %s",
                plan.role,
                saved["step"],
                start_epoch,
                spec.num_epochs,
                ckpt.directory,
            )
        resumed_from = None if saved is None else saved["step"]

        metadata = {
            "role": plan.role,
            "model": spec.model_name,
            "model_kwargs": plan.model_kwargs,
            "config": dict(values),
            "identity": plan.identity,
            "seed": values["seed"],
            # Every key of the run derives from this one and the epoch (see the module docstring).
            "role_key": jax.random.key_data(plan.key).tolist(),
            "source_fingerprint": run_data.source_fingerprint,
            "train_fingerprint": plan.train_fingerprint,
            "heldout_fingerprint": plan.heldout.fingerprint(),
            "num_train": len(plan.train),
            "num_heldout": len(plan.heldout),
            "excluded_classes": list(run_data.excluded_classes) if plan.generative else [],
            "num_epochs": spec.num_epochs,
            "steps_per_epoch": spec.num_batches,
            "batch_size": spec.batch_size,
            "device": provenance.device_name(),
        }
        divergence_window = min(MAX_CONSECUTIVE_NONFINITE, spec.num_batches)
        if start_epoch < spec.num_epochs:
            if mesh is None:
                images, labels = jnp.asarray(plan.train.images), jnp.asarray(plan.train.labels)
            else:
                images, labels = parallel.put((plan.train.images, plan.train.labels), parallel.replicated(mesh))
            train_key = jax.random.fold_in(plan.key, _TRAIN_STREAM)
            bar = _progress_bar(
                values["progress_bar"] and main_process,
                total=spec.num_epochs,
                initial=start_epoch,
                desc=f"{plan.role:>10}",
                unit="epoch",
                dynamic_ncols=True,
            )
            with bar:
                for epoch in range(start_epoch, spec.num_epochs):
                    epoch_key = jax.random.fold_in(train_key, epoch)
                    if mesh is not None:
                        epoch_key = parallel.put(epoch_key, parallel.replicated(mesh))
                    params, opt_state, batch_losses, finite = programs.train_epoch(
                        params, opt_state, images, labels, epoch_key
                    )
                    batch_losses, finite = np.asarray(batch_losses), np.asarray(finite)
                    step = (epoch + 1) * spec.num_batches
                    skipped = int((~finite).sum())
                    # Non-finite steps at the end of this epoch, continuing the run from the previous epochs.
                    trailing = int(np.argmax(finite[::-1])) if finite.any() else len(finite)
                    consecutive_nonfinite = trailing if finite.any() else consecutive_nonfinite + trailing
                    if consecutive_nonfinite >= divergence_window:
                        raise TrainingDivergedError(
                            f"{plan.role} training diverged: the last {consecutive_nonfinite} steps (up to step "
                            f"{step}, epoch {epoch + 1}) had non-finite gradients and were skipped; nothing of "
                            "this epoch was saved. Lower the learning rate (config."
                            f"{'' if plan.generative else 'classifier_'}learning_rate) or check the data"
                        )
                    mean_loss = float(batch_losses[finite].mean()) if finite.any() else float("nan")
                    history.append({"epoch": epoch + 1, "step": step, "loss": mean_loss, "skipped_steps": skipped})
                    bar.set_postfix(loss=f"{mean_loss:.4g}", refresh=False)
                    bar.update()
                    last = epoch + 1 == spec.num_epochs
                    if _should_checkpoint(step, spec.num_batches, values["checkpoint_every_steps"], last):
                        ckpt.save(
                            step,
                            params,
                            opt_state,
                            metadata={
                                **metadata,
                                "epoch": epoch + 1,
                                "finished": last,
                                "history": history,
                                "nonfinite_steps": sum(h["skipped_steps"] for h in history),
                                "consecutive_nonfinite": consecutive_nonfinite,
                            },
                        )
        final_step = spec.num_epochs * spec.num_batches
        checkpoint_path = str(ckpt.step_path(final_step))
    train_seconds = time.perf_counter() - started

    if mesh is not None:
        params = parallel.localize(params)  # every process evaluates its own copy, as one device would
    metrics = _evaluate(plan, programs, params, run_data.excluded_classes)
    if plan.generative and main_process:
        family = families.family_of(spec.model_name)
        samples_path = role_dir / "samples.png"
        description = family.describe(plan.model_kwargs, dict(spec.family_settings))
        _write_samples_png(
            samples_path,
            plan,
            programs,
            params,
            num_images=values["num_sample_images"],
            title=f"{spec.model_name} {description}, {spec.num_epochs} epochs, held-out "
            f"{family.loss_label} {metrics[f'heldout_{family.loss_metric}']:.4g}",
        )
        metrics["samples_png"] = str(samples_path)
    metrics.update(
        role=plan.role,
        model=spec.model_name,
        num_train=len(plan.train),
        num_heldout=len(plan.heldout),
        heldout_data=(
            plan.heldout.name
            if values["eval_data"]
            else f"{values['data']} (stratified holdout {values['holdout_fraction']})"
        ),
        epochs=spec.num_epochs,
        steps=final_step,
        final_train_loss=history[-1]["loss"] if history else None,
        nonfinite_steps=sum(h["skipped_steps"] for h in history),
        resumed_from_step=resumed_from,
        seconds=round(train_seconds, 2),
        checkpoint=checkpoint_path,
    )
    if not main_process:
        return metrics
    io.write_json(role_dir / "metrics.json", metrics, sort_keys=True)
    io.write_csv(role_dir / "history.csv", history, _HISTORY_COLUMNS)
    return metrics


# ------------------------------------------------------------------------------------------- entry points


def train_and_evaluate(config: Any, workdir: str | pathlib.Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Trains, checkpoints and evaluates every role in ``config.roles``; resumes what a workdir already holds.

    Everything that can be refused is refused before any training or deletion: the config (every field), the
    data (loaded and split), the models (built abstractly from the config and the data's image shape), the
    workdir (created only then, probed for writing; free space for the checkpoints), and each role's existing
    checkpoint (same role, model, config fields in scope and training-data fingerprint, or
    :class:`CheckpointMismatchError` naming the differences), every file of whose latest step is checked against
    the sizes and digests recorded at save time. Then each role trains from scratch or from its latest checkpoint,
    is evaluated on the held-out data, and its metrics, history and (generative) sample grid are written.

    A latest checkpoint that fails verification is refused (:class:`CheckpointCorruptError` naming the step and
    the file), unless ``config.restore_fallback``: then the newest step that verifies completely (files, arrays,
    digests) is resumed from, and each newer step passed over is moved to ``<role>/corrupt_checkpoints/`` with a
    warning naming it and why (also listed in the role's ``skipped_checkpoints``).

    Args:
        config: a train config (see :data:`gsu_jax.config_validation.TRAIN_SCHEMA`, ``configs/*.py``).
        workdir: the run directory (created if missing).
        overwrite: discard the existing checkpoints of the roles being trained and start them from scratch
            (other roles' directories are left alone).

    Returns:
        ``{role: metrics}``; generative metrics hold ``heldout_neg_elbo`` (and its terms) and ``samples_png``,
        classifier metrics ``heldout_accuracy`` and ``heldout_cross_entropy``; every role also ``num_train``,
        ``steps``, ``final_train_loss``, ``nonfinite_steps``, ``resumed_from_step``, ``seconds``,
        ``checkpoint`` and ``skipped_checkpoints`` (``[{"step", "reason", "moved_to"}]``, empty unless
        ``restore_fallback`` passed over a bad step).

    Raises:
        ConfigError: an invalid config or data that cannot be used (one line, naming the field).
        WorkdirError: the workdir cannot be created or written, or lacks the space for the checkpoints.
        CheckpointMismatchError: the workdir holds a checkpoint of another config or data (without ``overwrite``).
        CheckpointCorruptError: the latest checkpoint of a role cannot be read back intact (with
            ``restore_fallback``: no checkpoint of the role can).
        TrainingDivergedError: the gradients stayed non-finite.
    """
    started = time.perf_counter()
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be a bool, got {overwrite!r}")
    if not isinstance(workdir, (str, pathlib.Path)) or not str(workdir).strip():
        raise WorkdirError(f"workdir must be a non-empty path, got {workdir!r}")
    values = validate_train_config(config)
    parallel.join_hosts(values)  # before anything touches a device
    roles = parse_roles(values["roles"])
    run_data = prepare_data(values)
    plans = [_plan(role, values, run_data) for role in roles]
    mesh = parallel.run_mesh(values, _batch_fields(plans))
    workdir = ensure_writable_directory(workdir)
    saved, skipped = {}, {}
    for plan in plans:
        if overwrite:
            saved[plan.role], skipped[plan.role] = None, []
        elif values["restore_fallback"]:
            saved[plan.role], skipped[plan.role] = _newest_good_checkpoint(plan, workdir / plan.role)
        else:
            saved[plan.role], skipped[plan.role] = _existing_checkpoint(plan, workdir / plan.role), []
    _check_free_space(workdir, plans, values["max_to_keep"])
    # Every process has read the workdir's checkpoints before any of them changes it.
    parallel.barrier("train_and_evaluate:checked")
    if overwrite:
        if parallel.is_main_process():
            for plan in plans:
                shutil.rmtree(workdir / plan.role, ignore_errors=True)
        parallel.barrier("train_and_evaluate:overwrite")
    # Damaged steps are moved aside by process 0 only (every process found the same ones); the others wait for it.
    set_aside = {
        plan.role: _set_aside_bad_steps(plan, workdir / plan.role, skipped[plan.role])
        if parallel.is_main_process()
        else []
        for plan in plans
    }
    parallel.barrier("train_and_evaluate:set_aside")

    results = {}
    for plan in plans:
        role_dir = workdir / plan.role
        role_dir.mkdir(parents=True, exist_ok=True)
        results[plan.role] = _train_role(plan, role_dir, saved[plan.role], values, run_data, mesh)
        results[plan.role]["skipped_checkpoints"] = set_aside[plan.role]
        logging.info("%s: %s", plan.role, {k: v for k, v in results[plan.role].items() if isinstance(v, float)})
    summary = {"workdir": str(workdir), "wall_seconds": round(time.perf_counter() - started, 2), "roles": results}
    if parallel.is_main_process():
        io.write_json(workdir / "summary.json", summary, sort_keys=True)
    return results


def _batch_fields(plans: list[_RolePlan]) -> list[str]:
    """The config fields holding the batch sizes of ``plans``' roles (each once, in role order)."""
    fields = ["batch_size" if plan.generative else "classifier_batch_size" for plan in plans]
    return list(dict.fromkeys(fields))


def _on_shardings(abstract: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` restore targets carrying ``shardings`` (a pytree matching ``abstract``)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract, shardings
    )


def check_resumable(config: Any, workdir: str | pathlib.Path) -> dict[str, dict[str, Any] | None]:
    """Dry run of :func:`train_and_evaluate`'s refusals: nothing is trained, created or written.

    Returns:
        ``{role: metadata of its latest checkpoint, or None when it has none}`` for the roles in ``config.roles``
        (``metadata["finished"]`` tells whether the role would only be re-evaluated).

    Raises:
        ConfigError: an invalid config or unusable data.
        CheckpointMismatchError: a role's checkpoint belongs to another config or data (the keys are named).
        CheckpointCorruptError: a role's latest checkpoint metadata is unreadable.
    """
    values = validate_train_config(config)
    parallel.join_hosts(values)
    run_data = prepare_data(values)
    plans = [_plan(role, values, run_data) for role in parse_roles(values["roles"])]
    parallel.run_mesh(values, _batch_fields(plans))
    directory = pathlib.Path(workdir).expanduser().absolute()
    return {plan.role: _existing_checkpoint(plan, directory / plan.role) for plan in plans}


def load_trained(workdir: str | pathlib.Path, role: str, *, mesh: jax.sharding.Mesh | None = None) -> TrainedModel:
    """Loads the finished model of ``role`` from a train workdir (the latest checkpoint, verified bit for bit).

    Args:
        workdir: a directory written by :func:`train_and_evaluate` / ``train.py``.
        role: ``"generative"``, ``"evaluator"`` or ``"guidance"``.
        mesh: restore the parameters onto this mesh (:func:`gsu_jax.parallel.param_shardings`), whatever the
            device count that saved them; ``None``: onto the default device.

    Returns:
        :class:`TrainedModel` ``(graphdef, params, config, metadata)``.

    Raises:
        ValueError: an unknown role.
        CheckpointNotFoundError: no checkpoint of that role, or its training has not finished (the message says
            how to finish it).
        CheckpointCorruptError: the checkpoint cannot be read back intact.

    Example:
        >>> evaluator = load_trained("runs/mnist_vae", "evaluator")  # doctest: +SKIP
        >>> logits = models.classifier_logits(evaluator.graphdef, evaluator.params, images)  # doctest: +SKIP
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; allowed: {', '.join(ROLES)}")
    directory = _checkpoint_dir(pathlib.Path(workdir).expanduser().absolute() / role)
    hint = f"train it with: python train.py --config <config> --workdir {workdir}"
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"no trained {role} model in workdir {str(workdir)!r}; {hint}")
    with Checkpointer(directory, create=False) as ckpt:
        if ckpt.latest_step() is None:
            raise CheckpointNotFoundError(f"no complete {role} checkpoint in {str(directory)!r}; {hint}")
        metadata = ckpt.read_metadata()
        if metadata.get("role") != role:
            raise CheckpointMismatchError(
                f"{str(directory)!r} holds a {metadata.get('role')!r} checkpoint, not a {role!r} one"
            )
        if not metadata.get("finished"):
            raise CheckpointNotFoundError(
                f"the {role} model in {str(workdir)!r} is not finished (epoch {metadata.get('epoch')} of "
                f"{metadata.get('num_epochs')}); re-run the same train.py command to resume it"
            )
        kwargs = dict(metadata["model_kwargs"])
        kwargs["image_shape"] = tuple(kwargs["image_shape"])
        abstract_model = nnx.eval_shape(lambda: models.build_model(metadata["model"], rngs=nnx.Rngs(0), **kwargs))
        graphdef, abstract_params = nnx.split(abstract_model)
        abstract_params = abstract_like(abstract_params)
        if mesh is not None:
            abstract_params = _on_shardings(abstract_params, parallel.param_shardings(abstract_params, mesh))
        params, _, metadata = ckpt.restore(metadata["step"], abstract_params=abstract_params)
    return TrainedModel(graphdef, params, ml_collections.ConfigDict(metadata["config"]), metadata)
