"""Training one role, start to finish: start fresh or restore its checkpoint, run the epochs left (divergence
checks, checkpoints at epoch ends), then evaluate it and write its files.

:func:`train_role` is called once per role by :func:`gsu_jax.training.run.train_and_evaluate`, after every refusal
has been made; it owns ``<role>/checkpoints/`` while training and ``metrics.json``, ``history.csv`` and
``samples.png`` after. Non-finite steps are skipped by the optimizer (``optax.apply_if_finite``); this module counts
them across epochs and gives up with :class:`TrainingDivergedError` (see :data:`MAX_CONSECUTIVE_NONFINITE`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from gsu_jax import generative as families
from gsu_jax import interrupts, io, parallel, provenance
from gsu_jax.checkpointing import Checkpointer, abstract_like
from gsu_jax.training.evaluation import evaluate_role, write_samples_png
from gsu_jax.training.plan import INIT_STREAM, TRAIN_STREAM, RolePlan
from gsu_jax.training.programs import Programs, compiled_programs, state_shardings_on
from gsu_jax.training.role_checkpoints import checkpoint_dir, on_shardings
from gsu_jax.training.run_data import RunData

__all__ = ["MAX_CONSECUTIVE_NONFINITE", "TrainingDivergedError", "checkpoint_metadata", "train_role"]

# A run whose last this-many steps were all non-finite (skipped) has diverged.
MAX_CONSECUTIVE_NONFINITE = 20
# Columns of <role>/history.csv, one row per epoch.
_HISTORY_COLUMNS = ("epoch", "step", "loss", "skipped_steps")


class TrainingDivergedError(RuntimeError):
    """Training kept producing non-finite gradients; nothing of the failing epoch was saved."""


@dataclasses.dataclass
class _Progress:
    """Where a role's training stands: its state, the epochs done and their history (updated epoch by epoch)."""

    params: Any
    opt_state: Any
    epoch: int
    history: list[dict[str, Any]]
    consecutive_nonfinite: int
    resumed_from: int | None  # the step restored from; None for a fresh start


def train_role(
    plan: RolePlan,
    role_dir: pathlib.Path,
    saved: dict[str, Any] | None,
    values: Mapping[str, Any],
    run_data: RunData,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
    """Trains ``plan``'s role in ``role_dir`` from ``saved`` (the metadata of the checkpoint to resume from, already
    checked to belong to this plan; ``None``: from scratch), evaluates it and writes its files; returns its
    metrics (all but ``skipped_checkpoints``, which the caller adds)."""
    spec = plan.spec
    programs = compiled_programs(spec, mesh)
    shardings = None if mesh is None else state_shardings_on(programs.abstract_params, programs.optimizer, mesh)
    main_process = parallel.is_main_process()
    started = time.perf_counter()
    with Checkpointer(checkpoint_dir(role_dir), max_to_keep=values["max_to_keep"]) as ckpt:
        progress = _start_or_restore(plan, programs, ckpt, saved, mesh, shardings)
        metadata = checkpoint_metadata(plan, values, run_data)
        _run_epochs(plan, programs, ckpt, progress, metadata, values, mesh, main_process)
        final_step = spec.num_epochs * spec.num_batches
        checkpoint_path = str(ckpt.step_path(final_step))
    train_seconds = time.perf_counter() - started
    return _evaluate_and_write(
        plan,
        programs,
        progress,
        role_dir,
        values,
        run_data,
        mesh=mesh,
        main_process=main_process,
        final_step=final_step,
        train_seconds=train_seconds,
        checkpoint_path=checkpoint_path,
    )


# ------------------------------------------------------------------------------------------- restore or start


def _start_or_restore(
    plan: RolePlan,
    programs: Programs,
    ckpt: Checkpointer,
    saved: dict[str, Any] | None,
    mesh: jax.sharding.Mesh | None,
    shardings: tuple[Any, Any] | None,
) -> _Progress:
    """Fresh parameters from the role's init key, or the state and history of checkpoint ``saved["step"]``."""
    if saved is None:
        # Committed to the device like restored arrays are, so that a fresh and a resumed run hit the same
        # compiled programs (jit keys its cache on whether arguments are committed).
        initial = programs.init_state(jax.random.fold_in(plan.key, INIT_STREAM))
        if mesh is None:
            params, opt_state = jax.device_put(initial, jax.devices()[0])
        else:
            params, opt_state = parallel.put(initial, shardings)
        return _Progress(params, opt_state, epoch=0, history=[], consecutive_nonfinite=0, resumed_from=None)
    abstract_params = abstract_like(programs.abstract_params)
    abstract_opt_state = abstract_like(jax.eval_shape(programs.optimizer.init, abstract_params))
    if mesh is not None:
        # Restored straight onto this run's mesh, whatever the device count that saved it.
        abstract_params, abstract_opt_state = on_shardings((abstract_params, abstract_opt_state), shardings)
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
        plan.spec.num_epochs,
        ckpt.directory,
    )
    return _Progress(params, opt_state, start_epoch, history, consecutive_nonfinite, resumed_from=saved["step"])


