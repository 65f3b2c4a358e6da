"""Clean interrupts: SIGINT (Ctrl-C) and SIGTERM (what schedulers send before a kill) stop a run at a safe point.

Inside :func:`stop_at_safe_points` (``train.py`` and ``unlearn.py`` run their whole job in it) the first SIGINT or
SIGTERM only records the signal; the run loops read :func:`requested` once per safe point -- training after each
epoch (one compiled program), unlearning before each step and after each saved (method, seed) result -- save what stopping would otherwise lose (the epoch
just finished; with ``checkpoint_every_steps``, the unlearning run's state) and raise :class:`Interrupted`
(:func:`stop`), which the command lines turn into one line saying what was saved and how to resume, and exit status
``128 + signal`` (130 for SIGINT, 143 for SIGTERM). Re-running the same command resumes, and ends as an
uninterrupted run would (bit for bit on CPU), as after a SIGKILL.

A second signal ends the process at once with that status, even while the main thread is inside a long XLA call
(where Python signal handlers cannot run): Python's C-level handler writes every signal to a wakeup pipe
(``signal.set_wakeup_fd``), and a watcher thread exits the process on the second. Every file is written
atomically, so that loses nothing already saved either.

Outside :func:`stop_at_safe_points` (a library user's own program) nothing is installed and :func:`requested` is
always ``None``. Signal handlers can only be installed from the main thread; elsewhere the block runs without them.
A multi-process run (``config.distributed``) gives the signals back to their default action once the processes
have joined (:func:`leave_to_default`): the processes would see a signal at different steps, and a safe point
would need a collective to agree on it; a killed multi-process run resumes from what it saved, as after a SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

__all__ = ["Interrupted", "leave_to_default", "requested", "stop", "stop_at_safe_points"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: signal.Signals | None = None
_previous: dict[signal.Signals, object] | None = None  # the handlers to put back, while the block is active


class Interrupted(Exception):  # noqa: N818 - named for what happened, like KeyboardInterrupt
    """A SIGINT or SIGTERM stopped the run at a safe point; ``exit_status`` is ``128 + signal``."""

    def __init__(self, signum: signal.Signals) -> None:
        self.signal = signal.Signals(signum)
        self.exit_status = 128 + int(self.signal)
        super().__init__(f"interrupted by {self.signal.name}")


def requested() -> signal.Signals | None:
    """The signal received inside :func:`stop_at_safe_points`, or ``None``. Read it once per safe point: save
    what is unsaved if it is set, then :func:`stop`."""
    return _received


def stop(signum: signal.Signals | None) -> None:
    """Raises :class:`Interrupted` for ``signum`` (a value :func:`requested` returned); nothing for ``None``."""
    if signum is not None:
        raise Interrupted(signum)


def _record(signum: int, frame: object) -> None:
    del frame
    global _received
    if _received is None:
        _received = signal.Signals(signum)


def _watch(read_end: int) -> None:
    """Counts the signals the C-level handler writes to the wakeup pipe; exits the process on the second."""
    count = 0
    while True:
        try:
            data = os.read(read_end, 16)
        except OSError:
            return
        if not data:  # the block ended: the write end was closed
            return
        for byte in data:
            if byte in (int(signal.SIGINT), int(signal.SIGTERM)):
                count += 1
                if count >= 2:
                    os._exit(128 + byte)


@contextlib.contextmanager
def stop_at_safe_points() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM are recorded for :func:`requested` instead of ending the process."""
    global _received, _previous
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _previous, _received = {signum: signal.getsignal(signum) for signum in _SIGNALS}, None
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(read_end,), name="gsu-interrupts", daemon=True)
    watcher.start()
    for signum in _SIGNALS:
        signal.signal(signum, _record)
    try:
        yield
    finally:
        leave_to_default()
        signal.set_wakeup_fd(previous_wakeup)
        os.close(write_end)
        watcher.join(timeout=5)
        os.close(read_end)
        _received = None


def leave_to_default() -> None:
    """Gives SIGINT and SIGTERM back to the handlers they had before :func:`stop_at_safe_points` (main thread; a
    no-op outside the block). :func:`gsu_jax.parallel.join_hosts` calls it when several processes have joined."""
    global _previous
    if _previous is None or threading.current_thread() is not threading.main_thread():
        return
    for signum, handler in _previous.items():
        signal.signal(signum, handler)
    _previous = None
