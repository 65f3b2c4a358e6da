"""Files a run writes: atomic writers (text, bytes, JSON, CSV, PNG), the one JSON normaliser, image tiling.

Every file the project writes besides orbax's checkpoint arrays goes through :func:`atomic_file`: a temporary file
beside the target, fsynced, then renamed over it. A process killed at any point (even by SIGKILL) leaves the
previous complete file or none, never half of one. A write that fails (a disk that fills up mid-run, a quota, an I/O
error) raises :class:`WriteError`, naming the file and the free space left; the previous file stays as it was.

JSON: :func:`json_default` is the one hook for values the ``json`` module cannot write (numpy scalars and arrays,
JAX arrays, ``ml_collections.ConfigDict``); :func:`json_normalize` gives a value as JSON reads it back (tuples
become lists, numpy scalars plain numbers, keys strings), so that a live value compares equal to a saved one.
NaN and infinities are kept (``json`` writes them as ``NaN``/``Infinity``) unless ``nonfinite_as_null``, which
writes strict JSON (``null``), as the report does.

Nothing here touches JAX or matplotlib: figures are duck-typed (anything with ``savefig``).

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "out.json")
    >>> write_json(path, {"loss": float("nan"), "shape": (28, 28)}, indent=None, nonfinite_as_null=True)
    >>> open(path).read()
    '{"loss": null, "shape": [28, 28]}\\n'
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "WriteError",
    "atomic_file",
    "free_space",
    "json_default",
    "json_normalize",
    "json_text",
    "tile_images",
    "write_bytes",
    "write_csv",
    "write_error",
    "write_json",
    "write_png",
    "write_text",
]

# The process's file-creation mask (read once: os.umask can only be read by setting it).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_ENCODING = "utf-8"


class WriteError(OSError):
    """A file could not be written (disk full, quota, I/O error); the message names it and the free space left.
    Whatever complete file was there before is unchanged (a runtime failure: exit 1 from the command lines)."""


def free_space(path: str | os.PathLike) -> str:
    """``'<n> MiB free'`` on the file system holding ``path`` (its nearest existing parent), or ``''``."""
    candidate = os.path.abspath(os.fspath(path))
    while not os.path.exists(candidate) and os.path.dirname(candidate) != candidate:
        candidate = os.path.dirname(candidate)
    try:
        return f"{shutil.disk_usage(candidate).free / 2**20:.1f} MiB free"
    except OSError:
        return ""


def write_error(what: str, path: str | os.PathLike, error: OSError) -> WriteError:
    """The :class:`WriteError` for a failed write of ``what`` to ``path``: ``could not write <what> <path>: <OS
    error> (<n> MiB free on its file system)``; keeps the OS error's ``errno``."""
    free = free_space(path)
    where = f" ({free} on its file system)" if free else ""
    message = f"could not write {what}{' ' if what else ''}{str(os.fspath(path))!r}: {error.strerror or error}{where}"
    failure = WriteError(message)
    failure.errno = error.errno
    return failure


# ------------------------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[Any]:
    """Opens a temporary file beside ``path``; on a clean exit, fsyncs it and renames it over ``path``.

    A process killed (even by SIGKILL) or failing while writing leaves ``path`` as it was (absent or the previous
    complete file) and at most a ``.<name>.tmp-*`` file beside it, never a truncated ``path``: ``os.replace`` is
    atomic on POSIX file systems, and the directory is fsynced so the rename survives a crash.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "out.txt")
        >>> with atomic_file(path) as f:
        ...     _ = f.write("complete")
        >>> open(path).read()
        'complete'
    """
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=directory)
    except OSError as err:
        raise write_error("", os.path.join(directory, name), err) from err
    try:
        os.fchmod(handle, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the permissions open() would
        with os.fdopen(handle, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, os.path.join(directory, name))
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(err, WriteError):
            raise
        raise write_error("", os.path.join(directory, name), err) from err
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError):  # some file systems cannot open a directory; the rename is done anyway
        directory_handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_handle)
        finally:
            os.close(directory_handle)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to ``path`` (UTF-8, atomically)."""
    with atomic_file(path, encoding=_ENCODING) as f:
        f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` (atomically)."""
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """Writes a header of ``columns`` and one line per row (a column a row lacks is left empty), atomically."""
    with atomic_file(path, encoding=_ENCODING, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
        writer.writeheader()
        writer.writerows(rows)


def write_png(path: str | os.PathLike, figure: Any, **savefig_options: Any) -> None:
    """Renders a matplotlib ``figure`` as PNG in memory, then writes it atomically (never half a PNG on disk).

    ``savefig_options`` go to ``figure.savefig`` (e.g. ``dpi=110``); the bytes are those ``savefig(path)`` writes.
    """
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **savefig_options)
    write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------- JSON