def checkpoint_metadata(plan: RolePlan, values: Mapping[str, Any], run_data: RunData) -> dict[str, Any]:
    """What every checkpoint of the role records besides its epoch and history (read back by
    :func:`gsu_jax.training.role_checkpoints.existing_checkpoint` and :func:`gsu_jax.training.loading.load_trained`)."""
    spec = plan.spec
    return {
        "role": plan.role,
        "model": spec.model_name,
        "model_kwargs": plan.model_kwargs,
        "config": dict(values),
        "identity": plan.identity,
        "seed": values["seed"],
        # Every key of the run derives from this one and the epoch (see the package docstring).
        "role_key": jax.random.key_data(plan.key).tolist(),
        "source_fingerprint": run_data.source_fingerprint,
        "train_fingerprint": plan.train_fingerprint,
        "heldout_fingerprint": plan.heldout.fingerprint(),
        "num_train": len(plan.train),
        "num_heldout": len(plan.heldout),
        "excluded_classes": list(run_data.excluded_classes) if plan.generative else [],
        # The examples left out (config.exclude): unlearn.py refuses an oracle whose set differs from its forget set.
        "excluded": run_data.excluded if plan.generative else None,
        "num_epochs": spec.num_epochs,
        "steps_per_epoch": spec.num_batches,
        "batch_size": spec.batch_size,
        "device": provenance.device_name(),
    }


# ------------------------------------------------------------------------------------------- the epochs


def _should_checkpoint(step: int, steps_per_epoch: int, every: int, last_epoch: bool) -> bool:
    return last_epoch or step // every > (step - steps_per_epoch) // every


def _trailing_nonfinite(finite: np.ndarray, before: int) -> int:
    """Non-finite steps at the end of this epoch, continuing the run of ``before`` from the previous epochs."""
    trailing = int(np.argmax(finite[::-1])) if finite.any() else len(finite)
    return trailing if finite.any() else before + trailing


