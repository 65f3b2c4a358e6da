"""SIGINT and SIGTERM inside ``stop_at_safe_points``: the first is recorded and raised at the next safe point, a
second ends the process at once; outside the block nothing changes. (The command lines: test_faults.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from gsu_jax import interrupts


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_the_first_signal_is_raised_at_the_next_safe_point_with_its_exit_status(sig, status):
    default = signal.getsignal(sig)
    with interrupts.stop_at_safe_points():
        interrupts.check()  # nothing received: no-op
        os.kill(os.getpid(), sig)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert interrupts.requested() == sig
        with pytest.raises(interrupts.Interrupted) as excinfo:
            interrupts.check()
        assert excinfo.value.exit_status == status and str(excinfo.value) == f"interrupted by {sig.name}"
    assert signal.getsignal(sig) is default and interrupts.requested() is None
    interrupts.check()  # outside the block: never raises


def test_a_second_signal_ends_the_process_at_once():
    code = (
        "import os, signal, time\n"
        "from gsu_jax import interrupts\n"
        "with interrupts.stop_at_safe_points():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.05)\n"
        "    assert interrupts.requested() == signal.SIGTERM\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(30)\n"
        "print('survived')\n"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGTERM, done.stderr[-3000:]
    assert "survived" not in done.stdout and time.monotonic() - started < 25
