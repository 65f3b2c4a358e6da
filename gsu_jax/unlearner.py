r"""Unlearn your own model: :func:`unlearn`, one function from a per-example loss and a params pytree to a model
that has forgotten.

``unlearn.py`` runs the protocol on the models ``train.py`` makes (fixed-z monitoring by an evaluator, an oracle,
FID, the report). This is the library entry point for any other model: give it

* ``loss_fn(params, example, key) -> f32[]``, the loss of ONE example (``example`` a pytree of arrays without the
  batch axis; ``key`` that example's own PRNG key),
* ``params``, any pytree of float arrays (e.g. ``nnx.state(model, nnx.Param)``),
* the forget and retain data, each either arrays with a leading example axis (an array, a mapping or a tuple of
  them: batches are drawn from fresh seeded permutations, pass after pass) or an iterable of batches (a list, a
  generator: one batch per step; the run ends when either is exhausted),

and it runs a method of the registry (:data:`gsu_jax.methods.METHODS`, default the recommended method) with any
optax optimizer (default: the optimizer the method's defaults were measured with, else Adam 1e-3) for at most
``max_steps`` steps, calling your stopping rule ``stop(steps_run, params) -> bool`` after each.

Each step is the registry's one jitted step ``step(params, state, forget_batch, retain_batch, key)``
(:func:`gsu_jax.methods.make_method`), run by :func:`step_loop`, the loop ``unlearn.py`` runs too (it adds its
monitoring, in-flight checkpoints, interrupts and mesh through the loop's hooks), so the result equals what
``unlearn.py`` computes for the same batches and keys. A step whose new parameters or optimizer state are not finite
is skipped (counted in ``UnlearnResult.nonfinite_steps``); :data:`MAX_CONSECUTIVE_NONFINITE` in a row raise
:class:`FloatingPointError`.

``remap_surgery`` (the recommended method) pairs each forget example with a nearby retained image, so it needs
batches that are mappings holding an ``"image"`` field (``image_field=`` names another) and a loss that scores the
reconstruction of ``example.get("target", example["image"])``; by default only parameters whose path contains
``decoder`` follow its surrogate (``forget_only=``). For a loss without that contract pick another method (e.g.
``method="sa"``).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gsu_jax import methods
from gsu_jax.losses import LossFn
from gsu_jax.method_registry import PROTOCOL_OPTIMIZER, build_optimizer, is_positive_int

__all__ = [
    "MAX_CONSECUTIVE_NONFINITE",
    "LoopEnd",
    "StepRecord",
    "UnlearnResult",
    "batch_schedule",
    "step_loop",
    "tree_all_finite",
    "unlearn",
]

Params = Any
StopRule = Callable[[int, Params], bool]  # (steps run, params) -> stop?

# A run whose last this-many steps (or all its steps, for a shorter budget) had non-finite updates has diverged.
MAX_CONSECUTIVE_NONFINITE = 5
_EXHAUSTED = object()


class UnlearnResult(NamedTuple):
    """What :func:`unlearn` returns.

    Attributes:
      params: the parameters at the stop (the first update after which ``stop`` said True), or at the end of the
        run when it never did.
      params_at_end: the parameters after the last update run (the same as ``params`` unless
        ``continue_to_budget``).
      stopped_at: steps run when ``stop`` first said True (0: before any step; a skipped non-finite step counts,
        as in ``unlearn.py``), None if it never did.
      steps_run: steps run (skipped non-finite ones included).
      nonfinite_steps: updates skipped because their result was not finite.
      history: one dict per update attempted: ``step`` (1-based), the step's metrics (``forget_loss``,
        ``retain_loss``, ``update_norm``, ...) as floats and ``nonfinite_skipped`` (0 or 1).
      state: the method's state after the last update (step count, optimizer state and the rule's fixed state).
    """

    params: Params
    params_at_end: Params
    stopped_at: int | None
    steps_run: int
    nonfinite_steps: int
    history: list[dict[str, float]]
    state: methods.MethodState


class StepRecord(NamedTuple):
    """One attempted update, as :func:`step_loop` reports it to its ``after_step``.

    Attributes:
      step: updates attempted so far, this one included (1-based).
      params: the parameters after it (the previous ones if it was skipped).
      finite: False when its parameters or optimizer state were not finite and it was skipped.
      metrics: the step's metrics (``forget_loss``, ``retain_loss``, ...), device scalars.
      seconds: its wall time, dispatch to ready parameters (``unlearn.py`` readies the batches before;
        :func:`unlearn`'s host batches are transferred inside it).
    """

    step: int
    params: Params
    finite: bool
    metrics: Mapping[str, Any]
    seconds: float


class LoopEnd(NamedTuple):
    """Where :func:`step_loop` stopped: the last kept parameters and state and the non-finite counters."""

    params: Params
    state: Any
    nonfinite_steps: int
    consecutive_nonfinite: int


def step_loop(
    step: Callable[..., tuple[Params, Any, Mapping[str, Any]]],
    params: Params,
    state: Any,
    inputs_at: Callable[[int], tuple[Any, Any, jax.Array] | None],
    *,
    max_steps: int,
    after_step: Callable[[StepRecord], bool],
    diverged: Callable[[int, int], Exception],
    first_step: int = 0,
    stopped: bool = False,
    continue_to_budget: bool = False,
    before_step: Callable[[int, Params, Any, tuple[int, int]], None] | None = None,
    nonfinite_steps: int = 0,
    consecutive_nonfinite: int = 0,
) -> LoopEnd:
    """The unlearning loop of :func:`unlearn` and of ``unlearn.py`` (:func:`gsu_jax.unlearning.loop.run_steps`).

    For ``t = first_step .. max_steps - 1``, until stopped (and then on to the budget with ``continue_to_budget``):
    ``before_step(t, params, state, (nonfinite_steps, consecutive_nonfinite))`` (the CLI saves its in-flight state
    and honours interrupts there), ``inputs_at(t) -> (forget_batch, retain_batch, key)`` (None: the data ran out,
    the loop ends), one ``step`` timed to ready parameters, the non-finite guard (a step whose new parameters or
    state are not finite is skipped: both stay as they were, and :data:`MAX_CONSECUTIVE_NONFINITE` skipped in a
    row, or every step of a shorter budget, raise ``diverged(consecutive, step)``), then ``after_step(record)``,
    which says whether the run has now stopped (once True, it stays so). Returns the kept parameters and state.
    """
    window = min(MAX_CONSECUTIVE_NONFINITE, max_steps)
    for t in range(first_step, max_steps):
        if stopped and not continue_to_budget:
            break
        if before_step is not None:
            before_step(t, params, state, (nonfinite_steps, consecutive_nonfinite))
        inputs = inputs_at(t)
        if inputs is None:
            break
        started = time.perf_counter()
        new_params, new_state, metrics = step(params, state, *inputs)
        jax.block_until_ready(new_params)
        seconds = time.perf_counter() - started
        finite = bool(tree_all_finite((new_params, new_state)))
        if finite:
            params, state, consecutive_nonfinite = new_params, new_state, 0
        else:
            nonfinite_steps += 1
            consecutive_nonfinite += 1
            if consecutive_nonfinite >= window:
                raise diverged(consecutive_nonfinite, t + 1)
        stopped = after_step(StepRecord(t + 1, params, finite, metrics, seconds)) or stopped
    return LoopEnd(params, state, nonfinite_steps, consecutive_nonfinite)


@jax.jit
def tree_all_finite(tree: Any) -> jax.Array:
    """``bool[]``: every element of every leaf is finite (integer leaves always are)."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])) if leaves else jnp.bool_(True)


def batch_schedule(indices: np.ndarray, batch: int, steps: int, rng: np.random.Generator) -> np.ndarray:
    """``int64[steps, batch]`` positions: consecutive fresh permutations of ``indices``, cut into batches."""
    passes = math.ceil(steps * batch / indices.size)
    order = np.concatenate([rng.permutation(indices) for _ in range(passes)])
    return order[: steps * batch].reshape(steps, batch)


def unlearn(
    loss_fn: LossFn,
    params: Params,
    forget_data: Any,
    retain_data: Any,
    *,
    key: jax.Array,
    method: str | None = None,
    optimizer: optax.GradientTransformation | None = None,
    hparams: Mapping[str, Any] | None = None,
    max_steps: int = 50,
    batch_size: int = 128,
    retain_batch_size: int | None = None,
    stop: StopRule | None = None,
    continue_to_budget: bool = False,
    guidance_loss: Callable[[Params, jax.Array], jax.Array] | None = None,
    guidance_weight: float = 0.0,
    chunk_size: int | None = None,
) -> UnlearnResult:
    """Unlearns ``forget_data`` from the model of ``loss_fn`` and ``params`` (see the module docstring).

    Args:
      loss_fn: ``loss_fn(params, example, key) -> f32[]``, one example's loss.
      params: the trained parameters (a pytree of float arrays).
      forget_data, retain_data: arrays sharing a leading example axis (an array, a mapping or a tuple of them), or
        an iterable of batches (a list or a generator of such pytrees, one per step).
      key: a JAX PRNG key; it draws the batch order of array data and one key per step (each example of a step
        then gets its own key, :func:`gsu_jax.methods.split_step_keys`). The same key gives the same run.
      method: a name of :data:`gsu_jax.methods.METHODS`; None: :data:`gsu_jax.methods.RECOMMENDED_METHOD`.
      optimizer: any optax transformation the update direction is descended with; None: the one the method's
        registry record names (``METHODS[method].optimizer``), else Adam 1e-3.
      hparams: the method's hyperparameters over its defaults (``METHODS[method].defaults``).
      max_steps: the update budget (>= 1).
      batch_size, retain_batch_size: examples per step drawn from array data (retain defaults to ``batch_size``;
        ignored for iterables).
      stop: ``stop(steps_run, params) -> bool``, called on the host before the first step and after each one until
        it first says True (a skipped non-finite step counts as run and leaves ``params`` as they were); None never
        stops early (the run takes ``max_steps`` steps).
      continue_to_budget: keep stepping to ``max_steps`` after ``stop`` said True (``params`` stays the model at
        the stop, ``params_at_end`` the last one).
      guidance_loss, guidance_weight, chunk_size: as in :func:`gsu_jax.methods.make_method`.

    Returns:
      :class:`UnlearnResult`.

    Raises:
      ValueError / TypeError: a bad argument (unknown method or hyperparameter, empty or mismatched data, a batch
        size or budget below 1, ...), before any step runs.
      FloatingPointError: :data:`MAX_CONSECUTIVE_NONFINITE` consecutive non-finite steps.

    Example (a linear model and the paper's rule; the README has one with a Flax VAE and the recommended method):
      >>> import jax, jax.numpy as jnp, numpy as np, optax
      >>> from gsu_jax import unlearn
      >>> def loss_fn(params, example, key):
      ...     return jnp.square(example["x"] @ params["w"] - example["y"])
      >>> rng = np.random.default_rng(0)
      >>> x = rng.normal(size=(64, 3)).astype(np.float32)
      >>> forget = {"x": x[:16], "y": np.ones(16, np.float32)}
      >>> retain = {"x": x[16:], "y": np.zeros(48, np.float32)}
      >>> result = unlearn(loss_fn, {"w": jnp.zeros(3)}, forget, retain, key=jax.random.key(0), method="sa",
      ...                  optimizer=optax.sgd(0.1), max_steps=5, batch_size=8)
      >>> result.steps_run, len(result.history), result.stopped_at is None
      (5, 5, True)
    """
    name = methods.RECOMMENDED_METHOD if method is None else method
    if name not in methods.METHODS:
        raise ValueError(f"method={name!r} is unknown; allowed: {', '.join(sorted(methods.METHODS))}")
    _check_positive_int(max_steps, "max_steps")
    _check_positive_int(batch_size, "batch_size")
    retain_batch_size = batch_size if retain_batch_size is None else retain_batch_size
    _check_positive_int(retain_batch_size, "retain_batch_size")
    if stop is not None and not callable(stop):
        raise TypeError(f"stop must be None or a callable (steps_run, params) -> bool, got {stop!r}")
    if not isinstance(continue_to_budget, bool):
        raise TypeError(f"continue_to_budget must be True or False, got {continue_to_budget!r}")
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ()):
        raise TypeError(f"key must be one JAX PRNG key (jax.random.key(seed)), got {key!r}")
    _check_params(params)
    if optimizer is None:
        optimizer = build_optimizer(methods.METHODS[name].optimizer or PROTOCOL_OPTIMIZER)
    unlearning_method = methods.make_method(
        name,
        loss_fn=loss_fn,
        optimizer=optimizer,
        guidance_loss=guidance_loss,
        guidance_weight=guidance_weight,
        chunk_size=chunk_size,
        **dict(hparams or {}),
    )
    data_key, steps_key = jax.random.split(key)
    forget_key, retain_key = jax.random.split(data_key)
    forget_batches = _batches(forget_data, batch_size, max_steps, forget_key, "forget_data")
    retain_batches = _batches(retain_data, retain_batch_size, max_steps, retain_key, "retain_data")
    step = jax.jit(unlearning_method.step)

    def inputs_at(t: int) -> tuple[Any, Any, jax.Array] | None:
        try:
            return next(forget_batches), next(retain_batches), jax.random.fold_in(steps_key, t)
        except StopIteration:
            return None  # an iterable of batches ran out

    stopped_at = 0 if stop is not None and stop(0, params) else None
    params_at_stop = params if stopped_at == 0 else None
    history: list[dict[str, float]] = []

    def after_step(record: StepRecord) -> bool:
        nonlocal stopped_at, params_at_stop
        history.append(
            {
                "step": record.step,
                **{metric: float(value) for metric, value in record.metrics.items()},
                "nonfinite_skipped": int(not record.finite),
            }
        )
        if stopped_at is None and stop is not None and stop(record.step, record.params):
            stopped_at, params_at_stop = record.step, record.params
        return stopped_at is not None

    def diverged(consecutive: int, at_step: int) -> FloatingPointError:
        return FloatingPointError(
            f"{name} diverged: the last {consecutive} steps (up to step {at_step}) had non-finite "
            "updates and were skipped; lower the learning rate or check the loss and the data"
        )

    end = step_loop(
        step,
        params,
        unlearning_method.init(params),
        inputs_at,
        max_steps=max_steps,
        after_step=after_step,
        diverged=diverged,
        stopped=stopped_at is not None,
        continue_to_budget=continue_to_budget,
    )
    params, state, nonfinite_steps = end.params, end.state, end.nonfinite_steps
    return UnlearnResult(
        params=params if params_at_stop is None else params_at_stop,
        params_at_end=params,
        stopped_at=stopped_at,
        steps_run=len(history),
        nonfinite_steps=nonfinite_steps,
        history=history,
        state=state,
    )


