"""One run per workdir: an exclusive OS advisory lock on a file inside it.

``train.py`` and ``unlearn.py`` (through :func:`gsu_jax.training.train_and_evaluate` and
:func:`gsu_jax.unlearning.unlearn_and_evaluate`) hold :func:`exclusive_workdir` while they write a workdir, so a
second run started on a busy workdir (a command re-run in another terminal, a scheduler retrying a job that is still
alive) is refused at once with :class:`WorkdirBusyError`, naming the workdir and the process that holds it, instead
of training the same roles into the same checkpoint folders.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on ``<workdir>/.gsu-lock``. The kernel ties it to the open file and drops
it when the holding process exits, however it exits (SIGKILL and power loss included), so a lock is never stale:
the empty file stays, and a later run simply locks it again. Nothing is written into it (a refused run leaves every
file as it was, modification times included); the refusal names the holder's process id as the kernel reports it
(``/proc/locks``, Linux). Within one process the lock is re-entrant (an unlearning
run whose ``train_dir`` is its own workdir trains into it while holding it). With several processes (multi-host
runs) only process 0 takes it: the others write nothing of their own to the workdir.

Example::

    >>> import tempfile
    >>> from gsu_jax.workdir_lock import exclusive_workdir
    >>> with tempfile.TemporaryDirectory() as workdir, exclusive_workdir(workdir):
    ...     pass  # another process calling exclusive_workdir(workdir) now gets WorkdirBusyError
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib
from collections.abc import Iterator

from gsu_jax import parallel
from gsu_jax.checkpointing import WorkdirError

__all__ = ["LOCK_FILE", "WorkdirBusyError", "exclusive_workdir", "lock_holder"]

LOCK_FILE = ".gsu-lock"

# Workdirs this process holds, with how many nested holds: flock locks belong to an open file description, so a
# second open-and-lock of the same file by the same process would refuse itself.
_held: dict[pathlib.Path, int] = {}


class WorkdirBusyError(WorkdirError):
    """Another process holds the workdir's lock (a usage error: exit 2 from the command lines)."""


def lock_holder(workdir: str | os.PathLike) -> int | None:
    """The id of the process holding ``workdir``'s lock, as the kernel reports it (``/proc/locks``: Linux, this
    host), or ``None`` when it is not held or the kernel does not say."""
    try:
        stat = os.stat(pathlib.Path(workdir) / LOCK_FILE)
        with open("/proc/locks", encoding="ascii") as table:
            rows = table.read().splitlines()
    except OSError:
        return None
    inode = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    for row in rows:
        # "1: FLOCK  ADVISORY  WRITE 27237 fe:00:2147848 0 EOF" (a blocked waiter's row reads "1: -> FLOCK ...").
        fields = row.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
            return int(fields[4]) if fields[4].isdigit() else None
    return None


@contextlib.contextmanager
def exclusive_workdir(workdir: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Holds ``workdir``'s exclusive lock for the ``with`` block (process 0 only; re-entrant in a process).

    Args:
        workdir: an existing, writable directory.

    Yields:
        The resolved workdir.

    Raises:
        WorkdirBusyError: another process holds it; the message names the workdir and the holder.
        WorkdirError: the lock file cannot be opened or locked for another reason (named with the OS error).
    """
    directory = pathlib.Path(workdir).expanduser().resolve()
    if directory in _held:  # nested (the same on every process)
        _held[directory] += 1
        try:
            yield directory
        finally:
            _held[directory] -= 1
        return
    descriptor, refusal = None, None
    if parallel.is_main_process():
        try:
            descriptor = _acquire(directory)
        except Exception as err:  # noqa: BLE001 - any failure must reach the broadcast, or the others would wait
            refusal = err
    try:
        # Every process stops when process 0 could not take the lock (the others would wait for it at a barrier).
        agreed = parallel.main_process_value(refusal is None)
    except BaseException:
        if descriptor is not None:
            os.close(descriptor)
        raise
    if not agreed:
        raise refusal or WorkdirBusyError(f"workdir {str(directory)!r}: process 0 could not lock it (see its error)")
    _held[directory] = 1
    try:
        yield directory
    finally:
        del _held[directory]
        if descriptor is not None:
            os.close(descriptor)  # releases the lock


def _acquire(directory: pathlib.Path) -> int:
    """Opens (creating it empty) and locks ``<directory>/.gsu-lock``; returns the open descriptor."""
    path = directory / LOCK_FILE
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError as err:
        raise WorkdirError(f"cannot open the lock file {str(path)!r}: {err.strerror or err}") from err
    try:
        _lock(descriptor, directory)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _lock(descriptor: int, directory: pathlib.Path) -> None:
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise WorkdirError(f"cannot lock workdir {str(directory)!r}: {err.strerror or err}") from err
        holder = lock_holder(directory)
        who = f"process {holder} on this host" if holder else "another process"
        raise WorkdirBusyError(
            f"workdir {str(directory)!r} is in use by {who} (it holds {LOCK_FILE}); wait for that run to finish or "
            "stop it, or use another --workdir"
        ) from None