def _run_epochs(
    plan: RolePlan,
    programs: Programs,
    ckpt: Checkpointer,
    progress: _Progress,
    metadata: dict[str, Any],
    values: Mapping[str, Any],
    mesh: jax.sharding.Mesh | None,
    main_process: bool,
) -> None:
    """Runs the epochs from ``progress.epoch`` on, updating ``progress``; checkpoints at the epoch ends
    :func:`_should_checkpoint` picks. An epoch that ends the run's last ``min(MAX_CONSECUTIVE_NONFINITE, steps per
    epoch)`` steps all skipped raises :class:`TrainingDivergedError` before anything of it is saved."""
    spec = plan.spec
    divergence_window = min(MAX_CONSECUTIVE_NONFINITE, spec.num_batches)
    if progress.epoch >= spec.num_epochs:
        return
    if mesh is None:
        images, labels = jnp.asarray(plan.train.images), jnp.asarray(plan.train.labels)
    else:
        images, labels = parallel.put((plan.train.images, plan.train.labels), parallel.replicated(mesh))
    train_key = jax.random.fold_in(plan.key, TRAIN_STREAM)
    bar = _progress_bar(
        values["progress_bar"] and main_process,
        total=spec.num_epochs,
        initial=progress.epoch,
        desc=f"{plan.role:>10}",
        unit="epoch",
        dynamic_ncols=True,
    )
    with bar:
        for epoch in range(progress.epoch, spec.num_epochs):
            epoch_key = jax.random.fold_in(train_key, epoch)
            if mesh is not None:
                epoch_key = parallel.put(epoch_key, parallel.replicated(mesh))
            progress.params, progress.opt_state, batch_losses, finite = programs.train_epoch(
                progress.params, progress.opt_state, images, labels, epoch_key
            )
            batch_losses, finite = np.asarray(batch_losses), np.asarray(finite)
            step = (epoch + 1) * spec.num_batches
            skipped = int((~finite).sum())
            progress.consecutive_nonfinite = _trailing_nonfinite(finite, progress.consecutive_nonfinite)
            if progress.consecutive_nonfinite >= divergence_window:
                raise TrainingDivergedError(
                    f"{plan.role} training diverged: the last {progress.consecutive_nonfinite} steps (up to step "
                    f"{step}, epoch {epoch + 1}) had non-finite gradients and were skipped; nothing of "
                    "this epoch was saved. Lower the learning rate (config."
                    f"{'' if plan.generative else 'classifier_'}learning_rate) or check the data"
                )
            mean_loss = float(batch_losses[finite].mean()) if finite.any() else float("nan")
            progress.history.append({"epoch": epoch + 1, "step": step, "loss": mean_loss, "skipped_steps": skipped})
            progress.epoch = epoch + 1
            bar.set_postfix(loss=f"{mean_loss:.4g}", refresh=False)
            bar.update()
            last = epoch + 1 == spec.num_epochs
            # SIGINT/SIGTERM (read once): checkpoint the epoch just finished, whatever checkpoint_every_steps says,
            # then stop.
            interrupted = interrupts.requested()
            if interrupted is not None or _should_checkpoint(
                step, spec.num_batches, values["checkpoint_every_steps"], last
            ):
                ckpt.save(
                    step,
                    progress.params,
                    progress.opt_state,
                    metadata={
                        **metadata,
                        "epoch": epoch + 1,
                        "finished": last,
                        "history": progress.history,
                        "nonfinite_steps": sum(h["skipped_steps"] for h in progress.history),
                        "consecutive_nonfinite": progress.consecutive_nonfinite,
                    },
                )
            interrupts.stop(interrupted)


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


# ------------------------------------------------------------------------------------------- evaluate and write


def _evaluate_and_write(
    plan: RolePlan,
    programs: Programs,
    progress: _Progress,
    role_dir: pathlib.Path,
    values: Mapping[str, Any],
    run_data: RunData,
    *,
    mesh: jax.sharding.Mesh | None,
    main_process: bool,
    final_step: int,
    train_seconds: float,
    checkpoint_path: str,
) -> dict[str, Any]:
    """Held-out metrics of the trained role and the facts of its run; process 0 writes them to ``metrics.json``,
    the epochs to ``history.csv`` and, for the generative role, the sample grid to ``samples.png``."""
    spec, history, params = plan.spec, progress.history, progress.params
    if mesh is not None:
        params = parallel.localize(params)  # every process evaluates its own copy, as one device would
    metrics = evaluate_role(plan, programs, params, run_data.excluded_classes)
    if plan.generative and main_process:
        family = families.family_of(spec.model_name)
        samples_path = role_dir / "samples.png"
        description = family.describe(plan.model_kwargs, dict(spec.family_settings))
        write_samples_png(
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
        resumed_from_step=progress.resumed_from,
        seconds=round(train_seconds, 2),
        checkpoint=checkpoint_path,
    )
    if not main_process:
        return metrics
    io.write_json(role_dir / "metrics.json", metrics, sort_keys=True)
    io.write_csv(role_dir / "history.csv", history, _HISTORY_COLUMNS)
    return metrics