def json_default(value: Any) -> Any:
    """The JSON-native stand-in for what ``json`` cannot write: the ``default=`` hook of every JSON dump here.

    numpy scalars become Python numbers, numpy and JAX arrays nested lists, a ``ConfigDict`` a dict.

    Raises:
        TypeError: anything else (naming its type and value).
    """
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        return value.to_dict()
    if hasattr(value, "tolist"):  # jax.Array
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as JSON")


def json_normalize(value: Any, *, sort_keys: bool = False, nonfinite_as_null: bool = False) -> Any:
    """``value`` as JSON reads it back: tuples become lists, numpy scalars plain numbers, keys strings.

    Comparing a live config with a saved one goes through this so that ``(28, 28, 1)`` equals ``[28, 28, 1]``.

    Args:
        value: anything :func:`json_default` accepts, nested in dicts, lists and tuples.
        sort_keys: order every dict's keys (as ``json.dumps(sort_keys=True)`` does); else keep their order.
        nonfinite_as_null: NaN and infinities become ``None`` (else they are kept, as JSON's ``NaN`` reads back).

    Example:
        >>> json_normalize({"b": (1, np.float32(0.5)), "a": np.nan}, sort_keys=True, nonfinite_as_null=True)
        {'a': None, 'b': [1, 0.5]}
    """
    normalized = json.loads(json.dumps(value, default=json_default, sort_keys=sort_keys))
    return _nonfinite_to_null(normalized) if nonfinite_as_null else normalized


def _nonfinite_to_null(value: Any) -> Any:
    """A JSON-read value with every non-finite float replaced by ``None``."""
    if isinstance(value, dict):
        return {key: _nonfinite_to_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_nonfinite_to_null(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_text(value: Any, *, indent: int | None = 2, sort_keys: bool = False, nonfinite_as_null: bool = False) -> str:
    """``value`` as JSON text (``indent=None``: one line), through :func:`json_default`; see :func:`json_normalize`."""
    if nonfinite_as_null:
        # Normalised in the requested key order already: dumping it again must not re-sort its (string) keys.
        return json.dumps(json_normalize(value, sort_keys=sort_keys, nonfinite_as_null=True), indent=indent)
    return json.dumps(value, default=json_default, indent=indent, sort_keys=sort_keys)


def write_json(
    path: str | os.PathLike,
    value: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
    nonfinite_as_null: bool = False,
) -> None:
    """Writes :func:`json_text` of ``value`` and a final newline to ``path`` (atomically)."""
    write_text(path, json_text(value, indent=indent, sort_keys=sort_keys, nonfinite_as_null=nonfinite_as_null) + "\n")


# ------------------------------------------------------------------------------------------- images


def tile_images(images: np.ndarray, columns: int, *, gap: int = 0, fill: float = 0.0) -> np.ndarray:
    """Tiles ``f32[N, H, W, C]`` images row by row into one ``f32[rows*(H+gap)-gap, columns*(W+gap)-gap, C]`` grid.

    ``gap`` pixels of ``fill`` separate neighbouring images; cells past the last image are ``fill`` too.

    Example:
        >>> tile_images(np.ones((3, 2, 2, 1)), 2, gap=1).shape
        (5, 5, 1)
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"tile_images expects f32[N, H, W, C], got shape {images.shape}")
    count, height, width, channels = images.shape
    rows = max(1, math.ceil(count / columns))
    grid = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, channels), fill, dtype=np.float32)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = row * (height + gap), column * (width + gap)
        grid[top : top + height, left : left + width] = image
    return grid
