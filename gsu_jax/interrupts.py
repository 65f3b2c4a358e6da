"""Clean interrupts: SIGINT (Ctrl-C) and SIGTERM (what schedulers send before a kill) stop a run at a safe point.

Inside :func:`stop_at_safe_points` (``train.py`` and ``unlearn.py`` run their whole job in it) the first SIGINT or
SIGTERM only records the signal; the run loops call :func:`check` where stopping loses nothing that could be kept:
training after the epoch in flight (one compiled program) has ended and been checkpointed, unlearning before each
step (the (method, seed) run in flight is abandoned; finished ones are already saved). :func:`check` then raises
:class:`Interrupted`, which the command lines turn into one line saying what was saved and how to resume, and exit
status ``128 + signal`` (130 for SIGINT, 143 for SIGTERM). Re-running the same command resumes, and ends as an
uninterrupted run would (bit for bit on CPU), as after a SIGKILL.

The first signal also restores the default handlers, so a second signal ends the process at once (the kernel's
default action, even inside a long XLA call). Every file is written atomically, so that loses nothing already
saved either.

Outside :func:`stop_at_safe_points` (a library user's own program) nothing is installed and :func:`check` never
raises. Signal handlers can only be installed from the main thread; elsewhere the block runs without them.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

__all__ = ["Interrupted", "check", "requested", "stop_at_safe_points"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: signal.Signals | None = None


class Interrupted(Exception):  # noqa: N818 - named for what happened, like KeyboardInterrupt
    """A SIGINT or SIGTERM stopped the run at a safe point; ``exit_status`` is ``128 + signal``."""

    def __init__(self, signum: signal.Signals) -> None:
        self.signal = signal.Signals(signum)
        self.exit_status = 128 + int(self.signal)
        super().__init__(f"interrupted by {self.signal.name}")


def requested() -> signal.Signals | None:
    """The signal received inside :func:`stop_at_safe_points`, or ``None``."""
    return _received


def check() -> None:
    """Raises :class:`Interrupted` if a SIGINT or SIGTERM arrived (called by the run loops at their safe points)."""
    if _received is not None:
        raise Interrupted(_received)


def _record(signum: int, frame: object) -> None:
    del frame
    global _received
    _received = signal.Signals(signum)
    for other in _SIGNALS:  # a second signal takes the default action: the process ends at once
        signal.signal(other, signal.SIG_DFL)


@contextlib.contextmanager
def stop_at_safe_points() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM are recorded for :func:`check` instead of ending the process."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    _received = None
    for signum in _SIGNALS:
        signal.signal(signum, _record)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received = None
