"""Checkpoints of trained and unlearned models: one small layer over orbax's ``CheckpointManager``.

A checkpoint directory holds one subdirectory per saved step; each step holds three orbax items:

* ``params`` -- the model parameters (the ``nnx.State`` of ``graphdef, params = nnx.split(model)``);
* ``opt_state`` -- the optax state (absent for a save without optimizer, e.g. an unlearned model);
* ``metadata`` -- JSON: the config, the fingerprint of the data, the model name and hyperparameters, the role,
  the step/epoch reached, the package versions, and ``params_digest``/``opt_state_digest``, sha256 digests of
  every saved array (:func:`state_digest`).

Guarantees:

* **Atomic saves.** orbax writes a step into a temporary directory and renames it when complete, so a run killed
  mid-save leaves the previous steps intact and no half step is ever listed; leftover temporary directories are
  removed when the manager opens. Saves here are synchronous (the step is on disk when :meth:`Checkpointer.save`
  returns) and :meth:`Checkpointer.wait_until_finished` is still called before every read.
* **No silent loads.** Every save ends by recording the size and sha256 of each file of the step in
  ``<step>/gsu_files.json`` (:data:`FILES_MANIFEST`); every read first checks the step's files against it, so a
  truncated, corrupted or deleted file is refused naming the step and the FILE before orbax opens anything
  (orbax/tensorstore fed a damaged OCDBT index leave reader threads that print tracebacks at interpreter exit).
  Then a restore goes against an abstract target (shapes, dtypes and shardings, built with
  ``jax.eval_shape``/``nnx.eval_shape`` from the model), and the restored arrays are hashed and compared with
  the digests saved with them (this also covers a step whose manifest was never written: a run killed between
  orbax's commit and the manifest). A bad step raises :class:`CheckpointCorruptError` naming the step, the file
  (when known) and the earlier steps that remain; :meth:`Checkpointer.restore_newest_good` skips bad steps and
  restores the newest one that verifies, saying which it skipped and why.
* **Clear refusals.** :class:`CheckpointNotFoundError` (no checkpoint where one is required),
  :class:`CheckpointMismatchError` (a workdir of another config or data: the differing keys are named),
  :class:`WorkdirError` (a directory that cannot be written, checked before any training).

Example:
    >>> import tempfile, jax.numpy as jnp
    >>> with Checkpointer(tempfile.mkdtemp() + "/ckpt", max_to_keep=2) as ckpt:
    ...     ckpt.save(10, {"w": jnp.ones(3)}, metadata={"role": "demo"})
    ...     params, opt_state, metadata = ckpt.restore(10, abstract_params=abstract_like({"w": jnp.ones(3)}))
    >>> params["w"].tolist(), metadata["role"], metadata["step"]
    ([1.0, 1.0, 1.0], 'demo', 10)
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from gsu_jax import io, provenance

__all__ = [
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "Checkpointer",
    "FILES_MANIFEST",
    "SkippedStep",
    "WorkdirError",
    "abstract_like",
    "ensure_writable_directory",
    "first_line",
    "leaf_shapes",
    "orbax_leaf_shapes",
    "restore_orbax_tree",
    "state_digest",
]

METADATA_FORMAT = "gsu_jax.checkpoint/v1"
# Written into each step directory after orbax has committed it: {relative path: {"size", "sha256"}}.
FILES_MANIFEST = "gsu_files.json"
_MAX_LISTED = 8


class CheckpointError(Exception):
    """Base class of the checkpoint refusals below."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No (complete) checkpoint where one is required."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint belongs to another config, model or data than the one asked for."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint on disk cannot be read back intact (truncated, corrupted, edited).

    Attributes:
        step: the bad step (``None`` when the error is about several steps).
        reason: why it is bad, without the remedy (e.g. ``"file '.../d/ab12' is truncated: ..."``).
    """

    step: int | None = None
    reason: str = ""


class WorkdirError(CheckpointError, OSError):
    """A working directory cannot be created or written."""


class SkippedStep(NamedTuple):
    """A step :meth:`Checkpointer.restore_newest_good` passed over: its number and why it failed to verify."""

    step: int
    reason: str


# ------------------------------------------------------------------------------------------- helpers


def state_digest(tree: Any) -> str:
    """sha256 hex digest of a pytree of arrays: its leaf count and each leaf's dtype, shape and bytes, in order.

    Bit-identical trees give the same digest; any flipped bit, changed shape or reordered leaf changes it. The
    treedef itself is left out (its printed form varies across flax versions); restoring against an abstract
    target fixes the structure.
    """
    leaves = jax.tree.leaves(tree)
    digest = hashlib.sha256(f"{len(leaves)} leaves".encode())
    for leaf in leaves:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and not leaf.is_fully_replicated:
            # Split over several hosts (a model-sharded multi-process run): every process gathers the whole array
            # (a collective; every process hashes the same trees in the same order).
            from jax.experimental import multihost_utils

            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def abstract_like(tree: Any) -> Any:
    """The abstract restore target of a pytree: ``jax.ShapeDtypeStruct`` leaves with a single-device sharding.

    ``tree`` may hold arrays or ``jax.ShapeDtypeStruct`` (e.g. the output of ``jax.eval_shape`` or the state of
    ``nnx.eval_shape``); leaves without a sharding get this process's first device (the default device; in a
    multi-process run each process restores its own copy).
    """
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def to_abstract(leaf: Any) -> jax.ShapeDtypeStruct:
        leaf_sharding = getattr(leaf, "sharding", None) or sharding
        return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=leaf_sharding)

    return jax.tree.map(to_abstract, tree)


def leaf_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``{"a/b/value": (shape, dtype)}`` of every leaf of a pytree of arrays or ``ShapeDtypeStruct``, in tree order
    (the paths as orbax names them in a checkpoint's metadata, so the two compare key by key)."""
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): (tuple(np.shape(leaf)), np.dtype(leaf.dtype))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def orbax_leaf_shapes(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """:func:`leaf_shapes` of a plain orbax checkpoint (``ocp.StandardCheckpointer().save(path, tree)``, not one of
    :class:`Checkpointer`'s steps), read from its metadata alone: no array is read.

    Raises:
        Exception: whatever orbax raises for a directory it cannot read (its types vary).
    """
    with ocp.StandardCheckpointer() as reader:
        tree = reader.metadata(pathlib.Path(path).expanduser().absolute()).item_metadata.tree
    return leaf_shapes(tree)


def restore_orbax_tree(path: str | os.PathLike, abstract: Any) -> Any:
    """Restores a plain orbax checkpoint onto ``abstract`` (e.g. :func:`abstract_like` of a model's state). It has
    no digest to verify against: the caller records :func:`state_digest` of what it read.

    Raises:
        Exception: whatever orbax raises for damaged or mismatched arrays.
    """
    with ocp.StandardCheckpointer() as reader:
        return reader.restore(pathlib.Path(path).expanduser().absolute(), abstract)


def ensure_writable_directory(path: str | os.PathLike, *, what: str = "workdir") -> pathlib.Path:
    """Creates ``path`` (and parents) if needed and proves it writable by writing and removing a probe file.

    Returns:
        The absolute, resolved path.

    Raises:
        WorkdirError: the directory cannot be created, is a file, or cannot be written; the message names it.
    """
    directory = pathlib.Path(path).expanduser().absolute()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:
        raise WorkdirError(f"{what} {str(directory)!r} exists and is not a directory") from err
    except OSError as err:
        raise WorkdirError(f"{what} {str(directory)!r} cannot be created: {err.strerror or err}") from err
    probe = directory / f".write-probe-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"probe")
    except OSError as err:
        raise WorkdirError(f"{what} {str(directory)!r} is not writable: {err.strerror or err}") from err
    finally:
        probe.unlink(missing_ok=True)
    return directory.resolve()


# ------------------------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Saves and restores ``(params, opt_state, metadata)`` steps in one directory (an orbax CheckpointManager).

    Args:
        directory: where the steps live; made absolute (orbax requires it); created when ``create``.
        max_to_keep: how many most recent steps to keep (older ones are deleted after each save).
        create: create the directory if missing (``False`` for read-only use: then a missing directory raises
            :class:`CheckpointNotFoundError`).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = None, create: bool = True):
        self.directory = pathlib.Path(directory).expanduser().absolute()
        if not create and not self.directory.is_dir():
            raise CheckpointNotFoundError(f"no checkpoint directory at {str(self.directory)!r}")
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1
        ):
            raise ValueError(f"max_to_keep must be an integer >= 1 or None, got {max_to_keep!r}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=create,
            # A run killed mid-save leaves a temporary directory; it is never a valid step, so remove it.
            cleanup_tmp_directories=create,
            # The caller donates its buffers to the next training step: the step must be on disk on return.
            enable_async_checkpointing=False,
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as err:
            raise WorkdirError(f"cannot open checkpoint directory {str(self.directory)!r}: {err}") from err

    # -- context manager
    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def wait_until_finished(self) -> None:
        """Blocks until every save issued so far is on disk."""
        self._manager.wait_until_finished()

    # -- listing
    def all_steps(self) -> list[int]:
        """The complete steps on disk, ascending."""
        self._manager.reload()
        return sorted(int(step) for step in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete step, or ``None`` when there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_path(self, step: int) -> pathlib.Path:
        """The directory of ``step``."""
        return self.directory / str(int(step))

    def delete_after(self, step: int) -> None:
        """Deletes every step newer than ``step`` (to restart from an earlier, good step)."""
        for newer in self.all_steps():
            if newer > step:
                self._manager.delete(newer)

    # -- saving
    def save(self, step: int, params: Any, opt_state: Any = None, *, metadata: Mapping[str, Any]) -> None:
        """Saves one step atomically and waits until it is on disk.

        Args:
            step: the step number (>= 0); the directory name.
            params: pytree of arrays (an ``nnx.State``).
            opt_state: optax state pytree, or ``None`` to save parameters only.
            metadata: JSON-serialisable mapping (converted by :func:`gsu_jax.io.json_normalize`); the keys
                ``format``, ``step``, ``has_opt_state``, ``params_digest``, ``opt_state_digest`` and ``versions``
                are filled in here.

        Raises:
            ValueError: a negative step, or ``metadata`` that cannot be stored as JSON.
            gsu_jax.io.WriteError: the write failed (disk full, permissions); the message names the step directory
                and the free space; the partial step is removed, the earlier steps stay.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        step = int(step)
        try:
            record = io.json_normalize(dict(metadata), sort_keys=True)
        except TypeError as err:
            raise ValueError(f"metadata of step {step} is not JSON-serialisable: {err}") from err
        record.update(
            format=METADATA_FORMAT,
            step=step,
            has_opt_state=opt_state is not None,
            params_digest=state_digest(params),
            opt_state_digest=None if opt_state is None else state_digest(opt_state),
            versions=provenance.package_versions(),
        )
        items = {"params": ocp.args.StandardSave(params), "metadata": ocp.args.JsonSave(record)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        try:
            self._manager.save(step, args=ocp.args.Composite(**items), force=True)
            self._manager.wait_until_finished()
        except (OSError, ValueError) as err:
            failure = _write_failure(err)
            if failure is None:
                raise
            # orbax writes into "<step>.orbax-checkpoint-tmp*" and renames only a complete step: drop the partial
            # one now (it holds the space the next attempt needs); the previous steps are untouched.
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
            raise io.write_error(f"checkpoint step {step} to", self.step_path(step), failure) from err
        # A failure here leaves a complete step without its file list, which reads verify by array digests alone.
        self._write_files_manifest(step)

    def _write_files_manifest(self, step: int) -> None:
        """Records size and sha256 of every file of the committed ``step`` (atomically: :func:`gsu_jax.io.atomic_file`;
        its temporary file is named after the manifest, which the listing leaves out)."""
        step_dir = self.step_path(step)
        files = {
            path.relative_to(step_dir).as_posix(): {"size": path.stat().st_size, "sha256": _file_sha256(path)}
            for path in sorted(step_dir.rglob("*"))
            if path.is_file() and FILES_MANIFEST not in path.name
        }
        record = {"format": METADATA_FORMAT, "files": files, "files_sha256": _records_sha256(files)}
        io.write_text(step_dir / FILES_MANIFEST, io.json_text(record, indent=1, sort_keys=True))

    def set_aside(self, step: int, into: str | os.PathLike) -> pathlib.Path:
        """Moves ``step``'s directory out of the checkpoint directory into ``into`` (kept for inspection).

        Used after :meth:`restore_newest_good` skipped a bad step: the run then saves that step number again.

        Returns:
            Where the step now lives (``into/<step>-<random suffix>``).
        """
        destination = pathlib.Path(into).expanduser().absolute() / f"{int(step)}-{uuid.uuid4().hex[:8]}"
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.step_path(step), destination)
        self._manager.reload()
        return destination

    # -- reading
    def verify_files(self, step: int) -> bool:
        """Checks every file of ``step`` against the sizes and sha256 digests recorded when it was saved.

        Nothing is handed to orbax, so a damaged OCDBT index or array file is refused here, by name.

        Returns:
            ``True`` when every recorded file matches; ``False`` when the step has no manifest (saved by an older
            version, or a run killed between orbax's commit and the manifest): then only the array digests of
            :meth:`restore` vouch for it.

        Raises:
            CheckpointCorruptError: a recorded file is missing, of another size or other content, or the manifest
                itself is unreadable; the message names the step and the file.
        """
        step_dir = self.step_path(step)
        manifest = step_dir / FILES_MANIFEST
        if not manifest.is_file():
            return False
        try:
            record = json.loads(manifest.read_text())
            files = record["files"]
            expected = {str(name): (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
            intact = record["files_sha256"] == _records_sha256(files)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise self._corrupt(
                step,
                f"file {str(manifest)!r} (the list of the step's files) is unreadable "
                f"({type(err).__name__}: {first_line(err)})",
            ) from err
        if not intact:
            raise self._corrupt(
                step,
                f"file {str(manifest)!r} (the list of the step's files) does not match its "
                "own digest (its bytes changed on disk)",
            )
        for name, (size, sha256) in sorted(expected.items()):
            path = step_dir / name
            if not path.is_file():
                raise self._corrupt(step, f"file {str(path)!r} is missing")
            found = path.stat().st_size
            if found != size:
                raise self._corrupt(
                    step,
                    f"file {str(path)!r} is {'truncated' if found < size else 'extended'}: "
                    f"{found} bytes, {size} were written",
                )
            if _file_sha256(path) != sha256:
                raise self._corrupt(
                    step,
                    f"file {str(path)!r} does not match the sha256 recorded at save time (its bytes changed on disk)",
                )
        return True

    def read_metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of ``step`` (default: the latest), without touching the arrays.

        Raises:
            CheckpointNotFoundError: no such step (or no step at all).
            CheckpointCorruptError: a file of the step does not match its manifest (:meth:`verify_files`), or the
                metadata is missing or unreadable.
        """
        step = self._existing_step(step)
        self._manager.wait_until_finished()
        self.verify_files(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
            record = restored.metadata
        except Exception as err:  # orbax raises assorted types (OSError, ValueError, JSONDecodeError, KeyError)
            raise self._corrupt(step, f"unreadable metadata ({type(err).__name__}: {first_line(err)})") from err
        if not isinstance(record, dict) or record.get("format") != METADATA_FORMAT or "params_digest" not in record:
            raise self._corrupt(step, "metadata is missing or not a gsu_jax checkpoint record")
        return record

    def restore(
        self, step: int | None = None, *, abstract_params: Any, abstract_opt_state: Any = None
    ) -> tuple[Any, Any, dict[str, Any]]:
        """Restores ``step`` (default: the latest) against abstract targets and verifies it bit for bit.

        Args:
            step: which step; ``None`` for the latest.
            abstract_params: restore target of the parameters (``abstract_like`` of the model's state, or of
                ``nnx.eval_shape(...)``'s state).
            abstract_opt_state: restore target of the optimizer state (``abstract_like(jax.eval_shape(opt.init,
                abstract_params))``), or ``None`` to restore the parameters only (then the digest is not
                checked against the optimizer state, which is not read).

        Returns:
            ``(params, opt_state_or_None, metadata)``.

        Raises:
            CheckpointNotFoundError: no such step.
            CheckpointCorruptError: arrays missing, unreadable, of other shapes, or not matching the digests
                recorded at save time (the message names the step, its path and the earlier steps).
            CheckpointMismatchError: an optimizer state is asked for but the step was saved without one.
        """
        metadata = self.read_metadata(step)
        step = metadata["step"]
        if abstract_opt_state is not None and not metadata.get("has_opt_state"):
            raise CheckpointMismatchError(
                f"checkpoint step {step} in {str(self.step_path(step))!r} holds no optimizer state to resume from"
            )
        items = {"params": ocp.args.StandardRestore(abstract_params)}
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # orbax/tensorstore raise assorted types for damaged or mismatched arrays
            raise self._corrupt(step, f"arrays cannot be restored ({type(err).__name__}: {first_line(err)})") from err
        params = restored.params
        opt_state = restored.opt_state if abstract_opt_state is not None else None
        self._check_shapes(step, abstract_params, params)
        if state_digest(params) != metadata["params_digest"]:
            raise self._corrupt(step, "restored parameters do not match the digest recorded at save time")
        if abstract_opt_state is not None:
            self._check_shapes(step, abstract_opt_state, opt_state)
            if state_digest(opt_state) != metadata["opt_state_digest"]:
                raise self._corrupt(step, "restored optimizer state does not match the digest recorded at save time")
        return params, opt_state, metadata

    def restore_newest_good(
        self, *, abstract_params: Any, abstract_opt_state: Any = None, at_most: int | None = None
    ) -> tuple[Any, Any, dict[str, Any], list[SkippedStep]]:
        """Restores the newest step (``<= at_most``) that verifies, passing over bad ones instead of failing.

        Args:
            abstract_params, abstract_opt_state: as for :meth:`restore`.
            at_most: the newest step to consider (``None``: all).

        Returns:
            ``(params, opt_state_or_None, metadata, skipped)``; ``skipped`` lists the newer steps passed over,
            newest first, each with why (:class:`SkippedStep`). Nothing is deleted or moved.

        Raises:
            CheckpointNotFoundError: no step at all.
            CheckpointCorruptError: no step verifies (the reason of each is named).
        """
        steps = [step for step in self.all_steps() if at_most is None or step <= at_most]
        if not steps:
            raise CheckpointNotFoundError(f"no checkpoint in {str(self.directory)!r}")
        skipped = []
        for step in reversed(steps):
            try:
                params, opt_state, metadata = self.restore(
                    step, abstract_params=abstract_params, abstract_opt_state=abstract_opt_state
                )
            except CheckpointCorruptError as err:
                skipped.append(SkippedStep(step, err.reason))
                continue
            return params, opt_state, metadata, skipped
        error = CheckpointCorruptError(
            f"no checkpoint in {str(self.directory)!r} verifies: "
            + "; ".join(f"step {item.step}: {item.reason}" for item in skipped)
            + "; start over with --overwrite"
        )
        error.reason = "no step verifies"
        raise error

    def _check_shapes(self, step: int, abstract: Any, restored: Any) -> None:
        if list(leaf_shapes(abstract).values()) != list(leaf_shapes(restored).values()):
            raise self._corrupt(step, "restored arrays have other shapes or dtypes than the model's")

    def _existing_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointNotFoundError(f"no checkpoint in {str(self.directory)!r}")
        if step is None:
            return steps[-1]
        if int(step) not in steps:
            raise CheckpointNotFoundError(
                f"no checkpoint step {step} in {str(self.directory)!r}; steps present: {_listing(steps)}"
            )
        return int(step)

    def _corrupt(self, step: int, reason: str) -> CheckpointCorruptError:
        earlier = [s for s in self.all_steps() if s < step]
        remedy = (
            f"earlier steps {_listing(earlier)} remain: resume from the newest of them that verifies with "
            "restore_fallback (train.py: --config.restore_fallback=True), or delete "
            f"{str(self.step_path(step))!r}; or start over with --overwrite"
            if earlier
            else "no earlier step remains: start over with --overwrite"
        )
        error = CheckpointCorruptError(
            f"checkpoint step {step} at {str(self.step_path(step))!r} is corrupt: {reason}; {remedy}"
        )
        error.step, error.reason = step, reason
        return error


def _records_sha256(files: Any) -> str:
    """sha256 of the canonical JSON of a manifest's file records (so a damaged record names the manifest)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def first_line(err: BaseException, limit: int = 160) -> str:
    """The first line of an error's message, cut to ``limit`` characters (refusals stay one line)."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _listing(values: Sequence[int]) -> str:
    values = list(values)
    shown = ", ".join(str(v) for v in values[:_MAX_LISTED])
    return shown + (f", ... ({len(values)} in all)" if len(values) > _MAX_LISTED else "")


def _write_failure(error: BaseException) -> OSError | None:
    """The OS error behind a failed checkpoint write, or ``None`` for another failure. orbax reports tensorstore's
    write errors as ``ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']")``, not as ``OSError``."""
    if isinstance(error, OSError):
        return error
    found = re.search(r"os_error_code='(\d+)'", str(error))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))
