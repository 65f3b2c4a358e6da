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
        interrupts.stop(interrupts.requested())  # nothing received: no-op
        os.kill(os.getpid(), sig)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert interrupts.requested() == sig
        with pytest.raises(interrupts.Interrupted) as excinfo:
            interrupts.stop(interrupts.requested())
        assert excinfo.value.exit_status == status and str(excinfo.value) == f"interrupted by {sig.name}"
    assert signal.getsignal(sig) is default and interrupts.requested() is None


def test_a_second_signal_ends_the_process_at_once_even_inside_a_c_call():
    """The child blocks in C (a pthread mutex locked twice: no signal interrupts it, as inside an XLA program), so
    no Python handler can run; the second SIGTERM must still end it, with status 143."""
    code = (
        "import ctypes, os, signal, sys\n"
        "from gsu_jax import interrupts\n"
        "mutex = ctypes.create_string_buffer(64)  # zeroed: PTHREAD_MUTEX_INITIALIZER on Linux\n"
        "pthread = ctypes.CDLL(None)\n"
        "with interrupts.stop_at_safe_points():\n"
        "    pthread.pthread_mutex_lock(mutex)\n"
        "    print('blocking', flush=True)\n"
        "    pthread.pthread_mutex_lock(mutex)  # never returns\n"
        "print('survived')\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "blocking"
        child.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert child.poll() is None  # the first signal only asks
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=20)
    finally:
        child.kill()
    assert child.returncode == 143, child.stderr.read()[-3000:]
