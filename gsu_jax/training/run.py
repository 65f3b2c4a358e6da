"""A training run over a workdir: :func:`train_and_evaluate` (every refusal first, then each role in turn) and its
dry run :func:`check_resumable`.

This is the orchestration only: the data (:mod:`~gsu_jax.training.run_data`), each role's plan
(:mod:`~gsu_jax.training.plan`), what its checkpoints allow (:mod:`~gsu_jax.training.role_checkpoints`) and
training it (:mod:`~gsu_jax.training.role`) live in their own modules. With several processes, every process
checks the workdir before process 0 changes it; the barriers below keep them in step.
"""

from __future__ import annotations

import math
import pathlib
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging
from flax import nnx

from gsu_jax import io, parallel
from gsu_jax.checkpointing import SkippedStep, WorkdirError, ensure_writable_directory
from gsu_jax.config_validation import parse_roles, validate_train_config
from gsu_jax.training.plan import RolePlan, batch_fields, plan_role
from gsu_jax.training.role import train_role
from gsu_jax.training.role_checkpoints import existing_checkpoint, newest_good_checkpoint, set_aside_bad_steps
from gsu_jax.training.run_data import prepare_data
from gsu_jax.workdir_lock import exclusive_workdir

__all__ = ["check_resumable", "train_and_evaluate"]


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
    plans = [plan_role(role, values, run_data) for role in roles]
    mesh = parallel.run_mesh(values, batch_fields(plans))
    workdir = ensure_writable_directory(workdir)
    _check_free_space(workdir, plans, values["max_to_keep"])
    with exclusive_workdir(workdir):  # one run per workdir: a second one is refused before it reads anything
        return _train_roles(plans, workdir, values, run_data, mesh, overwrite, started)


def _train_roles(
    plans: list[RolePlan],
    workdir: pathlib.Path,
    values: Mapping[str, Any],
    run_data: Any,
    mesh: Any,
    overwrite: bool,
    started: float,
) -> dict[str, Any]:
    """``train_and_evaluate`` once the workdir is held: resume or clear, train each role, write the summary."""
    saved, skipped = _checkpoints_to_resume(plans, workdir, values, overwrite)
    set_aside = _clear_role_dirs(plans, workdir, skipped, overwrite)

    results = {}
    for plan in plans:
        role_dir = workdir / plan.role
        role_dir.mkdir(parents=True, exist_ok=True)
        results[plan.role] = train_role(plan, role_dir, saved[plan.role], values, run_data, mesh)
        results[plan.role]["skipped_checkpoints"] = set_aside[plan.role]
        logging.info("%s: %s", plan.role, {k: v for k, v in results[plan.role].items() if isinstance(v, float)})
    summary = {"workdir": str(workdir), "wall_seconds": round(time.perf_counter() - started, 2), "roles": results}
    if parallel.is_main_process():
        io.write_json(workdir / "summary.json", summary, sort_keys=True)
    return results


def _checkpoints_to_resume(
    plans: list[RolePlan], workdir: pathlib.Path, values: Mapping[str, Any], overwrite: bool
) -> tuple[dict[str, dict[str, Any] | None], dict[str, list[SkippedStep]]]:
    """``({role: metadata of the checkpoint to resume from, or None}, {role: damaged newer steps passed over})``;
    refuses a checkpoint of another config or data, or (without ``restore_fallback``) a damaged latest step."""
    saved, skipped = {}, {}
    for plan in plans:
        if overwrite:
            saved[plan.role], skipped[plan.role] = None, []
        elif values["restore_fallback"]:
            saved[plan.role], skipped[plan.role] = newest_good_checkpoint(plan, workdir / plan.role)
        else:
            saved[plan.role], skipped[plan.role] = existing_checkpoint(plan, workdir / plan.role), []
    return saved, skipped


def _clear_role_dirs(
    plans: list[RolePlan], workdir: pathlib.Path, skipped: dict[str, list[SkippedStep]], overwrite: bool
) -> dict[str, list[dict[str, Any]]]:
    """Once every process has read the workdir: process 0 deletes the roles' directories (``overwrite``) or moves
    their damaged steps aside; returns ``{role: the steps moved aside}`` (empty on the other processes)."""
    # Every process has read the workdir's checkpoints before any of them changes it.
    parallel.barrier("train_and_evaluate:checked")
    if overwrite:
        if parallel.is_main_process():
            for plan in plans:
                shutil.rmtree(workdir / plan.role, ignore_errors=True)
        parallel.barrier("train_and_evaluate:overwrite")
    # Damaged steps are moved aside by process 0 only (every process found the same ones); the others wait for it.
    set_aside = {
        plan.role: set_aside_bad_steps(plan, workdir / plan.role, skipped[plan.role])
        if parallel.is_main_process()
        else []
        for plan in plans
    }
    parallel.barrier("train_and_evaluate:set_aside")
    return set_aside


def _check_free_space(workdir: pathlib.Path, plans: list[RolePlan], max_to_keep: int) -> None:
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
    plans = [plan_role(role, values, run_data) for role in parse_roles(values["roles"])]
    parallel.run_mesh(values, batch_fields(plans))
    directory = pathlib.Path(workdir).expanduser().absolute()
    return {plan.role: existing_checkpoint(plan, directory / plan.role) for plan in plans}
