"""Resuming a (method, seed) run from inside it (``config.checkpoint_every_steps``; 0, the default, is off).

Every ``checkpoint_every_steps`` applied steps, :func:`gsu_jax.unlearning.loop.run_steps` saves what its loop
carries into ``<workdir>/inflight/<label>/seed_<s>/``: the parameters and optimizer state (an orbax step of
:class:`gsu_jax.checkpointing.Checkpointer`, verified by digest when read back), the parameters at the stopping
step once it is reached (``at_stop/``; they differ from the current ones when the run continues to the budget), and
in the step's metadata the host-side state: the next step, the log rows, both forget-fraction curves, the stopping
steps, the non-finite counts, the step times, and the digest of the run's identity (config, code, packages,
models, method, seed). A re-run of the same command restores it and continues from that step, so a run killed
near its end loses at most ``checkpoint_every_steps`` steps; the batches and keys of step ``t`` depend only on the
seed and ``t``, so the resumed run is bit-identical to an uninterrupted one on CPU. An in-flight state of another
run (another identity) is refused, like a saved result. The directory is removed once the run's result is saved.

Meant for long runs (a DDPM, a large model): for the small VAE runs a whole (method, seed) run takes seconds and
the per-run results already make a job resumable.
"""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax

from gsu_jax import checkpointing, io, parallel
from gsu_jax.unlearning.results import content_digest

__all__ = ["InflightState", "discard", "inflight_directory", "restore", "save"]

_INFLIGHT_DIR = "inflight"
_AT_STOP = "at_stop"


class InflightState(NamedTuple):
    """A run's loop state after ``host["next_step"]`` applied steps."""

    params: Any
    opt_state: Any
    params_at_stop: Any  # None until the stopping step is reached
    host: dict[str, Any]


def inflight_directory(workdir: pathlib.Path, label: str, seed: int) -> pathlib.Path:
    """``<workdir>/inflight/<label>/seed_<seed>``."""
    return workdir / _INFLIGHT_DIR / label / f"seed_{seed}"


def identity_digest(identity: Mapping[str, Any]) -> str:
    """The digest of a run's identity (what a resumed state must match), as saved results digest their content."""
    return content_digest(io.json_normalize(identity, sort_keys=True))


def save(directory: pathlib.Path, state: InflightState, identity: Mapping[str, Any]) -> None:
    """Saves ``state`` (every process its shards); the at-stop parameters once, at the first save after the stop."""
    step, stop = int(state.host["next_step"]), state.host["stop"]
    if stop is not None and stop != step:
        with checkpointing.Checkpointer(directory / _AT_STOP, max_to_keep=1) as ckpt:
            if ckpt.latest_step() != stop:
                ckpt.save(int(stop), state.params_at_stop, metadata={"role": "inflight_at_stop"})
    with checkpointing.Checkpointer(directory, max_to_keep=1) as ckpt:
        ckpt.save(
            step,
            state.params,
            _savable(state.opt_state),
            metadata={"role": "inflight", "identity_digest": identity_digest(identity), "host": state.host},
        )


def restore(
    directory: pathlib.Path, params0: Any, opt_state0: Any, identity: Mapping[str, Any]
) -> InflightState | None:
    """The saved in-flight state of this run, or ``None`` when there is none.

    Raises:
        checkpointing.CheckpointMismatchError: the state was saved by another run (config, code, models, ...).
        checkpointing.CheckpointCorruptError: its files do not verify.
    """
    if not directory.is_dir():
        return None
    with checkpointing.Checkpointer(directory, create=False) as ckpt:
        if ckpt.latest_step() is None:
            return None
        metadata = ckpt.read_metadata()
        if metadata.get("identity_digest") != identity_digest(identity):
            raise checkpointing.CheckpointMismatchError(
                f"{str(directory)!r} holds an interrupted run of another config, code or models; delete it to "
                "start that run from its first step"
            )
        opt_target = _savable(opt_state0)
        params, opt_state, _ = ckpt.restore(
            abstract_params=checkpointing.abstract_like(params0),
            abstract_opt_state=None if opt_target is None else checkpointing.abstract_like(opt_target),
        )
    host = metadata["host"]
    params_at_stop = None
    if host["stop"] is not None and host["stop"] != host["next_step"]:
        with checkpointing.Checkpointer(directory / _AT_STOP, create=False) as ckpt:
            params_at_stop, _, _ = ckpt.restore(abstract_params=checkpointing.abstract_like(params0))
    return InflightState(params, opt_state0 if opt_target is None else opt_state, params_at_stop, host)


def discard(directory: pathlib.Path) -> None:
    """Removes a finished run's in-flight state (process 0 only; the others go on without waiting for it)."""
    if parallel.is_main_process():
        shutil.rmtree(directory, ignore_errors=True)


def _savable(opt_state: Any) -> Any:
    """The optimizer state, or ``None`` when it holds no arrays (plain SGD): there is nothing to save then."""
    return opt_state if jax.tree.leaves(opt_state) else None
