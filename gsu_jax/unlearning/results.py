r"""The saved-result store: each finished (method, seed) run on disk, read back by a re-run in the same workdir.

**Reproducibility and resumption.** Everything random derives from the config (:mod:`gsu_jax.unlearning.keys`), so
the same config gives the same report on the same device and software, except the fields listed in
:data:`gsu_jax.reporting.VOLATILE_REPORT_FIELDS` (wall-clock times, the command line, which results were resumed).
The report records the full config, the data fingerprints, the models' parameter digests, the package versions,
JAX's numeric flags, the device and the code (git commit and a digest of the ``gsu_jax`` sources).

Each finished (method, seed) run is saved as ONE JSON file, ``results/<label>/seed_<s>.json``, written atomically
(temporary file, fsync, rename) as the run's last act, after its sample grid and its unlearned parameters: the
file's presence means everything of that run is on disk. A run killed at any point and re-run with the same command
and workdir reads these files back instead of recomputing the runs (the resumed report equals the uninterrupted one
but for ``reporting.VOLATILE_REPORT_FIELDS``), after checking that each was computed by the same config, code,
packages, device and models (else it refuses to mix them); a run killed before its file was written is redone from
its first step.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from gsu_jax import checkpointing, io, provenance
from gsu_jax.unlearning.errors import SavedResultError, UnlearnConfigError

__all__ = [
    "check_saved_results",
    "config_identity",
    "load_result",
    "read_result",
    "result_path",
    "run_identity",
    "save_result",
]

_RESULT_FORMAT = "gsu_jax.unlearn_result/v1"
_RESULTS_DIR = "results"
# Config fields that choose which runs to do or where the models come from, not what one (method, seed) run
# computes: saved runs stay valid when they change. The models enter a run's identity by their parameter digests,
# the method's own optimizer and hyperparameters as resolved for it.
_SELECTION_FIELDS = (
    "methods",
    "seeds",
    "first_seed",
    "progress",
    "checkpoint",
    "oracle_checkpoint",
    "train_dir",
    "optimizer",
    "method_optimizers",
    "method_hparams",
    "checkpoint_every_steps",  # how often a run saves its state does not change what it computes
)
_MAX_DIFFERENCES = 3


def config_identity(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config fields that decide what one (method, seed) run computes (all but :data:`_SELECTION_FIELDS`)."""
    return io.json_normalize({key: value for key, value in config.items() if key not in _SELECTION_FIELDS})


def result_path(workdir: pathlib.Path, label: str, seed: int) -> pathlib.Path:
    """Where the result of (label, seed) is saved: ``<workdir>/results/<label>/seed_<seed>.json``."""
    return workdir / _RESULTS_DIR / label / f"seed_{seed}.json"


def content_digest(content: Mapping[str, Any]) -> str:
    """sha256 of the canonical (key-sorted) JSON of ``content``, a JSON-ready mapping."""
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def read_result(path: pathlib.Path) -> dict[str, Any]:
    """A saved result, checked against the digest stored with it; :class:`SavedResultError` names a bad file."""
    remedy = "delete it to recompute that run"
    try:
        saved = json.loads(path.read_text())
        content = saved["content"]
        intact = saved["format"] == _RESULT_FORMAT and saved["digest"] == content_digest(content)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SavedResultError(
            f"saved result {str(path)!r} is unreadable ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:120]}); {remedy}"
        ) from err
    if not intact:
        raise SavedResultError(
            f"saved result {str(path)!r} is damaged or was edited (its content does not match "
            f"the digest saved with it); {remedy}"
        )
    return content


def _mismatch_message(path: pathlib.Path, workdir: pathlib.Path, differences: Sequence[str]) -> str:
    shown = "; ".join(differences[:_MAX_DIFFERENCES])
    more = f" (and {len(differences) - _MAX_DIFFERENCES} more)" if len(differences) > _MAX_DIFFERENCES else ""
    return (
        f"workdir {str(workdir)!r} holds results of another run, which are not mixed with this one: "
        f"{str(path.relative_to(workdir))!r} differs in {shown}{more}; use another workdir, or delete "
        f"{str(workdir / _RESULTS_DIR)!r} to recompute every run"
    )


def check_saved_results(workdir: pathlib.Path, config: Mapping[str, Any]) -> None:
    """Refuses (before any work) a workdir whose saved runs used another config, code, packages or device.

    A damaged saved result is refused too, chained to its :class:`SavedResultError` (``unlearn.py`` exits 1 for
    damage on disk, 2 for a workdir of another run).
    """
    directory = workdir / _RESULTS_DIR
    if not directory.is_dir():
        return
    current = {"config": config_identity(config), **provenance.environment_identity()}
    for path in sorted(directory.glob("*/seed_*.json")):
        try:
            identity = read_result(path)["identity"]
        except SavedResultError as err:
            raise UnlearnConfigError(str(err)) from err
        differences = provenance.differences({key: identity.get(key) for key in current}, current)
        if differences:
            raise UnlearnConfigError(_mismatch_message(path, workdir, differences))


def run_identity(
    config: Mapping[str, Any], models: Mapping[str, str], threshold: float, gated_target: float
) -> dict[str, Any]:
    """What every (method, seed) result of this run shares and a saved one must match to be read back: the config
    identity, the environment (code, packages, device), the models' parameter digests, the threshold and
    ``sa_gated``'s target; a run adds its method, hyperparameters, optimizer and seed."""
    return {
        "config": config_identity(config),
        **provenance.environment_identity(),
        "models": models,
        "threshold": threshold,
        "gated_target": gated_target,
    }


def load_result(workdir: pathlib.Path, label: str, seed: int, identity: Mapping[str, Any]) -> dict[str, Any] | None:
    """The saved result of (label, seed), or ``None``.

    Raises:
        SavedResultError: the file is unreadable or damaged.
        checkpointing.CheckpointMismatchError: it was computed by another run (config, code, models, ...).
    """
    path = result_path(workdir, label, seed)
    if not path.is_file():
        return None
    content = read_result(path)
    differences = provenance.differences(content["identity"], identity)
    if differences:
        raise checkpointing.CheckpointMismatchError(_mismatch_message(path, workdir, differences))
    return content


def save_result(workdir: pathlib.Path, label: str, seed: int, content: Mapping[str, Any]) -> dict[str, Any]:
    """Writes a finished run's result atomically; returns it as it reads back (what the report is built from)."""
    content = io.json_normalize(content)
    path = result_path(workdir, label, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = {"format": _RESULT_FORMAT, "digest": content_digest(content), "content": content}
    io.write_text(path, io.json_text(saved, indent=None))
    return content