def _check_positive_int(value: Any, name: str) -> None:
    if not is_positive_int(value):
        raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= 1")


def _check_params(params: Params) -> None:
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("params holds no arrays; allowed: a pytree of float arrays (the model's parameters)")
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"params{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; allowed: float arrays only "
                "(pass nnx.state(model, nnx.Param), not the whole module state)"
            )


def _is_array(value: Any) -> bool:
    return isinstance(value, (np.ndarray, jax.Array))


def _batches(data: Any, batch: int, steps: int, key: jax.Array, name: str) -> Iterator[Any]:
    """An iterator of batches: drawn from seeded permutations of array data, or the caller's own iterable.

    Arrays, mappings and tuples (NamedTuples too) are array data; a list, a generator or any other iterable is a
    sequence of batches (so ``[batch_0, batch_1]`` is two batches, ``(images, labels)`` one dataset).
    """
    if not isinstance(data, (Mapping, tuple, np.ndarray, jax.Array, str, bytes)) and isinstance(data, Iterable):
        iterator = iter(data)
        first = next(iterator, _EXHAUSTED)
        if first is _EXHAUSTED:
            raise ValueError(f"{name} is an empty iterable; allowed: at least one batch")
        leaves = jax.tree.leaves(first)
        if not leaves or not all(_is_array(leaf) and np.ndim(leaf) >= 1 for leaf in leaves):
            raise TypeError(
                f"{name}'s first batch must be a pytree of arrays with a leading batch axis, got {type(first).__name__}"
            )
        return itertools.chain([first], iterator)
    leaves = jax.tree.leaves(data)
    if not leaves or not all(_is_array(leaf) for leaf in leaves):
        raise TypeError(
            f"{name} must be a pytree of arrays with a leading example axis (an array, a mapping or a tuple of "
            f"arrays) or an iterable of batches (a list, a generator), got {type(data).__name__}"
            + ("" if leaves else " without arrays")
        )
    sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else 0 for leaf in leaves}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(
            f"{name}'s arrays must share one leading example axis of length >= 1, got leading sizes "
            f"{sorted(sizes)}; allowed: arrays [N, ...] with the same N"
        )
    (size,) = sizes
    # A numpy generator seeded from the key: the batch order is host-side indexing, not traced work.
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    schedule = batch_schedule(np.arange(size), batch, steps, rng)
    host = jax.tree.map(np.asarray, data)
    return (jax.tree.map(lambda leaf, rows=rows: jnp.asarray(leaf[rows]), host) for rows in schedule)
