"""A role's checkpoints in a workdir: where they live, whether they belong to this run, falling back past damaged
steps (``config.restore_fallback``), and restore targets on a mesh.

The checkpoints themselves (orbax steps, digests, verification) are :mod:`gsu_jax.checkpointing`'s; this module
decides what a training run may resume from, and refuses a checkpoint of another config or data
(:class:`~gsu_jax.checkpointing.CheckpointMismatchError`, naming every difference) before anything is written.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
from absl import logging

from gsu_jax import provenance
from gsu_jax.checkpointing import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointMismatchError,
    SkippedStep,
    abstract_like,
)
from gsu_jax.training.plan import RolePlan
from gsu_jax.training.programs import compiled_programs

__all__ = ["checkpoint_dir", "existing_checkpoint", "newest_good_checkpoint", "on_shardings", "set_aside_bad_steps"]

_CHECKPOINTS = "checkpoints"
# Where config.restore_fallback moves the checkpoints it skipped (beside <role>/checkpoints, outside orbax's view).
_CORRUPT_CHECKPOINTS = "corrupt_checkpoints"


def checkpoint_dir(role_dir: pathlib.Path) -> pathlib.Path:
    """``<role>/checkpoints``: the orbax steps of one role."""
    return role_dir / _CHECKPOINTS


def newest_good_checkpoint(plan: RolePlan, role_dir: pathlib.Path) -> tuple[dict[str, Any] | None, list[SkippedStep]]:
    """``config.restore_fallback``: the metadata of the newest checkpoint that verifies completely (files, arrays,
    digests) and the newer steps passed over; ``(None, [])`` without checkpoints. Refuses like
    :func:`existing_checkpoint` a checkpoint of another run, and raises :class:`CheckpointCorruptError` when no
    step verifies."""
    directory = checkpoint_dir(role_dir)
    if not directory.is_dir():
        return None, []
    programs = compiled_programs(plan.spec)
    abstract_params = abstract_like(programs.abstract_params)
    with Checkpointer(directory, create=False) as ckpt:
        steps = ckpt.all_steps()
        if not steps:
            return None, []
        # A checkpoint of another config would fail to restore like a damaged one: refuse it as what it is, from
        # the newest metadata that reads (a directory's steps all come from one run).
        for step in reversed(steps):
            try:
                existing_checkpoint(plan, role_dir, step=step)
                break
            except CheckpointCorruptError:
                continue
        _, _, good, skipped = ckpt.restore_newest_good(
            abstract_params=abstract_params,
            abstract_opt_state=abstract_like(jax.eval_shape(programs.optimizer.init, abstract_params)),
        )
    return existing_checkpoint(plan, role_dir, step=good["step"]), skipped


def set_aside_bad_steps(plan: RolePlan, role_dir: pathlib.Path, skipped: list[SkippedStep]) -> list[dict[str, Any]]:
    """Moves the steps :func:`newest_good_checkpoint` passed over to ``<role>/corrupt_checkpoints/`` (the run
    saves those step numbers again) and warns about each; returns what was moved, for the role's metrics."""
    moved = []
    if skipped:
        with Checkpointer(checkpoint_dir(role_dir), create=False) as ckpt:
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


def existing_checkpoint(plan: RolePlan, role_dir: pathlib.Path, *, step: int | None = None) -> dict[str, Any] | None:
    """The latest checkpoint's (or ``step``'s) metadata if it belongs to this plan, ``None`` if there is none; else
    refuses."""
    directory = checkpoint_dir(role_dir)
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
            "holdout_fraction, exclude_classes, exclude, evaluator_data and evaluator_fraction)"
        )
    if differences:
        raise CheckpointMismatchError(
            f"{str(directory)!r} holds a {plan.role} checkpoint (step {saved['step']}) trained with a different "
            f"config or data: {'; '.join(differences)}; pass --overwrite to discard it, or use another --workdir"
        )
    return saved


def on_shardings(abstract: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` restore targets carrying ``shardings`` (a pytree matching ``abstract``)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), abstract, shardings
    )
